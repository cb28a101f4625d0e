"""The input pipeline: shards → uint8 images at the training size, cached, batched.

Three datasets, one per use: `train_batches` of `train_examples` (shuffled,
repeated, full batches; one per stage), `validation_dataset` (one pass, the
last batch padded with rows that weigh nothing) and `prediction_dataset` (one
pass with each image's ids and metadata, for evaluation). The number of classes
is the manifest's.

list shards → interleave → parse → decode → resize → **cache uint8** →
shuffle/repeat → batch uint8 → prefetch. Batching uint8 costs a quarter of
batching float32, so the cast, the random augmentation and `preprocess_input`
run on the accelerator, inside the training wrapper (job/model.py).
"""

import atexit
import dataclasses
import math
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging
from sklearn.utils.class_weight import compute_class_weight

from job import config as config_lib, patient_metadata, run_state
from tfrecords import features, manifest as manifest_lib
from tfrecords.manifest import SplitInfo

CACHE_MODES = config_lib.CACHE_MODES
MEMORY_SHARE = 0.5  # auto: cache in memory only what fits in half the memory available

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


LABEL_OUTSIDE_MAP = "label outside the label_map"


def split_info(data_dir: str, manifest: dict, split: str, fold: int | None = None) -> SplitInfo:
  """A split as a run sees it: a fold's run (job.train --fold) trains on the other folds of the
  train and validation shards and validates on its own; the test split is every run's."""
  if fold is not None and split in ("train", "validation"):
    return manifest_lib.fold_split_info(data_dir, manifest, fold, split)
  return manifest_lib.split_info(data_dir, manifest, split)


def _records(info: SplitInfo, *, shuffle_files: bool, seed: int = 0, take: int | None = None) -> tf.data.Dataset:
  """The split's serialized examples (a fold's run: its folds only)."""
  files = tf.data.Dataset.from_tensor_slices(info.files)
  if shuffle_files:
    files = files.shuffle(len(info.files), seed=seed)
  dataset = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(info.files), 16),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle_files)
  if info.folds is not None:  # a fold's run (job.train --fold): its folds of the train and validation shards
    wanted = tf.constant(info.folds, tf.int64)
    dataset = dataset.filter(lambda record: tf.reduce_any(tf.equal(
        features.parse_example(record, [features.FOLD])[features.FOLD], wanted)))
  if take:
    dataset = dataset.take(take)
  return dataset


def _decoded(info: SplitInfo, image_size: int | tuple[int, ...], keys: list[str], *, shuffle_files: bool, seed: int = 0,
             take: int | None = None) -> tf.data.Dataset:
  """(uint8 image at the training size, label, metadata dict) per example."""
  dataset = _records(info, shuffle_files=shuffle_files, seed=seed, take=take)
  num_classes = len(info.class_counts)

  def parse(record):
    example = features.parse_example(record, [features.IMAGE_ENCODED, features.LABEL, *keys])
    # Shards converted at the training size (`tfrecords.convert --image_size`) skip the resize.
    # Several sizes (an ensemble of members trained at different sizes): each from the original.
    image = ({size: features.decode_and_resize(example[features.IMAGE_ENCODED], size) for size in image_size}
             if isinstance(image_size, tuple) else features.decode_and_resize(example[features.IMAGE_ENCODED], image_size))
    metadata = {name: example[key] for name, key in METADATA_KEYS.items() if key in keys}
    # A label the manifest does not know would become an all-zero one-hot target, silently.
    known = tf.debugging.assert_less(example[features.LABEL], tf.constant(num_classes, tf.int64), message=(
        f"{LABEL_OUTSIDE_MAP}: a shard of the {info.name} split holds a label beyond the manifest's "
        f"{num_classes} classes"))
    with tf.control_dependencies([known]):
      label = tf.identity(example[features.LABEL])
    return image, label, metadata

  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle_files)


