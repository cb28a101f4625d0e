"""TensorFlow's GPU start-up: the CUDA libraries it must find, and why it registered no GPU.

TensorFlow 2.21's GPU build opens the driver (libcuda.so.1, libnvidia-ml.so.1), then its
CUDA libraries by soname, along the RUNPATH of libtensorflow_framework.so.2, and registers
no GPU at all when one of them is missing ("Cannot dlopen some GPU libraries ... Skipping
registering GPU devices"). Two of the libraries pip's NVIDIA wheels bring are not where
their users look (`readelf -d`, TensorFlow 2.21 with the wheels of requirements/constraints-gpu.txt):

- libcusolver.so.11: libtensorflow_framework.so.2's RUNPATH lists site-packages/nvidia/
  {nccl,cuda_cupti,cublas,cudnn,cufft,cusparse,cuda_runtime,nvshmem}/lib but not
  nvidia/cusolver/lib (only libtensorflow_cc.so.2 does), so TensorFlow cannot open it;
- libnvrtc.so.12: cuDNN 9's sub-libraries look in $ORIGIN/../../nvrtc/lib, but the wheel's
  folder is nvidia/cuda_nvrtc/lib, so cuDNN's runtime-compiled engines cannot load it.

`preload` (called by `import job`, before TensorFlow loads) opens both from their wheels:
a later dlopen by soname finds a library already loaded, whatever the search path says.
That serves the trainer image, a VM and a workstation installed with `.[gpu]` alike, with no
environment to set before the process starts. tests/test_gpu_startup.py shows it under a
stand-in NVIDIA driver: without the preload TensorFlow lists no GPU.

For a job given GPUs, the guard (job/accelerators.py) first has TensorFlow start in a child
process, `start_in_a_fresh_process`, with its loader's own lines turned on: a missing cuDNN
sub-library aborts the process that loads it, so the job's own process starts TensorFlow's
GPU runtime only once the child has. Where the child saw fewer GPUs than given, `diagnose`
names the driver's error or the first library TensorFlow (or cuDNN) failed to open.
"""

import ctypes
import dataclasses
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys

# What TensorFlow and cuDNN cannot find in the wheels by themselves (see the module's docstring).
PRELOADED = ("libcusolver.so.11", "libnvrtc.so.12")
# Where pip's NVIDIA wheels put what TensorFlow and cuDNN open (site-packages/nvidia/<folder>/lib).
WHEEL_FOLDERS = {"libcudart.so.12": "cuda_runtime", "libcublas.so.12": "cublas", "libcublasLt.so.12": "cublas",
                 "libcufft.so.11": "cufft", "libcusolver.so.11": "cusolver", "libcusparse.so.12": "cusparse",
                 "libcupti.so.12": "cuda_cupti", "libnvJitLink.so.12": "nvjitlink", "libnccl.so.2": "nccl",
                 "libnvrtc.so.12": "cuda_nvrtc"}  # and cuDNN's libcudnn*.so.9 in cudnn
# Opened at the first collective step, not at start-up: a job of several GPUs or workers needs it.
NCCL = "libnccl.so.2"
# The driver's own libraries (from the host; NVIDIA's container toolkit mounts libcuda with
# the "compute" capability and libnvidia-ml, which TensorFlow needs too, with "utility").
DRIVER_LIBRARIES = {"libcuda.so.1": "compute", "libnvidia-ml.so.1": "utility"}

# The driver API's codes that cuInit returns (cuda.h of CUDA 12.9).
CUDA_ERRORS = {
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY: the libcuda.so.1 loaded is the CUDA toolkit's stub, not the driver (a "
        "stubs folder such as /usr/local/cuda/lib64/stubs is on LD_LIBRARY_PATH ahead of the driver's)",
    46: "CUDA_ERROR_DEVICE_UNAVAILABLE: the GPUs are busy or in exclusive use by another process",
    100: "CUDA_ERROR_NO_DEVICE: the driver sees no GPU (check NVIDIA_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES)",
    101: "CUDA_ERROR_INVALID_DEVICE",
    303: "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED",
    304: "CUDA_ERROR_OPERATING_SYSTEM: the driver's device files (/dev/nvidia*) cannot be opened",
    802: "CUDA_ERROR_SYSTEM_NOT_READY: a driver service is not running (NVSwitch machines need the fabric manager)",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: the driver's library and kernel module are of different versions",
    804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}

