"""What a job was given, and whether TensorFlow sees it: one GPU table for the launcher and the job.

The launcher (launch/vertex.py) checks a machine against the table before it submits
anything, and tells the job what it asked for in the container's environment
(EXPECTED_ACCELERATOR_ENV, "NVIDIA_L4:1": type and count per replica; an environment
variable, so that an image built before it is not broken by an unknown flag).
launch.multi_gpu counts a VM's GPUs without TensorFlow; `job.train
--expected_accelerator` says it by hand. `guard` then compares it with what TensorFlow
sees, before any data is read: a job billed for GPUs never trains on the CPU in silence.

TensorFlow's own "Cannot dlopen some GPU libraries" is a C++ log line that Python cannot
see, and a missing cuDNN sub-library aborts the process: the guard first has TensorFlow
start in a child process (job/gpu_startup.py), and only then in the job's. This module
imports no TensorFlow at module level (the launchers use the table).
"""

import dataclasses
import os
import re

from absl import logging

from job import gpu_startup
from tfrecords import cli

EXPECTED_ACCELERATOR_ENV = "EXPECTED_ACCELERATOR"


@dataclasses.dataclass(frozen=True)
class Gpu:
  model: str  # how TensorFlow's device name shows it ("NVIDIA L4", "Tesla T4", "NVIDIA A100-SXM4-80GB")
  compute_capability: tuple[int, int]
  arm_only: bool = False  # on Vertex AI only in ARM machines, which cannot run this x86 image

  def matches(self, device_name: str) -> bool:
    return re.search(rf"(^|[\s-]){re.escape(self.model)}($|[\s-])", device_name) is not None


# Vertex AI's accelerator names → the GPU. Compute capabilities from NVIDIA's CUDA GPU list.
GPUS = {
    "NVIDIA_TESLA_K80": Gpu("K80", (3, 7)),
    "NVIDIA_TESLA_P4": Gpu("P4", (6, 1)),
    "NVIDIA_TESLA_P100": Gpu("P100", (6, 0)),
    "NVIDIA_TESLA_V100": Gpu("V100", (7, 0)),
    "NVIDIA_TESLA_T4": Gpu("T4", (7, 5)),
    "NVIDIA_TESLA_A100": Gpu("A100", (8, 0)),
    "NVIDIA_A100_80GB": Gpu("A100", (8, 0)),
    "NVIDIA_L4": Gpu("L4", (8, 9)),
    "NVIDIA_H100_80GB": Gpu("H100", (9, 0)),
    "NVIDIA_H100_MEGA_80GB": Gpu("H100", (9, 0)),
    "NVIDIA_H200_141GB": Gpu("H200", (9, 0)),
    "NVIDIA_B200": Gpu("B200", (10, 0)),
    "NVIDIA_GB200": Gpu("GB200", (10, 0), arm_only=True),
    "NVIDIA_RTX_PRO_6000": Gpu("RTX PRO 6000", (12, 0)),
}
# TensorFlow 2.21's GPU build carries kernels for sm_60 and newer (tf.sysconfig.get_build_info():
# sm_60, sm_70, sm_80, sm_89, compute_90), and the pinned cuDNN (requirements/constraints-gpu.txt)
# supports Maxwell and newer: a Kepler K80 (also retired by Vertex AI) can run neither.
MIN_COMPUTE_CAPABILITY = (6, 0)
# Compiled kernels in TensorFlow 2.21; newer GPUs run the compute_90 PTX, compiled by the driver
# at the first start (TensorFlow warns that this can take a long time; the Dockerfile sizes the
# CUDA compute cache so that a restart in the same container reuses it).
COMPILED_CAPABILITIES = ((6, 0), (7, 0), (8, 0), (8, 9))

# Machine families whose name fixes the GPU (Vertex AI, "Configure compute resources for custom
# training"): family → (accelerator, {machine type → GPUs per machine}).
FIXED = {
    "a2-highgpu": ("NVIDIA_TESLA_A100", {"a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4,
                                         "a2-highgpu-8g": 8}),
    "a2-megagpu": ("NVIDIA_TESLA_A100", {"a2-megagpu-16g": 16}),
    "a2-ultragpu": ("NVIDIA_A100_80GB", {"a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4,
                                         "a2-ultragpu-8g": 8}),
    "a3-highgpu": ("NVIDIA_H100_80GB", {"a3-highgpu-1g": 1, "a3-highgpu-2g": 2, "a3-highgpu-4g": 4,
                                        "a3-highgpu-8g": 8}),
    "a3-megagpu": ("NVIDIA_H100_MEGA_80GB", {"a3-megagpu-8g": 8}),
    "a3-ultragpu": ("NVIDIA_H200_141GB", {"a3-ultragpu-8g": 8}),
    "a4-highgpu": ("NVIDIA_B200", {"a4-highgpu-8g": 8}),
    "a4x-highgpu": ("NVIDIA_GB200", {"a4x-highgpu-4g": 4}),
    "g2-standard": ("NVIDIA_L4", {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1,
                                  "g2-standard-16": 1, "g2-standard-32": 1, "g2-standard-24": 2,
                                  "g2-standard-48": 4, "g2-standard-96": 8}),
    "g4-standard": ("NVIDIA_RTX_PRO_6000", {"g4-standard-48": 1, "g4-standard-96": 2, "g4-standard-192": 4,
                                            "g4-standard-384": 8}),
}
# N1 machines take these GPUs, in these counts (the vCPU limits per count are Vertex's to check).
N1_GPUS = ("NVIDIA_TESLA_T4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_P4")
N1_COUNTS = (1, 2, 4, 8)
# Vertex AI's general-purpose and compute- or memory-optimised families, which take no GPU.
NO_GPU_FAMILIES = ("n2", "n2d", "n4", "e2", "c2", "c2d", "c3", "c3d", "c4", "m1", "m2", "m3", "t2d", "t2a", "h3")


