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

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import flags, logging
from sklearn import metrics as skm

from job import (artifacts, calibration, data, ensemble as ensemble_lib, metrics as metrics_lib, patient_metadata, plots,
                 tta as tta_lib)
from tfrecords import cli, features, fileio, manifest as manifest_lib, progress

MELANOMA_SPECIFICITY = 0.90
BOOTSTRAP = 1000  # lesion-bootstrap replicates for the 95% intervals
HEADLINE = (("balanced_accuracy", "balanced accuracy", "always_nv_balanced_accuracy"),
            ("accuracy", "accuracy", "always_nv_accuracy"), ("macro_f1", "macro F1", None),
            ("macro_roc_auc", "macro ROC AUC", None))


def _batches(info: manifest_lib.SplitInfo, class_names, image_sizes, batch_size: int, take: int | None):
  """(images at each size, the batch's table: ids, metadata, true label, and its raw patient fields
  as tensors, which a model with metadata takes) per batch, in file order."""
  dataset = data.prediction_dataset(info, tuple(image_sizes), batch_size, take=take)
  names = np.asarray(class_names)
  bar = progress.bar(min(info.num_examples, take or info.num_examples), "images", f"predicting {info.name}")
  for images, one_hot, metadata in dataset:
    frame = pd.DataFrame({k: v.numpy() for k, v in metadata.items()})
    for column in ("image_id", "lesion_id", "sex", "localization"):
      frame[column] = frame[column].str.decode("utf-8")
    frame["label"] = names[np.argmax(one_hot, axis=1)]
    yield images, frame, {f: metadata[f] for f in patient_metadata.FIELDS}
    if bar:
      bar.update(len(frame))
  if bar:
    bar.close()


def _table(frames: list[pd.DataFrame]) -> pd.DataFrame:
  table = pd.concat(frames, ignore_index=True)
  first = ["image_id", "lesion_id", "label", "prediction"]
  return table[first + [c for c in table.columns if c not in first]]


def with_probabilities(frame: pd.DataFrame, class_names, calibrated: np.ndarray, raw: np.ndarray) -> pd.DataFrame:
  """The frame with its prediction (the calibrated argmax), then `p_<class>` and `p_<class>_raw`."""
  frame = frame.copy()
  frame["prediction"] = np.asarray(class_names)[np.argmax(calibrated, axis=1)]
  for column, values in zip(probability_columns(class_names), calibrated.T):
    frame[column] = values
  for column, values in zip(probability_columns(class_names, raw=True), raw.T):
    frame[column] = values
  return frame


def predict_split(predictor: ensemble_lib.Ensemble, info: manifest_lib.SplitInfo, mode: str = "none",
                  batch_size: int = 64, take: int | None = None) -> pd.DataFrame:
  """One row per image: its metadata, true label, predicted label, the calibrated probabilities
  (`p_<class>`, what job.predict returns) and the raw ones (`p_<class>_raw`; for an ensemble the
  mean of its members'), under the test-time augmentation `mode`."""
  frames = []
  for images, frame, fields in _batches(info, predictor.class_names, predictor.image_sizes,
                                        tta_lib.images_per_batch(batch_size, mode), take):
    prediction = predictor.predict(images, mode, metadata=fields)
    frames.append(with_probabilities(frame, predictor.class_names, prediction.calibrated, prediction.raw))
  return _table(frames)


