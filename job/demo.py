r"""The offline demo: synthetic HAM10000 → shards → both stages → test metrics.

  python -m job.demo

Runs in a few minutes on two CPU cores with no network: a synthetic dataset
(HAM10000's layout, imbalance and lesion structure; tfrecords/synthetic.py),
a lesion-aware conversion at 64×64, ResNet-50 from random initialisation
(ImageNet weights cannot be downloaded offline), and an evaluation that puts
the balanced accuracy beside the always-`nv` baseline. The artifacts land in
artifacts/, where the seed's inference example reads them.
"""

import os

import tensorflow as tf
from absl import flags, logging

from job import artifacts, config as config_lib, evaluate, train
from tfrecords import cli, fileio, synthetic

FLAGS = flags.FLAGS
DEMO_BASE_BATCH = 16  # the demo's learning rates were chosen at batch 16; other batches scale them


def define_flags():
  flags.DEFINE_string("work_dir", "demo_output", "Where the synthetic images and shards go.")
  flags.DEFINE_string("model_dir", "artifacts", "Where the artifacts go (replaced if it holds an "
                      "earlier run).")
  flags.DEFINE_integer("num_images", 800, "Synthetic images.")
  flags.DEFINE_integer("image_size", 64, "Training image size.")
  flags.DEFINE_integer("stage1_epochs", 5, "Head epochs.")
  flags.DEFINE_integer("stage2_epochs", 5, "Fine-tuning epochs.")
  flags.DEFINE_integer("global_batch_size", 16, "Batch size.")
  flags.DEFINE_float("stage1_lr", 1e-3, "Stage 1 learning rate (random features learn slower than "
                     "ImageNet's, so the demo starts higher than the job's 1e-4).")
  flags.DEFINE_integer("seed", 0, "Seed of the data, the split and the training.")
  flags.DEFINE_bool("deterministic", False, "Repeatable training (job.train --deterministic).")


def main(argv):
  del argv
  if tf.io.gfile.exists(artifacts.path(FLAGS.model_dir, artifacts.RUN_CONFIG_FILE)):
    logging.info("replacing the earlier run in %s", FLAGS.model_dir)
    fileio.remove_if_exists(FLAGS.model_dir)
  _, shards_dir, _ = synthetic.write_and_convert(FLAGS.work_dir, FLAGS.num_images, FLAGS.image_size,
                                                 FLAGS.seed)
  cfg = config_lib.TrainConfig(
      data_dir=shards_dir, model_dir=FLAGS.model_dir, weights="none", image_size=FLAGS.image_size,
      global_batch_size=FLAGS.global_batch_size, stage1_epochs=FLAGS.stage1_epochs,
      stage2_epochs=FLAGS.stage2_epochs, stage1_lr=FLAGS.stage1_lr, mixed_precision="off",
      seed=FLAGS.seed, base_batch_size=DEMO_BASE_BATCH, deterministic=FLAGS.deterministic)
  metrics = train.train_and_evaluate(cfg)
  print(f"\nTest split ({metrics['num_images']} images of {metrics['num_lesions']} lesions, "
        "synthetic data; 95% CI over lesions):")
  for line in evaluate.headline_lines(metrics):
    print(f"  {line}")
  print(f"Artifacts: {os.path.abspath(FLAGS.model_dir) if fileio.is_local(FLAGS.model_dir) else FLAGS.model_dir}")


if __name__ == "__main__":
  cli.run(main, define_flags)
