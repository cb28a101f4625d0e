r"""Does a large global batch under-train without learning-rate scaling? Validation figures.

  python -m bench.lr_scaling [--num_images=2000] [--seeds=3]

Trains the job (both stages, same epochs) on the same synthetic shards at
global batch `--small_batch` (the seed's 32, where every rule gives the seed's
rates) and at `--large_batch` (256) with each of `--scalings`, for several
seeds, and reports the best model's validation balanced accuracy: mean, spread
(standard deviation) and each seed's. The figure is a quality, not a time, so
it holds on any machine; it says what this synthetic set shows, not HAM10000.
"""

import tempfile

import keras
import numpy as np
from absl import flags, logging
from sklearn import metrics as skm

from bench import common
from job import config as config_lib, ensemble, evaluate, train
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num_images", 2000, "Synthetic images (the train split gets ~70%).")
  flags.DEFINE_integer("image_size", 32, "Training image size.")
  flags.DEFINE_integer("small_batch", 32, "The base batch (the seed's rates are for it).")
  flags.DEFINE_integer("large_batch", 256, "The large global batch.")
  flags.DEFINE_list("scalings", ["none", "sqrt"], "Rules tried at the large batch.")
  flags.DEFINE_integer("seeds", 3, "Training seeds per configuration.")
  flags.DEFINE_integer("stage1_epochs", 5, "Head epochs.")
  flags.DEFINE_integer("stage2_epochs", 5, "Fine-tuning epochs.")
  flags.DEFINE_float("stage1_lr", 1e-3, "Stage 1 rate at the small batch (the demo's: random features).")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def validation_balanced_accuracy(model_dir: str, shards_dir: str) -> float:
  info = manifest.split_info(shards_dir, manifest.read(shards_dir), "validation")
  table = evaluate.predict_split(ensemble.load([model_dir]), info)
  return float(skm.balanced_accuracy_score(table["label"], table["prediction"]))


def main(argv):
  del argv
  _, shards_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size)
  configurations = [(FLAGS.small_batch, "none")] + [(FLAGS.large_batch, s) for s in FLAGS.scalings]
  results = []
  for batch, scaling in configurations:
    scores = []
    for seed in range(FLAGS.seeds):
      keras.backend.clear_session()
      cfg = config_lib.TrainConfig(
          data_dir=shards_dir, model_dir=tempfile.mkdtemp(prefix="bench-lr-"), weights="none",
          image_size=FLAGS.image_size, global_batch_size=batch, lr_scaling=scaling,
          base_batch_size=FLAGS.small_batch, stage1_lr=FLAGS.stage1_lr, stage1_epochs=FLAGS.stage1_epochs,
          stage2_epochs=FLAGS.stage2_epochs, mixed_precision="off", jit_compile="off",
          strategy="one_device", seed=seed, evaluate=False, serving=False)
      train.train_and_evaluate(cfg)
      scores.append(validation_balanced_accuracy(cfg.model_dir, shards_dir))
      logging.info("batch %d, %s scaling, seed %d: validation balanced accuracy %.3f", batch, scaling,
                   seed, scores[-1])
    results.append({"global_batch_size": batch, "lr_scaling": scaling, "seeds": FLAGS.seeds,
                    "val_balanced_accuracy_mean": float(np.mean(scores)),
                    "val_balanced_accuracy_std": float(np.std(scores)),
                    "val_balanced_accuracy": [round(v, 3) for v in scores]})
  common.report({"bench": "lr_scaling", "num_images": FLAGS.num_images, "image_size": FLAGS.image_size,
                 "epochs": [FLAGS.stage1_epochs, FLAGS.stage2_epochs], "results": results})


if __name__ == "__main__":
  cli.run(main, define_flags)
