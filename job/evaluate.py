r"""Calibration and evaluation of the best model: the ISIC metric set, with pictures.

  python -m job.evaluate --data_dir=DIR --model_dir=artifacts [--split=test]
  python -m job.evaluate --data_dir=ISIC_TEST --model_dir=artifacts --split=external [--output_dir=D]

`calibrate` runs once, at the end of training: on the validation split it fits
the temperature and chooses the melanoma operating threshold (90% specificity)
on the calibrated probabilities that job.predict and the serving export
return, and writes calibration.json. `evaluate` never fits anything on the
split it evaluates: it reads calibration.json, so it needs no validation split,
and writes predictions.csv, metrics.json, confusion_matrix.png and
reliability_diagram.png: for the test split beside the model (with
training_curves.png), for another split (an external set) in
{model_dir}/evaluation/{split}/ or --output_dir. The classes are the run's.
"""

import io

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import flags, logging
from sklearn import metrics as skm

from job import artifacts, calibration, data, metrics as metrics_lib, model as model_lib, plots
from tfrecords import cli, features, fileio, manifest as manifest_lib, progress

MELANOMA_SPECIFICITY = 0.90
BOOTSTRAP = 1000  # lesion-bootstrap replicates for the 95% intervals
HEADLINE = (("balanced_accuracy", "balanced accuracy", "always_nv_balanced_accuracy"),
            ("accuracy", "accuracy", "always_nv_accuracy"), ("macro_f1", "macro F1", None),
            ("macro_roc_auc", "macro ROC AUC", None))


def predict_split(model: keras.Model, info: manifest_lib.SplitInfo, class_names, image_size: int,
                  batch_size: int = 64, take: int | None = None) -> pd.DataFrame:
  """One row per image: its metadata, true label, predicted label and the model's own class
  probabilities (`p_<class>_raw`; `with_calibrated` adds the calibrated ones)."""
  dataset = data.prediction_dataset(info, image_size, batch_size, take=take)
  names = np.asarray(class_names)
  frames = []
  bar = progress.bar(min(info.num_examples, take or info.num_examples), "images", f"predicting {info.name}")
  for images, one_hot, metadata in dataset:
    probabilities = model.predict_on_batch(model_lib.preprocess(images))
    if bar:
      bar.update(len(probabilities))
    frame = pd.DataFrame({k: v.numpy() for k, v in metadata.items()})
    for column in ("image_id", "lesion_id", "sex", "localization"):
      frame[column] = frame[column].str.decode("utf-8")
    frame["label"] = names[np.argmax(one_hot, axis=1)]
    frame["prediction"] = names[np.argmax(probabilities, axis=1)]
    for column, values in zip(probability_columns(class_names, raw=True), probabilities.T):
      frame[column] = values
    frames.append(frame)
  if bar:
    bar.close()
  table = pd.concat(frames, ignore_index=True)
  first = ["image_id", "lesion_id", "label", "prediction"]
  return table[first + [c for c in table.columns if c not in first]]


def probability_columns(class_names, raw: bool = False) -> list[str]:
  """predictions.csv's probability columns: `p_<class>`, the calibrated probabilities every figure
  of metrics.json uses (and job.predict returns), and `p_<class>_raw`, the model's own."""
  return [f"p_{name}_raw" if raw else f"p_{name}" for name in class_names]


def labels_and_probabilities(predictions: pd.DataFrame, class_names, raw: bool = False
                             ) -> tuple[np.ndarray, np.ndarray]:
  labels = predictions["label"].map(manifest_lib.label_map(class_names)).to_numpy()
  probabilities = predictions[probability_columns(class_names, raw)].to_numpy(dtype=np.float64)
  return labels, probabilities


