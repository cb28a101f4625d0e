"""The input pipeline: shards → uint8 images at the training size, cached, batched.

list shards → interleave → parse → decode → resize → **cache uint8** →
shuffle/repeat → batch uint8 → prefetch. Batching uint8 costs a quarter of
batching float32, so the cast, the random augmentation and `preprocess_input`
run on the accelerator, inside the training wrapper (job/model.py).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tfrecords import features, fileio

MANIFEST_FILE = "manifest.json"
# What predictions.csv carries beside each prediction, for audit and subgroup metrics.
METADATA_KEYS = {"image_id": features.SOURCE_ID, "lesion_id": features.LESION_ID,
                 "age": features.AGE, "sex": features.SEX, "localization": features.LOCALIZATION}


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  files: list[str]
  num_examples: int
  class_counts: list[int]


def read_manifest(data_dir: str) -> dict:
  path = fileio.join(data_dir, MANIFEST_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"--data_dir={data_dir}: no {MANIFEST_FILE} (not a finished conversion; "
                            "run python -m tfrecords.convert)")
  return fileio.read_json(path)


def split_info(data_dir: str, manifest: dict, split: str) -> SplitInfo:
  info = manifest["splits"][split]
  files = [fileio.join(data_dir, shard["name"]) for shard in info["shards"]]
  return SplitInfo(files, info["num_examples"], [info["class_counts"][c] for c in features.CLASS_NAMES])


def class_weights(class_counts: list[int]) -> np.ndarray:
  """scikit-learn's "balanced" weights, n / (k · n_c), from the train split's class counts."""
  labels = np.repeat(np.arange(len(class_counts)), class_counts)
  present = np.unique(labels)
  weights = np.ones(len(class_counts))
  weights[present] = compute_class_weight("balanced", classes=present, y=labels)
  return weights


def preprocess(images: tf.Tensor) -> tf.Tensor:
  """uint8 → what the inner model takes: ResNet-50's caffe preprocessing (RGB→BGR, minus mean)."""
  return keras.applications.resnet50.preprocess_input(tf.cast(images, tf.float32))


def build_dataset(info: SplitInfo, image_size: int, batch_size: int, *, training: bool,
                  weights: np.ndarray | None = None, seed: int = 0, drop_remainder: bool = False,
                  take: int | None = None, with_ids: bool = False) -> tf.data.Dataset:
  """A dataset of (uint8 images, one-hot labels[, sample weights]) batches.

  training: shuffled, repeated forever (steps per epoch come from the manifest,
  so workers with unequal shares stay in step), sharded by file between
  workers. Otherwise: one pass in file order, sharded by data.
  with_ids: yields (images, labels, metadata dict) instead, for predictions.
  """
  files = tf.data.Dataset.from_tensor_slices(info.files)
  if training:
    files = files.shuffle(len(info.files), seed=seed)
  dataset = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(info.files), 16),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
  if take:
    dataset = dataset.take(take)

  keys = [features.IMAGE_ENCODED, features.LABEL]
  if with_ids:
    keys += list(METADATA_KEYS.values())

  def parse(record):
    example = features.parse_example(record, keys)
    # Shards converted at the training size (`tfrecords.convert --image_size`) skip the resize.
    image = features.decode_and_resize(example[features.IMAGE_ENCODED], image_size)
    metadata = {name: example[key] for name, key in METADATA_KEYS.items() if key in example}
    return image, example[features.LABEL], metadata

  dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
  dataset = dataset.cache()  # uint8 at the training size: before any random augmentation
  if training:
    dataset = dataset.shuffle(min(info.num_examples, 10_000), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat()

  weight_table = tf.constant(weights if weights is not None else np.ones(features.NUM_CLASSES),
                             tf.float32)

  def to_model_inputs(image, label, metadata):
    one_hot = tf.one_hot(label, features.NUM_CLASSES)
    if with_ids:
      return image, one_hot, metadata
    if weights is not None:
      return image, one_hot, tf.gather(weight_table, label)
    return image, one_hot

  dataset = dataset.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.FILE if training else tf.data.experimental.AutoShardPolicy.DATA)
  options.deterministic = not training
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