def _family(machine_type: str) -> str:
  return machine_type.rsplit("-", 1)[0] if machine_type.count("-") >= 2 else machine_type


def gpu_for_machine(machine_type: str, accelerator_type: str | None, accelerator_count: int
                    ) -> tuple[str | None, int]:
  """(accelerator type, count per machine) that Vertex AI would take for this machine, filled in
  where the machine's name fixes them; or a UserError that names the flags and what the machine
  takes. A CPU machine gives (None, 0)."""
  if not machine_type.strip():
    raise cli.UserError("--machine_type is empty: give a Vertex AI machine type, e.g. n1-standard-8 or g2-standard-8")
  given = f"--machine_type={machine_type}" + (f" --accelerator_type={accelerator_type}" if accelerator_type
                                              else "") + (f" --accelerator_count={accelerator_count}"
                                                          if accelerator_count else "")
  if accelerator_count < 0:
    raise cli.UserError(f"--accelerator_count={accelerator_count}: at least 1 (or leave it out)")
  if accelerator_type and accelerator_type not in GPUS:
    raise cli.UserError(f"--accelerator_type={accelerator_type}: not a GPU this job knows "
                        f"({', '.join(GPUS)})")
  # First what no machine can change: a GPU older than TensorFlow's build supports.
  if accelerator_type and GPUS[accelerator_type].compute_capability < MIN_COMPUTE_CAPABILITY:
    raise cli.UserError(f"{given}: {accelerator_type} (compute capability "
                        f"{'.'.join(map(str, GPUS[accelerator_type].compute_capability))}) is older than "
                        f"TensorFlow's GPU build and the pinned cuDNN support (compute capability "
                        f"{'.'.join(map(str, MIN_COMPUTE_CAPABILITY))} and newer)")
  family = _family(machine_type)
  if family in FIXED:
    fixed_type, counts = FIXED[family]
    if machine_type not in counts:
      raise cli.UserError(f"{given}: Vertex AI's {family} machines are {', '.join(counts)}")
    count = counts[machine_type]
    if accelerator_type not in (None, fixed_type) or accelerator_count not in (0, count):
      raise cli.UserError(f"{given}: {machine_type} has {count} × {fixed_type}; leave out "
                          "--accelerator_type and --accelerator_count, or give exactly those")
    accelerator_type, accelerator_count = fixed_type, count
  elif family.startswith("n1-"):
    if accelerator_count and not accelerator_type:
      raise cli.UserError(f"{given}: a GPU count needs --accelerator_type (N1 machines take "
                          f"{', '.join(N1_GPUS)}); without it the job would run on the CPU")
    if accelerator_type:
      if accelerator_type not in N1_GPUS:
        raise cli.UserError(f"{given}: N1 machines take {', '.join(N1_GPUS)}; {accelerator_type} "
                            "comes with its own machine type (e.g. a2-highgpu-1g for A100, g2-standard-8 "
                            "for L4, a3-highgpu-1g for H100)")
      accelerator_count = accelerator_count or 1
      if accelerator_count not in N1_COUNTS:
        raise cli.UserError(f"{given}: N1 machines take {accelerator_type} in counts of "
                            f"{', '.join(map(str, N1_COUNTS))}")
  elif accelerator_type and family.split("-")[0] in NO_GPU_FAMILIES:
    raise cli.UserError(f"{given}: Vertex AI attaches {accelerator_type} to N1 machines only (e.g. "
                        f"n1-standard-8) or to the GPU families ({', '.join(FIXED)}); {family} machines take no GPU")
  else:
    if accelerator_count and not accelerator_type:
      raise cli.UserError(f"{given}: a GPU count needs --accelerator_type; without it the job would "
                          "run on the CPU")
    if accelerator_type:
      logging.warning("%s: machine family %s is not in this launcher's table; Vertex AI will say "
                      "whether it takes %s", given, family, accelerator_type)
      accelerator_count = accelerator_count or 1
  if accelerator_type and GPUS[accelerator_type].arm_only:
    raise cli.UserError(f"{given}: {accelerator_type} machines are ARM (aarch64); the trainer image is "
                        "x86-64 only")
  return accelerator_type, accelerator_count


