"""Mixup and CutMix (`--mixup`, `--cutmix`): each training image mixed with another of its
replica's batch, and its one-hot label with that image's by the same share.

They mix labels, so they live in the training step rather than in a layer of the wrapper:
`MixingTrainer` is the training wrapper (a functional model) whose `train_step` mixes the batch
and then runs Keras's own step. Validation and every consumer of the saved model see unmixed
images.

Per image, as timm's `Mixup(mode="elem")` does: with probability `probability` the image is
mixed, with its partner in the batch reversed (timm's pairing); when both are on, CutMix or
mixup at even odds. The share λ of the image's own label is drawn from Beta(α, α):
  mixup:  image = λ·a + (1 − λ)·b, label = λ·y_a + (1 − λ)·y_b;
  CutMix: a box of (1 − λ) of the area, centred anywhere and clipped at the borders, pasted from
          b; λ is then the share of a's pixels that is left (timm's `correct_lam`).
The class-weighted loss weighs the mixed label by λ·w_a + (1 − λ)·w_b (it weighs y_true), and
label smoothing applies to the mixed label after that weight is taken.

Beta(α, α) is drawn as X/(X + Y), X and Y Gamma(α), with Marsaglia and Tsang's method written
out in ops XLA compiles: TensorFlow's gamma sampler (StatelessRandomGammaV3) has no XLA kernel,
and XLA's incomplete beta, which an inverse-CDF draw would need, is off by a few percent for
α < 0.3.
"""

import math

import keras
import tensorflow as tf

from job import augment

MIXING_STREAM = 0x6d6978  # folded into the step's seed: the augmentation's generator starts from the same seed
GAMMA_CANDIDATES = 16  # Marsaglia-Tsang accepts ≥ 95% of candidates for α ≥ 1: 16 all fail ~1e-21


def log_gamma_sample(alpha: float, shape, seed) -> tf.Tensor:
  """log of Gamma(alpha, 1) draws (Marsaglia & Tsang, ACM TOMS 26(3), 2000; for alpha < 1 the
  boost Gamma(alpha) = Gamma(alpha + 1)·U^(1/alpha)), in log space so that small alphas do not
  underflow. The first accepted of GAMMA_CANDIDATES candidates is kept."""
  boosted = alpha + 1.0 if alpha < 1.0 else alpha
  d = boosted - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  z = tf.random.stateless_normal([*shape, GAMMA_CANDIDATES], seeds[0])
  u = tf.random.stateless_uniform([*shape, GAMMA_CANDIDATES], seeds[1], minval=1e-12, maxval=1.0)
  v = (1.0 + c * z) ** 3
  safe_v = tf.maximum(v, 1e-12)
  accepted = (v > 0) & (tf.math.log(u) < 0.5 * z * z + d - d * safe_v + d * tf.math.log(safe_v))
  first = tf.argmax(tf.cast(accepted, tf.int32), axis=-1, output_type=tf.int32)
  log_g = math.log(d) + tf.math.log(tf.gather(safe_v, first, axis=-1, batch_dims=len(shape)))
  if alpha < 1.0:
    boost = tf.random.stateless_uniform(shape, seeds[2], minval=1e-12, maxval=1.0)
    log_g += tf.math.log(boost) / alpha
  return log_g


def beta_sample(alpha: float, shape, seed) -> tf.Tensor:
  """Beta(alpha, alpha) draws: X/(X + Y) = sigmoid(log X − log Y)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  return tf.sigmoid(log_gamma_sample(alpha, shape, seeds[0]) - log_gamma_sample(alpha, shape, seeds[1]))


def cutmix_boxes(shares: tf.Tensor, centres: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(B, H, W) true inside each image's box: sides √(1 − share) of the image's, centred at
  `centres` (B, 2: y, x in [0, 1)), clipped at the borders; a pixel is in when its centre is."""
  side = tf.sqrt(1.0 - shares)[:, None, None]
  ys = tf.range(height, dtype=tf.float32)[None, :, None] + 0.5
  xs = tf.range(width, dtype=tf.float32)[None, None, :] + 0.5
  cy, cx = (centres[:, 0] * height)[:, None, None], (centres[:, 1] * width)[:, None, None]
  return (tf.abs(ys - cy) <= side * height / 2.0) & (tf.abs(xs - cx) <= side * width / 2.0)