def _finish(dataset: tf.data.Dataset, shard_policy) -> tf.data.Dataset:
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = shard_policy
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def available_memory() -> int:
  """Bytes of memory this host can still give (MemAvailable), or all of it where unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_cache(mode: str, num_images: int, image_size: int, available: int | None = None) -> str:
  """memory, disk or none for `--cache=mode`: auto keeps the uint8 images in memory when they
  fit in half the memory available, else in a local file. Logs the estimate."""
  needed = num_images * image_size * image_size * 3
  available = available_memory() if available is None else available
  chosen = mode if mode != "auto" else "memory" if needed <= MEMORY_SHARE * available else "disk"
  logging.info("cache: %s (%d images at %d px take %.0f MB; %.0f MB of memory available)", chosen,
               num_images, image_size, needed / 2**20, available / 2**20)
  return chosen


def _cached(dataset: tf.data.Dataset, cache: str, name: str) -> tf.data.Dataset:
  if cache == "memory":
    return dataset.cache()
  if cache == "disk":  # a local file per process (workers on one host must not share one)
    remove_stale_disk_caches()
    folder = tempfile.mkdtemp(prefix=f"{DISK_CACHE_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the decoded split can take gigabytes
    return dataset.cache(os.path.join(folder, name))
  return dataset


DISK_CACHE_PREFIX = "ham10000-cache-"  # then the pid of the process that made it


def remove_stale_disk_caches(root: str | None = None) -> list[str]:
  """Removes the disk caches of processes that no longer run (a killed job's: atexit never ran),
  which hold a decoded split each."""
  root = root or tempfile.gettempdir()
  removed = []
  for name in os.listdir(root):
    pid = name[len(DISK_CACHE_PREFIX):].split("-", 1)[0]
    if name.startswith(DISK_CACHE_PREFIX) and pid.isdigit() and not run_state.process_alive(pid):
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      removed.append(name)
  if removed:
    logging.info("removed %d disk cache(s) left by ended processes in %s", len(removed), root)
  return removed


SHUFFLE_BUFFER = 10_000  # examples; a split no larger is shuffled whole


def shuffle_buffer(num_examples: int) -> int:
  """The train split's shuffle buffer: the whole split up to SHUFFLE_BUFFER. The first batch waits
  until it is full, so that many images are decoded (and cached) before the first step."""
  return min(num_examples, SHUFFLE_BUFFER)


def _model_input(fields: tuple[str, ...]):
  """(image, label, metadata) → (what the training wrapper takes, label): the image, or with
  metadata {"image_uint8": image, field: encoded} (job/patient_metadata.py)."""
  def to_input(image, label, metadata):
    if not fields:
      return image, label
    return {"image_uint8": image, **patient_metadata.encode(fields, metadata)}, label
  return to_input


def _metadata_keys(fields: tuple[str, ...]) -> list[str]:
  return [METADATA_KEYS[f] for f in fields]  # parsed into the metadata dict under the field's name


def metadata_counts(info: SplitInfo, fields: tuple[str, ...]) -> dict[str, dict[str, int]]:
  """{field: {category: images}} of a split as the encoding sees it (patient_metadata.categories):
  what a metadata model learns an input for. Reads the fields only, not the images."""
  dataset = _records(info, shuffle_files=False).map(
      lambda record: {f: features.parse_example(record, [METADATA_KEYS[f]])[METADATA_KEYS[f]] for f in fields},
      num_parallel_calls=tf.data.AUTOTUNE)
  counts = {f: dict.fromkeys(patient_metadata.categories(f), 0) for f in fields}
  for batch in dataset.batch(4096):
    for field, found in patient_metadata.category_counts(fields, batch).items():
      for category, number in found.items():
        counts[field][category] += number
  return counts


def train_examples(info: SplitInfo, image_size: int, *, seed: int = 0, take: int | None = None,
                   cache: str = "memory", metadata: tuple[str, ...] = ()) -> tf.data.Dataset:
  """(uint8 image, label) per example, decoded once and cached: what every stage shuffles. With
  metadata fields: ({"image_uint8": image, field: encoded}, label)."""
  dataset = _decoded(info, image_size, _metadata_keys(metadata), shuffle_files=True, seed=seed, take=take)
  return _cached(dataset.map(_model_input(metadata)), cache, "train")  # before any random op


def train_batches(examples: tf.data.Dataset, info: SplitInfo, global_batch_size: int, *, seed: int = 0,
                  num_workers: int = 1) -> tf.data.Dataset:
  """(uint8 images, one-hot labels) batches of `train_examples`: shuffled, repeated forever,
  every batch full (a static shape, as XLA and TPUs need).

  Build one per `fit` (job/train.py: one per stage), each with its own seed. Every iterator
  of one dataset draws its order from the shuffle's one reshuffle state, so a second `fit`
  on the same dataset trained on one order or another from run to run, op determinism on
  or not (the first fit's iterator, still running ahead, shares that state).

  Repeating means steps per epoch come from the manifest, so workers with
  unequal shares stay in step. Shards are split between workers by file, or by
  example where there are fewer shards than workers (a worker without a file
  would have nothing to train on). The class weights live in the loss
  (job/train.py), not here."""
  dataset = examples.shuffle(shuffle_buffer(info.num_examples), seed=seed, reshuffle_each_iteration=True)
  dataset = dataset.repeat()
  num_classes = len(info.class_counts)
  dataset = dataset.map(lambda x, label: (x, tf.one_hot(label, num_classes)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  dataset = dataset.batch(global_batch_size, drop_remainder=True)
  policy = tf.data.experimental.AutoShardPolicy.FILE
  if len(info.files) < num_workers:
    logging.info("%d train shards for %d workers: splitting the train split between workers by "
                 "example (convert with --num_train_shards >= %d to split by file)", len(info.files),
                 num_workers, num_workers)
    policy = tf.data.experimental.AutoShardPolicy.DATA
  return _finish(dataset, policy)


def train_dataset(info: SplitInfo, image_size: int, global_batch_size: int, *, seed: int = 0,
                  take: int | None = None, cache: str = "memory", num_workers: int = 1,
                  metadata: tuple[str, ...] = ()) -> tf.data.Dataset:
  """`train_batches` of `train_examples`, for one `fit` (benchmarks, the preflight)."""
  examples = train_examples(info, image_size, seed=seed, take=take, cache=cache, metadata=metadata)
  return train_batches(examples, info, global_batch_size, seed=seed, num_workers=num_workers)


@dataclasses.dataclass(frozen=True)
class ValidationData:
  dataset: tf.data.Dataset
  num_examples: int
  steps: int


def validation_dataset(info: SplitInfo, image_size: int, global_batch_size: int, *,
                       take: int | None = None, cache: str = "memory",
                       metadata: tuple[str, ...] = ()) -> ValidationData:
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
  real = _decoded(info, image_size, _metadata_keys(metadata), shuffle_files=False, take=take)
  real = _cached(real.map(_model_input(metadata)), cache, "validation")
  if cache != "none":
    # Filled now, in one full pass: Keras stops each validation pass after `steps` batches, and
    # a cache whose first pass is left unfinished is thrown away ("The calling iterator did not
    # fully read the dataset being cached"), to be filled again at the next epoch.
    for _ in real:
      pass
  num_classes = len(info.class_counts)
  real = real.map(lambda x, label: (x, tf.one_hot(label, num_classes), weight))
  padding_image = tf.zeros((image_size, image_size, 3), tf.uint8)
  padding_input = ({"image_uint8": padding_image, **{f: tf.zeros(patient_metadata.WIDTHS[f]) for f in metadata}}
                   if metadata else padding_image)
  pad = tf.data.Dataset.from_tensors((padding_input, tf.zeros(num_classes), 0.0)).repeat(padding)
  dataset = real.concatenate(pad).batch(global_batch_size, drop_remainder=True)
  # Keras then starts each epoch's validation afresh instead of reading past the end.
  dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
  return ValidationData(_finish(dataset, tf.data.experimental.AutoShardPolicy.DATA), num_examples, steps)


def prediction_dataset(info: SplitInfo, image_size: int | tuple[int, ...], batch_size: int, *,
                       take: int | None = None) -> tf.data.Dataset:
  """(uint8 images, one-hot labels, metadata dict) batches, one pass in file order, for
  evaluation on one machine (the last batch may be smaller). A tuple of sizes gives the images
  as {size: batch}, each resized from the original."""
  dataset = _decoded(info, image_size, list(METADATA_KEYS.values()), shuffle_files=False, take=take)
  num_classes = len(info.class_counts)
  dataset = dataset.map(lambda image, label, metadata: (image, tf.one_hot(label, num_classes), metadata))
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
