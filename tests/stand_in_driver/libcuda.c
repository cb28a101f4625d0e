/* A stand-in NVIDIA driver: libcuda.so.1 with one GPU that TensorFlow can find and name, and on
 * which nothing can run. It answers the driver API calls TensorFlow makes while it registers a
 * device (cuInit, the device count, name, attributes, memory size, PCI bus id, UUID) and fails
 * every context or memory call with CUDA_ERROR_NOT_SUPPORTED (801), so that TensorFlow walks its
 * real start-up (the driver, then its CUDA libraries, then device registration) and stops there.
 *
 * The devices: STAND_IN_GPU_COUNT of them (default 1), named STAND_IN_GPU_NAME (default
 * "NVIDIA L4"), of compute capability 8.9. STAND_IN_CUINIT_STATUS makes cuInit return that
 * status instead (e.g. 100, no device).
 * Values and enum numbers from CUDA 12.9's cuda.h. Built by tests/gpu_stand_in.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_INVALID_DEVICE = 101,
       CUDA_ERROR_NOT_SUPPORTED = 801 };

static int gpu_count(void) {
  const char *count = getenv("STAND_IN_GPU_COUNT");
  return count && *count ? atoi(count) : 1;
}

static const char *gpu_name(void) {
  const char *name = getenv("STAND_IN_GPU_NAME");
  return name && *name ? name : "NVIDIA L4";
}

CUresult cuInit(unsigned int flags) {
  const char *status = getenv("STAND_IN_CUINIT_STATUS");
  (void)flags;
  return status && *status ? atoi(status) : CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
  if (!version) return CUDA_ERROR_INVALID_VALUE;
  *version = 12090;  /* CUDA 12.9, what a 575-series driver reports */
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
  if (!count) return CUDA_ERROR_INVALID_VALUE;
  *count = gpu_count();
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  if (!device) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal < 0 || ordinal >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int length, CUdevice device) {
  if (!name || length <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  strncpy(name, gpu_name(), length - 1);
  name[length - 1] = '\0';
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  if (!value) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  switch (attribute) {
    case 1: *value = 1024; break;         /* max threads per block */
    case 2: case 3: *value = 1024; break; /* max block dim x, y */
    case 4: *value = 64; break;           /* max block dim z */
    case 5: *value = 2147483647; break;   /* max grid dim x */
    case 6: case 7: *value = 65535; break;
    case 8: *value = 49152; break;        /* shared memory per block */
    case 10: *value = 32; break;          /* warp size */
    case 13: *value = 2040000; break;     /* clock rate, kHz */
    case 16: *value = 58; break;          /* multiprocessor count (an L4 has 58) */
    case 33: *value = 1 + device; break;  /* PCI bus id */
    case 34: *value = 0; break;           /* PCI device id */
    case 36: *value = 6251000; break;     /* memory clock rate, kHz */
    case 37: *value = 192; break;         /* global memory bus width, bits */
    case 38: *value = 50331648; break;    /* L2 cache size */
    case 39: *value = 1536; break;        /* max threads per multiprocessor */
    case 41: *value = 1; break;           /* unified addressing */
    case 50: *value = 0; break;           /* PCI domain id */
    case 75: *value = 8; break;           /* compute capability major */
    case 76: *value = 9; break;           /* compute capability minor */
    case 81: *value = 102400; break;      /* shared memory per multiprocessor */
    case 82: *value = 65536; break;       /* registers per multiprocessor */
    case 97: *value = 101376; break;      /* shared memory per block, opt-in */
    default: *value = 0;
  }
  return CUDA_SUCCESS;
}

CUresult cuDeviceComputeCapability(int *major, int *minor, CUdevice device) {
  if (!major || !minor) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  *major = 8;
  *minor = 9;
  return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = (size_t)23034 << 20;  /* an L4's 22.5 GiB */
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetPCIBusId(char *bus_id, int length, CUdevice device) {
  if (!bus_id || length <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  snprintf(bus_id, length, "0000:%02x:00.0", 1 + device);
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device) {
  if (!uuid) return CUDA_ERROR_INVALID_VALUE;
  if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
  memcpy(uuid->bytes, "stand-in-gpu-000", 16);
  uuid->bytes[15] = (char)('0' + device);
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) { return cuDeviceGetUuid(uuid, device); }

CUresult cuGetErrorString(CUresult error, const char **text) {
  if (!text) return CUDA_ERROR_INVALID_VALUE;
  *text = error == CUDA_ERROR_NOT_SUPPORTED ? "operation not supported (a stand-in driver: nothing runs)"
                                            : "stand-in driver error";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **text) {
  if (!text) return CUDA_ERROR_INVALID_VALUE;
  *text = error == CUDA_ERROR_NOT_SUPPORTED ? "CUDA_ERROR_NOT_SUPPORTED" : "CUDA_ERROR_UNKNOWN";
  return CUDA_SUCCESS;
}

/* Contexts and memory: nothing can run on a stand-in. */
CUresult cuDevicePrimaryCtxRetain(void **context, CUdevice device) { (void)context; (void)device; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { (void)device; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuDevicePrimaryCtxGetState(CUdevice device, unsigned int *flags, int *active) {
  (void)device;
  if (flags) *flags = 0;
  if (active) *active = 0;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice device, unsigned int flags) { (void)device; (void)flags; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuCtxCreate_v2(void **context, unsigned int flags, CUdevice device) { (void)context; (void)flags; (void)device; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuCtxSetCurrent(void *context) { (void)context; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuCtxGetCurrent(void **context) { if (context) *context = 0; return CUDA_SUCCESS; }
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) { (void)free_bytes; (void)total_bytes; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t bytes) { (void)pointer; (void)bytes; return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuDeviceCanAccessPeer(int *can, CUdevice device, CUdevice peer) { (void)device; (void)peer; if (can) *can = 0; return CUDA_SUCCESS; }
