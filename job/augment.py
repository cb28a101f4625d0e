"""The augmentation, written so that XLA (and so a TPU) compiles it: the seed's
(RandomAugmentation, `--augment=seed`) and the dermoscopy preset (DermoscopyAugmentation).

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


def affine_sample(images: tf.Tensor, matrices: tf.Tensor, shifts: tf.Tensor | None = None) -> tf.Tensor:
  """Bilinear sampling of `images` (B, H, W, C) where the output pixel p reads the input at
  c + M·(p − c) + t, c the image centre, M (B, 2, 2) one matrix per image acting on (x, y), and
  t (B, 2) a shift in pixels (default none)."""
  batch, height, width, channels = images.shape
  batch = batch if batch is not None else tf.shape(images)[0]
  center = tf.constant([(width - 1) / 2.0, (height - 1) / 2.0], tf.float32)
  ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                       indexing="ij")
  offsets = tf.stack([xs, ys], axis=-1) - center  # (H, W, 2), (x, y) order
  source = tf.einsum("bij,hwj->bhwi", matrices, offsets) + center
  if shifts is not None:
    source += shifts[:, None, None, :]
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


def stateless_seed(generator: keras.random.SeedGenerator, replica=None) -> tf.Tensor:
  """The next seed of `generator` as a stateless op's (2,) int32 seed, as Keras casts it, with the
  replica's place folded in when given: every replica reads the same generator state, and would
  otherwise draw what the others draw for its share of the batch."""
  seed = tf.cast(tf.math.floormod(generator.next(), tf.int32.max - 1), tf.int32)
  return seed if replica is None else tf.random.experimental.stateless_fold_in(seed, replica)


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
    """keras.random.uniform from this layer's SeedGenerator; with several replicas, a stateless
    draw with the replica's place folded into the seed (`stateless_seed`)."""
    if replica is None:
      return keras.random.uniform(shape, low, high, dtype="float32", seed=self.seed_generator)
    return tf.random.stateless_uniform(shape, stateless_seed(self.seed_generator, replica), low, high,
                                       dtype=tf.float32)

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


# What the dermoscopy preset's cutout fills with: ImageNet's mean RGB, which the inner model's
# preprocessing maps to zero (the "zero" of cutout as it is applied to normalised images).
CUTOUT_FILL_RGB = (123.68, 116.779, 103.939)


def quarter_turns(images: tf.Tensor, turns: tf.Tensor) -> tf.Tensor:
  """Each square image (B, S, S, C) turned by `turns` (B,) × 90° counter-clockwise, exactly as
  numpy.rot90 turns it (gathers: no resampling)."""
  candidates = [images]
  for _ in range(3):
    candidates.append(tf.reverse(tf.transpose(candidates[-1], [0, 2, 1, 3]), axis=[1]))  # one more turn
  stacked = tf.stack(candidates, axis=1)  # (B, 4, S, S, C)
  return tf.gather(stacked, tf.cast(turns, tf.int32), axis=1, batch_dims=1)


def flip(images: tf.Tensor, where: tf.Tensor, axis: int) -> tf.Tensor:
  """`images` mirrored along `axis` (1: up-down, 2: left-right) where `where` (B,) is true."""
  return tf.where(where[:, None, None, None], tf.reverse(images, axis=[axis]), images)