_preloaded: dict[str, str] = {}  # soname → the path opened, or why it could not be
_tensorflow_loaded_first = False


def nvidia_roots() -> list[str]:
  """site-packages/nvidia folders (pip's NVIDIA wheels), found without importing anything."""
  spec = importlib.util.find_spec("nvidia")
  return list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []


def wheel_path(soname: str, folder: str) -> str | None:
  for root in nvidia_roots():
    path = os.path.join(root, folder, "lib", soname)
    if os.path.exists(path):
      return path
  return None


def preload():
  """Opens the libraries of PRELOADED from their wheels, once, where the wheels are installed
  (nothing happens without them: a CPU install)."""
  global _tensorflow_loaded_first
  if _preloaded or not nvidia_roots():
    return
  _tensorflow_loaded_first = "tensorflow" in sys.modules
  for soname in PRELOADED:
    path = wheel_path(soname, WHEEL_FOLDERS[soname])
    try:
      if path is None:
        raise OSError(f"not in site-packages/nvidia/{WHEEL_FOLDERS[soname]}/lib")
      ctypes.CDLL(path)
      _preloaded[soname] = path
    except OSError as e:
      _preloaded[soname] = f"not loaded: {e}"


def resolves(soname: str) -> bool:
  """Whether a dlopen of `soname` would find it: loaded already, in a wheel folder TensorFlow
  searches, on LD_LIBRARY_PATH, or known to the system's loader."""
  if os.path.exists(_preloaded.get(soname, "")) or wheel_path(soname, WHEEL_FOLDERS[soname]):
    return True
  if any(os.path.exists(os.path.join(d, soname)) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d):
    return True
  try:
    return soname in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return False


def missing_for(several_devices: bool) -> str | None:
  """What a job needs beyond registering its GPUs and cannot find: cuDNN's nvrtc, and NCCL for
  a job of several GPUs or workers (TensorFlow opens it at the first collective step)."""
  needed = ["libnvrtc.so.12"] + ([NCCL] if several_devices else [])
  for soname in needed:
    if not resolves(soname):
      why = ("TensorFlow opens it at the first step that reduces across GPUs or workers" if soname == NCCL
             else "cuDNN's runtime-compiled engines need it")
      return f"{soname} cannot be found ({why}): {_wheel_advice(soname)}"
  return None


def _wheel_advice(soname: str) -> str:
  folder = "cudnn" if soname.startswith("libcudnn") else WHEEL_FOLDERS.get(soname)
  where = (f"it comes from pip's nvidia-{folder.replace('_', '-')}-cu12 wheel (site-packages/nvidia/{folder}/lib); "
           if folder else "")
  return f"{where}install the package with its gpu extra (pip install '.[gpu]'), which brings every CUDA library"


# --- TensorFlow's start-up in a child process, and why it registered fewer GPUs --------------

# Run by `start_in_a_fresh_process`: `import job` preloads, as in the job itself.
_PROBE = ("import json, job\nfrom job import accelerators\n"
          "print('GPUS=' + json.dumps(accelerators.visible_gpus()), flush=True)\n")


@dataclasses.dataclass(frozen=True)
class StartUp:
  gpus: list[str] | None  # the GPUs TensorFlow registered, or None when the process failed
  returncode: int
  log: str  # TensorFlow's own lines, its loader's included


