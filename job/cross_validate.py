r"""K-fold cross-validation: every fold trained, out-of-fold figures, and the folds' ensemble.

  python -m tfrecords.convert --output_dir=shards --folds=5
  python -m job.cross_validate --data_dir=shards --model_dir=cv [--tta=dihedral] [job.train flags]

On shards converted with --folds=K, each fold k is trained as
`job.train --fold=k --model_dir=ROOT/fold-k` would train it (on the other K-1
folds, validated on fold k), one after another. A fold already finished (its
calibration.json written, by this command or by a Vertex AI job that
launch.vertex --folds submitted) with the same settings is not trained again; a
fold cut short resumes from its checkpoints, as job.train does. Then, in ROOT:

  oof_predictions.csv   every non-test image once, predicted by the fold model that never trained on it
  cv_metrics.json       the out-of-fold figures (metrics.json's set), and each fold's with their mean and sd
  cross_validation.json the folds and the ensemble's melanoma thresholds, chosen on the out-of-fold predictions
  metrics.json, predictions.csv, the pictures: the folds' ensemble on the test split (job/ensemble.py)
  serving/1             the ensemble's serving export (JPEG bytes in, its probabilities out)

The out-of-fold images are each fold's validation images: they chose its best
epoch and fitted its temperature, as any validation split does, so the
out-of-fold figures are those of validation, not of a held-out test; the test
split's are the ensemble's, fitted on nothing there.
"""

import dataclasses
import io

import keras
import numpy as np
import pandas as pd
from absl import flags, logging

from job import artifacts, calibration, config as config_lib, ensemble as ensemble_lib, evaluate as evaluate_lib
from job import metrics as metrics_lib, predict, run_state, train, tta as tta_lib
from tfrecords import cli, fileio, manifest as manifest_lib

OOF_PREDICTIONS_FILE = "oof_predictions.csv"
CV_METRICS_FILE = "cv_metrics.json"
PER_FOLD = ("balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc")


def fold_config(cfg: config_lib.TrainConfig, fold: int) -> config_lib.TrainConfig:
  """What `job.train --fold=k --model_dir=ROOT/fold-k` runs: the fold's own folders; no test
  evaluation nor export of its own (the ensemble's come at the end)."""
  sub = lambda root: root and fileio.join(root, ensemble_lib.FOLD_DIR.format(fold))
  return dataclasses.replace(cfg, fold=fold, model_dir=sub(cfg.model_dir), checkpoint_dir=sub(cfg.checkpoint_dir),
                             tensorboard_dir=sub(cfg.tensorboard_dir), evaluate=False, serving=False,
                             export_dir=None)


def is_finished(cfg: config_lib.TrainConfig, manifest_sha256: str) -> bool:
  """The fold's run is calibrated (job.train's last step before evaluation) with these settings."""
  if artifacts.read_calibration(cfg.model_dir) is None:
    return False
  recorded = artifacts.read_run_config(cfg.model_dir).get("fingerprint", {})
  return not run_state.differences(recorded, run_state.fingerprint(cfg, manifest_sha256, stage=2))


def train_folds(cfg: config_lib.TrainConfig, num_folds: int, manifest_sha256: str):
  for fold in range(num_folds):
    fold_cfg = fold_config(cfg, fold)
    if is_finished(fold_cfg, manifest_sha256):
      logging.info("fold %d of %d: finished in %s, not trained again", fold, num_folds, fold_cfg.model_dir)
      continue
    logging.info("fold %d of %d: training into %s", fold, num_folds, fold_cfg.model_dir)
    keras.backend.clear_session()  # each fold's model from a fresh graph, as in its own process
    train.train_and_evaluate(fold_cfg)


@dataclasses.dataclass(frozen=True)
class OutOfFold:
  """Every fold's validation images predicted by its own model: the table (fold, ids, metadata,
  label), and per TTA mode the raw probabilities (the mean over the mode's views) and the
  calibrated ones (with the fold's temperature for that mode)."""
  table: pd.DataFrame
  raw: dict[str, np.ndarray]
  calibrated: dict[str, np.ndarray]
  temperatures: dict[str, list[float]]
  class_names: tuple[str, ...]


def out_of_fold(cfg: config_lib.TrainConfig, manifest: dict, num_folds: int, take: int | None) -> OutOfFold:
  frames, class_names = [], None
  raw, calibrated, temperatures = ({mode: [] for mode in tta_lib.MODES} for _ in range(3))
  for fold in range(num_folds):
    member = ensemble_lib.load_member(fold_config(cfg, fold).model_dir)
    if class_names is not None and member.class_names != class_names:
      raise cli.UserError(f"--model_dir={member.model_dir} predicts the classes {list(member.class_names)}, "
                          f"the other folds {list(class_names)}")
    class_names = member.class_names
    info = manifest_lib.fold_split_info(cfg.data_dir, manifest, fold, "validation")
    frame, views = evaluate_lib.predict_views(member, info, take=take)  # one pass serves every mode
    frame.insert(0, "fold", fold)
    frames.append(frame)
    for mode in tta_lib.MODES:
      temperature = member.calibration_for(mode)["temperature"]
      raw[mode].append(views[:tta_lib.NUM_VIEWS[mode]].mean(axis=0))
      calibrated[mode].append(calibration.apply_temperature(raw[mode][-1], temperature))
      temperatures[mode].append(temperature)
    keras.backend.clear_session()
  return OutOfFold(pd.concat(frames, ignore_index=True), {m: np.concatenate(p) for m, p in raw.items()},
                   {m: np.concatenate(p) for m, p in calibrated.items()}, temperatures, class_names)