def kept_shares(shares: tf.Tensor, use_cutmix: tf.Tensor, centres: tf.Tensor, mixed: tf.Tensor,
                height: int, width: int) -> tf.Tensor:
  """(B,): the share of itself each image keeps (its label's weight): λ for mixup, the area left
  outside the box for CutMix, 1 for an image not mixed."""
  inside = cutmix_boxes(shares, centres, height, width)
  cut_share = 1.0 - tf.reduce_mean(tf.cast(inside, tf.float32), axis=(1, 2))
  return tf.where(mixed, tf.where(use_cutmix, cut_share, shares), 1.0)


def mix(images: tf.Tensor, labels: tf.Tensor, shares: tf.Tensor, use_cutmix: tf.Tensor,
        centres: tf.Tensor, mixed: tf.Tensor):
  """The batch mixed with itself reversed. shares: λ per image; use_cutmix: CutMix rather than
  mixup per image; mixed: whether the image is mixed at all. Returns float32 images in the input's
  value range and the mixed labels."""
  images = tf.cast(images, tf.float32)
  labels = tf.cast(labels, tf.float32)
  partner_images, partner_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
  _, height, width, _ = images.shape
  inside = cutmix_boxes(shares, centres, height, width)
  cut = tf.where(inside[..., None], partner_images, images)
  blended = shares[:, None, None, None] * images + (1.0 - shares[:, None, None, None]) * partner_images
  share = kept_shares(shares, use_cutmix, centres, mixed, height, width)
  out = tf.where(mixed[:, None, None, None], tf.where(use_cutmix[:, None, None, None], cut, blended), images)
  return out, share[:, None] * labels + (1.0 - share[:, None]) * partner_labels


@keras.saving.register_keras_serializable(package="ham10000")
class MixingTrainer(keras.Model):
  """The training wrapper (built as a functional model) with mixup and/or CutMix in its
  training step. alpha 0 turns one off; probability: the share of images mixed."""

  def __init__(self, *args, mixup=0.0, cutmix=0.0, probability=1.0, seed=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.mixup, self.cutmix, self.probability, self.seed = float(mixup), float(cutmix), float(probability), seed
    self.mixing_seed = keras.random.SeedGenerator(seed)

  def draw(self, batch_size, seed):
    """λ, the CutMix-or-mixup choice, the boxes' centres and whether to mix, per image."""
    seeds = tf.random.experimental.stateless_split(seed, 6)
    shape = (batch_size,)
    uniform = lambda i: tf.random.stateless_uniform(shape, seeds[i])  # noqa: E731
    if self.mixup > 0 and self.cutmix > 0:
      use_cutmix = uniform(0) < 0.5
      shares = tf.where(use_cutmix, beta_sample(self.cutmix, shape, seeds[1]), beta_sample(self.mixup, shape, seeds[2]))
    else:
      use_cutmix = tf.fill(shape, self.cutmix > 0)
      shares = beta_sample(self.cutmix or self.mixup, shape, seeds[1])
    centres = tf.stack([uniform(3), uniform(5)], axis=-1)
    return {"shares": shares, "use_cutmix": use_cutmix, "centres": centres, "mixed": uniform(4) < self.probability}

  def step_seed(self):
    """This step's seed, the replica's place folded in: every replica reads one generator and
    would otherwise mix its share of the batch as the others do."""
    seed = augment.stateless_seed(self.mixing_seed, augment.replica_in_sync_group())
    return tf.random.experimental.stateless_fold_in(seed, MIXING_STREAM)

  def train_step(self, data):
    x, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    # With patient metadata the batch is {"image_uint8": images, field: encoded}: each image's
    # fields are blended with its partner's by the same share as its label.
    images = x["image_uint8"] if isinstance(x, dict) else x
    draws = self.draw(tf.shape(images)[0], self.step_seed())
    mixed, mixed_labels = mix(images, labels, **draws)
    if images.dtype.is_integer:  # the wrapper takes uint8: mixup rounds to the nearest grey level
      mixed = tf.cast(tf.round(mixed), images.dtype)
    if isinstance(x, dict):
      share = kept_shares(**draws, height=images.shape[1], width=images.shape[2])[:, None]
      mixed = {name: mixed if name == "image_uint8" else share * value + (1.0 - share) * tf.reverse(value, [0])
               for name, value in x.items()}
    return super().train_step(keras.utils.pack_x_y_sample_weight(mixed, mixed_labels, sample_weight))

  def get_config(self):
    return {**super().get_config(), "mixup": self.mixup, "cutmix": self.cutmix,
            "probability": self.probability, "seed": self.seed}
