r"""What each backbone's training step costs, against ResNet-50's on the same batches.

  python -m bench.backbones [--backbones=resnet50v2,efficientnet_b0,...] [--image_size=64]

Each backbone is the job's stage-2 training wrapper (bench/timing.py: the heavier stage, its
default share unfrozen), fed one in-memory batch over and over, so that the figure is the
step's and not the pipeline's. ResNet-50 and the backbone are timed alternately, `--rounds`
pairs, and the ratio (ResNet-50's images/s ÷ the backbone's: > 1 is slower) is taken pair by
pair. The CPU here says what the networks cost relative to each other on a CPU; on a GPU
(`bench.gpu`) the ratios differ, EfficientNets' depthwise convolutions more than others.
"""

import dataclasses

import numpy as np
import tensorflow as tf
from absl import flags, logging

from bench import common
from bench.timing import build, images_per_second
from job import backbones, config as config_lib, data
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("backbones", [name for name in backbones.NAMES if name != backbones.DEFAULT],
                    "Backbones to time against resnet50.")
  flags.DEFINE_integer("num_images", 300, "Synthetic images.")
  flags.DEFINE_integer("image_size", 64, "Training image size.")
  flags.DEFINE_integer("batch_size", 16, "Batch size.")
  flags.DEFINE_integer("steps", 5, "Steps per timed epoch.")
  flags.DEFINE_integer("epochs", 2, "Timed epochs per measurement (after one warm-up epoch).")
  flags.DEFINE_integer("rounds", 2, "resnet50/backbone pairs, alternated.")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def main(argv):
  del argv
  backbones.check_names(FLAGS.backbones, "--backbones")
  _, shards_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images)
  info = manifest.split_info(shards_dir, manifest.read(shards_dir), "train")
  weights = data.class_weights(info.class_counts)
  batch = next(iter(data.train_dataset(info, FLAGS.image_size, FLAGS.batch_size)))
  in_memory = tf.data.Dataset.from_tensors(batch).repeat()
  base = config_lib.TrainConfig(data_dir=shards_dir, image_size=FLAGS.image_size, mixed_precision="off",
                                global_batch_size=FLAGS.batch_size, jit_compile="off")

  def speed(model):
    return images_per_second(model, in_memory, FLAGS.steps, FLAGS.epochs, FLAGS.batch_size)

  reference = build(base, weights)
  figures = {"bench": "backbones", "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size}
  for name in FLAGS.backbones:
    model = build(dataclasses.replace(base, backbone=name), weights)
    ratios = []
    for _ in range(FLAGS.rounds):
      resnet, other = speed(reference), speed(model)
      ratios.append(resnet / other)
    figures[f"{name}_step_vs_resnet50"] = float(np.median(ratios))
    logging.info("%s: a step costs %.2f× ResNet-50's", name, figures[f"{name}_step_vs_resnet50"])
  common.report(figures)


if __name__ == "__main__":
  cli.run(main, define_flags)
