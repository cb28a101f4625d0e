"""The training job end to end: one shared run on ram://, mirrored, kill-and-resume, the demo."""

import json
import os
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn import metrics as skm

import helpers
from helpers import REPO, copy_tree, in_a_terminal, python_warnings, run_module, wait_until, warnings_and_errors
from job import ensemble, keras_compat, predict, train
from tfrecords import features



def test_artifacts_are_written_to_a_non_local_model_dir(trained_run):
  _, run_dir = trained_run
  for name in ("best_model.keras", "label_map.json", "history.csv", "run_config.json", "metrics.json",
               "predictions.csv", "calibration.json", "confusion_matrix.png", "training_curves.png",
               "reliability_diagram.png", "checkpoints/stage1.json", "checkpoints/stage2.json", "serving/1/saved_model.pb"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  assert any("events.out.tfevents" in f for _, _, files in os.walk(os.path.join(run_dir, "logs"))
             for f in files)
  assert json.load(open(os.path.join(run_dir, "label_map.json"))) == features.LABEL_MAP


def test_history_spans_both_stages_with_continuous_epochs(trained_run):
  _, run_dir = trained_run
  history = pd.read_csv(os.path.join(run_dir, "history.csv"))
  assert history["epoch"].tolist() == [0, 1, 2]
  assert history["stage"].tolist() == [1, 1, 2]
  # The seed's 2e-5 is for batch 32; at 16 the square-root rule divides it by √2.
  assert history["learning_rate"].iloc[-1] == pytest.approx(2e-5 * (16 / 32) ** 0.5)
  for column in ("loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"):
    assert history[column].notna().all(), column
  best = json.load(open(os.path.join(run_dir, "best_model.json")))
  assert best["value"] == pytest.approx(history["val_f1"].max())  # best carried across stages
  assert best["epoch"] == history["epoch"][history["val_f1"].idxmax()]


def test_run_config_records_what_a_reader_needs(trained_run, shards_dir):
  import hashlib
  _, run_dir = trained_run
  config = json.load(open(os.path.join(run_dir, "run_config.json")))
  assert config["image_size"] == 32 and config["flags"]["global_batch_size"] == 16
  assert config["versions"]["tensorflow"] == tf.__version__
  manifest = open(os.path.join(shards_dir, "manifest.json"), "rb").read()
  assert config["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()


def test_best_model_is_the_plain_inner_model(trained_run):
  _, run_dir = trained_run
  model = keras.saving.load_model(os.path.join(run_dir, "best_model.keras"), safe_mode=True)
  assert model.name == "ham10000_resnet50"
  assert model.input_shape == (None, None, None, 3)
  assert model.get_layer("avg_pool").dtype_policy.name == "float32"
  probabilities = model.predict(np.zeros((2, 224, 224, 3), np.float32), verbose=0)
  assert probabilities.shape == (2, 7) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_seed_inference_example_runs_verbatim(trained_run, synthetic_dir, tmp_path):
  _, run_dir = trained_run
  image = os.path.join(synthetic_dir, "HAM10000_images_part_1", "ISIC_0024306.jpg")
  label, probability = helpers.run_seed_inference_example(run_dir, image, tmp_path)
  assert label in features.CLASS_NAMES and 0 <= probability <= 1


def test_metrics_match_scikit_learn_on_predictions(trained_run):
  metrics, run_dir = trained_run
  predictions = pd.read_csv(os.path.join(run_dir, "predictions.csv"))
  written = json.load(open(os.path.join(run_dir, "metrics.json")))
  assert written["balanced_accuracy"] == pytest.approx(
      skm.balanced_accuracy_score(predictions["label"], predictions["prediction"]))
  assert written["macro_f1"] == pytest.approx(
      skm.f1_score(predictions["label"], predictions["prediction"], average="macro",
                   labels=list(features.CLASS_NAMES), zero_division=0))
  assert written["baselines"]["always_nv_accuracy"] == pytest.approx((predictions["label"] == "nv").mean())
  probabilities = predictions[[f"p_{c}" for c in features.CLASS_NAMES]].to_numpy()
  assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
  assert (np.asarray(features.CLASS_NAMES)[probabilities.argmax(axis=1)] == predictions["prediction"]).all()
  assert metrics["balanced_accuracy"] == written["balanced_accuracy"]
  # The AUCs too, from the file a user opens: p_* are the calibrated probabilities the figures use,
  # p_*_raw the model's own, which give the *_raw AUCs.
  labels = predictions["label"].map({c: i for i, c in enumerate(features.CLASS_NAMES)}).to_numpy()
  present = sorted(set(labels))
  raw = predictions[[f"p_{c}_raw" for c in features.CLASS_NAMES]].to_numpy()
  for columns, key in ((probabilities, "macro_roc_auc"), (raw, "macro_roc_auc_raw")):
    aucs = [skm.roc_auc_score(labels == i, columns[:, i]) for i in present]
    assert written[key] == pytest.approx(np.mean(aucs)), key
  assert written["confidence_intervals_95"]["unit"] == "lesion"


def test_metrics_json_holds_the_isic_set(trained_run):
  _, run_dir = trained_run
  written = json.load(open(os.path.join(run_dir, "metrics.json")))
  for key in ("balanced_accuracy", "macro_f1", "macro_roc_auc", "accuracy"):
    ci = written["confidence_intervals_95"][key]
    assert ci["low"] <= written[key] <= ci["high"], key
  assert set(written["per_class"]) == set(features.CLASS_NAMES)
  assert set(written["subgroups_balanced_accuracy"]) == {"sex", "age_band", "localization"}
  calibration = json.load(open(os.path.join(run_dir, "calibration.json")))
  assert written["calibration"]["temperature"] == calibration["temperature"] > 0
  assert written["calibration"]["nll"]["after"] <= written["calibration"]["nll"]["before"] + 0.05
  # The melanoma threshold was chosen on validation, on the calibrated probabilities that
  # job.predict and the serving export return, and applied unchanged here.
  assert calibration["melanoma_threshold"]["scale"] == "calibrated"
  assert written["melanoma"]["threshold"] == calibration["melanoma_threshold"]["value"]
  assert written["melanoma"]["scale"] == "calibrated probabilities"
  assert written["melanoma"]["chosen_on"] == "validation"


def test_run_config_records_the_effective_learning_rates(trained_run):
  _, run_dir = trained_run
  config = json.load(open(os.path.join(run_dir, "run_config.json")))
  assert config["effective_learning_rates"] == pytest.approx({"stage1": 1e-3 * 0.5 ** 0.5,
                                                              "stage2": 2e-5 * 0.5 ** 0.5})
  assert config["fingerprint"]["global_batch_size"] == 16 and config["fingerprint"]["lr_scaling"] == "sqrt"


def test_another_run_into_the_same_model_dir_stops_before_building_anything(trained_run, shards_dir,
                                                                             tmp_path):
  _, run_dir = trained_run
  model_dir = tmp_path / "reused"
  copy_tree(run_dir, str(model_dir))
  before = (model_dir / "run_config.json").read_bytes()
  result = run_module("job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}", "--image_size=48",
                      "--global_batch_size=16", "--weights=none", check=False)
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert "holds another run" in line and "image_size: 32 → 48" in line and "--overwrite" in line
  assert "weights: " in line  # every differing setting is named
  assert (model_dir / "run_config.json").read_bytes() == before
  assert "train: " not in result.stderr  # stopped before the datasets and the model


def test_evaluation_reads_the_calibration_and_needs_no_validation_split(trained_run, shards_dir, tmp_path):
  _, run_dir = trained_run
  model_dir, data_dir = tmp_path / "run", tmp_path / "test_only"
  copy_tree(run_dir, str(model_dir))
  copy_tree(shards_dir, str(data_dir))
  manifest = json.load(open(data_dir / "manifest.json"))
  del manifest["splits"]["validation"]
  (data_dir / "manifest.json").write_text(json.dumps(manifest))
  calibration = (model_dir / "calibration.json").read_bytes()
  shown = in_a_terminal("job.evaluate", f"--model_dir={model_dir}", f"--data_dir={data_dir}")
  test_images = manifest["splits"]["test"]["num_examples"]
  assert re.search(rf"predicting test: +100%\|.*\| {test_images}/{test_images} \[", shown), shown[-2000:]
  assert (model_dir / "calibration.json").read_bytes() == calibration  # nothing refitted
  original = json.load(open(os.path.join(run_dir, "metrics.json")))
  again = json.load(open(model_dir / "metrics.json"))
  assert again["balanced_accuracy"] == original["balanced_accuracy"]
  assert again["melanoma"]["threshold"] == original["melanoma"]["threshold"]


def test_predict_cli_on_a_file_and_a_folder(trained_run, synthetic_dir, tmp_path):
  _, run_dir = trained_run
  folder = os.path.join(synthetic_dir, "HAM10000_images_part_2")
  one = os.path.join(synthetic_dir, "HAM10000_images_part_1", "ISIC_0024306.jpg")
  few = tmp_path / "few"
  few.mkdir()
  for name in sorted(os.listdir(folder))[:3]:
    os.link(os.path.join(folder, name), few / name)
  result = run_module("job.predict", f"--model_dir={run_dir}", f"--output={tmp_path / 'p.csv'}", one,
                      str(few))
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4 and lines[0].startswith("ISIC_0024306.jpg\t")
  table = pd.read_csv(tmp_path / "p.csv")
  assert table["label"].isin(features.CLASS_NAMES).all()
  assert np.allclose(table[[f"p_{c}" for c in features.CLASS_NAMES]].sum(axis=1), 1, atol=1e-5)
  assert table["top3"].str.split().str.len().eq(3).all()
  assert "calibration.json" not in result.stderr  # a finished run: calibrated, nothing to say


def test_predict_says_when_a_run_has_no_calibration_yet(trained_run, tmp_path, caplog):
  _, run_dir = trained_run
  unfinished = tmp_path / "unfinished"
  copy_tree(run_dir, str(unfinished))
  os.remove(unfinished / "calibration.json")
  unfinished_run = ensemble.load([str(unfinished)])
  assert unfinished_run.members[0].calibration_for("none")["temperature"] == 1.0
  unfinished_run.uncalibrated_warning("these are")
  assert f"--model_dir={unfinished} has no calibration.json" in caplog.text and "not calibrated" in caplog.text
  caplog.clear()
  ensemble.load([run_dir]).uncalibrated_warning("these are")
  assert caplog.text == ""


def test_predict_names_unreadable_files_and_predicts_the_rest(trained_run, synthetic_dir, tmp_path):
  _, run_dir = trained_run
  folder = tmp_path / "mixed"
  folder.mkdir()
  source = os.path.join(synthetic_dir, "HAM10000_images_part_1", "ISIC_0024306.jpg")
  os.link(source, folder / "good.jpg")
  image = tf.io.decode_jpeg(open(source, "rb").read())
  (folder / "as_png.PNG").write_bytes(tf.io.encode_png(image).numpy())
  (folder / "notes.jpg").write_text("not an image")
  pngs = tmp_path / "pngs"
  pngs.mkdir()
  (pngs / "only.png").write_bytes(tf.io.encode_png(image).numpy())
  result = run_module("job.predict", f"--model_dir={run_dir}", f"--output={tmp_path / 'p.csv'}",
                      str(folder), str(pngs), check=False)
  assert result.returncode == 1
  printed = sorted(line.split("\t")[0] for line in result.stdout.strip().splitlines())
  assert printed == ["as_png.PNG", "good.jpg", "only.png"]  # a folder of PNGs is not empty
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: 1 of 4 files could not be read as images: {folder / 'notes.jpg'} (the others were predicted)")
  table = pd.read_csv(tmp_path / "p.csv")
  assert len(table) == 3
  same = table.set_index(table["path"].map(os.path.basename))
  assert np.allclose(same.loc["good.jpg", [f"p_{c}" for c in features.CLASS_NAMES]].astype(float),
                     same.loc["as_png.PNG", [f"p_{c}" for c in features.CLASS_NAMES]].astype(float), atol=1e-3)


def test_training_writes_a_serving_model_that_answers_jpeg_bytes(trained_run, synthetic_dir):
  """The run's serving/ SavedModel, written at the end of training without a flag: what a
  `{"image_bytes": {"b64": ...}}` request hands it once TF Serving has decoded the base64."""
  _, run_dir = trained_run
  inference = ensemble.load([run_dir])
  image = os.path.join(synthetic_dir, "HAM10000_images_part_1", "ISIC_0024306.jpg")
  serving = tf.saved_model.load(os.path.join(run_dir, "serving", "1")).signatures["serving_default"]
  assert list(serving.structured_input_signature[1]) == ["image_bytes"]
  out = serving(image_bytes=tf.constant([open(image, "rb").read()] * 2))
  expected, _ = predict.predict_files(inference, [image])
  probabilities = out["probabilities"].numpy()
  assert probabilities.shape == (2, 7)
  assert np.allclose(probabilities[0], expected[[f"p_{c}" for c in features.CLASS_NAMES]].iloc[0], atol=1e-4)
  assert out["label"].numpy()[0].decode() == expected["label"][0]
  assert [c.decode() for c in out["classes"].numpy()[0]] == list(features.CLASS_NAMES)


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices(shards_dir, tmp_path):
  model_dir = tmp_path / "mirrored"
  # --debug validates on 32 images: at a global batch of 30 the last batch holds two images,
  # fewer than the three replicas (one would get an empty batch without the padding).
  result = run_module("job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}", "--strategy=mirrored",
                      "--noserving", "--cpu_devices=3", "--weights=none", "--image_size=32",
                      "--global_batch_size=30", "--stage1_epochs=1", "--stage2_epochs=1", "--debug")
  assert python_warnings(result.stderr) == []  # a healthy run's log warns of nothing
  config = json.load(open(model_dir / "run_config.json"))
  assert config["strategy"] == "MirroredStrategy" and config["num_replicas"] == 3
  assert pd.read_csv(model_dir / "history.csv")["stage"].tolist() == [1, 2]
  assert (model_dir / "best_model.keras").exists() and (model_dir / "metrics.json").exists()


# Keras's own fit with two steps per execution over two replicas: the upstream failure that
# job.train refuses (keras-team/keras#19246). When Keras fixes it, this fails: lift the refusal.
KERAS_MULTI_STEP_OVER_TWO_REPLICAS = """
import tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
  model.compile("adam", "categorical_crossentropy", steps_per_execution=2)
model.fit(tf.data.Dataset.from_tensors((tf.zeros([8, 4]), tf.zeros([8, 2]))).repeat(), steps_per_epoch=4, verbose=0)
"""


@pytest.mark.slow
def test_several_steps_per_execution_over_several_replicas_are_refused_before_anything_is_read(tmp_path):
  upstream = subprocess.run([sys.executable, "-c", KERAS_MULTI_STEP_OVER_TWO_REPLICAS], capture_output=True,
                            text=True, timeout=300)
  assert upstream.returncode != 0 and "You must feed a value for placeholder tensor" in upstream.stderr
  result = run_module("job.train", f"--data_dir={tmp_path / 'no-shards'}", f"--model_dir={tmp_path / 'run'}",
                      "--strategy=mirrored", "--cpu_devices=2", "--steps_per_execution=2", check=False)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
      "error: --steps_per_execution=2 under --strategy=mirrored with 2 replicas: Keras's multi-step loop fails "
      "under several GPU or CPU replicas (keras-team/keras#19246); leave it at 1 there (it pays on TPUs and on "
      "one device)")
  assert not (tmp_path / "run").exists()


def _history_has_epoch(history, epoch):
  return lambda: history.exists() and epoch in pd.read_csv(history)["epoch"].tolist()


def _backup_reached(backup_dir, epoch, mid_epoch=False):
  """The backup resumes at `epoch` or later (mid_epoch: saved after a step of it, not at its start)."""
  def reached():
    try:
      saved = json.loads((backup_dir / "training_metadata.json").read_text())
    except (FileNotFoundError, ValueError):
      return False
    return saved["epoch"] >= epoch and (saved["batch"] > 0 or not mid_epoch)
  return reached


@pytest.mark.slow
def test_preempted_then_killed_training_resumes_without_repeating_epochs(shards_dir, tmp_path):
  model_dir = tmp_path / "resumed"
  args = [sys.executable, "-m", "job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}",
          "--weights=none", "--noserving", "--image_size=32", "--global_batch_size=8", "--stage1_epochs=2",
          "--stage2_epochs=2", "--strategy=one_device", "--noevaluate", "--backup_steps=5"]
  history = model_dir / "history.csv"

  def start(log):
    return subprocess.Popen(args, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)

  first = start(tmp_path / "first.log")
  wait_until(_history_has_epoch(history, 0), first, "epoch 0")
  wait_until(_backup_reached(model_dir / "backup" / "stage1", 1, mid_epoch=True), first,
             "a step-level backup in epoch 1")
  first.send_signal(signal.SIGTERM)  # mid-epoch, as when Vertex AI reclaims a spot VM
  assert first.wait(timeout=120) == train.PREEMPTED_EXIT_CODE
  assert "preempted: backup saved in" in open(tmp_path / "first.log").read()
  assert " at epoch 2, step " in open(tmp_path / "first.log").read()
  backup = json.load(open(model_dir / "backup" / "stage1" / "training_metadata.json"))
  assert backup["epoch"] == 1  # resume in stage 1's second epoch
  # EarlyStopping and ReduceLROnPlateau as they stood after epoch 0, this run's fingerprint.
  assert backup["callbacks"]["EarlyStopping"]["wait"] == 0
  assert backup["callbacks"]["ReduceLROnPlateau"]["best"] == pytest.approx(
      pd.read_csv(history)["val_loss"].iloc[0], rel=1e-5)
  assert backup["fingerprint"]["image_size"] == 32
  row0 = pd.read_csv(history).iloc[0].to_dict()

  second = start(tmp_path / "second.log")
  wait_until(_history_has_epoch(history, 2), second, "epoch 2")
  # The backup is written after the history.
  wait_until(_backup_reached(model_dir / "backup" / "stage2", 3), second, "the backup of epoch 2")
  second.send_signal(signal.SIGKILL)  # mid-stage 2, no warning
  second.wait()
  log = open(tmp_path / "second.log").read()
  assert "Epoch 2/2" in log and "Epoch 1/2" not in log  # stage 1 resumed at its second epoch
  assert "resumed EarlyStopping: {'wait': 0" in log

  third = start(tmp_path / "third.log")
  assert third.wait(timeout=600) == 0
  log = open(tmp_path / "third.log").read()
  assert "stage 1 already finished" in log
  assert "Epoch 4/4" in log and "Epoch 3/4" not in log  # stage 2 resumed at its second epoch
  final = pd.read_csv(history)
  assert final["epoch"].tolist() == [0, 1, 2, 3] and final["stage"].tolist() == [1, 1, 2, 2]
  assert final.iloc[0].to_dict() == row0
  assert not (model_dir / "backup").exists() or not os.listdir(model_dir / "backup")


def test_keras_internals_the_backup_relies_on_are_still_there(tmp_path):
  """When this fails, Keras changed BackupAndRestore or Model: re-check job/callbacks.py's
  PreemptibleBackup and job/keras_compat.py, then move the checked range."""
  low, high = keras_compat.BACKUP_INTERNALS_CHECKED
  assert low <= keras_compat.major_minor() <= high
  assert keras_compat.missing_backup_internals(keras.callbacks.BackupAndRestore(str(tmp_path))) == []
  assert hasattr(keras.Sequential([keras.Input((1,))]), "_initial_epoch")

  class Changed(keras.callbacks.BackupAndRestore):  # a Keras without the private method
    _save_model = None

  with pytest.raises(RuntimeError, match="BackupAndRestore has no _save_model"):
    keras_compat.check_backup_internals(Changed(str(tmp_path)))


@pytest.mark.slow
def test_demo_runs_and_reports_against_the_baseline_with_a_clean_log(tmp_path):
  """Convert, train both stages, evaluate and export, as a user runs it (no TF_CPP_MIN_LOG_LEVEL of
  the tests'): no warning or error line but the start-up lines TensorFlow prints whatever the log
  level, which the README lists with why they are harmless ("A clean log")."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = subprocess.run([sys.executable, "-m", "job.demo", f"--work_dir={tmp_path / 'work'}",
                           f"--model_dir={tmp_path / 'artifacts'}", "--num_images=300", "--image_size=32",
                           "--stage1_epochs=2", "--stage2_epochs=1"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "balanced accuracy" in result.stdout and "always-nv 0.143" in result.stdout
  assert (tmp_path / "artifacts" / "best_model.keras").exists()
  assert warnings_and_errors(result.stderr) == []


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "known: about 1 run in 8 still trains on another order of the train split (stage 1 or 2); "
    "the second fit's shared reshuffle state is fixed (job/data.py, train_batches), a race remains"))
def test_deterministic_runs_repeat_their_history_and_test_metrics(shards_dir, tmp_path):
  """Op determinism cannot be switched off inside a process: two small runs in two, at once."""
  processes = {name: subprocess.Popen(
      [sys.executable, "-m", "job.train", f"--data_dir={shards_dir}", f"--model_dir={tmp_path / name}",
       "--deterministic", "--seed=3", "--weights=none", "--image_size=32", "--global_batch_size=16",
       "--stage1_epochs=2", "--stage2_epochs=1", "--strategy=one_device", "--noserving", "--debug"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")}
  runs = []
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    runs.append((pd.read_csv(tmp_path / name / "history.csv"), json.load(open(tmp_path / name / "metrics.json"))))
  (history_a, metrics_a), (history_b, metrics_b) = runs
  assert history_a.drop(columns=[c for c in history_a if c.endswith("seconds")], errors="ignore").equals(
      history_b.drop(columns=[c for c in history_b if c.endswith("seconds")], errors="ignore"))
  # The runs differ in one field by design: the folder each was written to.
  assert metrics_a["predictor"].pop("model_dirs") == [str(tmp_path / "a")]
  assert metrics_b["predictor"].pop("model_dirs") == [str(tmp_path / "b")]
  assert metrics_a == metrics_b
