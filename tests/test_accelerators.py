"""The first minutes on a GPU machine: the job sees what it was given, or stops at once saying why."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, container_command_for, copy_with_a_damaged_shard
from job import accelerators, config as config_lib, gpu_startup, preflight
from launch import vertex


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


@pytest.mark.parametrize("value, why", [("L4", "expected TYPE:COUNT"), ("NVIDIA_L4:0", "at least 1"),
                                        ("GPU:0", "at least 1"), ("NVIDIA_L5:1", "NVIDIA_L5 is not an accelerator"),
                                        ("GPU:two", "expected TYPE:COUNT"),
                                        ("TPU_BOGUS:8", "TPU_BOGUS is not an accelerator")])  # once passed as a TPU
def test_a_malformed_expectation_names_where_it_came_from(value, why):
  with pytest.raises(accelerators.cli.UserError, match=rf"^\$EXPECTED_ACCELERATOR={value}: .*{why}"):
    accelerators.parse_expected(value, "$EXPECTED_ACCELERATOR")
  assert accelerators.parse_expected("TPU_V5_LITEPOD:4", "x").is_tpu


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


class NotADriver:
  """A libcuda.so.1 without the driver API (ctypes raises AttributeError for a missing symbol)."""

  def __getattr__(self, name):
    raise AttributeError(f"stub.so: undefined symbol: {name}")


def loader(driver):
  def load(name):
    if isinstance(driver, OSError):
      raise driver
    return driver
  return load


def started(log="", gpus=None, returncode=0):
  return gpu_startup.StartUp(gpus, returncode, log)


@pytest.mark.parametrize("status, named", [(100, "CUDA_ERROR_NO_DEVICE"), (34, "CUDA_ERROR_STUB_LIBRARY"),
                                           (46, "CUDA_ERROR_DEVICE_UNAVAILABLE"), (802, "fabric manager"),
                                           (12345, "see cuda.h")])
def test_the_diagnosis_names_the_drivers_error(status, named):
  said = gpu_startup.diagnose(started(), loader(FakeDriver(status=status)))
  assert said.startswith(f"the NVIDIA driver failed to start: cuInit returned {status} (") and named in said
  assert 35 not in gpu_startup.CUDA_ERRORS  # the runtime's cudaErrorInsufficientDriver, not a driver API code


def test_the_diagnosis_names_a_missing_driver_or_one_that_is_not_nvidias():
  said = gpu_startup.diagnose(started(), loader(OSError("libcuda.so.1: cannot open shared object file")))
  assert said.startswith("libcuda.so.1 cannot be loaded (libcuda.so.1: cannot open") and "--gpus all" in said
  said = gpu_startup.diagnose(started(), loader(NotADriver()))
  assert "is not NVIDIA's driver library: stub.so: undefined symbol: cuInit" in said


def test_the_diagnosis_names_the_first_library_tensorflows_start_up_could_not_open():
  log = ("I0000 dso_loader.cc:133] Successfully opened dynamic library libcufft.so.11\n"
         "I0000 dso_loader.cc:144] Could not load dynamic library 'libcusolver.so.11'; dlerror: libcusolver.so.11: "
         "cannot open shared object file: No such file or directory; LD_LIBRARY_PATH: /usr/local/nvidia/lib64\n"
         "I0000 dso_loader.cc:144] Could not load dynamic library 'libcusparse.so.12'; dlerror: x; LD_LIBRARY_PATH: y\n")
  said = gpu_startup.diagnose(started(log, gpus=[]), loader(FakeDriver()))
  assert said.startswith("the driver (CUDA 12.4) sees 1 GPU(s), but TensorFlow could not open libcusolver.so.11 "
                         "(libcusolver.so.11: cannot open shared object file: No such file or directory): it comes "
                         "from pip's nvidia-cusolver-cu12 wheel (site-packages/nvidia/cusolver/lib)"), said
  log = "I0000 dso_loader.cc:144] Could not load dynamic library 'libnvidia-ml.so.1'; dlerror: gone; LD_LIBRARY_PATH: /x\n"
  said = gpu_startup.diagnose(started(log, gpus=[]), loader(FakeDriver()))
  assert "could not open libnvidia-ml.so.1 (gone), a library of the NVIDIA driver" in said and "utility" in said


def test_the_diagnosis_survives_a_start_up_that_aborted():
  log = ("Unable to load any of {libcudnn_graph.so.9.10.2, libcudnn_graph.so.9.10, libcudnn_graph.so.9, "
         "libcudnn_graph.so}\nInvalid handle. Cannot load symbol cudnnGetProperty\n")
  said = gpu_startup.diagnose(started(log, returncode=-6), loader(FakeDriver()))
  assert "but cuDNN could not open libcudnn_graph.so.9, one of its sub-libraries: it comes from pip's " \
         "nvidia-cudnn-cu12 wheel" in said
  said = gpu_startup.diagnose(started("F0000 something.cc:1] Check failed: x\n", returncode=-6), loader(FakeDriver()))
  assert said.endswith("but TensorFlow's GPU start-up was killed by signal 6: F0000 something.cc:1] Check failed: x")


def test_the_diagnosis_of_a_start_up_that_saw_fewer_gpus_says_what_it_registered(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
  said = gpu_startup.diagnose(started(gpus=["NVIDIA L4"]), loader(FakeDriver(count=2)))
  assert said == ("the driver (CUDA 12.4) sees 2 GPU(s), and TensorFlow's start-up opened every GPU library and "
                  "registered 1 (NVIDIA L4); CUDA_VISIBLE_DEVICES=0")


# --- job.preflight ---------------------------------------------------------------------------

PREFLIGHT_FLAGS = ["--weights=none", "--image_size=32", "--global_batch_size=16", "--preflight_steps=3"]


def run_preflight(*args):
  result = subprocess.run([sys.executable, "-m", "job.preflight", *PREFLIGHT_FLAGS, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  return result, json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None


@pytest.mark.slow
# One device runs the job's own --steps_per_execution (2 steps per execution are what is timed).
@pytest.mark.parametrize("strategy_flags, replicas", [(["--steps_per_execution=2"], 1),
                                                     (["--strategy=mirrored", "--cpu_devices=2"], 2)])
def test_preflight_compiles_and_times_the_real_step(shards_dir, tmp_path, strategy_flags, replicas):
  model_dir = tmp_path / "run"
  result, report = run_preflight(f"--data_dir={shards_dir}", f"--model_dir={model_dir}", *strategy_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["ok"] and report["failed_check"] is None and report["replicas"] == replicas
  assert [c["check"] for c in report["checks"]] == list(preflight.CHECKS)
  assert report["strategy"] == ("MirroredStrategy" if replicas > 1 else "OneDeviceStrategy")
  assert report["precision"] == "float32" and report["xla"] is False  # a CPU: the job's own decisions
  assert report["compile_seconds"] > 0 and report["images_per_second"] > 0 and report["input_startup_seconds"] >= 0
  assert report["cache_filling"] is False  # a split smaller than the shuffle buffer is cached before step 1
  assert 0 <= report["input_wait_share"] <= 1 and report["peak_memory_bytes"] is None  # no GPU here
  assert report["checks"][3]["detail"]["first_batches"]["test"] == [16, 32, 32, 3]
  assert "preflight passed" in result.stderr and "images/s" in result.stderr
  executions = "2 step(s) per execution" if "--steps_per_execution=2" in strategy_flags else "1 step(s) per execution"
  assert executions in report["checks"][-1]["detail"]  # the job's own executions are what is timed
  # It trains no run: its report is all it leaves, the same as it printed.
  assert sorted(os.listdir(model_dir)) == ["preflight.json"]
  assert json.load(open(model_dir / "preflight.json")) == report


def test_the_preflight_says_the_cache_is_filling_only_while_it_is():
  # HAM10000's train split (~7,000) fits the shuffle buffer: decoded and cached before the first
  # step, so the timed epoch reads the cache (2 × 20 × 64 images < 7,000 does not make it filling).
  assert not preflight.cache_still_filling("memory", 7010, steps=20, global_batch_size=64)
  # ISIC 2019 (~17,700 train images): the buffer (10,000) and one epoch of 20 × 64 read, the rest not yet.
  assert preflight.cache_still_filling("memory", 17_700, steps=20, global_batch_size=64)
  assert not preflight.cache_still_filling("memory", 17_700, steps=200, global_batch_size=64)
  assert not preflight.cache_still_filling("none", 17_700, steps=20, global_batch_size=64)


@pytest.mark.slow  # a fresh TensorFlow process
def test_preflight_refuses_no_steps_before_anything_starts():
  result = subprocess.run([sys.executable, "-m", "job.preflight", "--preflight_steps=0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "--preflight_steps=0" in result.stderr and "Traceback" not in result.stderr
  for steps in ("0", "-3"):  # what job.preflight parses, the launcher refuses before submitting
    with pytest.raises(accelerators.cli.UserError, match=rf"^after --: flag --preflight_steps={steps}: "):
      vertex.parse_trainer_flags([f"--preflight_steps={steps}"], preflight=True)


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


def test_preflight_refuses_a_folder_job_train_would_refuse_and_writes_nothing_there(shards_dir, tmp_path):
  from job import run_state
  from tfrecords import fileio
  cfg = config_lib.TrainConfig(data_dir=shards_dir, model_dir=str(tmp_path / "run"), weights="none",
                               image_size=32, global_batch_size=16, strategy="one_device")
  # Another run's stage marker (another image size): job.train with these flags stops there.
  other = config_lib.TrainConfig(**{**cfg.__dict__, "image_size": 64})
  fileio.write_json(str(tmp_path / "run" / "checkpoints" / "stage1.json"),
                    {"fingerprint": run_state.fingerprint(other, "sha", 1)})
  report = preflight.run_checks(cfg, steps=3)
  assert report["failed_check"] == "lease" and "holds another run (image_size: 64 → 32" in report["checks"][-1]["detail"]
  assert not (tmp_path / "run" / "preflight.json").exists()
  # A live job holds the folder: its lease refuses the preflight, which leaves nothing in that job's folder.
  busy = tmp_path / "busy"
  held = run_state.Lease(str(busy), {"job": "another"}).acquire()
  try:
    report = preflight.run_checks(config_lib.TrainConfig(**{**cfg.__dict__, "model_dir": str(busy)}), steps=3)
  finally:
    held.release()
  assert report["failed_check"] == "lease" and not (busy / "preflight.json").exists()


@pytest.mark.slow
def test_preflight_exits_non_zero_naming_the_failed_check(shards_dir, tmp_path):
  result, report = run_preflight(f"--data_dir={shards_dir}", f"--model_dir={tmp_path / 'run'}",
                                 "--expected_accelerator=NVIDIA_L4:1")
  assert result.returncode == preflight.EXIT_CHECK_FAILED
  assert report["failed_check"] == "accelerator" and "FAILED at accelerator" in result.stderr
  assert "libcuda.so.1" in report["checks"][-1]["detail"]