def with_calibrated(predictions: pd.DataFrame, class_names, temperature: float) -> pd.DataFrame:
  """The predictions with the calibrated probabilities (`p_<class>`) before the raw ones."""
  _, raw = labels_and_probabilities(predictions, class_names, raw=True)
  calibrated = pd.DataFrame(calibration.apply_temperature(raw, temperature), index=predictions.index,
                            columns=probability_columns(class_names))
  first = list(predictions.columns[:predictions.columns.get_loc(probability_columns(class_names, raw=True)[0])])
  return pd.concat([predictions[first], calibrated, predictions.drop(columns=first)], axis=1)


def calibrate(model_dir: str, data_dir: str, image_size: int | None = None,
              take: int | None = None) -> dict:
  """Fits calibration.json on the validation split: the temperature, then the melanoma
  threshold on the calibrated probabilities."""
  image_size = image_size or artifacts.read_run_config(model_dir)["image_size"]
  class_names = artifacts.class_names(model_dir)
  manifest = manifest_lib.read(data_dir)
  validation = predict_split(artifacts.load_best_model(model_dir),
                             manifest_lib.split_info(data_dir, manifest, "validation"), class_names,
                             image_size, take=take)
  labels, probabilities = labels_and_probabilities(validation, class_names, raw=True)
  temperature = calibration.fit_temperature(labels, probabilities)
  mel = metrics_lib.class_index(class_names, metrics_lib.MELANOMA)
  threshold = None if mel is None else {
      "value": metrics_lib.melanoma_threshold(labels, calibration.apply_temperature(probabilities, temperature),
                                              mel, MELANOMA_SPECIFICITY),
      "scale": "calibrated", "target_specificity": MELANOMA_SPECIFICITY}
  calibration_json = {"method": "temperature_scaling", "temperature": temperature, "fitted_on": "validation",
                      "num_images": int(len(validation)), "melanoma_threshold": threshold}
  fileio.write_json(artifacts.path(model_dir, artifacts.CALIBRATION_FILE), calibration_json)
  logging.info("calibration on %d validation images: temperature %.3f%s", len(validation), temperature,
               "" if threshold is None else f", melanoma threshold {threshold['value']:.3f} (calibrated)")
  return calibration_json


def melanoma_figures(labels, calibrated, class_names, calibration_json) -> dict:
  """Sensitivity and specificity at the threshold chosen on validation (calibration.json)."""
  mel = metrics_lib.class_index(class_names, metrics_lib.MELANOMA)
  if mel is None:
    return {"available": False, "note": f"no {metrics_lib.MELANOMA} class in this run"}
  threshold = calibration_json["melanoma_threshold"]
  return {"available": True,
          **metrics_lib.melanoma_operating_point(labels, calibrated, mel, threshold["value"]),
          "scale": "calibrated probabilities", "chosen_on": "validation",
          "target_specificity": threshold["target_specificity"]}


