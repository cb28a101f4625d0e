"""The job takes its classes from the shards' manifest: a hand-made three-class set trains,
evaluates and predicts, and the figures that need `mel` or `nv` say why they are left out."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from helpers import run_module
from job import config as config_lib, train
from tfrecords import features, fileio, manifest as manifest_lib

CLASSES = ("akiec", "bcc", "df")  # neither mel nor nv
COLOURS = {"akiec": (200, 110, 90), "bcc": (215, 160, 180), "df": (120, 90, 60)}
SPLIT_SIZES = {"train": 30, "validation": 12, "test": 12}

pytestmark = pytest.mark.slow  # each test trains, or starts a server


def jpeg(colour, rng) -> bytes:
  pixels = np.clip(np.array(colour) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def example(image_id: str, lesion_id: str, label: int, encoded: bytes) -> bytes:
  feature = {
      features.IMAGE_ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      features.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      features.SOURCE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
      features.LESION_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[lesion_id.encode()])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def three_class_shards(tmp_path_factory):
  """One shard per split and a manifest, written by hand (not by the HAM10000 converter)."""
  root = str(tmp_path_factory.mktemp("three_classes"))
  rng = np.random.default_rng(0)
  splits = {}
  for split, size in SPLIT_SIZES.items():
    name = features.shard_name(split, 0, 1)
    labels = np.arange(size) % len(CLASSES)
    with tf.io.TFRecordWriter(os.path.join(root, name)) as writer:
      for i, label in enumerate(labels):
        writer.write(example(f"{split}_{i}", f"lesion_{split}_{i}", int(label),
                             jpeg(COLOURS[CLASSES[label]], rng)))
    splits[split] = {"num_examples": size, "shards": [{"name": name, "num_examples": size}],
                     "class_counts": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)}}
  manifest_lib.write(root, {"label_map": manifest_lib.label_map(CLASSES), "splits": splits})
  return root


@pytest.fixture(scope="module")
def three_class_run(three_class_shards, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("three_class_run"))
  cfg = config_lib.TrainConfig(data_dir=three_class_shards, model_dir=model_dir, weights="none",
                               image_size=32, global_batch_size=8, stage1_epochs=1, stage2_epochs=0,
                               stage1_lr=1e-3, mixed_precision="off", strategy="one_device", serving=False)
  return train.train_and_evaluate(cfg), model_dir


def test_the_run_takes_its_classes_from_the_manifest(three_class_run):
  metrics, model_dir = three_class_run
  label_map = json.load(open(os.path.join(model_dir, "label_map.json")))
  assert list(label_map) == list(CLASSES) and list(label_map.values()) == [0, 1, 2]
  assert json.load(open(os.path.join(model_dir, "run_config.json")))["class_names"] == list(CLASSES)
  predictions = pd.read_csv(os.path.join(model_dir, "predictions.csv"))
  assert [c for c in predictions.columns if c.startswith("p_")] == [f"p_{c}" for c in CLASSES] + [
      f"p_{c}_raw" for c in CLASSES]
  assert set(predictions["label"]) == set(CLASSES)
  assert len(predictions) == SPLIT_SIZES["test"]
  assert set(metrics["per_class"]) == set(CLASSES)
  assert metrics["confusion_matrix"]["labels"] == list(CLASSES)
  assert np.asarray(metrics["confusion_matrix"]["counts"]).shape == (3, 3)


def test_figures_without_mel_or_nv_are_left_out_and_say_so(three_class_run):
  metrics, model_dir = three_class_run
  written = json.load(open(os.path.join(model_dir, "metrics.json")))
  assert written["melanoma"] == {"available": False, "note": "no mel class in this run"}
  assert written["baselines"]["always_nv_accuracy"] is None
  assert written["baselines"]["note"] == "no nv class in this run"
  assert 0 <= written["balanced_accuracy"] <= 1


def test_predict_reports_the_runs_classes(three_class_run, tmp_path):
  _, model_dir = three_class_run
  image = tmp_path / "one.jpg"
  image.write_bytes(jpeg(COLOURS["bcc"], np.random.default_rng(1)))
  result = run_module("job.predict", f"--model_dir={model_dir}", str(image))
  name, label, probability, top3 = result.stdout.strip().split("\t")
  assert name == "one.jpg" and label in CLASSES and 0 <= float(probability) <= 1
  assert {entry.split(":")[0] for entry in top3.split()} == set(CLASSES)


def test_evaluating_shards_of_other_classes_is_refused(three_class_run, shards_dir):
  _, model_dir = three_class_run
  result = run_module("job.evaluate", f"--model_dir={model_dir}", f"--data_dir={shards_dir}", check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: --data_dir={shards_dir} holds the classes")
  assert fileio.read_json(os.path.join(model_dir, "metrics.json"))["num_images"] == SPLIT_SIZES["test"]
