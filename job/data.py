"""The input pipeline: shards → uint8 images at the training size, cached, batched.

Three datasets, one per use: `train_dataset` (shuffled, repeated, full
batches), `validation_dataset` (one pass, the last batch padded with rows that
weigh nothing) and `prediction_dataset` (one pass with each image's ids and
metadata, for evaluation). The number of classes is the manifest's.

list shards → interleave → parse → decode → resize → **cache uint8** →
shuffle/repeat → batch uint8 → prefetch. Batching uint8 costs a quarter of
batching float32, so the cast, the random augmentation and `preprocess_input`
run on the accelerator, inside the training wrapper (job/model.py).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tfrecords import features
from tfrecords.manifest import SplitInfo

# What predictions.csv carries beside each prediction, for audit and subgroup metrics.
METADATA_KEYS = {"image_id": features.SOURCE_ID, "lesion_id": features.LESION_ID,
                 "age": features.AGE, "sex": features.SEX, "localization": features.LOCALIZATION}


def class_weights(class_counts: list[int]) -> np.ndarray:
  """scikit-learn's "balanced" weights, n / (k · n_c), from the train split's class counts."""
  labels = np.repeat(np.arange(len(class_counts)), class_counts)
  present = np.unique(labels)
  weights = np.ones(len(class_counts))
  weights[present] = compute_class_weight("balanced", classes=present, y=labels)
  return weights


def _decoded(info: SplitInfo, image_size: int, keys: list[str], *, shuffle_files: bool, seed: int = 0,
             take: int | None = None) -> tf.data.Dataset:
  """(uint8 image at the training size, label, metadata dict) per example."""
  files = tf.data.Dataset.from_tensor_slices(info.files)
  if shuffle_files:
    files = files.shuffle(len(info.files), seed=seed)
  dataset = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(info.files), 16),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle_files)
  if take:
    dataset = dataset.take(take)

  def parse(record):
    example = features.parse_example(record, [features.IMAGE_ENCODED, features.LABEL, *keys])
    # Shards converted at the training size (`tfrecords.convert --image_size`) skip the resize.
    image = features.decode_and_resize(example[features.IMAGE_ENCODED], image_size)
    metadata = {name: example[key] for name, key in METADATA_KEYS.items() if key in keys}
    return image, example[features.LABEL], metadata

  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle_files)


def _finish(dataset: tf.data.Dataset, shard_policy) -> tf.data.Dataset:
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = shard_policy
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_dataset(info: SplitInfo, image_size: int, global_batch_size: int, *, seed: int = 0,
                  take: int | None = None) -> tf.data.Dataset:
  """(uint8 images, one-hot labels) batches: shuffled, repeated forever, every batch full
  (a static shape, as XLA and TPUs need).

  Repeating means steps per epoch come from the manifest, so workers with
  unequal shares stay in step; shards are split between workers by file. The
  class weights live in the loss (job/train.py), not here."""
  dataset = _decoded(info, image_size, [], shuffle_files=True, seed=seed, take=take)
  dataset = dataset.map(lambda image, label, _: (image, label)).cache()  # before any random op
  dataset = dataset.shuffle(min(info.num_examples, 10_000), seed=seed, reshuffle_each_iteration=True)
  dataset = dataset.repeat()
  num_classes = len(info.class_counts)
  dataset = dataset.map(lambda image, label: (image, tf.one_hot(label, num_classes)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  dataset = dataset.batch(global_batch_size, drop_remainder=True)
  return _finish(dataset, tf.data.experimental.AutoShardPolicy.FILE)


@dataclasses.dataclass(frozen=True)
class ValidationData:
  dataset: tf.data.Dataset
  num_examples: int
  steps: int


def validation_dataset(info: SplitInfo, image_size: int, global_batch_size: int, *,
                       take: int | None = None) -> ValidationData:
  """One pass over the split in whole batches of `global_batch_size`: the last is padded.

  Every batch has one static shape (XLA, TPUs), and no replica or worker is ever
  handed an empty batch (which crashes a multi-replica step). The padding must
  weigh nothing in any figure: batches are (images, one-hot, sample weight), and
  the metrics are compiled as weighted metrics. Keras averages the loss over
  rows, padding included ("sum_over_batch_size", and its loss tracker weighs
  each batch by its row count), so each real image weighs padded/real and each
  padding row 0: loss, accuracy and F1 are then exactly those of the real images."""
  num_examples = min(info.num_examples, take) if take else info.num_examples
  steps = max(1, math.ceil(num_examples / global_batch_size))
  padding = steps * global_batch_size - num_examples
  weight = steps * global_batch_size / max(num_examples, 1)
  real = _decoded(info, image_size, [], shuffle_files=False, take=take)
  real = real.map(lambda image, label, _: (image, label)).cache()
  num_classes = len(info.class_counts)
  real = real.map(lambda image, label: (image, tf.one_hot(label, num_classes), weight))
  pad = tf.data.Dataset.from_tensors((tf.zeros((image_size, image_size, 3), tf.uint8),
                                      tf.zeros(num_classes), 0.0)).repeat(padding)
  dataset = real.concatenate(pad).batch(global_batch_size, drop_remainder=True)
  # Keras then starts each epoch's validation afresh instead of reading past the end.
  dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
  return ValidationData(_finish(dataset, tf.data.experimental.AutoShardPolicy.DATA), num_examples, steps)


def prediction_dataset(info: SplitInfo, image_size: int, batch_size: int, *,
                       take: int | None = None) -> tf.data.Dataset:
  """(uint8 images, one-hot labels, metadata dict) batches, one pass in file order, for
  evaluation on one machine (the last batch may be smaller)."""
  dataset = _decoded(info, image_size, list(METADATA_KEYS.values()), shuffle_files=False, take=take)
  num_classes = len(info.class_counts)
  dataset = dataset.map(lambda image, label, metadata: (image, tf.one_hot(label, num_classes), metadata))
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