def predict_views(member: ensemble_lib.Member, info: manifest_lib.SplitInfo, batch_size: int = 64,
                  take: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
  """One member's raw probabilities of every dihedral view (views × images × classes), with
  the images' table: every TTA mode's probabilities from one pass (tta.py)."""
  frames, views = [], []
  for images, frame, fields in _batches(info, member.class_names, (member.image_size,),
                                        tta_lib.images_per_batch(batch_size, "dihedral"), take):
    frames.append(frame)
    views.append(np.reshape(member.raw_views(images[member.image_size], "dihedral", fields),
                            (tta_lib.NUM_VIEWS["dihedral"], len(frame), -1)))
  return pd.concat(frames, ignore_index=True), np.concatenate(views, axis=1)


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


def melanoma_threshold(labels: np.ndarray, calibrated: np.ndarray, class_names, chosen_on: str) -> dict | None:
  """The melanoma operating threshold at MELANOMA_SPECIFICITY, on calibrated probabilities."""
  mel = metrics_lib.class_index(class_names, metrics_lib.MELANOMA)
  if mel is None:
    return None
  return {"value": metrics_lib.melanoma_threshold(labels, calibrated, mel, MELANOMA_SPECIFICITY),
          "scale": "calibrated", "target_specificity": MELANOMA_SPECIFICITY, "chosen_on": chosen_on}


def split_info_of_run(run_config: dict, data_dir: str, manifest: dict, split: str) -> manifest_lib.SplitInfo:
  return data.split_info(data_dir, manifest, split, run_config.get("flags", {}).get("fold"))


def calibrate(model_dir: str, data_dir: str, take: int | None = None) -> dict:
  """Fits calibration.json on the run's validation split, once for each test-time augmentation
  (one prediction of every dihedral view serves all three): the temperature, then the melanoma
  threshold on the calibrated probabilities. The top-level temperature and threshold are the
  `none` mode's, as before test-time augmentation."""
  member = ensemble_lib.load_member(model_dir)
  run_config = artifacts.read_run_config(model_dir)
  validation_info = split_info_of_run(run_config, data_dir, manifest_lib.read(data_dir), "validation")
  frame, views = predict_views(member, validation_info, take=take)
  labels = frame["label"].map(manifest_lib.label_map(member.class_names)).to_numpy()
  fold = run_config["flags"].get("fold")
  fitted_on = "validation" if fold is None else f"validation (fold {fold})"
  per_mode = {}
  for mode in tta_lib.MODES:
    raw = views[:tta_lib.NUM_VIEWS[mode]].mean(axis=0)
    temperature = calibration.fit_temperature(labels, raw)
    per_mode[mode] = {"temperature": temperature, "melanoma_threshold": melanoma_threshold(
        labels, calibration.apply_temperature(raw, temperature), member.class_names, fitted_on)}
  calibration_json = {"method": "temperature_scaling", "temperature": per_mode["none"]["temperature"],
                      "fitted_on": fitted_on, "num_images": int(len(frame)),
                      "melanoma_threshold": per_mode["none"]["melanoma_threshold"], "tta": per_mode}
  fileio.write_json(artifacts.path(model_dir, artifacts.CALIBRATION_FILE), calibration_json)
  for mode, fitted in per_mode.items():
    threshold = fitted["melanoma_threshold"]
    logging.info("calibration on %d %s images, --tta=%s: temperature %.3f%s", len(frame), fitted_on, mode,
                 fitted["temperature"], "" if threshold is None else
                 f", melanoma threshold {threshold['value']:.3f} (calibrated)")
  return calibration_json


def melanoma_figures(labels, calibrated, class_names, threshold: dict | None) -> dict:
  """Sensitivity and specificity at the threshold chosen on validation (calibration.json) or on
  a cross-validation's out-of-fold predictions."""
  mel = metrics_lib.class_index(class_names, metrics_lib.MELANOMA)
  if mel is None:
    return {"available": False, "note": f"no {metrics_lib.MELANOMA} class in this run"}
  if threshold is None:
    return {"available": False, "note": "runs put together as an ensemble here share no validation split to "
                                        "choose a melanoma threshold on (a cross-validation's root has one)"}
  return {"available": True,
          **metrics_lib.melanoma_operating_point(labels, calibrated, mel, threshold["value"]),
          "scale": "calibrated probabilities", "chosen_on": threshold.get("chosen_on", "validation"),
          "target_specificity": threshold["target_specificity"]}


def compute_metrics(test: pd.DataFrame, class_names, calibration_json: dict, seed: int = 0) -> dict:
  """metrics.json's content, from the split's predictions (every figure can be recomputed from
  the file written) and the calibration: {"temperature" (one per member of an ensemble),
  "fitted_on", "melanoma_threshold"}."""
  temperature = calibration_json["temperature"]
  labels, probabilities = labels_and_probabilities(test, class_names, raw=True)
  _, calibrated = labels_and_probabilities(test, class_names)
  # An ensemble's mean raw probabilities need not share its calibrated ones' argmax: the
  # predictions are the calibrated argmax, what users get.
  counts = skm.confusion_matrix(labels, calibrated.argmax(axis=1), labels=range(len(class_names)))
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
      "melanoma": melanoma_figures(labels, calibrated, class_names, calibration_json["melanoma_threshold"]),
      "confusion_matrix": {"labels": list(class_names), "counts": counts.tolist()},
      "subgroups_balanced_accuracy": metrics_lib.subgroups(labels, calibrated, test),
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
    logging.info("melanoma at calibrated p>=%.3f (90%% specificity on %s): sensitivity %.3f, "
                 "specificity %.3f on %s", mel["threshold"], mel["chosen_on"], mel["sensitivity"],
                 mel["specificity"], metrics["split"])


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


def _check_data_dir(predictor: ensemble_lib.Ensemble, data_dir: str, manifest: dict, split: str):
  """The split holds the predictor's classes and, for a train/validation/test split, is each
  member's own (check_the_runs_own_split); an ensemble is scored on test or an external set only."""
  classes = manifest_lib.class_names(manifest)
  for member in predictor.members:
    if classes != member.class_names:
      raise cli.UserError(f"--data_dir={data_dir} holds the classes {list(classes)}, the run in "
                          f"--model_dir={member.model_dir} {list(member.class_names)}")
    check_the_runs_own_split(artifacts.read_run_config(member.model_dir), member.model_dir, data_dir, manifest, split)
  if len(predictor.members) > 1 and split in ("train", "validation"):
    raise cli.UserError(f"--split={split}: an ensemble's members trained or validated on these images (each fold "
                        "on its own part); evaluate an ensemble on --split=test or an external set")


def evaluate(model_dirs: list[str] | str, data_dir: str, split: str = "test", take: int | None = None,
             output_dir: str | None = None, tta: str = "none", predictor: ensemble_lib.Ensemble | None = None,
             melanoma_threshold: dict | None = None) -> dict:
  """Predicts `split` with the run, or the runs as one ensemble (ensemble.py), under the
  test-time augmentation `tta`, and writes the files listed in the module docstring into
  `output_dir`; fits nothing. Default folder: for one run or one cross-validation root,
  artifacts.evaluation_dir; runs put together here need --output_dir."""
  model_dirs = [model_dirs] if isinstance(model_dirs, str) else list(model_dirs)
  predictor = predictor or ensemble_lib.load(model_dirs)
  for member in predictor.members:
    if member.calibration is None:
      raise cli.UserError(f"--model_dir={member.model_dir}: no {artifacts.CALIBRATION_FILE} (the training job "
                          "writes it when it finishes; rerun its command to finish it)")
  if output_dir is None and len(model_dirs) > 1:
    raise cli.UserError("several --model_dir: give --output_dir for the ensemble's figures")
  manifest = manifest_lib.read(data_dir)
  _check_data_dir(predictor, data_dir, manifest, split)
  run_config = artifacts.read_run_config(predictor.model_dirs[0])
  info = split_info_of_run(run_config, data_dir, manifest, split)
  if not info.num_examples:
    raise cli.UserError(f"--data_dir={data_dir}: the {split} split holds no images")
  manifest_lib.check_shards(data_dir, manifest, (split,))  # a damaged shard, named, not a DataLossError
  class_names = predictor.class_names
  table = predict_split(predictor, info, tta, take=take)
  if predictor.metadata_fields:  # an outside set may not record what the model takes
    predictor.warn_untrained({f: tf.constant(table[f].to_numpy(np.float32 if f == "age" else str))
                              for f in predictor.metadata_fields}, f"the {split} split of --data_dir={data_dir}")
  threshold = melanoma_threshold or predictor.melanoma_threshold(tta)
  temperatures = [m.calibration_for(tta)["temperature"] for m in predictor.members]
  fitted_on = {m.calibration.get("fitted_on", "validation") for m in predictor.members}
  calibration_json = {"temperature": temperatures[0] if len(temperatures) == 1 else temperatures,
                      "fitted_on": " and ".join(sorted(fitted_on)), "melanoma_threshold": threshold}
  metrics = {"split": split, "tta": tta, "predictor": predictor.describe(tta),
             **compute_metrics(table, class_names, calibration_json, seed=run_config.get("seed", 0))}
  log_summary(metrics, table, class_names)
  output_dir = output_dir or artifacts.evaluation_dir(model_dirs[0], split)
  fileio.makedirs(output_dir)
  out = io.StringIO()
  table.to_csv(out, index=False)
  fileio.write_atomic(artifacts.path(output_dir, artifacts.PREDICTIONS_FILE), out.getvalue())
  fileio.write_json(artifacts.path(output_dir, artifacts.METRICS_FILE), metrics)
  write_plots(model_dirs[0], output_dir, metrics, run_config)
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
  flags.DEFINE_multi_string("model_dir", ["artifacts"], "The training job's --model_dir, or a cross-validation's "
                            "root (job.cross_validate); several: their ensemble (then give --output_dir).")
  flags.DEFINE_enum("tta", "none", list(tta_lib.MODES), "Test-time augmentation: none, flip (image and mirror) or "
                    "dihedral (the 8 flips and quarter turns); probabilities averaged over the views.")
  flags.DEFINE_string("split", "test", "Split of --data_dir to evaluate: test, or any other it holds "
                      "(external for a set converted with --external).")
  flags.DEFINE_string("output_dir", None, "Where the figures go (default: --model_dir for the test "
                      "split, else {model_dir}/evaluation/{split}).")


def main(argv):
  del argv
  evaluate(flags.FLAGS.model_dir, flags.FLAGS.data_dir, flags.FLAGS.split,
           output_dir=flags.FLAGS.output_dir, tta=flags.FLAGS.tta)


if __name__ == "__main__":
  cli.run(main, define_flags)
