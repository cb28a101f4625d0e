r"""A seeded study on the synthetic data: does --metadata use what the patient's site says?

  python -m bench.metadata_study [--num_images=800] [--site_signal=0.5] [--seed=0] [--work_dir=D]

1. A synthetic dataset whose label depends partly on the site: a share (--site_signal) of the
   lesions are photographed at their class's own site (tfrecords.synthetic --site_signal), the
   rest anywhere; age and sex say nothing of the class.
2. Two runs with the same seed and flags on the same shards: images only, and
   --metadata=age,sex,localization.
3. job.compare's paired lesion bootstrap on the same test images: the metadata run's balanced
   accuracy and macro AUC minus the image-only run's, with 95% intervals.

Random initialisation at a small image size, as bench.cross_validation_study: the figures
say that the branch learns a signal the fields carry, not how much HAM10000's fields add.
"""

import dataclasses
import os

import keras
from absl import flags

from bench import common
from job import compare as compare_lib, config as config_lib, train
from tfrecords import cli

FLAGS = flags.FLAGS
FIELDS = ("age", "sex", "localization")


def define_flags():
  flags.DEFINE_integer("num_images", 800, "Synthetic images.")
  flags.DEFINE_float("site_signal", 0.5, "Share of lesions at their class's own site.")
  flags.DEFINE_integer("image_size", 32, "Training image size.")
  flags.DEFINE_integer("stage1_epochs", 3, "Head epochs of both runs.")
  flags.DEFINE_integer("stage2_epochs", 2, "Fine-tuning epochs of both runs.")
  flags.DEFINE_integer("seed", 0, "Seed of the data, the split and the training.")
  flags.DEFINE_string("work_dir", None, "Where the data and the runs go (default: a temporary folder).")
  flags.DEFINE_string("data_dir", None, "Shards to study instead of the synthetic ones.")
  flags.DEFINE_enum("color_constancy", "none", config_lib.COLOR_CONSTANCY, "job.train's, for both runs.")
  flags.DEFINE_string("baseline_dir", None, "An image-only run on the same shards to compare with, instead of "
                      "training one (its settings are then its own).")
  flags.DEFINE_bool("debug", False, "Train both runs on job.train --debug's small subset (a quick check).")


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size,
                                              seed=FLAGS.seed, site_signal=FLAGS.site_signal)[1]
  runs = FLAGS.work_dir or os.path.dirname(data_dir)
  image_only = config_lib.TrainConfig(
      data_dir=data_dir, model_dir=os.path.join(runs, f"image_only_{os.path.basename(data_dir)}"),
      weights="none", image_size=FLAGS.image_size, global_batch_size=16, stage1_epochs=FLAGS.stage1_epochs,
      stage2_epochs=FLAGS.stage2_epochs, stage1_lr=1e-3, mixed_precision="off", strategy="one_device",
      seed=FLAGS.seed, debug=FLAGS.debug, color_constancy=FLAGS.color_constancy, overwrite=True)
  with_metadata = dataclasses.replace(image_only, metadata=FIELDS,
                                      model_dir=os.path.join(runs, f"metadata_{os.path.basename(data_dir)}"))
  baseline = FLAGS.baseline_dir or image_only.model_dir
  for cfg in (image_only, with_metadata) if not FLAGS.baseline_dir else (with_metadata,):
    keras.backend.clear_session()
    train.train_and_evaluate(config_lib.validated(cfg))
  compared = compare_lib.compare([baseline, with_metadata.model_dir], data_dir, seed=FLAGS.seed)["comparisons"][0]
  common.report({
      "bench": "metadata_study", "image_size": FLAGS.image_size, "seed": FLAGS.seed,
      "site_signal": FLAGS.site_signal, "epochs": [FLAGS.stage1_epochs, FLAGS.stage2_epochs],
      "color_constancy": FLAGS.color_constancy,
      "runs": [baseline, with_metadata.model_dir],
      "metadata_vs_image_only": {key: compared[key] for key in ("balanced_accuracy", "macro_roc_auc")}})


if __name__ == "__main__":
  cli.run(main, define_flags)
