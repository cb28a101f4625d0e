"""The TFRecord contract: feature keys, the label map, encoding and parsing.

The keys follow TensorFlow Model Garden's image classification decoder
(`official/vision/dataloaders/tfexample_utils.py`), so its tools and ours read
each other's shards. The converter writes with `encode_example`; the training
job reads with `parse_example`. Nothing else should spell a key.
"""

import math
from typing import Any, Mapping

import tensorflow as tf

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
LABEL = "image/class/label"
LABEL_TEXT = "image/class/text"
SOURCE_ID = "image/source_id"
LESION_ID = "image/lesion_id"
AGE = "image/metadata/age"
SEX = "image/metadata/sex"
LOCALIZATION = "image/metadata/localization"
DX_TYPE = "image/metadata/dx_type"  # leaks the label: audit only, never a model input
# The cross-validation fold (tfrecords.convert --folds) of a train or validation example. Written
# only then, so unfolded shards, and a folded conversion's test shards, are those without folds.
FOLD = "image/fold"
NO_FOLD = -1  # what parsing gives where an example has no fold

# Index order of the seven HAM10000 diagnoses, as the converter labels them. The
# converter writes `label_map.json` and the manifest's label map from this dict, so
# `list(label_map)[i]` is class i (the seed's inference relies on it); the job reads
# the classes from there, not from here.
CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
LABEL_MAP = {name: index for index, name in enumerate(CLASS_NAMES)}
NUM_CLASSES = len(CLASS_NAMES)

SPLITS = ("train", "validation", "test")
EXTERNAL = "external"  # the one split of a set converted with --external (not split by lesion)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# Pixels an image may declare where bytes from outside are decoded (the converter's sources,
# job.predict's files, the serving signature's requests): a 0.75 MB PNG can declare 16000×16000,
# gigabytes once decoded. HAM10000's images are 600×450; ISIC 2020's originals reach ~24 MP.
MAX_PIXELS = 50_000_000


def declared_size(contents: tf.Tensor) -> tf.Tensor:
  """[height, width] as a JPEG, PNG, GIF or BMP header declares it, read before any pixel is
  decoded (int64; [0, 0] for bytes of another kind, which the decoder then refuses)."""
  contents = tf.convert_to_tensor(contents, tf.string)
  padded = contents + tf.constant(b"\0" * 32)  # header reads stay in bounds on short input

  def number(offset: int, length: int, little_endian: bool) -> tf.Tensor:
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, length), tf.uint8), tf.int64)
    powers = tf.constant([256 ** (i if little_endian else length - 1 - i) for i in range(length)], tf.int64)
    return tf.reduce_sum(digits * powers)

  def signed32(value):  # BMP's height is negative for a top-down image
    return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))

  def starts(magic: bytes):
    return tf.equal(tf.strings.substr(padded, 0, len(magic)), magic)

  return tf.case([
      (starts(b"\xff\xd8\xff"), lambda: tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64)),
      (starts(b"\x89PNG\r\n\x1a\n"), lambda: tf.stack([number(20, 4, False), number(16, 4, False)])),
      (tf.logical_or(starts(b"GIF87a"), starts(b"GIF89a")),
       lambda: tf.stack([number(8, 2, True), number(6, 2, True)])),
      (starts(b"BM"), lambda: tf.stack([signed32(number(22, 4, True)), signed32(number(18, 4, True))])),
  ], default=lambda: tf.zeros([2], tf.int64), exclusive=True)


def too_many_pixels(height: int, width: int, max_pixels: int = MAX_PIXELS) -> str | None:
  """Why an image of that declared size is refused, or None."""
  if height * width <= max_pixels:
    return None
  return f"{width}×{height} pixels, more than the {max_pixels:,} allowed (HAM10000's are 600×450)"


def decode_and_resize(jpeg: tf.Tensor, image_size: int, any_format: bool = False,
                      max_pixels: int | None = None) -> tf.Tensor:
  """JPEG → uint8 image_size×image_size, resized with the seed inference's bilinear
  `tf.image.resize`. The converter stores images this way and the job reads them
  this way; an image already at that size is returned as decoded. `any_format`: BMP too
  (tf.io.decode_jpeg reads JPEG, PNG and GIF; decode_image also BMP), for job.predict.
  `max_pixels`: bytes from outside (job.predict, the serving signature) whose header declares
  more are refused (InvalidArgumentError) before a pixel is decoded."""
  checks = []
  if max_pixels is not None:
    size = declared_size(jpeg)
    checks.append(tf.debugging.Assert(
        size[0] * size[1] <= max_pixels,
        [f"the image declares more pixels than the {max_pixels:,} allowed; height, width:", size]))
  with tf.control_dependencies(checks):
    if any_format:
      image = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
    else:
      image = tf.io.decode_jpeg(jpeg, channels=3)

  def resize():
    resized = tf.image.resize(image, (image_size, image_size))
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  shape = tf.shape(image)
  already = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
  # tf.cond loses the static shape; TPUs (XLA) need it whole.
  return tf.ensure_shape(tf.cond(already, lambda: image, resize), (image_size, image_size, 3))


def _bytes(value: bytes | str) -> tf.train.Feature:
  if isinstance(value, str):
    value = value.encode("utf-8")
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _float(value: float) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))


def encode_example(*, jpeg: bytes, height: int, width: int, row: Mapping[str, Any]) -> bytes:
  """Serialises one image and its metadata row (HAM10000 columns) as a tf.train.Example."""
  age = row.get("age")
  age = float("nan") if age is None or (isinstance(age, float) and math.isnan(age)) else float(age)
  dx = str(row["dx"])
  feature = {
      IMAGE_ENCODED: _bytes(jpeg),
      IMAGE_FORMAT: _bytes("jpeg"),
      IMAGE_HEIGHT: _int64(height),
      IMAGE_WIDTH: _int64(width),
      LABEL: _int64(LABEL_MAP[dx]),
      LABEL_TEXT: _bytes(dx),
      SOURCE_ID: _bytes(str(row["image_id"])),
      LESION_ID: _bytes(str(row["lesion_id"])),
      AGE: _float(age),
      SEX: _bytes(str(row.get("sex") or "")),
      LOCALIZATION: _bytes(str(row.get("localization") or "")),
      DX_TYPE: _bytes(str(row.get("dx_type") or "")),
  }
  if "fold" in row:
    feature[FOLD] = _int64(row["fold"])
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)  # same bytes in every process


FEATURE_SPEC = {
    IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
    IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    LABEL_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LESION_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    AGE: tf.io.FixedLenFeature([], tf.float32, default_value=float("nan")),
    SEX: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LOCALIZATION: tf.io.FixedLenFeature([], tf.string, default_value=""),
    DX_TYPE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    FOLD: tf.io.FixedLenFeature([], tf.int64, default_value=NO_FOLD),
}


def parse_example(serialized: tf.Tensor, keys=None) -> dict[str, tf.Tensor]:
  """Parses a serialised example; `keys` limits parsing to the features needed."""
  spec = FEATURE_SPEC if keys is None else {k: FEATURE_SPEC[k] for k in keys}
  return tf.io.parse_single_example(serialized, spec)
