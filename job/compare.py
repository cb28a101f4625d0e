r"""Paired comparison of runs on the same images: is B better than A, or is it chance?

  python -m job.compare --data_dir=shards --model_dir=runs/a --model_dir=runs/b [--model_dir=cv …]
      [--split=test] [--tta=none]

Each --model_dir (a run, or a cross-validation's root as its ensemble) predicts
the same split; then one lesion bootstrap resamples the split's lesions (its
images, for a set without lesion groupings) and scores every run on each
resample. A run's difference from the first (run − baseline) then varies with
the runs alone: two runs' separate intervals overlap far more than the interval
of their difference, which is what tells a change from noise. Reported for
balanced accuracy, macro ROC AUC, macro F1 and melanoma sensitivity (at each
run's own threshold, chosen on its validation or out-of-fold predictions):
the difference, its 95% interval and the share of resamples in which the run is
worse; with three runs or more, each figure's mean and sd over the runs (the
spread of, say, one command's seeds). A table goes to stderr, one JSON line to
stdout.

Runs may come from different conversions (a HAM10000 model and an ISIC 2019
model on one external set); refused, naming the run, are runs with other
classes, and a split holding any image a run trained or validated on (the
split.csv of each run's --data_dir says which).
"""

import json
import sys

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import flags, logging

from job import artifacts, ensemble as ensemble_lib, evaluate as evaluate_lib, metrics as metrics_lib, tta as tta_lib
from tfrecords import cli, convert, fileio, manifest as manifest_lib


def images_of(data_dir: str, splits) -> pd.DataFrame:
  """The image ids of `splits` in a conversion's split.csv."""
  path = fileio.join(data_dir, convert.SPLIT_FILE)
  if not tf.io.gfile.exists(path):
    raise cli.UserError(f"{path} is missing: without it there is no telling which images that conversion's runs "
                        "trained on; convert again")
  with tf.io.gfile.GFile(path) as f:
    table = pd.read_csv(f, dtype={"image_id": str, "split": str})
  return table[table["split"].isin(splits)]


def check_unseen(run: ensemble_lib.Ensemble, name: str, image_ids: set[str], split: str):
  """Stops when any member of `run` trained or validated on an image of the split compared."""
  for member in run.members:
    trained_on = artifacts.read_run_config(member.model_dir)["flags"]["data_dir"]
    seen = images_of(trained_on, ("train", "validation"))
    shared = sorted(image_ids & set(seen["image_id"]))
    if shared:
      raise cli.UserError(f"--model_dir={name}: {len(shared)} images of the {split} split compared were in the "
                          f"train or validation split of --data_dir={trained_on}, which "
                          f"{member.model_dir} trained on (e.g. {', '.join(shared[:3])}); compare on images "
                          "no run has seen")


def figure(point: np.ndarray, samples: np.ndarray, run: int, index: int) -> dict:
  """Run − baseline of one figure: the difference, its 95% interval and the share of resamples
  in which the run is worse (every figure here is better higher)."""
  difference = samples[:, run, index] - samples[:, 0, index]
  difference = difference[~np.isnan(difference)]
  if np.isnan(point[run, index]) or np.isnan(point[0, index]) or not len(difference):
    return {"difference": None, "ci95": None, "share_worse": None, "value": None, "baseline_value": None}
  return {"difference": float(point[run, index] - point[0, index]),
          "ci95": [float(np.percentile(difference, 2.5)), float(np.percentile(difference, 97.5))],
          "share_worse": float(np.mean(difference < 0)),
          "value": float(point[run, index]), "baseline_value": float(point[0, index])}


