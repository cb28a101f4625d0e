"""Colour constancy (--color_constancy=shades_of_gray), inside the saved model.

Dermoscopes light the skin differently; Shades of Gray (Finlayson and Trezzi, 2004)
estimates each image's illuminant as the p-norm mean of each channel, e_c = mean(I_c^p)^(1/p),
and rescales the channels so that the estimate is grey: I'_c = I_c / (√3 · e_c / ‖e‖). The
ISIC 2019 winner (Gessert et al., arXiv 1910.03910) preprocesses every image so, with p = 6.

It is the inner model's first layer, so evaluation, job.predict and the serving export apply
it alike; in training the wrapper applies it before the augmentation (as the ISIC 2019
winner preprocessed before augmenting: the colour jitter then varies corrected images) and
the inner model's layer lets the image through. No built-in Keras layer takes a p-th root (nor a log to build one
from), so this one is ours: a model holding it loads where this package is imported (job.predict,
job.evaluate, the serving export need nothing more), but not in the seed's inference example,
whose plain `load_model` imports nothing of ours.
"""

import keras
import numpy as np

from job import backbones

POWER = 6


@keras.saving.register_keras_serializable(package="ham10000")
class ShadesOfGray(keras.layers.Layer):
  """Shades of Gray on 0-255 images, in float32 whatever the policy (255^6 overflows float16).

  space: "rgb", 0-255 RGB in and out (the training wrapper's, before the augmentation); "caffe",
  the inner model's input (BGR minus the ImageNet mean) in and out. inference_only: the layer
  passes its input through in training, where the wrapper has corrected the image already,
  before the augmentation, so that the colour jitter is not corrected away; a second pass over
  a corrected image changes it little (its illuminant is grey already, clipping aside)."""

  def __init__(self, power: float = POWER, space: str = "caffe", inference_only: bool = False, **kwargs):
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    if space not in ("rgb", "caffe"):
      raise ValueError(f"space={space!r}: rgb or caffe")
    self.power, self.space, self.inference_only = float(power), space, bool(inference_only)

  def call(self, inputs, training=None):
    if self.inference_only and training:
      return inputs
    # Per-channel gains: the channel order does not matter, BGR or RGB alike.
    offset = (keras.ops.convert_to_tensor(np.asarray(backbones.CAFFE_MEAN_BGR, np.float32)) if self.space == "caffe"
              else 0.0)
    pixels = keras.ops.clip(keras.ops.cast(inputs, "float32") + offset, 0.0, 255.0)
    illuminant = keras.ops.power(keras.ops.mean(keras.ops.power(pixels / 255.0, self.power), axis=(1, 2),
                                                keepdims=True), 1.0 / self.power)
    unit = illuminant / keras.ops.maximum(keras.ops.norm(illuminant, axis=-1, keepdims=True), 1e-6)
    corrected = pixels / keras.ops.maximum(unit * np.sqrt(3.0), 1e-6)
    return keras.ops.clip(corrected, 0.0, 255.0) - offset

  def get_config(self):
    return {**super().get_config(), "power": self.power, "space": self.space, "inference_only": self.inference_only}
