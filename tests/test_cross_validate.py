"""job.cross_validate end to end on two folds: killed and resumed, its out-of-fold predictions,
and the ensemble's export against job.predict. One cross-validation, shared by the tests."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import helpers
from helpers import REPO, run_module, wait_until, warnings_and_errors

pytestmark = pytest.mark.slow  # trains two folds

TRAIN_FLAGS = ["--weights=none", "--image_size=32", "--global_batch_size=16", "--stage1_epochs=1",
               "--stage2_epochs=0", "--stage1_lr=1e-3", "--tta=flip"]


@pytest.fixture(scope="module")
def folded_shards(source, tmp_path_factory):
  from tfrecords import convert
  out = str(tmp_path_factory.mktemp("folded_shards"))
  convert.convert(source, out, convert.Settings(source=source.description, image_size=32, folds=2), workers=2)
  return out


@pytest.fixture(scope="module")
def cross_validation(folded_shards, tmp_path_factory):
  """Killed (SIGKILL, no clean-up) once fold 0 has finished, then run again to the end.
  Returns the root, fold 0's files' modification times when it was killed, and the second log."""
  root = str(tmp_path_factory.mktemp("cv") / "root")
  command = ["-m", "job.cross_validate", f"--data_dir={folded_shards}", f"--model_dir={root}", *TRAIN_FLAGS]
  first = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    wait_until(lambda: os.path.exists(os.path.join(root, "fold-1", "run_config.json")), first,
               "fold 1 started", timeout=600)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  fold0 = os.path.join(root, "fold-0")
  stamps = {name: os.stat(os.path.join(fold0, name)).st_mtime_ns for name in os.listdir(fold0)
            if os.path.isfile(os.path.join(fold0, name))}
  assert not os.path.exists(os.path.join(root, "oof_predictions.csv"))
  second = run_module(*command[1:])
  return root, stamps, second.stderr


def test_a_killed_cross_validation_resumes_without_retraining_a_finished_fold(cross_validation):
  root, stamps, log = cross_validation
  assert "fold 0 of 2: finished" in log and "fold 1 of 2: training" in log
  assert warnings_and_errors(log) == []
  fold0 = os.path.join(root, "fold-0")
  assert {"best_model.keras", "calibration.json", "history.csv"} <= set(stamps)
  assert {name: os.stat(os.path.join(fold0, name)).st_mtime_ns for name in stamps} == stamps
  for name in ("oof_predictions.csv", "cv_metrics.json", "cross_validation.json", "metrics.json"):
    assert os.path.exists(os.path.join(root, name)), name


def test_out_of_fold_predictions_come_from_the_fold_model_that_never_saw_them(cross_validation, folded_shards):
  from job import ensemble, evaluate
  from tfrecords import manifest
  root, _, _ = cross_validation
  oof = pd.read_csv(os.path.join(root, "oof_predictions.csv"))
  split = pd.read_csv(os.path.join(folded_shards, "split.csv"))
  not_test = split[split["split"] != "test"].set_index("image_id")
  assert sorted(oof["image_id"]) == sorted(not_test.index)  # each non-test image exactly once
  assert (oof.set_index("image_id")["fold"] == not_test.loc[oof["image_id"], "fold"]).all()
  oof = oof.set_index("image_id")
  read = manifest.read(folded_shards)
  columns = evaluate.probability_columns(manifest.class_names(read))
  for fold in (0, 1):
    info = manifest.fold_split_info(folded_shards, read, fold, "validation")
    own, other = (evaluate.predict_split(ensemble.load([os.path.join(root, f"fold-{k}")]), info, "flip")
                  .set_index("image_id") for k in (fold, 1 - fold))
    expected = oof.loc[own.index, columns].to_numpy()
    np.testing.assert_allclose(own[columns].to_numpy(), expected, atol=1e-6)
    assert np.abs(other[columns].to_numpy() - expected).max() > 1e-3  # the other model is told apart


def test_the_cross_validation_export_serves_what_job_predict_returns(cross_validation, synthetic_dir, tmp_path):
  import tensorflow as tf
  root, _, _ = cross_validation
  paths = helpers.synthetic_image_paths(synthetic_dir, 3)
  output = tmp_path / "predictions.csv"
  run_module("job.predict", f"--model_dir={root}", "--tta=flip", f"--output={output}", *paths)
  predicted = pd.read_csv(output)
  columns = [c for c in predicted if c.startswith("p_")]
  serve = tf.saved_model.load(os.path.join(root, "serving", "1")).signatures["serving_default"]
  served = serve(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))["probabilities"].numpy()
  np.testing.assert_allclose(served, predicted[columns].to_numpy(), atol=1e-5)
  info = json.load(open(os.path.join(root, "serving", "1", "assets.extra", "serving.json")))
  assert info["tta"] == "flip" and info["num_members"] == 2


def test_the_study_runs_on_a_finished_cross_validation_without_training_it_again(cross_validation, folded_shards):
  root, stamps, _ = cross_validation
  result = run_module("bench.cross_validation_study", f"--data_dir={folded_shards}", f"--model_dir={root}",
                      "--stage1_epochs=1", "--stage2_epochs=0", "--weak_stage1_epochs=1")
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert "fold 0 of 2: finished" in result.stderr and "fold 1 of 2: finished" in result.stderr
  fold0 = os.path.join(root, "fold-0")
  assert {name: os.stat(os.path.join(fold0, name)).st_mtime_ns for name in stamps} == stamps
  assert figures["folds"] == 2 and len(figures["single_fold_dihedral"]["values"]) == 2
  for value in (figures["ensemble_none"], figures["ensemble_dihedral"], *figures["single_fold_none"]["values"]):
    assert 0 <= value <= 1
  assert -1 <= figures["weaker_vs_fold_0"]["balanced_accuracy"]["difference"] <= 1
