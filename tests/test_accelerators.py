"""The first minutes on a GPU machine: the job sees what it was given, or stops at once saying why."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, copy_with_a_damaged_shard
from job import accelerators, config as config_lib, preflight
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


# --- job.preflight ---------------------------------------------------------------------------

PREFLIGHT_FLAGS = ["--weights=none", "--image_size=32", "--global_batch_size=16", "--preflight_steps=3"]


def run_preflight(*args):
  result = subprocess.run([sys.executable, "-m", "job.preflight", *PREFLIGHT_FLAGS, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  return result, json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None


@pytest.mark.slow
@pytest.mark.parametrize("strategy_flags, replicas", [([], 1), (["--strategy=mirrored", "--cpu_devices=2"], 2)])
def test_preflight_compiles_and_times_the_real_step(shards_dir, tmp_path, strategy_flags, replicas):
  model_dir = tmp_path / "run"
  result, report = run_preflight(f"--data_dir={shards_dir}", f"--model_dir={model_dir}", *strategy_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["ok"] and report["failed_check"] is None and report["replicas"] == replicas
  assert [c["check"] for c in report["checks"]] == list(preflight.CHECKS)
  assert report["strategy"] == ("MirroredStrategy" if replicas > 1 else "OneDeviceStrategy")
  assert report["precision"] == "float32" and report["xla"] is False  # a CPU: the job's own decisions
  assert report["compile_seconds"] > 0 and report["images_per_second"] > 0
  assert 0 <= report["input_wait_share"] <= 1 and report["peak_memory_bytes"] is None  # no GPU here
  assert report["checks"][3]["detail"]["first_batches"]["test"] == [16, 32, 32, 3]
  assert "preflight passed" in result.stderr and "images/s" in result.stderr
  # It trains no run: its report is all it leaves, the same as it printed.
  assert sorted(os.listdir(model_dir)) == ["preflight.json"]
  assert json.load(open(model_dir / "preflight.json")) == report


def test_preflight_names_a_damaged_shard_and_stops_there(shards_dir, tmp_path):
  data_dir, shard = copy_with_a_damaged_shard(shards_dir, tmp_path / "shards", "validation")
  cfg = config_lib.TrainConfig(data_dir=str(data_dir), model_dir=str(tmp_path / "run"), weights="none",
                               image_size=32, global_batch_size=16, strategy="one_device")
  report = preflight.run_checks(cfg, steps=3)
  assert not report["ok"] and report["failed_check"] == "data"
  assert shard.name in report["checks"][-1]["detail"]
  assert [c["check"] for c in report["checks"]] == ["devices", "accelerator", "strategy", "data"]
  assert report["images_per_second"] is None  # nothing was built or trained


def test_preflight_names_an_unwritable_model_dir(shards_dir, tmp_path):
  (tmp_path / "a_file").write_text("not a folder")
  cfg = config_lib.TrainConfig(data_dir=shards_dir, model_dir=str(tmp_path / "a_file" / "run"), weights="none",
                               image_size=32, global_batch_size=16, strategy="one_device")
  report = preflight.run_checks(cfg, steps=3)
  assert not report["ok"] and report["failed_check"] == "storage"
  assert report["checks"][-1]["detail"].startswith(f"--model_dir={tmp_path / 'a_file' / 'run'} is not writable")


@pytest.mark.slow
def test_preflight_exits_non_zero_naming_the_failed_check(shards_dir, tmp_path):
  result, report = run_preflight(f"--data_dir={shards_dir}", f"--model_dir={tmp_path / 'run'}",
                                 "--expected_accelerator=NVIDIA_L4:1")
  assert result.returncode == preflight.EXIT_CHECK_FAILED
  assert report["failed_check"] == "accelerator" and "FAILED at accelerator" in result.stderr
  assert "libcuda.so.1" in report["checks"][-1]["detail"]