def compare(model_dirs: list[str], data_dir: str, split: str = "test", tta: str = "none",
            replicates: int = evaluate_lib.BOOTSTRAP, seed: int = 0, take: int | None = None) -> dict:
  if len(model_dirs) < 2:
    raise cli.UserError("give two --model_dir or more: the first is the baseline the others are compared with")
  loaded = {}
  runs = [loaded.setdefault(d, ensemble_lib.load([d])) for d in model_dirs]  # a run against itself: loaded once
  manifest = manifest_lib.read(data_dir)
  classes = manifest_lib.class_names(manifest)
  for name, run in zip(model_dirs, runs):
    if run.class_names != classes:
      raise cli.UserError(f"--model_dir={name} predicts the classes {list(run.class_names)}, --data_dir={data_dir} "
                          f"holds {list(classes)}; runs are compared on the classes they share with the data")
  info = manifest_lib.split_info(data_dir, manifest, split)
  image_ids = set(images_of(data_dir, (split,))["image_id"])
  for name, run in zip(model_dirs, runs):
    check_unseen(run, name, image_ids, split)

  tables = {}
  for name, run in zip(model_dirs, runs):
    if name not in tables:
      tables[name] = evaluate_lib.predict_split(run, info, tta, take=take)
  first = tables[model_dirs[0]]
  labels = first["label"].map(manifest_lib.label_map(classes)).to_numpy()
  probabilities = [evaluate_lib.labels_and_probabilities(tables[name], classes)[1] for name in model_dirs]
  thresholds = [(run.melanoma_threshold(tta) or {}).get("value") for run in runs]
  mel = metrics_lib.class_index(classes, metrics_lib.MELANOMA)
  point, samples = metrics_lib.paired_bootstrap(labels, probabilities, first["lesion_id"].to_numpy(), thresholds,
                                                mel, replicates, seed)
  result = {"baseline": model_dirs[0], "split": split, "data_dir": data_dir, "tta": tta,
            "num_images": int(len(first)), "num_lesions": int(first["lesion_id"].nunique()),
            "bootstrap": {"replicates": replicates, "seed": seed,
                          "unit": metrics_lib.bootstrap_unit(first["lesion_id"], first["image_id"])},
            "comparisons": [{"run": name, **{key: figure(point, samples, i, k) for k, key in enumerate(metrics_lib.PAIRED)}}
                            for i, name in enumerate(model_dirs) if i > 0]}
  if len(model_dirs) >= 3:
    result["over_runs"] = {key: {"mean": _nan_free(np.nanmean(point[:, k])), "sd": _nan_free(np.nanstd(point[:, k], ddof=1))}
                           for k, key in enumerate(metrics_lib.PAIRED)}
  return result


def _nan_free(value) -> float | None:
  return None if np.isnan(value) else float(value)


def table_lines(result: dict) -> list[str]:
  """What stderr shows: each run against the baseline, figure by figure."""
  lines = [f"{result['split']} split, {result['num_images']} images of {result['num_lesions']} lesions, "
           f"--tta={result['tta']}; baseline {result['baseline']}",
           f"{'run':<28}{'figure':<22}{'run − baseline':>15}  {'95% interval':<18}{'worse in':>9}"]
  for comparison in result["comparisons"]:
    for key in metrics_lib.PAIRED:
      f = comparison[key]
      if f["difference"] is None:
        lines.append(f"{comparison['run']:<28}{key:<22}{'n/a':>15}  (no threshold or no melanoma)")
        continue
      lines.append(f"{comparison['run']:<28}{key:<22}{f['difference']:>+15.3f}  "
                   f"[{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]  {100 * f['share_worse']:>7.1f}%")
  for key, spread in result.get("over_runs", {}).items():
    if spread["mean"] is not None:
      lines.append(f"{'over the runs':<28}{key:<22}mean {spread['mean']:.3f}, sd {spread['sd']:.3f}")
  return lines


def define_flags():
  flags.DEFINE_string("data_dir", None, "Converted shards holding the split to compare on.", required=True)
  flags.DEFINE_multi_string("model_dir", None, "A run or a cross-validation's root; give two or more, the "
                            "first is the baseline.", required=True)
  flags.DEFINE_string("split", "test", "Split of --data_dir (test, or external for a set converted with --external).")
  flags.DEFINE_enum("tta", "none", list(tta_lib.MODES), "Test-time augmentation for every run.")
  flags.DEFINE_integer("replicates", evaluate_lib.BOOTSTRAP, "Lesion-bootstrap replicates.", lower_bound=100)
  flags.DEFINE_integer("seed", 0, "The bootstrap's seed.")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  result = compare(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, FLAGS.tta, FLAGS.replicates, FLAGS.seed)
  print("\n".join(table_lines(result)), file=sys.stderr)
  print(json.dumps(result))
  logging.info("compared %d runs on %d images", len(FLAGS.model_dir), result["num_images"])


if __name__ == "__main__":
  cli.run(main, define_flags)
