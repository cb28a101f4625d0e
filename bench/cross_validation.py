r"""What cross-validation costs: test-time augmentation, a fold ensemble, and a fold's pipeline.

  python -m bench.cross_validation [--image_size=224] [--members=5] [--folds=5]

Three ratios, each measured side by side in one process on the same images:

- `flip` and `dihedral` TTA ÷ none: an ensemble of one (job/ensemble.py) predicting the
  test split's batches, each mode timed in turn, round after round;
- a `--members` ensemble ÷ one model (no TTA), the same way;
- a fold's training pipeline ÷ today's: job/data.py's train_dataset over a conversion
  with `--folds` (fold 1's run: the train and validation shards, filtered to its other
  folds) against the same conversion without, images per second through the first
  (uncached) epoch and from the cache. The folded conversion holds the same images.

Models are ResNet-50s with random weights (the cost of a forward pass does not depend on
them). A ratio near 1 for the pipeline means a fold's epoch costs what an epoch cost before.
"""

import itertools
import math
import time

import numpy as np
import tensorflow as tf
from absl import flags, logging

from bench import common
from bench.pipeline import examples_per_second
from job import data, ensemble as ensemble_lib, model as model_lib, tta as tta_lib
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num_images", 600, "Synthetic images.")
  flags.DEFINE_integer("image_size", 224, "Image size of the models and the pipelines.")
  flags.DEFINE_integer("batch_size", 32, "Images per prediction batch and per training batch.")
  flags.DEFINE_integer("members", 5, "Members of the ensemble timed against one model.")
  flags.DEFINE_integer("folds", 5, "Folds of the folded conversion.")
  flags.DEFINE_integer("rounds", 3, "Rounds of the prediction timings (each times every variant once).")
  flags.DEFINE_integer("cached_epochs", 3, "Epochs of each pipeline timed from the cache.")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def member(seed: int, class_names: tuple[str, ...]) -> ensemble_lib.Member:
  tf.keras.utils.set_random_seed(seed)
  inner = model_lib.build_inner_model("none", num_classes=len(class_names))
  return ensemble_lib.Member(f"random-{seed}", inner, FLAGS.image_size, class_names, calibration=None)


def seconds_to_predict(predictor: ensemble_lib.Ensemble, batches: list, mode: str) -> float:
  start = time.perf_counter()
  for images in batches:
    predictor.predict({FLAGS.image_size: images}, mode, calibrated=False)
  return time.perf_counter() - start


def prediction_ratios(shards_dir: str) -> dict:
  read = manifest.read(shards_dir)
  info, class_names = manifest.split_info(shards_dir, read, "test"), manifest.class_names(read)
  batches = [images for images, _, _ in data.prediction_dataset(info, FLAGS.image_size, FLAGS.batch_size)]
  members = [member(seed, class_names) for seed in range(FLAGS.members)]
  one = ensemble_lib.Ensemble("one", tuple(members[:1]))
  several = ensemble_lib.Ensemble("several", tuple(members))
  variants = {f"tta_{mode}": (one, mode) for mode in tta_lib.MODES}
  variants["ensemble"] = (several, "none")
  for predictor, mode in variants.values():  # tracing, outside the timings
    seconds_to_predict(predictor, batches[:1], mode)
  seconds = {name: [] for name in variants}
  for _ in range(FLAGS.rounds):
    for name, (predictor, mode) in variants.items():
      seconds[name].append(seconds_to_predict(predictor, batches, mode))
  # Pair by pair within a round, then the median: the machine's drift cancels.
  ratio = lambda name: float(np.median(np.divide(seconds[name], seconds["tta_none"])))
  images = sum(len(b) for b in batches)
  return {"test_images": images, "none_img_s": images / float(np.median(seconds["tta_none"])),
          "flip_vs_none": ratio("tta_flip"), "dihedral_vs_none": ratio("tta_dihedral"),
          "members": FLAGS.members, "ensemble_vs_one": ratio("ensemble")}


def pipeline_figures(info) -> tuple[float, float]:
  """Images/s of the first (uncached) epoch and from the cache."""
  steps = math.ceil(info.num_examples / FLAGS.batch_size)
  batches = iter(data.train_dataset(info, FLAGS.image_size, FLAGS.batch_size))
  first = examples_per_second(itertools.islice(batches, steps), FLAGS.batch_size)
  cached = examples_per_second(itertools.islice(batches, steps * FLAGS.cached_epochs), FLAGS.batch_size)
  return first, cached


def pipeline_ratios() -> tuple[dict, str]:
  """The figures, and the unfolded conversion (the prediction timings read its test split)."""
  _, plain_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size)
  _, folded_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size,
                                    folds=FLAGS.folds)
  plain = manifest.split_info(plain_dir, manifest.read(plain_dir), "train")
  folded = data.split_info(folded_dir, manifest.read(folded_dir), "train", fold=1)
  logging.info("train images: %d today, %d in fold 1's run of %d folds", plain.num_examples, folded.num_examples,
               FLAGS.folds)
  plain_first, plain_cached = pipeline_figures(plain)
  folded_first, folded_cached = pipeline_figures(folded)
  return {"folds": FLAGS.folds, "pipeline_first_epoch_img_s": plain_first,
          "folded_vs_today_first_epoch": folded_first / plain_first,
          "folded_vs_today_cached": folded_cached / plain_cached}, plain_dir


def main(argv):
  del argv
  pipeline, shards_dir = pipeline_ratios()
  common.report({"bench": "cross_validation", "image_size": FLAGS.image_size, **prediction_ratios(shards_dir),
                 **pipeline})


if __name__ == "__main__":
  cli.run(main, define_flags)