def jit_warning(accelerator_type: str) -> str | None:
  """Said when TensorFlow has no compiled kernels for the GPU. A kernel compiled for sm_XY runs
  on X.Y and newer GPUs of the same major version; others get the compute_90 PTX compiled by
  the driver at the first start."""
  major, minor = GPUS[accelerator_type].compute_capability
  if any(m == major and n <= minor for m, n in COMPILED_CAPABILITIES):
    return None
  return (f"TensorFlow 2.21 has no compiled kernels for {accelerator_type} (compute capability "
          f"{major}.{minor}): the first start compiles them from PTX, which TensorFlow warns can take a "
          "long time (not measured here: a preflight on the machine shows it)")


@dataclasses.dataclass(frozen=True)
class Expected:
  """What the job was given: `count` GPUs (of `accelerator`, when known), or a TPU."""
  accelerator: str | None  # a GPUS key, "GPU" (any model) or a TPU name
  count: int
  source: str  # where it was said, for the message

  @property
  def is_tpu(self) -> bool:
    return (self.accelerator or "").startswith("TPU")


# The TPUs TensorFlow runs on in Vertex AI custom training, as its AcceleratorType names them
# (launch/vertex.py's TPU specs).
TPUS = ("TPU_V2", "TPU_V3", "TPU_V5_LITEPOD")


def parse_expected(value: str, source: str) -> Expected | None:
  """"NVIDIA_L4:1", "GPU:2" (any model), "TPU_V3:8", or "" / "none" (nothing said)."""
  value = (value or "").strip()
  if value.lower() in ("", "none"):
    return None
  match = re.fullmatch(r"([A-Za-z0-9_]+):(\d+)", value)
  if not match:
    raise cli.UserError(f"{source}={value}: expected TYPE:COUNT, e.g. NVIDIA_L4:1 or GPU:2")
  name, count = match.group(1), int(match.group(2))
  if not (name in GPUS or name in TPUS or name.upper() == "GPU"):
    raise cli.UserError(f"{source}={value}: {name} is not an accelerator this job knows (GPU for any GPU, "
                        f"{', '.join(GPUS)}, {', '.join(TPUS)})")
  if count < 1:
    raise cli.UserError(f"{source}={value}: the count is per machine and at least 1 (leave it out for a CPU job)")
  return Expected("GPU" if name.upper() == "GPU" else name, count, source)


def count_gpus_without_tensorflow() -> int:
  """The GPUs the NVIDIA driver shows (for launch.multi_gpu, before TensorFlow loads)."""
  folder = "/proc/driver/nvidia/gpus"
  return len(os.listdir(folder)) if os.path.isdir(folder) else 0


# --- The guard ---------------------------------------------------------------------------------

def build_versions() -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info = tf.sysconfig.get_build_info()
  if not info.get("is_cuda_build"):
    return f"TensorFlow {tf.__version__} is not a CUDA build"
  return (f"TensorFlow {tf.__version__} is built for CUDA {info.get('cuda_version')} and cuDNN "
          f"{info.get('cudnn_version')}")


def visible_gpus() -> list[str]:
  """TensorFlow's GPUs, by device name ("NVIDIA L4")."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
          for gpu in tf.config.list_physical_devices("GPU")]


def guard(expected: Expected | None):
  """Stops the job, in one line, when TensorFlow does not see the GPUs it was given, or cannot
  find a library it will need once training starts. TPUs are checked where the TPU strategy is
  made (it stops when none answers)."""
  if expected is None or expected.is_tpu:
    return
  gpu = GPUS.get(expected.accelerator)

  def as_given(names: list[str] | None) -> bool:
    return names is not None and len(names) == expected.count and not [n for n in names if gpu and not gpu.matches(n)]

  what = f"{expected.count} × {expected.accelerator}"
  driver_failed = gpu_startup.driver_failure()
  if driver_failed:  # no driver, or one that does not start: nothing for TensorFlow to register
    raise cli.UserError(f"accelerator check: expected {what} ({expected.source}), TensorFlow sees 0 GPU(s); "
                        f"{build_versions()}; {driver_failed}. Nothing was read or written.")
  # A fresh process first: what aborts there (a missing cuDNN sub-library) cannot abort the job.
  started = gpu_startup.start_in_a_fresh_process()
  names = visible_gpus() if as_given(started.gpus) else started.gpus or []
  if as_given(names):
    from job import distribute_utils  # pylint: disable=g-import-not-at-top  (it loads TensorFlow)
    several = expected.count > 1 or distribute_utils.cluster_size_from_tf_config() > 1
    missing = gpu_startup.missing_for(several)
    if missing:
      raise cli.UserError(f"accelerator check: TensorFlow sees {what}, but {missing}. Nothing was read or written.")
    logging.info("accelerator check: %d GPU(s) as expected (%s)", len(names), ", ".join(names))
    return
  seen = f"{len(names)} GPU(s)" + (f" ({', '.join(names)})" if names else "")
  raise cli.UserError(f"accelerator check: expected {what} ({expected.source}), TensorFlow sees {seen}; "
                      f"{build_versions()}; {gpu_startup.diagnose(started)}. Nothing was read or written.")
