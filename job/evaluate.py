r"""Evaluation of the best model on a split: predictions.csv and metrics.json.

  python -m job.evaluate --data_dir=DIR --model_dir=artifacts [--split=test]

Metrics come from scikit-learn, beside the trivial baselines on the same split
(always `nv`): a figure without its baseline misleads under this imbalance.
"""

import io

import keras
import numpy as np
import pandas as pd
from absl import app, flags, logging
from sklearn import metrics as skm

from job import data
from tfrecords import features, fileio

BEST_MODEL_FILE = "best_model.keras"
RUN_CONFIG_FILE = "run_config.json"


def load_best_model(model_dir: str) -> keras.Model:
  path = fileio.copy_to_local(fileio.join(model_dir, BEST_MODEL_FILE))
  return keras.saving.load_model(path, safe_mode=True)


def predict_split(model: keras.Model, info: data.SplitInfo, image_size: int, batch_size: int = 64,
                  take: int | None = None) -> pd.DataFrame:
  """One row per image: its metadata, true label, predicted label and class probabilities."""
  dataset = data.build_dataset(info, image_size, batch_size, training=False, with_ids=True, take=take)
  frames = []
  for images, one_hot, metadata in dataset:
    probabilities = model.predict_on_batch(data.preprocess(images))
    frame = pd.DataFrame({k: v.numpy() for k, v in metadata.items()})
    for column in ("image_id", "lesion_id", "sex", "localization"):
      frame[column] = frame[column].str.decode("utf-8")
    frame["label"] = np.asarray(features.CLASS_NAMES)[np.argmax(one_hot, axis=1)]
    frame["prediction"] = np.asarray(features.CLASS_NAMES)[np.argmax(probabilities, axis=1)]
    for index, name in enumerate(features.CLASS_NAMES):
      frame[f"p_{name}"] = probabilities[:, index]
    frames.append(frame)
  table = pd.concat(frames, ignore_index=True)
  first = ["image_id", "lesion_id", "label", "prediction"]
  return table[first + [c for c in table.columns if c not in first]]


def compute_metrics(predictions: pd.DataFrame) -> dict:
  y_true, y_pred = predictions["label"], predictions["prediction"]
  labels = list(features.CLASS_NAMES)
  report = skm.classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
  always_nv = pd.Series("nv", index=y_true.index)
  return {
      "num_images": int(len(predictions)),
      "num_lesions": int(predictions["lesion_id"].nunique()),
      "accuracy": skm.accuracy_score(y_true, y_pred),
      "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
      "macro_f1": skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
      "per_class": {name: report[name] for name in labels},
      "confusion_matrix": {"labels": labels,
                           "counts": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()},
      "baselines": {
          "always_nv_accuracy": skm.accuracy_score(y_true, always_nv),
          "always_nv_balanced_accuracy": skm.balanced_accuracy_score(y_true, always_nv),
      },
  }


def evaluate(model_dir: str, data_dir: str, split: str = "test", image_size: int | None = None,
             batch_size: int = 64, take: int | None = None, write: bool = True) -> dict:
  """Predicts `split` with best_model.keras, writes predictions.csv and metrics.json."""
  if image_size is None:
    image_size = fileio.read_json(fileio.join(model_dir, RUN_CONFIG_FILE))["image_size"]
  manifest = data.read_manifest(data_dir)
  model = load_best_model(model_dir)
  predictions = predict_split(model, data.split_info(data_dir, manifest, split), image_size,
                              batch_size, take)
  metrics = {"split": split, **compute_metrics(predictions)}
  report = skm.classification_report(predictions["label"], predictions["prediction"],
                                     labels=list(features.CLASS_NAMES), zero_division=0)
  logging.info("%s split, %d images:\n%s", split, len(predictions), report)
  logging.info("balanced accuracy %.3f (always-nv %.3f), accuracy %.3f (always-nv %.3f), "
               "macro F1 %.3f", metrics["balanced_accuracy"],
               metrics["baselines"]["always_nv_balanced_accuracy"], metrics["accuracy"],
               metrics["baselines"]["always_nv_accuracy"], metrics["macro_f1"])
  if write:
    out = io.StringIO()
    predictions.to_csv(out, index=False)
    fileio.write_atomic(fileio.join(model_dir, "predictions.csv"), out.getvalue())
    fileio.write_json(fileio.join(model_dir, "metrics.json"), metrics)
  return metrics


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  evaluate(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split)


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", None, "Converted shards with manifest.json.", required=True)
  flags.DEFINE_string("model_dir", "artifacts", "The training job's --model_dir.")
  flags.DEFINE_enum("split", "test", list(features.SPLITS), "Split to evaluate.")
  app.run(main)
