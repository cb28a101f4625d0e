"""The first minutes on a GPU machine: the job sees what it was given, or stops at once saying why."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO
from job import accelerators
from launch import vertex


def container_command_for(machine_type: str) -> tuple[list[str], dict[str, str]]:
  """What Vertex AI would run for a job the launcher built: the image's entrypoint, the
  container's args, and its environment."""
  job = vertex.rest_json(vertex.build_custom_job(
      display_name="x", image_uri="x", data_dir="gs://no-such-bucket/shards", model_dir="gs://b/r",
      machine_type=machine_type, accelerator_type=None, accelerator_count=0, replica_count=1, spot=False,
      service_account=None, tensorboard=None, passthrough=["--stage1_epochs=1"]))
  container = job["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
  env = {e["name"]: e["value"] for e in container.get("env", [])}
  return [sys.executable, "-m", "job.train", *container["args"]], env


def test_a_one_l4_job_on_a_machine_without_a_gpu_stops_at_once_saying_why():
  command, env = container_command_for("g2-standard-8")
  assert env == {"EXPECTED_ACCELERATOR": "NVIDIA_L4:1"}
  start = time.monotonic()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "AIP_MODEL_DIR": "gs://b/r/model"})
  elapsed = time.monotonic() - start
  assert result.returncode != 0
  assert elapsed < 45, f"took {elapsed:.0f} s"  # a fresh TensorFlow import is ~10 s of it
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("error: accelerator check: expected 1 × NVIDIA_L4 ($EXPECTED_ACCELERATOR), "
                          "TensorFlow sees 0 GPU(s)"), error
  assert "built for CUDA 12" in error and "libcuda.so.1 cannot be loaded" in error
  # The data folder (a bucket that does not exist) was never read: the check came first.
  assert "no-such-bucket" not in result.stderr.replace(error, "")


def test_a_cpu_job_and_a_correct_expectation_pass():
  accelerators.guard(None)
  accelerators.guard(accelerators.parse_expected("none", "--expected_accelerator"))
  with pytest.raises(accelerators.cli.UserError, match=r"expected 2 × GPU \(--expected_accelerator\)"):
    accelerators.guard(accelerators.parse_expected("GPU:2", "--expected_accelerator"))


@pytest.mark.parametrize("value", ["L4", "NVIDIA_L4:0", "NVIDIA_L5:1", "GPU:two"])
def test_a_malformed_expectation_names_where_it_came_from(value):
  with pytest.raises(accelerators.cli.UserError, match=r"^\$EXPECTED_ACCELERATOR=" + value.replace(":", ":")):
    accelerators.parse_expected(value, "$EXPECTED_ACCELERATOR")


class FakeDriver:
  """libcuda.so.1 as ctypes sees it: cuInit's status, the driver's CUDA version, a device count."""

  def __init__(self, status=0, version=12040, count=1):
    self.status, self.version, self.count = status, version, count

  def cuInit(self, flags):  # pylint: disable=invalid-name
    return self.status

  def cuDriverGetVersion(self, pointer):  # pylint: disable=invalid-name
    pointer._obj.value = self.version
    return 0

  def cuDeviceGetCount(self, pointer):  # pylint: disable=invalid-name
    pointer._obj.value = self.count
    return 0


def loader(driver, failing=()):
  def load(name):
    if name == "libcuda.so.1":
      return driver
    if os.path.basename(name) in failing:
      raise OSError(f"{name}: undefined symbol: cudnnGetLibConfig")
    return object()
  return load


def test_the_diagnosis_names_the_driver_error_or_the_first_library_that_fails(tmp_path, monkeypatch):
  assert "CUDA_ERROR_NO_DEVICE" in accelerators.diagnose(loader(FakeDriver(status=100)))
  assert "CUDA_ERROR_INSUFFICIENT_DRIVER" in accelerators.diagnose(loader(FakeDriver(status=35)))
  # pip's NVIDIA wheels, laid out as site-packages/nvidia/<package>/lib, with cuDNN missing.
  libraries = {"cuda_runtime": "libcudart.so.12", "cublas": "libcublasLt.so.12 libcublas.so.12",
               "cufft": "libcufft.so.11", "cusolver": "libcusolver.so.11", "cusparse": "libcusparse.so.12",
               "nccl": "libnccl.so.2"}
  for package, names in libraries.items():
    (tmp_path / "nvidia" / package / "lib").mkdir(parents=True)
    for name in names.split():
      (tmp_path / "nvidia" / package / "lib" / name).touch()
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "nvidia", raising=False)
  said = accelerators.diagnose(loader(FakeDriver()))
  assert "the driver (CUDA 12.4) sees 1 GPU(s), but libcudnn.so.9 is not installed" in said
  assert "pip install '.[gpu]'" in said
  (tmp_path / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
  (tmp_path / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9").touch()
  said = accelerators.diagnose(loader(FakeDriver(), failing={"libcudnn.so.9"}))
  assert "nvidia/cudnn/lib/libcudnn.so.9 failed to load: " in said and "undefined symbol" in said
  assert "every GPU library loads" in accelerators.diagnose(loader(FakeDriver()))
