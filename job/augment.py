"""The seed's augmentation, written so that XLA (and so a TPU) compiles it.

Keras's `RandomRotation` and `RandomZoom` call `ImageProjectiveTransformV3`,
which has no XLA kernel in TensorFlow 2.21 (tensorflow/tensorflow#42454; the
kernel landed upstream after 2.21): Keras switches `jit_compile` off for any
model that holds them, and a TPU cannot compile them. This layer draws the
same transformations from the same ranges and applies them with ops that XLA
compiles (a few gathers):

  horizontal flip (p = 0.5), rotation by ±`rotation`·360° (Keras's
  `RandomRotation(0.1)`: ±36°), zoom by 1 ± `zoom` in both axes
  (`RandomZoom(0.1)`), both about the image centre with bilinear sampling and
  "reflect" fill; then contrast × [1 − `contrast`, 1 + `contrast`] about each
  image's per-channel mean, clipped to `value_range` (`RandomContrast`).

Flip, rotation and zoom are one affine map from output to input pixels
(source = c + z·F·R·(p − c)), so an image is sampled once, not three times.
Coordinates are computed in float32 whatever the dtype policy: bfloat16 has
8 bits of mantissa and cannot hold pixel positions 0-223 exactly.
"""

import functools
import math

import keras
import tensorflow as tf


def reflect(coordinate: tf.Tensor, size: int) -> tf.Tensor:
  """Keras's "reflect" fill (d c b a | a b c d | d c b a), on continuous coordinates,
  as TensorFlow's `ImageProjectiveTransformV3` maps them."""
  size = float(size)
  folded = tf.math.floormod(coordinate, 2.0 * size)
  folded = tf.where(folded >= size, 2.0 * size - folded - 1.0, folded)
  return tf.clip_by_value(folded, 0.0, size - 1.0)


def affine_sample(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
  """Bilinear sampling of `images` (B, H, W, C) where the output pixel p reads the input at
  c + M·(p − c), c the image centre and M (B, 2, 2) one matrix per image, acting on (x, y)."""
  batch, height, width, channels = images.shape
  batch = batch if batch is not None else tf.shape(images)[0]
  center = tf.constant([(width - 1) / 2.0, (height - 1) / 2.0], tf.float32)
  ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                       indexing="ij")
  offsets = tf.stack([xs, ys], axis=-1) - center  # (H, W, 2), (x, y) order
  source = tf.einsum("bij,hwj->bhwi", matrices, offsets) + center
  x = reflect(source[..., 0], width)
  y = reflect(source[..., 1], height)
  x0, y0 = tf.floor(x), tf.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)

  flat = tf.reshape(images, [-1, channels])
  base = (tf.range(batch, dtype=tf.int32) * (height * width))[:, None, None]

  def read(yy, xx):
    return tf.gather(flat, base + yy * width + xx)

  top = read(y0, x0) * (1.0 - wx) + read(y0, x1) * wx
  bottom = read(y1, x0) * (1.0 - wx) + read(y1, x1) * wx
  return top * (1.0 - wy) + bottom * wy


def transform_matrices(angles: tf.Tensor, zooms: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
  """z·F·R per image: R rotates by `angles` (radians, as Keras's RandomRotation maps output to
  input), F mirrors x where `flips` is true, z scales (> 1 zooms out, as RandomZoom)."""
  cos, sin = tf.cos(angles), tf.sin(angles)
  mirror = tf.where(flips, -1.0, 1.0)
  return zooms[:, None, None] * tf.stack([tf.stack([mirror * cos, -mirror * sin], -1),
                                          tf.stack([sin, cos], -1)], axis=1)


def adjust_contrast(images: tf.Tensor, factors: tf.Tensor, value_range=(0.0, 255.0)) -> tf.Tensor:
  """(x − mean) · factor + mean per image and channel, clipped: Keras's RandomContrast."""
  mean = tf.reduce_mean(images, axis=(1, 2), keepdims=True)
  adjusted = (images - mean) * factors[:, None, None, None] + mean
  return tf.clip_by_value(adjusted, value_range[0], value_range[1])


def replica_in_sync_group():
  """This replica's place among all replicas (global across workers under
  MultiWorkerMirroredStrategy), or None with a single replica, whose draws stay Keras's own."""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return None
  return context.replica_id_in_sync_group


@keras.saving.register_keras_serializable(package="ham10000")
class RandomAugmentation(keras.layers.Layer):
  """Random flip, rotation, zoom and contrast in one XLA-compilable layer (training only).

  Runs in float32 (`dtype="float32"` by default) under any mixed-precision policy."""

  def __init__(self, rotation=0.1, zoom=0.1, contrast=0.1, value_range=(0.0, 255.0), seed=None,
               **kwargs):
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    self.rotation, self.zoom, self.contrast = rotation, zoom, contrast
    self.value_range, self.seed = tuple(value_range), seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def draw(self, batch_size, uniform=None, replica=None):
    """One random transformation per image, from the ranges of the seed's Keras layers.
    uniform(shape, low, high): the random source (default: this layer's seeded one, drawn
    apart on each replica). replica: the replica's place in the sync group (default: read
    from the replica context when there are several)."""
    if uniform is None:
      replica = replica_in_sync_group() if replica is None else replica
      uniform = functools.partial(self._uniform, replica=replica)
    max_angle = self.rotation * 2.0 * math.pi
    shape = (batch_size,)
    return {"angles": uniform(shape, -max_angle, max_angle),
            "zooms": uniform(shape, 1.0 - self.zoom, 1.0 + self.zoom),
            "flips": uniform(shape, 0.0, 1.0) < 0.5,
            "contrasts": uniform(shape, 1.0 - self.contrast, 1.0 + self.contrast)}

  def _uniform(self, shape, low, high, replica=None):
    """keras.random.uniform from this layer's SeedGenerator; with several replicas, the
    replica's place folded into the seed. Every replica reads the same generator state, and
    would otherwise draw the same transformations for its share of the batch."""
    if replica is None:
      return keras.random.uniform(shape, low, high, dtype="float32", seed=self.seed_generator)
    seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1), tf.int32)  # as Keras casts it
    seed = tf.random.experimental.stateless_fold_in(seed, replica)
    return tf.random.stateless_uniform(shape, seed, low, high, dtype=tf.float32)

  def apply(self, images, angles, zooms, flips, contrasts):
    warped = affine_sample(images, transform_matrices(angles, zooms, flips))
    return adjust_contrast(warped, contrasts, self.value_range)

  def call(self, images, training=False):
    if not training:
      return images
    return self.apply(images, **self.draw(tf.shape(images)[0]))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
            "contrast": self.contrast, "value_range": self.value_range, "seed": self.seed}
