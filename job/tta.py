"""Test-time augmentation: a model's probabilities averaged over flips and quarter turns.

A dermoscopic image has no "up": a lesion mirrored or turned a quarter is the
same lesion, so the mean of the predictions over those views is a better
estimate than any one of them. The ISIC 2020 winner averages the 8 transforms
of the dihedral group (transposes × flips); `flip` is the image and its mirror.

The views are ordered so that each mode's are the first of the dihedral list
(identity, mirror, then each quarter turn of both): one pass under `dihedral`
gives every mode's probabilities, which calibration uses to fit a temperature
per mode on one prediction of the validation split. They run batched on the
accelerator: a batch of B images becomes one model call on V·B views.
"""

import numpy as np
import tensorflow as tf

MODES = ("none", "flip", "dihedral")
NUM_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}


def views(images: tf.Tensor, mode: str) -> tf.Tensor:
  """[B, H, W, C] square images → [V·B, H, W, C], view-major: view v of image b at v·B + b.
  View 2k is the image turned k quarter turns anticlockwise, view 2k+1 its mirror so turned."""
  count = NUM_VIEWS[mode]
  if count == 1:
    return images
  # As float32, which the model takes anyway: oneDNN reverses no uint8 tensor on CPUs without
  # AVX-512 and logs an error line for each (the result is the same).
  images = tf.cast(images, tf.float32)
  mirrored = tf.image.flip_left_right(images)
  out = []
  for quarter_turns in range(4):
    for image in (images, mirrored):
      if len(out) < count:
        out.append(tf.image.rot90(image, quarter_turns))
  return tf.concat(out, axis=0)


def mean_over_views(probabilities, mode: str, num_views: int | None = None):
  """[V·B, C] (views as `views` orders them) → [B, C], the mean over the first
  NUM_VIEWS[mode] views; `num_views`: how many views `probabilities` holds (default: the mode's)."""
  num_views = num_views or NUM_VIEWS[mode]
  per_view = np.reshape(np.asarray(probabilities), (num_views, -1, np.shape(probabilities)[-1]))
  return per_view[:NUM_VIEWS[mode]].mean(axis=0)


def mean_over_views_tf(probabilities: tf.Tensor, mode: str) -> tf.Tensor:
  """`mean_over_views` in TensorFlow, for the serving signature."""
  per_view = tf.reshape(probabilities, (NUM_VIEWS[mode], -1, tf.shape(probabilities)[-1]))
  return tf.reduce_mean(per_view, axis=0)


def images_per_batch(batch_size: int, mode: str) -> int:
  """Images per model call so that a call holds about `batch_size` views (memory as without TTA)."""
  return max(1, batch_size // NUM_VIEWS[mode])
