"""The trainer image's GPU start-up on a machine without a GPU: the image's Python packages in an
environment of their own, and a stand-in NVIDIA driver where the image expects the host's.

- `gpu_environment()`: a virtual environment with what the Dockerfile installs for the GPU
  variant (`pip install -c requirements/constraints-gpu.txt ".[gpu]"`, the project itself
  left out: the checkout's code runs on PYTHONPATH). About 3.6 GB of wheels, so it is kept
  outside the checkout, in ~/.cache/ham10000-resnet50/ (XDG_CACHE_HOME), one per content of
  constraints-gpu.txt; a new one replaces the others.
- `build_driver(folder)`: libcuda.so.1 and libnvidia-ml.so.1 from tests/stand_in_driver/*.c
  (gcc): one GPU or more (STAND_IN_GPU_COUNT) that TensorFlow finds and names, and on which
  nothing can run.
- `image_environment(root)`: the environment variables the Dockerfile's GPU stages set, read
  from the Dockerfile, with the host driver's folders moved under `root` (no root rights needed).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys

from helpers import REPO, exclusive

CONSTRAINTS = os.path.join(REPO, "requirements", "constraints-gpu.txt")
DRIVER_SOURCES = os.path.join(REPO, "tests", "stand_in_driver")
DRIVER_LIBRARIES = ("libcuda.so.1", "libnvidia-ml.so.1")
PROJECT = "ham10000-resnet50"  # setup.py's name


def cache_root() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), PROJECT)


def gpu_environment() -> str:
  """The Python of the GPU variant's environment, made once per constraints-gpu.txt."""
  key = hashlib.sha256(open(CONSTRAINTS, "rb").read()).hexdigest()[:16]
  venv = os.path.join(cache_root(), f"gpu-env-{key}")
  python = os.path.join(venv, "bin", "python")
  os.makedirs(cache_root(), exist_ok=True)
  with exclusive(f"{venv}.lock"):  # another test run on this machine may be making it
    _make_gpu_environment(venv)
  return python


def _make_gpu_environment(venv: str):
  if not os.path.exists(os.path.join(venv, "ready")):
    partial = f"{venv}.partial"  # renamed when complete: an interrupted install is never used
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", partial], check=True)
    pip = [os.path.join(partial, "bin", "python"), "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-c", CONSTRAINTS, f"{REPO}[gpu]"], check=True, timeout=3600)
    subprocess.run([*pip, "uninstall", "--yes", PROJECT], check=True)
    open(os.path.join(partial, "ready"), "w").close()
    shutil.rmtree(venv, ignore_errors=True)
    os.rename(partial, venv)
    for old in os.listdir(cache_root()):  # environments of earlier constraints
      if old.startswith("gpu-env-") and not old.startswith(os.path.basename(venv)):  # its lock kept
        path = os.path.join(cache_root(), old)
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)


def site_packages(python: str) -> str:
  return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        capture_output=True, text=True, check=True).stdout.strip()


def linked_copy(python: str, destination: str) -> str:
  """A copy of the environment whose files are hard links (seconds, no space): one can be removed
  from it without touching the original. Returns its Python."""
  venv = os.path.dirname(os.path.dirname(python))
  subprocess.run(["cp", "-al", venv, destination], check=True)
  return os.path.join(destination, "bin", "python")


def build_driver(folder: str):
  os.makedirs(folder, exist_ok=True)
  for library in DRIVER_LIBRARIES:
    source = os.path.join(DRIVER_SOURCES, library.split(".so")[0] + ".c")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", os.path.join(folder, library),
                    source], check=True)


def dockerfile_gpu_env() -> dict[str, str]:
  """The ENV instructions of the Dockerfile's stages that the GPU image is built through (every
  stage but the TPU's), in order, as `docker build` would set them."""
  text = open(os.path.join(REPO, "Dockerfile")).read().replace("\\\n", " ")
  env: dict[str, str] = {}
  for stage in re.split(r"^FROM ", text, flags=re.M)[1:]:
    if "tpu" in stage.split("\n", 1)[0]:
      continue
    for line in re.findall(r"^ENV (.+)$", stage, re.M):
      for name, value in re.findall(r"(\w+)=(\S+)", line):
        env[name] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), os.environ.get(m.group(1), "")), value)
  return env


def image_environment(root: str) -> tuple[dict[str, str], str]:
  """The GPU image's environment with each folder of its LD_LIBRARY_PATH (where the host's driver
  appears) moved under `root`, and the first of those folders (where a driver goes)."""
  env = dockerfile_gpu_env()
  folders = [root + folder for folder in env["LD_LIBRARY_PATH"].split(":")]
  return {**env, "LD_LIBRARY_PATH": ":".join(folders)}, folders[0]