def hue_rotation(angles: tf.Tensor) -> tf.Tensor:
  """(B, 3, 3) rotations of RGB about the grey axis by `angles` (radians): a hue shift that keeps
  grey grey and each pixel's mean, with a matrix product (Rodrigues' formula)."""
  cos, sin = tf.cos(angles)[:, None, None], tf.sin(angles)[:, None, None]
  third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
  cross = tf.constant([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) * root  # [u]×, u = (1,1,1)/√3
  outer = tf.fill([3, 3], third)
  return cos * tf.eye(3) + sin * cross + (1.0 - cos) * outer


def adjust_colour(images, brightness, contrast, saturation, hue, value_range=(0.0, 255.0)):
  """Per image: hue turned by `hue` radians, saturation × `saturation` (about each pixel's
  grey), contrast × `contrast` (about the image's mean), plus `brightness` (grey levels); clipped."""
  x = tf.einsum("bij,bhwj->bhwi", hue_rotation(hue), images)
  grey = tf.reduce_mean(x, axis=-1, keepdims=True)
  x = grey + (x - grey) * saturation[:, None, None, None]
  mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
  x = mean + (x - mean) * contrast[:, None, None, None] + brightness[:, None, None, None]
  return tf.clip_by_value(x, value_range[0], value_range[1])


def cutout(images: tf.Tensor, centres: tf.Tensor, side: float) -> tf.Tensor:
  """One square of `side` × the image's side per image, at `centres` (B, 2: y, x, in [0, 1)),
  filled with CUTOUT_FILL_RGB (clipped at the borders)."""
  _, height, width, _ = images.shape
  half = side * height / 2.0
  ys = tf.range(height, dtype=tf.float32)[None, :, None]
  xs = tf.range(width, dtype=tf.float32)[None, None, :]
  cy, cx = (centres[:, 0] * height)[:, None, None], (centres[:, 1] * width)[:, None, None]
  inside = (tf.abs(ys + 0.5 - cy) <= half) & (tf.abs(xs + 0.5 - cx) <= half)
  return tf.where(inside[..., None], tf.constant(CUTOUT_FILL_RGB, images.dtype), images)


@keras.saving.register_keras_serializable(package="ham10000")
class DermoscopyAugmentation(RandomAugmentation):
  """`--augment=dermoscopy`: what the ISIC winners add to the seed's, since a dermoscopy image
  has no up and its colour varies with the device. Per image, in this order: a random quarter
  turn and up-down and left-right flips (exact: the 8 symmetries of the square); a rotation by
  ±`rotation`·360°, a scale by 1 ± `zoom` and a shift by ±`shift` of the side (one bilinear
  resampling, "reflect" fill); hue, saturation, contrast and brightness jitter in 0-255 space;
  then, with probability `cutout_probability`, one square hole of `cutout` × the side.

  XLA compiles it, and each replica draws its own (RandomAugmentation's random source)."""

  def __init__(self, rotation=0.125, zoom=0.1, shift=0.1, brightness=0.1, contrast=0.1, saturation=0.1,
               hue=0.05, cutout=0.3, cutout_probability=0.5, value_range=(0.0, 255.0), seed=None, **kwargs):
    super().__init__(rotation=rotation, zoom=zoom, contrast=contrast, value_range=value_range, seed=seed,
                     **kwargs)
    self.shift, self.brightness, self.saturation, self.hue = shift, brightness, saturation, hue
    self.cutout, self.cutout_probability = cutout, cutout_probability

  def draw(self, batch_size, uniform=None, replica=None):
    if uniform is None:
      replica = replica_in_sync_group() if replica is None else replica
      uniform = functools.partial(self._uniform, replica=replica)
    shape = (batch_size,)
    draws = super().draw(batch_size, uniform=uniform)  # angles, zooms, flips (left-right), contrasts
    span = self.value_range[1] - self.value_range[0]
    return {**draws,
            "turns": tf.floor(uniform(shape, 0.0, 4.0 - 1e-3)),
            "flips_up_down": uniform(shape, 0.0, 1.0) < 0.5,
            "shifts": tf.stack([uniform(shape, -self.shift, self.shift) for _ in range(2)], axis=-1),
            "brightness": uniform(shape, -self.brightness, self.brightness) * span,
            "saturation": uniform(shape, 1.0 - self.saturation, 1.0 + self.saturation),
            "hue": uniform(shape, -self.hue, self.hue) * 2.0 * math.pi,
            "cutout_centres": tf.stack([uniform(shape, 0.0, 1.0) for _ in range(2)], axis=-1),
            "cutout_on": uniform(shape, 0.0, 1.0) < self.cutout_probability}

  def apply(self, images, angles, zooms, flips, contrasts, turns, flips_up_down, shifts, brightness,
            saturation, hue, cutout_centres, cutout_on):
    x = flip(flip(quarter_turns(images, turns), flips_up_down, axis=1), flips, axis=2)
    no_mirror = tf.zeros_like(flips)  # mirrored above, exactly
    side = float(images.shape[2])
    x = affine_sample(x, transform_matrices(angles, zooms, no_mirror), shifts * side)
    x = adjust_colour(x, brightness, contrasts, saturation, hue, self.value_range)
    if self.cutout > 0:
      x = tf.where(cutout_on[:, None, None, None], cutout(x, cutout_centres, self.cutout), x)
    return x

  def get_config(self):
    return {**super().get_config(), "shift": self.shift, "brightness": self.brightness,
            "saturation": self.saturation, "hue": self.hue, "cutout": self.cutout,
            "cutout_probability": self.cutout_probability}
