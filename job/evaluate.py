r"""Evaluation of the best model: the ISIC metric set, calibrated, with pictures.

  python -m job.evaluate --data_dir=DIR --model_dir=artifacts [--split=test]

Writes into the model_dir: predictions.csv, metrics.json, calibration.json,
confusion_matrix.png, training_curves.png and reliability_diagram.png. The
validation split chooses what must not be chosen on test: the temperature and
the melanoma operating threshold.
"""

import io

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import app, flags, logging
from sklearn import metrics as skm

from job import calibration, data, metrics as metrics_lib, plots
from tfrecords import features, fileio

BEST_MODEL_FILE = "best_model.keras"
RUN_CONFIG_FILE = "run_config.json"
CALIBRATION_FILE = "calibration.json"
MELANOMA_SPECIFICITY = 0.90


def load_best_model(model_dir: str) -> keras.Model:
  path = fileio.copy_to_local(fileio.join(model_dir, BEST_MODEL_FILE))
  return keras.saving.load_model(path, safe_mode=True)


def predict_split(model: keras.Model, info: data.SplitInfo, image_size: int, batch_size: int = 64,
                  take: int | None = None) -> pd.DataFrame:
  """One row per image: its metadata, true label, predicted label and class probabilities."""
  dataset = data.prediction_dataset(info, image_size, batch_size, take=take)
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


