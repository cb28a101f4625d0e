"""The launchers and the Dockerfile, checked without a cloud or a Docker engine."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_module
from job import accelerators, callbacks
from launch import multi_gpu, upload_model, vertex


def dry_run(*args):
  result = run_module("launch.vertex", "--dry_run", "--image_uri=us-docker.pkg.dev/p/ham/trainer:1",
                      "--data_dir=gs://b/shards", "--model_dir=gs://b/runs/r1", *args)
  assert result.stderr == ""  # a launcher loads no TensorFlow, whose start-up lines would show here
  return json.loads(result.stdout)


def test_vertex_dry_run_multi_node_gpu_spot():
  job = dry_run("--machine_type=a2-highgpu-1g", "--accelerator_type=NVIDIA_TESLA_A100",
                "--accelerator_count=1", "--replica_count=3", "--spot", "--service_account=sa@p.iam",
                "--", "--stage1_epochs=3")
  spec = job["jobSpec"]
  pools = spec["workerPoolSpecs"]
  assert [int(p["replicaCount"]) for p in pools] == [1, 2]  # the chief counts as one of the 3
  assert pools[0]["machineSpec"] == pools[1]["machineSpec"] == {
      "machineType": "a2-highgpu-1g", "acceleratorType": "NVIDIA_TESLA_A100", "acceleratorCount": 1}
  assert pools[0]["containerSpec"]["args"] == ["--data_dir=gs://b/shards", "--strategy=multi_worker",
                                               "--stage1_epochs=3"]
  assert spec["baseOutputDirectory"] == {"outputUriPrefix": "gs://b/runs/r1"}
  assert spec["scheduling"] == {"strategy": "SPOT", "restartJobOnWorkerRestart": True, "timeout": "86400s"}
  assert spec["serviceAccount"] == "sa@p.iam"
  vertex_types().CustomJob.from_json(json.dumps(job))  # parses as the real message


def vertex_types():
  from google.cloud import aiplatform_v1
  return aiplatform_v1


def test_vertex_multi_node_restarts_the_whole_job_with_or_without_spot():
  def scheduling(**kwargs):
    return vertex.rest_json(_custom_job(**kwargs))["jobSpec"].get("scheduling")

  assert scheduling(replica_count=2) == {"restartJobOnWorkerRestart": True, "timeout": "86400s"}
  assert scheduling() == {"timeout": "86400s"}  # never Vertex's default of 7 days
  assert scheduling(spot=True) == {"strategy": "SPOT", "timeout": "86400s"}
  assert scheduling(timeout="90m") == {"timeout": "5400s"}
  for bad in ("8d", "200h", "0s", "soon"):
    with pytest.raises(vertex.cli.UserError, match=f"--timeout={bad}"):
      scheduling(timeout=bad)


def test_vertex_accepts_cloud_storage_fuse_paths_and_writes_the_dry_run_to_a_file(tmp_path):
  output = tmp_path / "job.json"
  result = run_module("launch.vertex", "--dry_run", f"--output={output}", "--image_uri=x",
                      "--data_dir=/gcs/b/shards", "--model_dir=/gcs/b/runs/r1")
  assert result.stdout.strip() == str(output)
  job = vertex_types().CustomJob.from_json(output.read_text())
  assert job.job_spec.base_output_directory.output_uri_prefix == "gs://b/runs/r1"
  assert list(job.job_spec.worker_pool_specs[0].container_spec.args) == ["--data_dir=gs://b/shards"]


def test_vertex_tensorboard_needs_a_service_account():
  result = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=gs://b/s", "--model_dir=gs://b/r",
                      "--tensorboard=projects/p/locations/us-central1/tensorboards/1", check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --tensorboard=projects/p/locations/us-central1/tensorboards/1 needs --service_account")


@pytest.mark.parametrize("monitor, goal", [(None, "MAXIMIZE"), ("val_loss", "MINIMIZE")])
def test_vertex_tuning_job_searches_the_learning_rates_for_the_jobs_monitor(monitor, goal):
  passthrough = [f"--monitor={monitor}"] if monitor else []
  custom = _custom_job(machine_type="g2-standard-8", accelerator_type="NVIDIA_L4", passthrough=passthrough)
  job = vertex.rest_json(vertex.build_tuning_job(custom, monitor=vertex.monitor_of(passthrough), max_trials=12,
                                                parallel_trials=3))
  vertex_types().HyperparameterTuningJob.from_json(json.dumps(job))
  assert job["maxTrialCount"] == 12 and job["parallelTrialCount"] == 3
  study = job["studySpec"]
  assert study["metrics"] == [{"metricId": monitor or "val_f1", "goal": goal}]
  assert study["measurementSelectionType"] == "BEST_MEASUREMENT"
  parameters = {p["parameterId"]: p for p in study["parameters"]}
  assert parameters["stage1_lr"]["scaleType"] == parameters["stage2_lr"]["scaleType"] == "UNIT_LOG_SCALE"
  assert 0 < parameters["stage2_lr"]["doubleValueSpec"]["minValue"] < parameters["stage2_lr"]["doubleValueSpec"]["maxValue"]
  assert "integerValueSpec" in parameters["fine_tune_layers"]
  pool = job["trialJobSpec"]["workerPoolSpecs"][0]
  assert pool["machineSpec"]["acceleratorType"] == "NVIDIA_L4"
  # Trials choose on validation alone: no test evaluation, no serving export, whatever came before.
  assert pool["containerSpec"]["args"] == ["--data_dir=gs://b/s", *passthrough, "--noevaluate", "--noserving"]
  assert job["trialJobSpec"]["scheduling"]["timeout"] == "86400s"  # each trial bounded


def test_vertex_tuning_job_can_search_the_backbone_among_those_given():
  custom = _custom_job(machine_type="g2-standard-8", accelerator_type="NVIDIA_L4", passthrough=[])
  job = vertex.rest_json(vertex.build_tuning_job(custom, monitor="val_f1", max_trials=4, parallel_trials=2,
                                                tune_backbones=("resnet50", "convnext_tiny")))
  vertex_types().HyperparameterTuningJob.from_json(json.dumps(job))
  parameters = {p["parameterId"]: p for p in job["studySpec"]["parameters"]}
  assert parameters["backbone"]["categoricalValueSpec"]["values"] == ["resnet50", "convnext_tiny"]
  assert parameters["fine_tune_layers"]["integerValueSpec"]["maxValue"] == "136"  # ConvNeXt-Tiny's layers
  with pytest.raises(vertex.cli.UserError, match="--tune_backbones: resnet51 "):
    vertex.build_tuning_job(custom, monitor="val_f1", max_trials=4, parallel_trials=2, tune_backbones=("resnet51",))


@pytest.mark.parametrize("flag", ["--evaluate", "--serving=true"])
def test_vertex_tune_refuses_a_trial_that_would_evaluate_the_test_split(flag):
  with pytest.raises(vertex.cli.UserError, match=f"{re.escape(flag)}: tuning trials never evaluate"):
    vertex.build_tuning_job(_custom_job(passthrough=[flag]), monitor="val_f1", max_trials=4, parallel_trials=2)
  with pytest.raises(vertex.cli.UserError, match="--max_trials=0"):
    vertex.build_tuning_job(_custom_job(), monitor="val_f1", max_trials=0, parallel_trials=1)


def _custom_job(**kwargs):
  settings = dict(display_name="t", image_uri="x", data_dir="gs://b/s", model_dir="gs://b/r",
                  machine_type="n1-standard-8", accelerator_type=None, accelerator_count=0, replica_count=1,
                  spot=False, service_account=None, tensorboard=None, passthrough=[])
  return vertex.build_custom_job(**{**settings, **kwargs})


@pytest.mark.parametrize("passthrough, refused", [
    (["--model_dir=/tmp/lost", "--data_dir=/tmp/x"], r"^after --: --data_dir, --model_dir the launcher sets itself"),
    (["--data_dir", "gs://b/other"], r"^after --: --data_dir the launcher sets itself"),
    (["--checkpoint_dir=/tmp/ckpt"], r"^--checkpoint_dir \(after --\)=/tmp/ckpt: Vertex AI jobs read and write Cloud"),
    (["--tensorboard_dir=logs"], r"^--tensorboard_dir \(after --\)=logs: Vertex AI"),
    (["--noserving=false"], r"^after --: .*noserving.*\(see python -m job.train --help\)$"),
])
def test_trainer_flags_may_not_override_the_launchers_own(passthrough, refused):
  with pytest.raises(vertex.cli.UserError, match=refused):
    _custom_job(passthrough=passthrough)


def test_a_trainer_metadata_field_the_job_would_refuse_is_refused_before_submitting():
  with pytest.raises(vertex.cli.UserError, match=r"^--metadata=age,dx_type: dx_type cannot be an input"):
    vertex.parse_trainer_flags(["--metadata=age,dx_type"])
  assert vertex.parse_trainer_flags(["--metadata=sex,age"]).metadata == ["sex", "age"]


def test_the_launcher_sets_the_strategy_of_a_tpu_or_several_machines_itself():
  with pytest.raises(vertex.cli.UserError, match=r"^after --: --strategy the launcher sets itself"):
    _custom_job(passthrough=["--strategy=mirrored"], replica_count=2)
  with pytest.raises(vertex.cli.UserError, match=r"^after --: --strategy, --tpu the launcher sets itself"):
    _custom_job(passthrough=["--strategy=one_device", "--tpu=x"], machine_type="cloud-tpu", accelerator_type="TPU_V3",
                accelerator_count=8)
  assert "--strategy=mirrored" in vertex.rest_json(_custom_job(passthrough=["--strategy=mirrored"]))[
      "jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["args"]  # one machine: the user's choice
  assert _custom_job(passthrough=["--checkpoint_dir=gs://b/ckpt"])


def test_the_tuning_metric_is_the_monitor_as_the_trainer_parses_it():
  assert vertex.monitor_of([]) == "val_f1"
  assert vertex.monitor_of(["-monitor=val_loss"]) == "val_loss"  # absl takes a single dash too
  assert vertex.monitor_of(["--monitor", "val_accuracy", "--stage1_epochs=1"]) == "val_accuracy"


def test_a_bad_timeout_is_refused_with_the_preflight_too():
  with pytest.raises(vertex.cli.UserError, match=r"^--timeout=junk: a duration"):
    _custom_job(preflight=True, timeout="junk")


@pytest.mark.parametrize("tune", [False, True])
def test_vertex_submit_and_wait_follow_the_job_through_the_real_client(tune, capsys):
  from vertex_stand_in import JobServiceStandIn
  s = vertex_types().JobState
  service = JobServiceStandIn([s.JOB_STATE_QUEUED, s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING,
                               s.JOB_STATE_RUNNING, s.JOB_STATE_SUCCEEDED])
  try:
    job = _custom_job()
    if tune:
      job = vertex.build_tuning_job(job, monitor="val_f1", max_trials=4, parallel_trials=2)
    done = vertex.submit(service.client(), job, "p", "us-central1", wait=True, poll_seconds=0,
                         sleep=lambda _: None)
  finally:
    service.stop()
  kind = "hyperparameterTuningJobs" if tune else "customJobs"
  assert done.name == f"projects/p/locations/us-central1/{kind}/1000"
  assert done.state == s.JOB_STATE_SUCCEEDED and service.gets == 4
  assert type(service.created[0]).__name__ == type(job).__name__  # what was sent arrived whole
  out, err = capsys.readouterr()
  assert out.strip() == done.name
  assert [line.split()[1] for line in err.splitlines()[1:]] == [
      "JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]  # changes only
  assert err.splitlines()[0].startswith("https://console.cloud.google.com/vertex-ai/locations/us-central1/")


@pytest.mark.parametrize("monitor, best", [("val_f1", "3"), ("val_loss", "1")])
def test_vertex_tune_wait_names_the_best_trial_and_what_to_run_on_it(monitor, best, capsys):
  from vertex_stand_in import JobServiceStandIn
  s = vertex_types().JobState
  trials = [("1", 0.61, "SUCCEEDED"), ("2", None, "INFEASIBLE"), ("3", 0.74, "SUCCEEDED"), ("4", 0.9, "STOPPING")]
  service = JobServiceStandIn([s.JOB_STATE_RUNNING, s.JOB_STATE_SUCCEEDED], trials=trials)
  try:
    job = vertex.build_tuning_job(_custom_job(), monitor=monitor, max_trials=4, parallel_trials=2)
    done = vertex.submit(service.client(), job, "p", "us-central1", wait=True, poll_seconds=0, sleep=lambda _: None)
  finally:
    service.stop()
  capsys.readouterr()
  assert vertex.best_trial(done)[0] == best  # trial 4 never finished: not a candidate
  vertex.print_best_trial(done, "gs://b/r", "gs://b/s")
  out = capsys.readouterr().out
  assert out.startswith(f"best trial {best}: {monitor}=") and f"gs://b/r/{best}/model" in out
  assert f"job.evaluate --model_dir=gs://b/r/{best}/model --data_dir=gs://b/s" in out
  assert f"launch.upload_model --artifact_uri=gs://b/r/{best}/model/serving" in out


def test_vertex_wait_fails_when_the_job_fails(capsys):
  from vertex_stand_in import JobServiceStandIn
  s = vertex_types().JobState
  service = JobServiceStandIn([s.JOB_STATE_PENDING, s.JOB_STATE_RUNNING, s.JOB_STATE_FAILED])
  try:
    with pytest.raises(vertex.cli.UserError, match=r"customJobs/1000 ended JOB_STATE_FAILED: The replica "
                       r"workerpool0-0 exited with a non-zero status of 1\. \(logs: https://"):
      vertex.submit(service.client(), _custom_job(), "p", "us-central1", wait=True, poll_seconds=0,
                    sleep=lambda _: None)
  finally:
    service.stop()


def test_vertex_dry_run_single_gpu():
  single = dry_run("--machine_type=g2-standard-8", "--accelerator_type=NVIDIA_L4")
  pools = single["jobSpec"]["workerPoolSpecs"]
  assert len(pools) == 1 and pools[0]["containerSpec"]["args"] == ["--data_dir=gs://b/shards"]
  assert pools[0]["machineSpec"]["acceleratorCount"] == 1


@pytest.mark.parametrize("args, machine", [
    (["--machine_type=cloud-tpu", "--accelerator_type=TPU_V3"],
     {"machineType": "cloud-tpu", "acceleratorType": "TPU_V3", "acceleratorCount": 8}),
    (["--machine_type=cloud-tpu", "--accelerator_type=TPU_V2"],
     {"machineType": "cloud-tpu", "acceleratorType": "TPU_V2", "acceleratorCount": 8}),
    (["--machine_type=ct5lp-hightpu-4t"], {"machineType": "ct5lp-hightpu-4t", "acceleratorType":
                                           "TPU_V5_LITEPOD", "acceleratorCount": 4, "tpuTopology": "2x2"}),
    (["--machine_type=ct5lp-hightpu-8t"], {"machineType": "ct5lp-hightpu-8t", "acceleratorType":
                                           "TPU_V5_LITEPOD", "acceleratorCount": 8, "tpuTopology": "2x4"}),
])
def test_vertex_dry_run_asks_for_real_tpu_shapes(args, machine):
  pools = dry_run(*args)["jobSpec"]["workerPoolSpecs"]
  assert len(pools) == 1 and pools[0]["machineSpec"] == machine
  assert pools[0]["containerSpec"]["args"][1:3] == ["--strategy=tpu", "--tpu=local"]


@pytest.mark.parametrize("args, cause", [
    (["--machine_type=ct6e-standard-4t"], "TensorFlow does not run on v6e"),
    (["--machine_type=ct5p-hightpu-4t", "--accelerator_type=TPU_V5P"], "does not offer TPU v4 and v5p"),
    (["--machine_type=ct4p-hightpu-4t", "--accelerator_type=TPU_V4_POD"], "v2 and v3"),
    (["--machine_type=cloud-tpu", "--accelerator_type=TPU_V3", "--accelerator_count=1"],
     "--accelerator_count=8"),
    (["--machine_type=ct5lp-hightpu-4t", "--replica_count=2"], "multi-host TPU slices are not supported"),
])
def test_vertex_refuses_tpu_jobs_tensorflow_cannot_run(args, cause):
  result = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=gs://b/s",
                      "--model_dir=gs://b/r", *args, check=False)
  assert result.returncode != 0 and cause in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")  # one line, no usage dump


def test_vertex_rejects_bad_flags():
  result = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=/local",
                      "--model_dir=gs://b/r", check=False)
  assert result.returncode != 0 and "--data_dir=/local" in result.stderr
  with pytest.raises(ValueError, match="--accelerator_type=NVIDIA_NOPE"):
    vertex.build_custom_job(display_name="x", image_uri="x", data_dir="gs://b", model_dir="gs://b",
                            machine_type="n1-standard-8", accelerator_type="NVIDIA_NOPE", accelerator_count=1,
                            replica_count=1, spot=False, service_account=None, tensorboard=None,
                            passthrough=[])


@pytest.mark.parametrize("machine, accelerator, count, expected", [
    # The machine's name fixes the GPU: the launcher fills in the count.
    ("g2-standard-8", None, 0, ("NVIDIA_L4", 1)),
    ("g2-standard-48", "NVIDIA_L4", 0, ("NVIDIA_L4", 4)),
    ("a2-highgpu-2g", None, 0, ("NVIDIA_TESLA_A100", 2)),
    ("a2-ultragpu-1g", "NVIDIA_A100_80GB", 1, ("NVIDIA_A100_80GB", 1)),
    ("a3-highgpu-8g", None, 0, ("NVIDIA_H100_80GB", 8)),
    ("a3-ultragpu-8g", None, 0, ("NVIDIA_H200_141GB", 8)),
    ("n1-standard-16", "NVIDIA_TESLA_V100", 2, ("NVIDIA_TESLA_V100", 2)),
    ("n1-standard-8", "NVIDIA_TESLA_T4", 0, ("NVIDIA_TESLA_T4", 1)),
    ("n1-standard-8", None, 0, (None, 0)),  # a CPU job, said so
    ("e2-standard-8", None, 0, (None, 0)),
])
def test_launcher_fills_in_what_the_machine_fixes(machine, accelerator, count, expected):
  assert accelerators.gpu_for_machine(machine, accelerator, count) == expected


@pytest.mark.parametrize("machine, accelerator, count, cause", [
    ("n1-standard-8", None, 4, "a GPU count needs --accelerator_type"),  # today: a CPU job
    ("n1-standard-8", "NVIDIA_TESLA_T4", -3, "--accelerator_count=-3: at least 1"),
    ("a2-highgpu-1g", "NVIDIA_L4", 0, "a2-highgpu-1g has 1 × NVIDIA_TESLA_A100"),
    ("a2-highgpu-1g", None, 2, "a2-highgpu-1g has 1 × NVIDIA_TESLA_A100"),
    ("a2-highgpu-3g", None, 0, "a2-highgpu-1g, a2-highgpu-2g"),
    ("n1-standard-8", "NVIDIA_L4", 1, "N1 machines take NVIDIA_TESLA_T4"),
    ("n1-standard-8", "NVIDIA_TESLA_T4", 3, "in counts of 1, 2, 4, 8"),
    ("a4x-highgpu-4g", None, 0, "ARM"),
    ("n1-standard-8", "NVIDIA_TESLA_K80", 1, "(compute capability 3.7) is older than"),  # not "N1 machines take"
    ("x9-custom-8", "NVIDIA_TESLA_K80", 1, "compute capability 3.7"),
    ("n2-standard-8", "NVIDIA_TESLA_T4", 1, "attaches NVIDIA_TESLA_T4 to N1 machines only"),  # not a warning
    ("e2-standard-8", "NVIDIA_L4", 1, "e2-standard machines take no GPU"),
    ("", None, 0, "--machine_type is empty"),
])
def test_launcher_refuses_what_vertex_would_refuse_or_what_drops_the_gpu(machine, accelerator, count, cause):
  with pytest.raises(vertex.cli.UserError, match=re.escape(cause)) as refused:
    accelerators.gpu_for_machine(machine, accelerator, count)
  assert f"--machine_type={machine}" in str(refused.value) or "--accelerator_count" in str(refused.value) or (
      not machine and "--machine_type is empty" in str(refused.value))


def test_an_unknown_machine_family_passes_with_a_warning(caplog):
  assert accelerators.gpu_for_machine("z9-gpu-4", "NVIDIA_L4", 0) == ("NVIDIA_L4", 1)
  assert "not in this launcher's table" in caplog.text


def test_the_job_is_told_what_it_was_given():
  pools = dry_run("--machine_type=a2-highgpu-2g")["jobSpec"]["workerPoolSpecs"]
  assert pools[0]["machineSpec"] == {"machineType": "a2-highgpu-2g", "acceleratorType": "NVIDIA_TESLA_A100",
                                     "acceleratorCount": 2}
  assert pools[0]["containerSpec"]["env"] == [{"name": "EXPECTED_ACCELERATOR", "value": "NVIDIA_TESLA_A100:2"}]
  assert "env" not in dry_run("--machine_type=n1-standard-8")["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
  warned = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=gs://b/s", "--model_dir=gs://b/r",
                      "--machine_type=a3-highgpu-1g")
  assert "no compiled kernels for NVIDIA_H100_80GB" in warned.stderr


def test_the_device_names_tensorflow_reports_match_the_table():
  # Device names as TensorFlow's get_device_details reports them on these GPUs.
  for accelerator, name in [("NVIDIA_L4", "NVIDIA L4"), ("NVIDIA_TESLA_T4", "Tesla T4"),
                            ("NVIDIA_TESLA_A100", "NVIDIA A100-SXM4-40GB"), ("NVIDIA_H100_80GB", "NVIDIA H100 80GB HBM3"),
                            ("NVIDIA_TESLA_P4", "Tesla P4"), ("NVIDIA_TESLA_V100", "Tesla V100-SXM2-16GB")]:
    assert accelerators.GPUS[accelerator].matches(name), (accelerator, name)
  assert not accelerators.GPUS["NVIDIA_L4"].matches("NVIDIA L40S")
  assert not accelerators.GPUS["NVIDIA_TESLA_P4"].matches("Tesla P40")
  assert not accelerators.GPUS["NVIDIA_TESLA_A100"].matches("Tesla T4")


def test_multi_gpu_command():
  assert multi_gpu.command(["--data_dir=d"], num_gpus=4)[1:] == ["-m", "job.train", "--strategy=mirrored",
                                                                  "--data_dir=d"]
  with pytest.raises(Exception, match="no GPU"):
    multi_gpu.command([], num_gpus=0)
  assert multi_gpu.environment(4)["EXPECTED_ACCELERATOR"] == "GPU:4"


def test_hypertune_reports_the_monitored_metric(tmp_path, monkeypatch):
  metric_file = tmp_path / "hypertune" / "output.metrics"
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
  assert callbacks.in_tuning_trial()
  reporter = callbacks.HypertuneReporter("val_f1")
  reporter.on_epoch_end(2, {"val_f1": np.float32(0.625), "loss": 1.0})
  reported = json.loads(metric_file.read_text().strip().splitlines()[-1])
  assert reported["val_f1"] == "0.625" and reported["global_step"] == "2" and reported["trial"] == "7"


def test_a_trial_that_cannot_write_its_metric_file_stops_in_one_line(tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("")
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "a_file" / "hypertune" / "output.metrics"))
  with pytest.raises(callbacks.cli.UserError, match=r"^tuning trial: cloudml-hypertune cannot write its metric "
                     r"file .*a_file/hypertune/output.metrics as uid \d+ \(.*cloudml-hypertune#6\)$"):
    callbacks.HypertuneReporter("val_f1")


def test_the_gpu_image_gives_its_user_the_folders_hypertune_writes():
  gpu_stage = open(os.path.join(REPO, "Dockerfile")).read().split("FROM trainer AS final-gpu", 1)[1].split("FROM ", 1)[0]
  user = re.search(r"^USER (\w+)", gpu_stage, re.M).group(1)
  made = re.search(rf"install -d -o {user} -g {user} (.+)$", gpu_stage, re.M).group(1).split()
  assert made == ["/var/hypertune", "/tmp/hypertune"]  # the platform's folder and the library's default


def test_dockerfile_matches_the_pinned_tensorflow_and_entrypoint():
  dockerfile = open(os.path.join(REPO, "Dockerfile")).read()
  pinned = re.search(r'"tensorflow==([\d.]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
  # The GPU image: a Python base and pip's NVIDIA wheels through the gpu extra, at setup.py's pin
  # (TensorFlow's own -gpu images since 2.18 carry a cuDNN 8 that TensorFlow cannot load).
  assert "FROM tensorflow/tensorflow" not in dockerfile
  python = re.search(r"Written by requirements/lock.py for Python ([\d.]+)",
                     open(os.path.join(REPO, "requirements", "constraints-gpu.txt")).read()).group(1)
  assert f"FROM python:{python}-slim AS base-gpu" in dockerfile
  assert f'"gpu": ["tensorflow[and-cuda]=={pinned}"]' in open(os.path.join(REPO, "setup.py")).read()
  assert 'pip install --no-cache-dir -c requirements/constraints-gpu.txt ".[gpu]"' in dockerfile
  gpu_base = dockerfile.split("AS base-gpu", 1)[1].split("FROM ", 1)[0]
  for setting in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                  "LD_LIBRARY_PATH=/usr/local/nvidia/lib64", "CUDA_CACHE_MAXSIZE="):
    assert setting in gpu_base, setting
  entrypoint = json.loads(re.search(r"ENTRYPOINT (\[.*\])", dockerfile).group(1))
  assert entrypoint[:2] == ["python", "-m"] and os.path.exists(
      os.path.join(REPO, entrypoint[2].replace(".", "/") + ".py"))
  for folder in re.findall(r"^COPY (\w+) ", dockerfile, re.M):
    assert os.path.isdir(os.path.join(REPO, folder)), folder
  assert not re.search(r"(?i)(credential|api_key|secret)", dockerfile.replace("No credentials", ""))


def _requirement_names(lines):
  return {re.split(r"[<>=~!\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines
          if line.strip() and not line.lstrip().startswith("#")}


def test_tpu_image_requirements_cover_setup_py_and_pin_an_existing_release():
  setup_py = open(os.path.join(REPO, "setup.py")).read()
  runtime = re.search(r"install_requires=\[(.*?)\]", setup_py, re.S).group(1)
  needed = _requirement_names(re.findall(r'"([^"]+)"', runtime)) - {"tensorflow", "tensorboard"}
  tpu = open(os.path.join(REPO, "requirements", "tpu.txt")).read().splitlines()
  assert needed <= _requirement_names(tpu), needed - _requirement_names(tpu)
  assert "tensorflow-tpu==2.20.0" in tpu and "tensorboard~=2.20.0" in tpu
  keras_pin = re.search(r'"keras([^"]+)"', setup_py).group(1)
  assert f"keras{keras_pin}" in tpu  # the Keras job/keras_compat.py is gated for
  dockerfile = open(os.path.join(REPO, "Dockerfile")).read()
  assert "pip install --no-cache-dir -c requirements/constraints-tpu.txt -r requirements/tpu.txt" in dockerfile
  assert "/lib/libtpu.so" in dockerfile


@pytest.mark.slow
def test_tpu_image_requirements_resolve_together(tmp_path):
  """What `docker build --build-arg VARIANT=tpu` would install, resolved by pip against the
  package index for this Python (the image's 3.11), without installing anything."""
  report = tmp_path / "report.json"
  result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                           "--quiet", "--report", str(report), "-r",
                           os.path.join(REPO, "requirements", "tpu.txt")],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
  assert versions["tensorflow-tpu"] == "2.20.0" and versions["libtpu"] == "0.0.14"
  assert versions["tensorboard"].startswith("2.20.") and versions["keras"].startswith("3.15.")
  assert "tensorflow" not in versions  # the TPU build replaces it, never beside it