def per_fold_figures(table: pd.DataFrame, class_names) -> dict:
  """Each fold's validation figures (its model on its own fold), with their mean and sd."""
  folds = []
  for fold, rows in table.groupby("fold"):
    labels, calibrated = evaluate_lib.labels_and_probabilities(rows, class_names)
    figures = metrics_lib.headline(labels, calibrated)
    folds.append({"fold": int(fold), "num_images": int(len(rows)), **{k: float(figures[k]) for k in PER_FOLD}})
  summary = {k: {"mean": float(np.mean([f[k] for f in folds])), "sd": float(np.std([f[k] for f in folds], ddof=1))}
             for k in PER_FOLD}
  return {"folds": folds, **summary}


def cross_validate(cfg: config_lib.TrainConfig, tta: str = "none") -> dict:
  """Trains the folds not yet trained, then writes what the module docstring lists; returns
  the ensemble's test metrics (or the out-of-fold ones under --noevaluate)."""
  if cfg.fold is not None:
    raise cli.UserError(f"--fold={cfg.fold}: job.cross_validate trains every fold; train one with "
                        "python -m job.train --fold")
  manifest = manifest_lib.read(cfg.data_dir)
  num_folds = manifest_lib.num_folds(manifest)
  if not num_folds:
    raise cli.UserError(f"--data_dir={cfg.data_dir} was converted without --folds: convert again with "
                        "python -m tfrecords.convert --folds=5")
  root = cfg.model_dir
  fileio.makedirs(root)
  manifest_sha256 = fileio.sha256_of(fileio.join(cfg.data_dir, manifest_lib.MANIFEST_FILE))
  train_folds(cfg, num_folds, manifest_sha256)

  take = train.DEBUG_EVAL_EXAMPLES if cfg.debug else None
  oof = out_of_fold(cfg, manifest, num_folds, take)
  class_names = oof.class_names
  labels = oof.table["label"].map(manifest_lib.label_map(class_names)).to_numpy()
  # The ensemble's melanoma threshold, for each mode: on predictions of images no model chose
  # it on before (each fold's own threshold saw only its fold).
  thresholds = {mode: evaluate_lib.melanoma_threshold(labels, oof.calibrated[mode], class_names,
                                                      "out-of-fold predictions") for mode in tta_lib.MODES}
  table = evaluate_lib._table([evaluate_lib.with_probabilities(oof.table, class_names, oof.calibrated[tta],
                                                               oof.raw[tta])])
  out = io.StringIO()
  table.to_csv(out, index=False)
  fileio.write_atomic(fileio.join(root, OOF_PREDICTIONS_FILE), out.getvalue())
  cv_metrics = {
      "num_folds": num_folds, "tta": tta,
      "note": "each fold's model on its own validation fold, which chose its best epoch and fitted its "
              "temperature; the melanoma threshold is chosen on these predictions",
      "out_of_fold": evaluate_lib.compute_metrics(table, class_names, {
          "temperature": oof.temperatures[tta], "fitted_on": "each fold's validation",
          "melanoma_threshold": thresholds[tta]}, seed=cfg.seed),
      "per_fold": per_fold_figures(table, class_names),
  }
  fileio.write_json(fileio.join(root, CV_METRICS_FILE), cv_metrics)
  headline = cv_metrics["out_of_fold"]
  logging.info("out-of-fold, %d images of %d lesions (--tta=%s): balanced accuracy %.3f; per fold %.3f ± %.3f",
               headline["num_images"], headline["num_lesions"], tta, headline["balanced_accuracy"],
               cv_metrics["per_fold"]["balanced_accuracy"]["mean"], cv_metrics["per_fold"]["balanced_accuracy"]["sd"])
  # Last of what the folds give: from here on ROOT is a finished cross-validation, an ensemble
  # that job.evaluate, job.predict and job.compare take as one model.
  fileio.write_json(fileio.join(root, ensemble_lib.CROSS_VALIDATION_FILE), {
      "folds": num_folds, "data_dir": cfg.data_dir, "manifest_sha256": manifest_sha256,
      "fold_dirs": [ensemble_lib.FOLD_DIR.format(k) for k in range(num_folds)], "melanoma_threshold": thresholds})

  metrics = cv_metrics["out_of_fold"]
  predictor = ensemble_lib.load([root])
  if cfg.evaluate:
    metrics = evaluate_lib.evaluate(root, cfg.data_dir, "test", take=take, tta=tta, predictor=predictor)
  serving_dir = cfg.serving_dir
  if serving_dir:
    predict.export_serving(predictor, serving_dir, tta)
    logging.info("the %d folds' serving SavedModel (image_bytes in, their mean calibrated probabilities out) in %s",
                 num_folds, serving_dir)
  return metrics


def define_flags():
  config_lib.define_flags()
  flags.DEFINE_enum("tta", "none", list(tta_lib.MODES), "Test-time augmentation of the out-of-fold predictions "
                    "and of the ensemble's test figures: none, flip or dihedral.")


def main(argv):
  del argv
  cross_validate(config_lib.config_from_flags(), flags.FLAGS.tta)


if __name__ == "__main__":
  cli.run(main, define_flags)
