"""The launchers and the Dockerfile, checked without a cloud or a Docker engine."""

import json
import os
import re

import numpy as np
import pytest

from conftest import REPO, run_module
from job import callbacks
from launch import multi_gpu, vertex


def dry_run(*args):
  result = run_module("launch.vertex", "--dry_run", "--image_uri=us-docker.pkg.dev/p/ham/trainer:1",
                      "--data_dir=gs://b/shards", "--model_dir=gs://b/runs/r1", *args)
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
  assert spec["scheduling"]["strategy"] == "SPOT" and spec["serviceAccount"] == "sa@p.iam"


def test_vertex_dry_run_single_gpu_and_tpu():
  single = dry_run("--machine_type=g2-standard-8", "--accelerator_type=NVIDIA_L4")
  pools = single["jobSpec"]["workerPoolSpecs"]
  assert len(pools) == 1 and pools[0]["containerSpec"]["args"] == ["--data_dir=gs://b/shards"]
  tpu = dry_run("--machine_type=ct5lp-hightpu-4t")
  assert "--strategy=tpu" in tpu["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["args"]


def test_vertex_rejects_bad_flags():
  result = run_module("launch.vertex", "--dry_run", "--image_uri=x", "--data_dir=/local",
                      "--model_dir=gs://b/r", check=False)
  assert result.returncode != 0 and "--data_dir=/local" in result.stderr
  with pytest.raises(ValueError, match="--accelerator_type=NVIDIA_NOPE"):
    vertex.build_custom_job(display_name="x", image_uri="x", data_dir="gs://b", model_dir="gs://b",
                            machine_type="n1-standard-8", accelerator_type="NVIDIA_NOPE", accelerator_count=1,
                            replica_count=1, spot=False, service_account=None, tensorboard=None,
                            passthrough=[])


def test_multi_gpu_command():
  assert multi_gpu.command(["--data_dir=d"], num_gpus=4)[1:] == ["-m", "job.train", "--strategy=mirrored",
                                                                  "--data_dir=d"]
  with pytest.raises(Exception, match="no GPU"):
    multi_gpu.command([], num_gpus=0)


def test_hypertune_reports_the_monitored_metric(tmp_path, monkeypatch):
  metric_file = tmp_path / "hypertune" / "output.metrics"
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
  assert callbacks.in_tuning_trial()
  reporter = callbacks.HypertuneReporter("val_f1")
  reporter.on_epoch_end(2, {"val_f1": np.float32(0.625), "loss": 1.0})
  reported = json.loads(metric_file.read_text().strip().splitlines()[-1])
  assert reported["val_f1"] == "0.625" and reported["global_step"] == "2" and reported["trial"] == "7"


def test_dockerfile_matches_the_pinned_tensorflow_and_entrypoint():
  dockerfile = open(os.path.join(REPO, "Dockerfile")).read()
  pinned = re.search(r'"tensorflow==([\d.]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
  assert f"ARG TF_VERSION={pinned}" in dockerfile
  assert "FROM tensorflow/tensorflow:${TF_VERSION}-gpu" in dockerfile
  entrypoint = json.loads(re.search(r"ENTRYPOINT (\[.*\])", dockerfile).group(1))
  assert entrypoint[:2] == ["python", "-m"] and os.path.exists(
      os.path.join(REPO, entrypoint[2].replace(".", "/") + ".py"))
  for folder in re.findall(r"^COPY (\w+) ", dockerfile, re.M):
    assert os.path.isdir(os.path.join(REPO, folder)), folder
  assert not re.search(r"(?i)(credential|api_key|secret)", dockerfile.replace("No credentials", ""))