def labels_and_probabilities(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
  labels = predictions["label"].map(features.LABEL_MAP).to_numpy()
  probabilities = predictions[[f"p_{c}" for c in features.CLASS_NAMES]].to_numpy(dtype=np.float64)
  return labels, probabilities


def compute_metrics(test: pd.DataFrame, validation: pd.DataFrame, bootstrap: int = 1000,
                    seed: int = 0) -> tuple[dict, dict]:
  """metrics.json's content and calibration.json's, from the two splits' predictions."""
  labels, probabilities = labels_and_probabilities(test)
  val_labels, val_probabilities = labels_and_probabilities(validation)
  temperature = calibration.fit_temperature(val_labels, val_probabilities)
  calibrated = calibration.apply_temperature(probabilities, temperature)
  threshold = metrics_lib.melanoma_threshold(val_labels, val_probabilities, MELANOMA_SPECIFICITY)
  counts = skm.confusion_matrix(labels, probabilities.argmax(axis=1), labels=metrics_lib.CLASSES)
  result = {
      "num_images": int(len(test)),
      "num_lesions": int(test["lesion_id"].nunique()),
      **metrics_lib.headline(labels, probabilities),
      "baselines": metrics_lib.baselines(labels),
      "confidence_intervals_95": metrics_lib.lesion_bootstrap(labels, probabilities,
                                                              test["lesion_id"].to_numpy(), bootstrap, seed),
      "per_class": metrics_lib.per_class_report(labels, probabilities),
      "melanoma": {**metrics_lib.melanoma_operating_point(labels, probabilities, threshold),
                   "chosen_on": "validation", "target_specificity": MELANOMA_SPECIFICITY},
      "confusion_matrix": {"labels": list(features.CLASS_NAMES), "counts": counts.tolist()},
      "subgroups_balanced_accuracy": metrics_lib.subgroups(labels, probabilities, test),
      "calibration": {
          "temperature": temperature,
          "ece_15_bins": {"before": metrics_lib.expected_calibration_error(labels, probabilities),
                          "after": metrics_lib.expected_calibration_error(labels, calibrated)},
          "brier": {"before": metrics_lib.brier_score(labels, probabilities),
                    "after": metrics_lib.brier_score(labels, calibrated)},
          "nll": {"before": calibration.negative_log_likelihood(labels, probabilities),
                  "after": calibration.negative_log_likelihood(labels, calibrated)},
          "reliability_bins": {"before": metrics_lib.reliability_bins(labels, probabilities),
                               "after": metrics_lib.reliability_bins(labels, calibrated)},
      },
  }
  calibration_json = {"method": "temperature_scaling", "temperature": temperature,
                      "fitted_on": "validation", "num_images": int(len(validation))}
  return result, calibration_json


def log_summary(metrics: dict, test: pd.DataFrame):
  report = skm.classification_report(test["label"], test["prediction"], labels=list(features.CLASS_NAMES),
                                     zero_division=0)
  ci = metrics["confidence_intervals_95"]
  baselines = metrics["baselines"]
  logging.info("%s split, %d images of %d lesions:\n%s", metrics["split"], metrics["num_images"],
               metrics["num_lesions"], report)
  for key, baseline in (("balanced_accuracy", baselines["always_nv_balanced_accuracy"]),
                        ("accuracy", baselines["always_nv_accuracy"]), ("macro_f1", None),
                        ("macro_roc_auc", None)):
    logging.info("%-18s %.3f  (95%% CI %.3f-%.3f)%s", key, metrics[key], ci[key]["low"], ci[key]["high"],
                 "" if baseline is None else f"  always-nv {baseline:.3f}")
  mel = metrics["melanoma"]
  if mel["sensitivity"] is not None:
    logging.info("melanoma at p>=%.3f (90%% specificity on validation): sensitivity %.3f, "
                 "specificity %.3f on %s", mel["threshold"], mel["sensitivity"], mel["specificity"],
                 metrics["split"])


def evaluate(model_dir: str, data_dir: str, split: str = "test", image_size: int | None = None,
             batch_size: int = 64, take: int | None = None, write: bool = True,
             bootstrap: int = 1000) -> dict:
  """Predicts validation and `split`; writes the files listed in the module docstring."""
  run_config = fileio.read_json(fileio.join(model_dir, RUN_CONFIG_FILE))
  image_size = image_size or run_config["image_size"]
  manifest = data.read_manifest(data_dir)
  model = load_best_model(model_dir)
  test = predict_split(model, data.split_info(data_dir, manifest, split), image_size, batch_size, take)
  validation = predict_split(model, data.split_info(data_dir, manifest, "validation"), image_size,
                             batch_size, take)
  metrics, calibration_json = compute_metrics(test, validation, bootstrap, run_config.get("seed", 0))
  metrics = {"split": split, **metrics}
  log_summary(metrics, test)
  if write:
    out = io.StringIO()
    test.to_csv(out, index=False)
    fileio.write_atomic(fileio.join(model_dir, "predictions.csv"), out.getvalue())
    fileio.write_json(fileio.join(model_dir, "metrics.json"), metrics)
    fileio.write_json(fileio.join(model_dir, CALIBRATION_FILE), calibration_json)
    write_plots(model_dir, metrics, run_config)
  return metrics


def write_plots(model_dir: str, metrics: dict, run_config: dict):
  plots.confusion_matrix(np.asarray(metrics["confusion_matrix"]["counts"]),
                         fileio.join(model_dir, "confusion_matrix.png"))
  history_path = fileio.join(model_dir, "history.csv")
  if tf.io.gfile.exists(history_path):
    with tf.io.gfile.GFile(history_path) as f:
      history = pd.read_csv(f)
    plots.training_curves(history, run_config["flags"].get("monitor", "val_f1"),
                          fileio.join(model_dir, "training_curves.png"))
  bins = metrics["calibration"]["reliability_bins"]
  plots.reliability_diagram(bins["before"], bins["after"], fileio.join(model_dir, "reliability_diagram.png"))


def main(argv):
  del argv
  evaluate(flags.FLAGS.model_dir, flags.FLAGS.data_dir, flags.FLAGS.split)


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", None, "Converted shards with manifest.json.", required=True)
  flags.DEFINE_string("model_dir", "artifacts", "The training job's --model_dir.")
  flags.DEFINE_enum("split", "test", list(features.SPLITS), "Split to evaluate.")
  app.run(main)
