r"""Input pipeline throughput: the seed's pipeline against the job's, on the same images.

  python -m bench.pipeline [--num_images=600] [--image_size=224]

(a) the seed's: path list → read_file → decode_jpeg → resize → preprocess_input
    → batch 32, no cache (parallel map and prefetch, to be generous to it);
(b) the job's (job/data.py) over shards converted at the training size
    (`tfrecords.convert --image_size`), first epoch (uncached);
(c) the same, steady state (served from the uint8 cache).
Also (b) over shards that keep the original 600×450 JPEGs, to show what
resizing once at conversion buys. All read the same train-split images;
tfds.benchmark does the timing.
"""

import itertools
import math
import os

import keras
import pandas as pd
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags, logging

from bench import common
from job import data
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num_images", 800, "Synthetic images (the train split gets ~70%).")
  flags.DEFINE_integer("image_size", 224, "Training image size.")
  flags.DEFINE_integer("batch_size", 32, "Batch size.")
  flags.DEFINE_integer("cached_epochs", 5, "Epochs timed from the cache.")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def seed_pipeline(paths, image_size, batch_size):
  def load(path):
    image = tf.image.decode_jpeg(tf.io.read_file(path), channels=3)
    image = tf.image.resize(image, (image_size, image_size))
    return keras.applications.resnet50.preprocess_input(tf.cast(image, tf.float32))
  return (tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def examples_per_second(batches, batch_size) -> float:
  stats = tfds.benchmark(batches, batch_size=batch_size).stats
  return float(stats.loc["first+lasts", "avg"])


def job_pipeline(shards_dir):
  info = manifest.split_info(shards_dir, manifest.read(shards_dir), "train")
  return info, iter(data.train_dataset(info, FLAGS.image_size, FLAGS.batch_size))


def main(argv):
  del argv
  _, resized_dir, source = common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=FLAGS.image_size)
  _, original_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images, image_size=0)
  split = pd.read_csv(os.path.join(resized_dir, "split.csv"))
  paths = [str(source.images[i]) for i in split["image_id"][split["split"] == "train"]]
  steps = math.ceil(len(paths) / FLAGS.batch_size)
  logging.info("%d train images, %d batches of %d per epoch", len(paths), steps, FLAGS.batch_size)

  seed = examples_per_second(seed_pipeline(paths, FLAGS.image_size, FLAGS.batch_size), FLAGS.batch_size)
  _, ours = job_pipeline(resized_dir)
  first = examples_per_second(itertools.islice(ours, steps), FLAGS.batch_size)
  cached = examples_per_second(itertools.islice(ours, steps * FLAGS.cached_epochs), FLAGS.batch_size)
  _, original = job_pipeline(original_dir)
  first_original = examples_per_second(itertools.islice(original, steps), FLAGS.batch_size)
  common.report({"bench": "pipeline", "images": len(paths), "image_size": FLAGS.image_size,
                 "seed_img_s": seed, "first_epoch_img_s": first, "cached_img_s": cached,
                 "first_epoch_vs_seed": first / seed, "cached_vs_seed": cached / seed,
                 "first_epoch_original_jpegs_img_s": first_original,
                 "first_epoch_original_jpegs_vs_seed": first_original / seed})


if __name__ == "__main__":
  cli.run(main, define_flags)