def compute_metrics(test: pd.DataFrame, class_names, calibration_json: dict, seed: int = 0) -> dict:
  """metrics.json's content, from the split's predictions (with_calibrated: every figure can be
  recomputed from the file written) and the run's calibration."""
  temperature = calibration_json["temperature"]
  labels, probabilities = labels_and_probabilities(test, class_names, raw=True)
  _, calibrated = labels_and_probabilities(test, class_names)
  counts = skm.confusion_matrix(labels, probabilities.argmax(axis=1), labels=range(len(class_names)))
  # The figures of the probabilities users get (job.predict, the serving export, the melanoma
  # operating point): the calibrated ones. Temperature scaling keeps each image's argmax, so
  # accuracy, balanced accuracy and F1 are the same either way; it does not keep the ranking of
  # images within a class, so the AUCs differ, and the raw ones are given beside them.
  per_class = metrics_lib.per_class_report(labels, calibrated, class_names)
  for name, raw_auc in zip(class_names, metrics_lib.per_class_auc(labels, probabilities)):
    per_class[name]["roc_auc_raw"] = raw_auc
  return {
      "num_images": int(len(test)),
      "num_lesions": int(test["lesion_id"].nunique()),
      "probabilities": "calibrated (temperature scaling); *_raw: as the model outputs them",
      # The macro figures average over these: a class absent from the split has no recall.
      "classes_averaged": [class_names[i] for i in sorted(set(labels.tolist()))],
      **metrics_lib.headline(labels, calibrated),
      "macro_roc_auc_raw": metrics_lib.macro_auc(labels, probabilities),
      "baselines": metrics_lib.baselines(labels, class_names),
      "confidence_intervals_95": metrics_lib.lesion_bootstrap(  # calibrated, as above
          labels, calibrated, test["lesion_id"].to_numpy(), BOOTSTRAP, seed,
          unit=metrics_lib.bootstrap_unit(test["lesion_id"], test["image_id"])),
      "per_class": per_class,
      "melanoma": melanoma_figures(labels, calibrated, class_names, calibration_json),
      "confusion_matrix": {"labels": list(class_names), "counts": counts.tolist()},
      "subgroups_balanced_accuracy": metrics_lib.subgroups(labels, probabilities, test),
      "calibration": {
          "temperature": temperature, "fitted_on": calibration_json["fitted_on"],
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


def headline_lines(metrics: dict) -> list[str]:
  """The headline figures, each with its lesion-bootstrap interval and the always-nv baseline."""
  ci, baselines = metrics["confidence_intervals_95"], metrics["baselines"]
  lines = []
  for key, label, baseline_key in HEADLINE:
    baseline = baselines.get(baseline_key) if baseline_key else None
    lines.append(f"{label:<18}{metrics[key]:.3f}  ({ci[key]['low']:.3f}-{ci[key]['high']:.3f})"
                 + (f"   always-nv {baseline:.3f}" if baseline is not None else ""))
  return lines


def log_summary(metrics: dict, test: pd.DataFrame, class_names):
  report = skm.classification_report(test["label"], test["prediction"], labels=list(class_names),
                                     zero_division=0)
  logging.info("%s split, %d images of %d lesions:\n%s", metrics["split"], metrics["num_images"],
               metrics["num_lesions"], report)
  for line in headline_lines(metrics):
    logging.info("%s", line)
  mel = metrics["melanoma"]
  if mel["available"] and mel["sensitivity"] is not None:
    logging.info("melanoma at calibrated p>=%.3f (90%% specificity on validation): sensitivity %.3f, "
                 "specificity %.3f on %s", mel["threshold"], mel["sensitivity"], mel["specificity"],
                 metrics["split"])


def check_the_runs_own_split(run_config: dict, model_dir: str, data_dir: str, manifest: dict, split: str):
  """A train, validation or test split must be the run's own: the same split of another
  conversion (another --seed, say) holds images the run trained on, and its figures would
  replace the run's. An external set (--split=external) is another matter: its converter
  refused any image of the training conversion."""
  if split not in features.SPLITS:
    return
  recorded = run_config.get("split_checksums", {}).get(split)
  if recorded is not None:
    same = recorded == manifest_lib.split_checksums(manifest).get(split)
  else:  # a run from before split checksums were recorded: the whole manifest
    same = run_config.get("manifest_sha256") in (None, fileio.sha256_of(fileio.join(data_dir, manifest_lib.MANIFEST_FILE)))
  if not same:
    trained_on = run_config.get("flags", {}).get("data_dir")
    raise cli.UserError(f"--data_dir={data_dir}: its {split} split is not the one the run in --model_dir={model_dir} "
                        f"was trained beside (--data_dir={trained_on}, manifest sha256 "
                        f"{str(run_config.get('manifest_sha256'))[:12]}…): another conversion's {split} images may "
                        "be this run's training images. Evaluate on the run's own shards, or convert another set "
                        "with --external and give --split=external. Nothing was written.")


def evaluate(model_dir: str, data_dir: str, split: str = "test", image_size: int | None = None,
             take: int | None = None, output_dir: str | None = None) -> dict:
  """Predicts `split` and writes the files listed in the module docstring into `output_dir`
  (artifacts.evaluation_dir by default); fits nothing."""
  run_config = artifacts.read_run_config(model_dir)
  class_names = artifacts.class_names(model_dir)
  calibration_json = artifacts.read_calibration(model_dir)
  if calibration_json is None:
    raise cli.UserError(f"--model_dir={model_dir}: no {artifacts.CALIBRATION_FILE} (the training job "
                        "writes it when it finishes; rerun its command to finish it)")
  image_size = image_size or run_config["image_size"]
  manifest = manifest_lib.read(data_dir)
  if manifest_lib.class_names(manifest) != class_names:
    raise cli.UserError(f"--data_dir={data_dir} holds the classes {list(manifest_lib.class_names(manifest))}, "
                        f"the run in --model_dir={model_dir} {list(class_names)}")
  check_the_runs_own_split(run_config, model_dir, data_dir, manifest, split)
  info = manifest_lib.split_info(data_dir, manifest, split)
  if not info.num_examples:
    raise cli.UserError(f"--data_dir={data_dir}: the {split} split holds no images")
  manifest_lib.check_shards(data_dir, manifest, (split,))  # a damaged shard, named, not a DataLossError
  test = with_calibrated(predict_split(artifacts.load_best_model(model_dir), info, class_names, image_size,
                                       take=take), class_names, calibration_json["temperature"])
  metrics = {"split": split, **compute_metrics(test, class_names, calibration_json,
                                               seed=run_config.get("seed", 0))}
  log_summary(metrics, test, class_names)
  output_dir = output_dir or artifacts.evaluation_dir(model_dir, split)
  fileio.makedirs(output_dir)
  out = io.StringIO()
  test.to_csv(out, index=False)
  fileio.write_atomic(artifacts.path(output_dir, artifacts.PREDICTIONS_FILE), out.getvalue())
  fileio.write_json(artifacts.path(output_dir, artifacts.METRICS_FILE), metrics)
  write_plots(model_dir, output_dir, metrics, run_config)
  logging.info("%s split: figures and pictures in %s", split, output_dir)
  return metrics


def write_plots(model_dir: str, output_dir: str, metrics: dict, run_config: dict):
  plots.confusion_matrix(np.asarray(metrics["confusion_matrix"]["counts"]), metrics["confusion_matrix"]["labels"],
                         artifacts.path(output_dir, artifacts.CONFUSION_MATRIX_PLOT))
  history_path = artifacts.path(model_dir, artifacts.HISTORY_FILE)
  if output_dir == model_dir and tf.io.gfile.exists(history_path):
    with tf.io.gfile.GFile(history_path) as f:
      history = pd.read_csv(f)
    plots.training_curves(history, run_config["flags"].get("monitor", "val_f1"),
                          artifacts.path(model_dir, artifacts.TRAINING_CURVES_PLOT))
  bins = metrics["calibration"]["reliability_bins"]
  plots.reliability_diagram(bins["before"], bins["after"], artifacts.path(output_dir, artifacts.RELIABILITY_PLOT))


def define_flags():
  flags.DEFINE_string("data_dir", None, "Converted shards with manifest.json.", required=True)
  flags.DEFINE_string("model_dir", "artifacts", "The training job's --model_dir.")
  flags.DEFINE_string("split", "test", "Split of --data_dir to evaluate: test, or any other it holds "
                      "(external for a set converted with --external).")
  flags.DEFINE_string("output_dir", None, "Where the figures go (default: --model_dir for the test "
                      "split, else {model_dir}/evaluation/{split}).")


def main(argv):
  del argv
  evaluate(flags.FLAGS.model_dir, flags.FLAGS.data_dir, flags.FLAGS.split,
           output_dir=flags.FLAGS.output_dir)


if __name__ == "__main__":
  cli.run(main, define_flags)
