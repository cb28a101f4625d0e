r"""A seeded study on the synthetic data: what the folds' ensemble and TTA do to test figures,
and whether job.compare tells a weaker run apart.

  python -m bench.cross_validation_study [--num_images=800] [--folds=3] [--seed=0]

1. A synthetic dataset converted with --folds=K; job.cross_validate trains the K folds.
2. On the test split (which no fold trained or validated on): each fold's model alone,
   and the K folds' ensemble (job/ensemble.py), without TTA and with the 8 dihedral views.
3. A deliberately weaker run (fold 0's data, --weak_stage1_epochs and no stage 2), compared
   with fold 0's model by job.compare's paired lesion bootstrap on the same test images.

Random initialisation (no ImageNet weights offline) at a small image size: the figures
say what the method does to models of this quality on data of this kind, not what it does
to ImageNet-initialised models on HAM10000.
"""

import dataclasses
import os

import keras
import numpy as np
from absl import flags, logging

from bench import common
from job import compare as compare_lib, config as config_lib, cross_validate, ensemble, evaluate, metrics, train
from tfrecords import cli, fileio, manifest

FLAGS = flags.FLAGS
MODES = ("none", "dihedral")


def define_flags():
  flags.DEFINE_integer("num_images", 800, "Synthetic images.")
  flags.DEFINE_integer("image_size", 32, "Training image size.")
  flags.DEFINE_integer("folds", 3, "Folds (K).")
  flags.DEFINE_integer("stage1_epochs", 3, "Head epochs of every fold.")
  flags.DEFINE_integer("stage2_epochs", 2, "Fine-tuning epochs of every fold.")
  flags.DEFINE_integer("weak_stage1_epochs", 1, "Head epochs of the weaker run (no fine-tuning).")
  flags.DEFINE_integer("seed", 0, "Seed of the data, the split, the folds and the training.")
  flags.DEFINE_string("work_dir", None, "Where the data and the runs go (default: a temporary folder).")
  flags.DEFINE_string("data_dir", None, "A conversion with --folds to study instead of the synthetic one.")
  flags.DEFINE_string("model_dir", None, "The cross-validation root (default: beside the shards); its "
                      "finished folds are not trained again.")


def test_balanced_accuracy(model_dirs: list[str], data_dir: str, mode: str) -> float:
  predictor = ensemble.load(model_dirs)
  info = manifest.split_info(data_dir, manifest.read(data_dir), "test")
  table = evaluate.predict_split(predictor, info, mode)
  labels, calibrated = evaluate.labels_and_probabilities(table, predictor.class_names)
  keras.backend.clear_session()
  return float(metrics.headline(labels, calibrated)["balanced_accuracy"])


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size,
                                              seed=FLAGS.seed, folds=FLAGS.folds)[1]
  root = FLAGS.model_dir or os.path.join(os.path.dirname(data_dir), f"cv_{os.path.basename(data_dir)}")
  cfg = config_lib.TrainConfig(
      data_dir=data_dir, model_dir=root, weights="none", image_size=FLAGS.image_size, global_batch_size=16,
      stage1_epochs=FLAGS.stage1_epochs, stage2_epochs=FLAGS.stage2_epochs, stage1_lr=1e-3, mixed_precision="off",
      strategy="one_device", seed=FLAGS.seed)
  cross_validate.cross_validate(cfg)  # finished folds are kept: a rerun only evaluates
  fold_dirs = ensemble.fold_dirs(root)

  single = {mode: [test_balanced_accuracy([d], data_dir, mode) for d in fold_dirs] for mode in MODES}
  together = {mode: test_balanced_accuracy([root], data_dir, mode) for mode in MODES}
  for mode in MODES:
    logging.info("test balanced accuracy, tta=%s: single folds %s, the %d folds' ensemble %.3f", mode,
                 " ".join(f"{b:.3f}" for b in single[mode]), len(fold_dirs), together[mode])

  weak = dataclasses.replace(cross_validate.fold_config(cfg, 0), model_dir=f"{root}_weaker_fold_0",
                             stage1_epochs=FLAGS.weak_stage1_epochs, stage2_epochs=0)
  fileio.remove_if_exists(weak.model_dir)  # trained anew each time: it is cheap
  keras.backend.clear_session()
  train.train_and_evaluate(weak)
  compared = compare_lib.compare([fold_dirs[0], weak.model_dir], data_dir, seed=FLAGS.seed)["comparisons"][0]

  common.report({
      "bench": "cross_validation_study", "image_size": FLAGS.image_size, "folds": len(fold_dirs), "seed": FLAGS.seed, "epochs": [FLAGS.stage1_epochs, FLAGS.stage2_epochs],
      **{f"single_fold_{mode}": {"values": single[mode], "mean": float(np.mean(single[mode])),
                                 "sd": float(np.std(single[mode], ddof=1))} for mode in MODES},
      **{f"ensemble_{mode}": together[mode] for mode in MODES},
      "weaker_vs_fold_0": {"epochs": [FLAGS.weak_stage1_epochs, 0],
                           **{key: compared[key] for key in ("balanced_accuracy", "macro_roc_auc")}}})


if __name__ == "__main__":
  cli.run(main, define_flags)
