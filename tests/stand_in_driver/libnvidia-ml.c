/* A stand-in NVIDIA Management Library, libnvidia-ml.so.1: the calls that TensorFlow and
 * job/accelerators.py make to ask the driver about its GPUs (start, device count, handle, name,
 * driver and CUDA versions), answering for the devices of the stand-in libcuda.so.1
 * (STAND_IN_GPU_COUNT, STAND_IN_GPU_NAME).
 * Values and names from NVML's nvml.h (driver 575). Built by tests/gpu_stand_in.py. */
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

enum { NVML_SUCCESS = 0, NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_INSUFFICIENT_SIZE = 7,
       NVML_ERROR_NOT_SUPPORTED = 3 };

static struct nvmlDevice_st { int index; } devices[16];

static unsigned int gpu_count(void) {
  const char *count = getenv("STAND_IN_GPU_COUNT");
  int n = count && *count ? atoi(count) : 1;
  return n < 0 ? 0 : n > 16 ? 16 : (unsigned int)n;
}

static nvmlReturn_t copy_text(const char *text, char *out, unsigned int length) {
  if (!out) return NVML_ERROR_INVALID_ARGUMENT;
  if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  strcpy(out, text);
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlInit(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return NVML_SUCCESS; }
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
  if (!count) return NVML_ERROR_INVALID_ARGUMENT;
  *count = gpu_count();
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
  if (!device || index >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
  devices[index].index = (int)index;
  *device = &devices[index];
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
  return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
  const char *given = getenv("STAND_IN_GPU_NAME");
  if (device < devices || device >= devices + gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
  return copy_text(given && *given ? given : "NVIDIA L4", name, length);
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
  return copy_text("575.57.08", version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
  if (!version) return NVML_ERROR_INVALID_ARGUMENT;
  *version = 12090;
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

const char *nvmlErrorString(nvmlReturn_t result) {
  return result == NVML_SUCCESS ? "Success" : "stand-in NVML error";
}