# install_requires name → the module product code imports (tensorboard: Keras's TensorBoard
# callback imports it, not our code; jinja2: pandas' .style imports it for tfds.as_dataframe, the
# TFDS example in docs/data.md, which tests/test_interop.py runs).
IMPORT_NAMES = {"tensorflow": "tensorflow", "keras": "keras", "tensorflow-datasets": "tensorflow_datasets",
                "google-cloud-storage": "google.cloud import storage", "kagglehub": "kagglehub",
                "pandas": "pandas", "scikit-learn": "sklearn", "absl-py": "absl", "matplotlib": "matplotlib",
                "pillow": "PIL", "cloudml-hypertune": "hypertune", "tqdm": "tqdm"}


def test_every_runtime_requirement_is_imported_by_product_code_and_the_sdk_is_not():
  setup_py = open(os.path.join(REPO, "setup.py")).read()
  runtime = _requirement_names(re.findall(r'"([^"]+)"', re.search(r"install_requires=\[(.*?)\]", setup_py,
                                                                      re.S).group(1)))
  assert runtime - {"tensorboard", "jinja2"} == set(IMPORT_NAMES)
  product = "".join(open(os.path.join(REPO, package, name)).read() for package in ("job", "tfrecords")
                    for name in os.listdir(os.path.join(REPO, package)) if name.endswith(".py"))
  for requirement, module in IMPORT_NAMES.items():
    assert re.search(rf"^\s*(import|from) {re.escape(module)}", product, re.M), requirement
  assert "aiplatform" not in product  # the launchers' SDK stays out of the trainer image
  result = subprocess.run([sys.executable, "-c", "import sys, job.train, job.predict, tfrecords.convert; "
                           "print(sorted(m for m in sys.modules if 'aiplatform' in m))"],
                          cwd=REPO, capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("variant, installs", [("gpu", "setup.py"), ("tpu", "requirements/tpu.txt"),
                                                ("test", "setup.py")])
def test_constraints_pin_every_package_each_install_needs(variant, installs):
  pins = dict(line.strip().split("==") for line in open(os.path.join(REPO, "requirements",
                                                                     f"constraints-{variant}.txt"))
              if line.strip() and not line.startswith("#"))
  text = open(os.path.join(REPO, installs)).read()
  if installs == "setup.py":
    text = re.search(r"install_requires=\[(.*?)\]", text, re.S).group(1) + (
        re.search(r'"test": \[(.*?)\]', text, re.S).group(1) if variant == "test" else "")
    needed = _requirement_names(re.findall(r'"([^"]+)"', text))
  else:
    needed = _requirement_names(text.splitlines())
  assert needed <= set(pins), needed - set(pins)
  if variant == "gpu":
    pinned_tf = re.search(r'"tensorflow==([\d.]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
    assert pins["tensorflow"] == pinned_tf
  used_by = open(os.path.join(REPO, ".ci", "run")).read() if variant == "test" else open(
      os.path.join(REPO, "Dockerfile")).read()
  assert f"-c requirements/constraints-{variant}.txt" in used_by


def test_gpu_constraints_pin_the_cuda_libraries_tensorflow_was_built_against():
  """pip's NVIDIA wheels in constraints-gpu.txt against tf.sysconfig.get_build_info() of the
  TensorFlow installed here (the same release): cuDNN and the CUDA runtime of the same major
  version (minor versions are compatible within one), cuBLAS of the CUDA major, and the rest
  of what TensorFlow opens (job/gpu_startup.py's WHEEL_FOLDERS) pinned."""
  import tensorflow as tf
  info = tf.sysconfig.get_build_info()
  pins = dict(line.strip().split("==") for line in open(os.path.join(REPO, "requirements", "constraints-gpu.txt"))
              if line.strip() and not line.startswith("#"))
  cuda_major = info["cuda_version"].split(".")[0]
  assert pins["tensorflow"] == tf.__version__
  assert pins["nvidia-cudnn-cu12"].split(".")[0] == str(info["cudnn_version"]).split(".")[0]
  assert pins["nvidia-cuda-runtime-cu12"].split(".")[0] == cuda_major
  assert pins["nvidia-cublas-cu12"].split(".")[0] == cuda_major
  for package in ("nvidia-cufft-cu12", "nvidia-cusolver-cu12", "nvidia-cusparse-cu12", "nvidia-nccl-cu12",
                  "nvidia-cuda-nvcc-cu12"):  # nvcc: ptxas and libdevice, which XLA needs on a GPU
    assert package in pins, package
  # The held cuDNN still supports the oldest GPU the launcher accepts (requirements/lock.py says why).
  assert pins["nvidia-cudnn-cu12"] == "9.10.2.21" and accelerators.MIN_COMPUTE_CAPABILITY == (6, 0)


def test_the_image_holds_every_package_setup_installs():
  """`docker build` sends what .dockerignore leaves, and the image gets what COPY names: every
  package of setup.py (bench included: docs/performance.md runs bench.gpu in the image)."""
  packages = {name for name in re.findall(r'"(\w+)"', re.search(r"include=\[(.*?)\]",
                                                                 open(os.path.join(REPO, "setup.py")).read(), re.S).group(1))}
  copied = set(re.findall(r"^COPY (\w+) \1$", open(os.path.join(REPO, "Dockerfile")).read(), re.M))
  ignored = set(open(os.path.join(REPO, ".dockerignore")).read().split())
  assert "bench" in packages and packages <= copied and not packages & ignored, (packages, copied, ignored)


def test_gpu_image_runs_as_an_unprivileged_user():
  dockerfile = open(os.path.join(REPO, "Dockerfile")).read()
  gpu_stage = dockerfile.split("FROM trainer AS final-gpu", 1)[1].split("FROM ", 1)[0]
  assert re.search(r"^USER (\w+)", gpu_stage, re.M).group(1) not in ("root", "0")
  assert dockerfile.strip().splitlines()[-2] == "FROM final-${VARIANT}"


def test_upload_model_dry_run_is_a_model_on_the_prebuilt_container(tmp_path):
  output = tmp_path / "model.json"
  result = run_module("launch.upload_model", "--dry_run", f"--output={output}",
                      "--artifact_uri=/gcs/b/runs/r1/model/serving/", "--display_name=ham")
  model = vertex_types().Model.from_json(output.read_text())
  # The pre-built container reads the SavedModel's own folder: the version folder the job writes.
  assert model.artifact_uri == "gs://b/runs/r1/model/serving/1" and model.display_name == "ham"
  assert model.container_spec.image_uri == upload_model.DEFAULT_SERVING_IMAGE
  assert "ends its availability in January 2027" in result.stderr
  custom = upload_model.build_model(display_name="ham", artifact_uri="gs://b/runs/r1/model/serving/1",
                                    serving_image="europe-docker.pkg.dev/p/r/ham10000-serving:1")
  assert custom.artifact_uri == "gs://b/runs/r1/model/serving"  # TF Serving reads the base folder
  assert custom.container_spec.predict_route == "/v1/models/ham10000:predict"
  assert custom.container_spec.health_route == "/v1/models/ham10000"
  assert [p.container_port for p in custom.container_spec.ports] == [8501]
  for bad in ("--artifact_uri=gs://", "--serving_image= "):
    refused = run_module("launch.upload_model", "--dry_run", "--artifact_uri=gs://b/s", bad, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: --")


def test_the_serving_image_does_what_vertex_asks_of_a_custom_container(tmp_path):
  """Dockerfile.serving on a pinned TensorFlow Serving release, its entrypoint run here with a
  stand-in tensorflow_model_server that prints the arguments it was given."""
  dockerfile = open(os.path.join(REPO, "Dockerfile.serving")).read()
  assert re.search(r"^FROM tensorflow/serving:2\.(19|2\d)\.\d+$", dockerfile, re.M)  # pinned, 2.19 or later
  entrypoint = os.path.join(REPO, "launch", "serving_entrypoint.sh")
  assert "COPY launch/serving_entrypoint.sh" in dockerfile
  fake = tmp_path / "tensorflow_model_server"
  fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
  fake.chmod(0o755)
  env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "AIP_HTTP_PORT": "8080", "AIP_STORAGE_URI": "gs://b/r/model/serving"}
  args = subprocess.run(["/bin/sh", entrypoint], env=env, capture_output=True, text=True, check=True).stdout.split()
  assert args == ["--port=8500", "--rest_api_port=8080", f"--model_name={upload_model.TF_SERVING_MODEL_NAME}",
                  "--model_base_path=gs://b/r/model/serving"]
  model = upload_model.build_model(display_name="x", artifact_uri="gs://b/s", serving_image="x/ham10000-serving:1")
  assert model.container_spec.health_route == f"/v1/models/{upload_model.TF_SERVING_MODEL_NAME}"
  missing = subprocess.run(["/bin/sh", entrypoint], env={"PATH": env["PATH"]}, capture_output=True, text=True)
  assert missing.returncode != 0 and "AIP_STORAGE_URI is not set" in missing.stderr
  # The layout TF Serving needs, named before it starts (it would wait forever for a version).
  (tmp_path / "run" / "model" / "serving" / "1" / "variables").mkdir(parents=True)
  (tmp_path / "run" / "model" / "serving" / "1" / "saved_model.pb").write_bytes(b"")
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "saved_model.pb").write_bytes(b"")
  for uri, said in (("gs://b/r/model/serving/1", "is a version folder; TF Serving needs its parent"),
                    (f"{tmp_path}/run/model/serving/1/", "is a version folder"),
                    (f"{tmp_path}/run/model", "holds no version folder"),
                    (f"{tmp_path}/run/model/serving/1/variables", "holds no version folder"),
                    (f"{tmp_path}/export", "is a SavedModel itself")):
    refused = subprocess.run(["/bin/sh", entrypoint], env={**env, "AIP_STORAGE_URI": uri}, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and said in refused.stderr and refused.stdout == "", (uri, refused.stderr)
  served = subprocess.run(["/bin/sh", entrypoint], env={**env, "AIP_STORAGE_URI": f"{tmp_path}/run/model/serving"},
                          capture_output=True, text=True, check=True).stdout.split()
  assert served[-1] == f"--model_base_path={tmp_path}/run/model/serving"


def test_upload_model_waits_for_the_long_running_operation_through_the_real_client():
  from vertex_stand_in import JobServiceStandIn
  service = JobServiceStandIn()
  try:
    model = upload_model.build_model(display_name="ham", artifact_uri="gs://b/serving",
                                     serving_image=upload_model.DEFAULT_SERVING_IMAGE)
    name = upload_model.upload(service.model_client(), model, "p", "us-central1", timeout=30)
  finally:
    service.stop()
  assert name == "projects/p/locations/us-central1/models/7"
  assert service.operation_gets == 1  # the operation was followed until done
  assert service.uploaded[0].model.artifact_uri == "gs://b/serving/1"  # pre-built: the version folder


def test_the_serving_export_answers_alike_under_the_serving_containers_tensorflow(trained_run, tf215_python,
                                                                                   tf219_python, synthetic_dir):
  """The pre-built prediction containers run TensorFlow 2.15, Dockerfile.serving's TF Serving
  2.19: the export loads under both and returns the probabilities this TensorFlow returns."""
  serving = os.path.join(trained_run[1], "serving", "1")
  images = [os.path.join(synthetic_dir, "HAM10000_images_part_1", name) for name in
            sorted(os.listdir(os.path.join(synthetic_dir, "HAM10000_images_part_1")))[:4]]
  script = ("import json, sys, tensorflow as tf\n"
            "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
            "images = tf.constant([open(p, 'rb').read() for p in sys.argv[2:]])\n"
            "out = serve(image_bytes=images)\n"
            "print(json.dumps({'version': tf.__version__, 'p': out['probabilities'].numpy().tolist()}))\n")
  answers = []
  for python in (tf215_python, tf219_python, sys.executable):
    result = subprocess.run([python, "-c", script, serving, *images], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    answers.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert [a["version"][:5] for a in answers] == ["2.15.", "2.19.", "2.21."]
  for answer in answers[:2]:
    assert np.allclose(answer["p"], answers[2]["p"], atol=1e-5)


def test_vertex_preflight_runs_the_preflight_on_the_same_machines_with_a_short_timeout():
  job = dry_run("--machine_type=g2-standard-8", "--preflight", "--", "--global_batch_size=64")
  pool = job["jobSpec"]["workerPoolSpecs"][0]
  assert pool["containerSpec"]["command"] == ["python", "-m", "job.preflight"]
  assert pool["containerSpec"]["args"] == ["--data_dir=gs://b/shards", "--global_batch_size=64"]
  assert pool["containerSpec"]["env"] == [{"name": "EXPECTED_ACCELERATOR", "value": "NVIDIA_L4:1"}]
  assert pool["machineSpec"]["acceleratorType"] == "NVIDIA_L4"
  assert job["jobSpec"]["scheduling"]["timeout"] == vertex.PREFLIGHT_TIMEOUT
  assert "command" not in dry_run("--machine_type=g2-standard-8")["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
  refused = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=gs://b/s", "--model_dir=gs://b/r",
                       "--preflight", "--tune", check=False)
  assert refused.returncode == 1 and "--preflight" in refused.stderr


def test_vertex_preflight_prints_the_report_or_names_the_failed_check(capsys):
  report = {"ok": False, "failed_check": "data", "checks": [
      {"check": "devices", "ok": True, "detail": "TensorFlow 2.21.0"},
      {"check": "data", "ok": False, "detail": "gs://b/shards/train-00003-of-00016.tfrecord: sha256 differs"}]}
  with pytest.raises(vertex.cli.UserError, match="failed at its data check"):
    vertex.print_preflight_report(report, "gs://b/r")
  out, err = capsys.readouterr()
  assert json.loads(out) == report and "FAIL data" in err and "train-00003" in err
  with pytest.raises(vertex.cli.UserError, match="wrote no report to gs://b/r/model/preflight.json"):
    vertex.print_preflight_report(None, "gs://b/r")


@pytest.mark.parametrize("passthrough, named", [(["--monitor=val_auc"], "--monitor"),
                                                (["--stage1_epoch=3"], "stage1_epoch"),
                                                (["--strategy", "gpu"], "--strategy")])
def test_vertex_refuses_trainer_flags_the_job_would_refuse_before_submitting(passthrough, named):
  with pytest.raises(vertex.cli.UserError, match=rf"after --: .*{named}"):
    _custom_job(passthrough=passthrough)
  _custom_job(passthrough=["--monitor=val_loss", "--stage1_epochs=3", "--noserving", "--traceback"])
  result = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=gs://b/s", "--model_dir=gs://b/r",
                      "--", *passthrough, check=False)
  assert result.returncode == 1 and result.stderr.startswith("error: after --")  # no TensorFlow start-up lines


def test_vertex_folds_submits_one_job_per_fold_and_prints_the_command_that_finishes():
  result = run_module("launch.vertex", "--dry_run", "--image_uri=us-docker.pkg.dev/p/ham/trainer:1",
                      "--data_dir=gs://b/shards", "--model_dir=gs://b/cv", "--folds=3", "--", "--image_size=128")
  jobs = json.loads(result.stdout)
  assert len(jobs) == 3
  for fold, job in enumerate(jobs):
    assert job["displayName"].endswith(f"-fold-{fold}")
    assert job["jobSpec"]["baseOutputDirectory"] == {"outputUriPrefix": f"gs://b/cv/fold-{fold}"}
    # Where job.cross_validate looks for the fold, and nothing the folds' ensemble does later.
    assert job["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["args"] == [
        "--data_dir=gs://b/shards", "--image_size=128", f"--fold={fold}", f"--model_dir=gs://b/cv/fold-{fold}",
        "--noevaluate", "--noserving"]
    vertex_types().CustomJob.from_json(json.dumps(job))
  assert result.stderr.strip().splitlines()[-1].strip() == (
      "python -m job.cross_validate --data_dir=gs://b/shards --model_dir=gs://b/cv --image_size=128")
  refused = run_module("launch.vertex", "--dry_run", "--image_uri=u", "--data_dir=gs://b/shards",
                       "--model_dir=gs://b/cv", "--folds=3", "--", "--fold=1", check=False)
  assert refused.returncode == 1 and "--fold with --folds" in refused.stderr