@functools.cache
def start_in_a_fresh_process(timeout: float = 180) -> StartUp:
  """TensorFlow's GPU start-up in a child process, its loader's lines on (TF_CPP_VMODULE: they
  are VLOG lines, which no log level shows): what it registered, and what it said. Once per
  process (the preflight's device and accelerator checks share it)."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "dso_loader=2",
         "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
  try:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                            env=env)
  except subprocess.TimeoutExpired:
    return StartUp(None, -1, f"TensorFlow's GPU start-up did not finish in {timeout:.0f} s")
  found = re.search(r"^GPUS=(.*)$", result.stdout, re.M)
  return StartUp(json.loads(found.group(1)) if found and result.returncode == 0 else None, result.returncode,
                 result.stderr)


def _library_failure(log: str) -> str | None:
  """The first library TensorFlow (or cuDNN, loading its sub-libraries) said it could not open."""
  failed = re.search(r"Could not load dynamic library '([^']+)'; dlerror: ([^;\n]+)", log)
  if failed:
    soname, error = failed.groups()
    if soname in DRIVER_LIBRARIES:
      return (f"TensorFlow could not open {soname} ({error.strip()}), a library of the NVIDIA driver: a "
              f"container gets it from the host when NVIDIA_DRIVER_CAPABILITIES includes "
              f"{DRIVER_LIBRARIES[soname]} (the trainer image sets compute,utility)")
    return f"TensorFlow could not open {soname} ({error.strip()}): {_wheel_advice(soname)}"
  cudnn = re.search(r"Unable to load any of \{([^}]*)\}", log)  # cuDNN's own loader
  if cudnn:
    names = [n.strip() for n in cudnn.group(1).split(",")]
    soname = next((n for n in names if re.fullmatch(r"lib\w+\.so\.\d+", n)), names[0])
    return f"cuDNN could not open {soname}, one of its sub-libraries: {_wheel_advice(soname)}"
  return None


def driver_failure(load=ctypes.CDLL) -> str | None:
  """Why the NVIDIA driver cannot serve TensorFlow (missing, not NVIDIA's, cuInit failing), or None."""
  return _driver_failure(load)[0]


def _driver_failure(load) -> tuple[str | None, str]:
  """(why the driver failed, or None; what it says of itself)."""
  try:
    cuda = load("libcuda.so.1")
  except OSError as e:
    return (f"libcuda.so.1 cannot be loaded ({e}): no NVIDIA driver in this environment (a container needs "
            "the host's driver mounted: Vertex AI does it for GPU machines, Docker needs --gpus all with "
            "NVIDIA's container toolkit)"), ""
  try:
    init, get_version, get_count = cuda.cuInit, cuda.cuDriverGetVersion, cuda.cuDeviceGetCount
  except AttributeError as e:
    return (f"the libcuda.so.1 loaded ({_loaded_path('libcuda.so.1')}) is not NVIDIA's driver library: "
            f"{str(e).splitlines()[0]}"), ""
  status = init(0)
  if status:
    return f"the NVIDIA driver failed to start: cuInit returned {status} ({CUDA_ERRORS.get(status, 'see cuda.h')})", ""
  version, count = ctypes.c_int(0), ctypes.c_int(0)
  get_version(ctypes.byref(version))
  get_count(ctypes.byref(count))
  return None, f"the driver (CUDA {version.value // 1000}.{version.value % 1000 // 10}) sees {count.value} GPU(s)"


def _loaded_path(soname: str) -> str:
  try:
    with open("/proc/self/maps") as maps:
      return next((line.split()[-1] for line in maps if line.rstrip().endswith("/" + soname)), soname)
  except OSError:
    return soname


def diagnose(started: StartUp | None = None, load=ctypes.CDLL) -> str:
  """Why TensorFlow registered fewer GPUs than given: the driver first (libcuda.so.1, cuInit),
  then the first library TensorFlow's own start-up failed to open, or how that start-up ended."""
  driver_failed, driver = _driver_failure(load)
  if driver_failed:
    return driver_failed
  started = started or start_in_a_fresh_process()
  library = _library_failure(started.log)
  if library:
    return f"{driver}, but {library}"
  if started.gpus is None:
    last = [line for line in started.log.strip().splitlines() if line.strip()][-1:] or ["no output"]
    how = f"was killed by signal {-started.returncode}" if started.returncode < 0 else f"exited {started.returncode}"
    return f"{driver}, but TensorFlow's GPU start-up {how}: {last[0][:300]}"
  if _tensorflow_loaded_first:
    return (f"{driver}; TensorFlow was imported before the job's package, so the CUDA libraries it cannot "
            f"find by itself were not preloaded (import job first)")
  return (f"{driver}, and TensorFlow's start-up opened every GPU library and registered {len(started.gpus)}"
          + (f" ({', '.join(started.gpus)})" if started.gpus else "")
          + (f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in os.environ
             else ""))
