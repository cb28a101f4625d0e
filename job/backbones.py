"""The backbones by name (`--backbone`): one registry of what keras.applications builds, what
input each takes, and how much of it stage 2 fine-tunes.

Importing this module loads no TensorFlow (the launchers check a job's flags with it); `build`
does.

Every inner model takes what the seed's inference example feeds it, ResNet-50's "caffe"
preprocessing (BGR, minus the ImageNet mean). A backbone that wants other input gets a front
of built-in Keras layers in float32, so that the seed's plain `load_model` rebuilds it and the
undo loses nothing to float16 (a 0-255 value there is off by up to 0.125):

  Rescaling(1, offset=ImageNet mean) → BGR 0-255; a frozen 1×1 Conv2D permutation → RGB 0-255;
  then the backbone's own scaling, taken out of the backbone and put here:
    "mean_std":   (x/255 − mean)/std, ImageNet's (EfficientNet B0-B7 and V2-B0-B3, ConvNeXt)
    "symmetric":  x/127.5 − 1 (ResNet50V2, Keras's "tf" mode)
    "v2":         x/128 − 1 (EfficientNetV2-S/M/L's own Rescaling)

Taken out, because the backbones differ in what their graph holds: Keras's EfficientNet (V1)
adds a Rescaling(1/sqrt(std)) to its stem only when built with weights="imagenet"
(keras/src/applications/efficientnet.py, tensorflow/tensorflow#49930), so a model built without
and given the weights later would normalise otherwise, silently. V1's stem is cut off (the model
from `stem_conv_pad` on, the same layers whatever the weights); V2 and ConvNeXt are built with
include_preprocessing=False.

Stage 2 fine-tunes the top of the backbone's flattened layer list (ConvNeXt nests Sequential
stages): ResNet-50 the seed's 50 of 175 layers, and every other backbone the same share (50/175),
moved down to the start of the block it falls in, so that no block trains in part. The counts
below are checked against the built models by tests/test_backbones.py.
"""

import dataclasses
import re

from tfrecords import cli

# ImageNet's RGB statistics in 0-255, as keras.applications normalise with them.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # what keras.applications.resnet50.preprocess_input subtracts
FINE_TUNE_SHARE = 50 / 175  # the seed's 50 of ResNet-50's 175 layers
# A layer's block, from its name: conv4_block5_1_conv, block6b_expand_conv, convnext_tiny_stage_2_block_5_….
BLOCK = re.compile(r"(conv\d_block\d+|block\d+[a-z]|stage_\d+_block_\d+)_")


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str  # --backbone
  application: str  # the keras.applications function
  scaling: str  # "caffe" (takes the inner model's input as is), "mean_std", "symmetric", "v2"
  layers: int  # in the flattened backbone as built here, its input included
  fine_tune_layers: int  # stage 2's default: see the module docstring
  cut_stem_at: str | None = None  # the layer the backbone starts at (V1: its stem's scaling left out)
  options: tuple = ()  # more keyword arguments of the application

  @property
  def model_name(self) -> str:
    """The inner model's name."""
    return f"ham10000_{self.name}"


_V2 = (("include_preprocessing", False),)
REGISTRY = {b.name: b for b in (
    Backbone("resnet50", "ResNet50", "caffe", 175, 50),
    Backbone("resnet50v2", "ResNet50V2", "symmetric", 190, 59),
    Backbone("efficientnet_b0", "EfficientNetB0", "mean_std", 235, 75, cut_stem_at="stem_conv_pad"),
    Backbone("efficientnet_b1", "EfficientNetB1", "mean_std", 337, 105, cut_stem_at="stem_conv_pad"),
    Backbone("efficientnet_b2", "EfficientNetB2", "mean_std", 337, 105, cut_stem_at="stem_conv_pad"),
    Backbone("efficientnet_b3", "EfficientNetB3", "mean_std", 382, 120, cut_stem_at="stem_conv_pad"),
    Backbone("efficientnet_b4", "EfficientNetB4", "mean_std", 472, 136, cut_stem_at="stem_conv_pad"),
    Backbone("efficientnetv2_b0", "EfficientNetV2B0", "mean_std", 268, 78, options=_V2),
    Backbone("efficientnetv2_b1", "EfficientNetV2B1", "mean_std", 332, 108, options=_V2),
    Backbone("efficientnetv2_b2", "EfficientNetV2B2", "mean_std", 347, 108, options=_V2),
    Backbone("efficientnetv2_b3", "EfficientNetV2B3", "mean_std", 407, 123, options=_V2),
    Backbone("efficientnetv2_s", "EfficientNetV2S", "v2", 512, 153, options=_V2),
    Backbone("convnext_tiny", "ConvNeXtTiny", "mean_std", 136, 45, options=_V2),
)}
NAMES = tuple(REGISTRY)
DEFAULT = "resnet50"


def get(name: str) -> Backbone:
  if name not in REGISTRY:
    raise KeyError(name)
  return REGISTRY[name]


def check_names(names, flag: str) -> None:
  """Refuses, naming the flag, any of `names` that is not a backbone here."""
  unknown = [name for name in names if name not in REGISTRY]
  if unknown:
    raise cli.UserError(f"{flag}: {', '.join(unknown)} (expected some of {', '.join(NAMES)})")


def block_of(layer_name: str) -> str | None:
  found = BLOCK.search(layer_name)
  return found.group(1) if found else None


def fine_tune_start(layer_names: list[str]) -> int:
  """Where stage 2's share of a flattened backbone starts: FINE_TUNE_SHARE of its layers from
  the top, moved down to the first layer of the block it falls in."""
  cut = len(layer_names) - round(len(layer_names) * FINE_TUNE_SHARE)
  block = block_of(layer_names[cut])
  while cut > 0 and block is not None and block_of(layer_names[cut - 1]) == block:
    cut -= 1
  return cut
