"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import REPO, free_ports
from job import keras_compat

TINY_FIT = os.path.join(os.path.dirname(__file__), "multi_worker_fit.py")

pytestmark = pytest.mark.slow  # each test trains, or starts a server


def run_workers(command, tmp_path, timeout=900, env=None):
  """Runs `command` as worker 0 and worker 1 of one cluster; returns their (returncode, output)."""
  cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
  tmp_path.mkdir(parents=True, exist_ok=True)
  processes = []
  for index in range(2):
    log = open(tmp_path / f"worker{index}.log", "w")
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    processes.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {}).get(index, {}), "TF_CONFIG": tf_config}))
  try:
    codes = [p.wait(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
  return [(code, open(tmp_path / f"worker{i}.log").read()) for i, code in enumerate(codes)]


@pytest.mark.parametrize("fixes, error", [("none", "with an unsupported type"),
                                          ("build", "Invalid reduction dimension 0")])
def test_installed_keras_still_needs_each_fix(fixes, error, tmp_path):
  """When this fails, Keras has fixed keras-team/keras#20585: drop job/keras_compat.py."""
  assert keras_compat.needed()
  for code, output in run_workers([sys.executable, TINY_FIT, fixes], tmp_path, timeout=300):
    assert code != 0 and error in output, output[-3000:]


def test_fixed_fit_on_two_workers_matches_one_device(tmp_path):
  for code, output in run_workers([sys.executable, TINY_FIT, "full"], tmp_path, timeout=300):
    assert code == 0, output[-3000:]
    losses = json.loads(output.strip().splitlines()[-1])
    assert losses["multi_worker"] == pytest.approx(losses["one_device"], rel=1e-5)


def test_keras_compat_applies_only_to_affected_versions():
  assert keras_compat.needed("3.0.5") and keras_compat.needed("3.15.1")
  assert not keras_compat.needed("3.16.0") and not keras_compat.needed("2.15.0")


def test_two_workers_train_both_stages_and_only_the_chief_writes(shards_dir, tmp_path):
  model_dir = tmp_path / "model"
  worker_tmp = tmp_path / "worker_tmp"
  worker_tmp.mkdir()
  # --debug validates on 32 images: at a global batch of 20 the last batch is padded, and the
  # second worker's half of it holds 2 images and 8 rows of padding.
  command = [sys.executable, "-m", "job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}",
             "--weights=none", "--noserving", "--image_size=32", "--global_batch_size=20", "--stage1_epochs=1", "--debug"]
  # Stage 1 alone, then a rerun that must skip it on both workers (the chief's marker),
  # else they would train different stages and their collectives would not match.
  for code, output in run_workers(command + ["--stage2_epochs=0", "--noevaluate"], tmp_path / "first",
                                  env={1: {"TMPDIR": str(worker_tmp)}}):
    assert code == 0, output[-5000:]
  results = run_workers(command + ["--stage2_epochs=1"], tmp_path, env={1: {"TMPDIR": str(worker_tmp)}})
  for code, output in results:
    assert code == 0, output[-5000:]
    assert "stage 1 already finished" in output
  config = json.load(open(model_dir / "run_config.json"))
  assert config["strategy"] == "MultiWorkerMirroredStrategy" and config["num_replicas"] == 2
  history = pd.read_csv(model_dir / "history.csv")
  assert history["stage"].tolist() == [1, 2]
  assert (model_dir / "best_model.keras").exists() and (model_dir / "checkpoints" / "stage2.json").exists()
  # The chief evaluated once; the other worker neither evaluated nor left files behind.
  predictions = pd.read_csv(model_dir / "predictions.csv")
  assert len(predictions) == predictions["image_id"].nunique()
  assert "test split, " in results[0][1] and "test split, " not in results[1][1]
  assert os.listdir(worker_tmp) == []


def test_two_workers_with_fewer_train_shards_than_workers(source, tmp_path):
  """One train shard for two workers (splitting by file would leave one without data), a
  validation split of 46 images that ends in a padded batch, and a cache on disk."""
  from tfrecords import convert
  data_dir = str(tmp_path / "one_shard")
  convert.convert(source, data_dir, convert.Settings(source=source.description, num_train_shards=1,
                                                     num_eval_shards=1, image_size=32), workers=1)
  model_dir = tmp_path / "model"
  command = [sys.executable, "-m", "job.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
             "--weights=none", "--noserving", "--image_size=32", "--global_batch_size=20", "--stage1_epochs=1",
             "--stage2_epochs=0", "--noevaluate", "--cache=disk"]
  for code, output in run_workers(command, tmp_path):
    assert code == 0, output[-5000:]
    assert "1 train shards for 2 workers: splitting the train split between workers by example" in output
    assert "cache: disk" in output
  assert pd.read_csv(model_dir / "history.csv")["stage"].tolist() == [1]
