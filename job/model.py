"""The two models: the inner classifier that is saved, and the training wrapper.

inner model (what `best_model.keras` holds, input preprocessed as the seed's
inference example feeds it, any image size):
  ResNet-50 (no top, BatchNorm frozen: never trainable, so in inference mode) → GlobalAveragePooling →
  Dropout(0.3) → Dense(one per class of the shards' manifest, softmax, float32)

training wrapper (never saved as a model; runs on the accelerator, and
compiles under XLA whole):
  uint8 → float → random flip / rotation / zoom / contrast (job/augment.py, in
  0-255 space: the contrast clips to its value range) → preprocess_input →
  inner model
"""

import keras
import tensorflow as tf

from job import augment as augment_lib, config as config_lib
from tfrecords import cli, fileio

BACKBONE_NAME = "resnet50"
BACKBONE_LAYERS = config_lib.BACKBONE_LAYERS


def preprocess(images):
  """uint8 or float images in 0-255 → what the inner model takes: ResNet-50's "caffe"
  preprocessing (RGB→BGR, minus the ImageNet mean, no scaling), as the seed's example does."""
  return keras.applications.resnet50.preprocess_input(keras.ops.cast(images, "float32"))


@keras.saving.register_keras_serializable(package="ham10000")
class ResNetPreprocess(keras.layers.Layer):
  """`preprocess` as a layer of the training wrapper."""

  def call(self, inputs):
    return preprocess(inputs)


def build_backbone(weights: str) -> keras.Model:
  """ResNet-50 without its top. weights: "imagenet", "none", or a local or gs:// weights file."""
  if weights not in ("imagenet", "none") and not tf.io.gfile.exists(weights):
    raise FileNotFoundError(f"--weights={weights}: no such file (expected imagenet, none, or a "
                            "ResNet-50 no-top weights file, local or gs://)")
  # "imagenet": Keras downloads the weights once and caches them in ~/.keras.
  backbone = keras.applications.ResNet50(include_top=False, input_shape=(None, None, 3),
                                         weights="imagenet" if weights == "imagenet" else None,
                                         name=BACKBONE_NAME)
  if weights not in ("imagenet", "none"):
    try:
      backbone.load_weights(fileio.copy_to_local(weights))  # h5py opens local files only
    except (ValueError, OSError, KeyError) as e:
      raise cli.UserError(f"--weights={weights} is not a ResNet-50 no-top weights file "
                          f"({str(e).splitlines()[0][:200]})") from None
  return backbone


def build_inner_model(weights: str, num_classes: int, dropout: float = 0.3) -> keras.Model:
  backbone = build_backbone(weights)
  inputs = keras.Input((None, None, 3), name="image")
  # BatchNorm keeps ImageNet's statistics in both stages because no BatchNorm layer is ever
  # trainable (set_trainable_for_stage): Keras uses batch statistics only when `training and
  # self.trainable`. The training=False here does not hold on its own: Keras 3.15 replaces a
  # nested model's recorded `training` with the outer call's (the wrapper's training=True).
  x = backbone(inputs, training=False)
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  x = keras.layers.Dropout(dropout, name="dropout")(x)
  outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                               name="probabilities")(x)
  return keras.Model(inputs, outputs, name="ham10000_resnet50")


def build_training_model(inner: keras.Model, image_size: int, seed: int = 0,
                         augment: bool = True) -> keras.Model:
  """augment=False leaves the random layers out (benchmarks measure what they cost)."""
  inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image_uint8")
  x = keras.ops.cast(inputs, "float32")  # layers below cast on to the policy's compute dtype
  if augment:
    x = augmentation(seed)(x)
  x = ResNetPreprocess(name="preprocess")(x)
  outputs = inner(x)
  return keras.Model(inputs, outputs, name="training_wrapper")


def augmentation(seed: int = 0) -> keras.layers.Layer:
  """The seed's flip, rotation (0.1), zoom (0.1) and contrast (0.1), in 0-255 space, with ops
  that XLA compiles (Keras's RandomRotation and RandomZoom do not)."""
  return augment_lib.RandomAugmentation(rotation=0.1, zoom=0.1, contrast=0.1, value_range=(0, 255),
                                    seed=seed, name="augment")


def backbone_of(inner: keras.Model) -> keras.Model:
  return inner.get_layer(BACKBONE_NAME)


def set_trainable_for_stage(inner: keras.Model, stage: int, fine_tune_layers: int = 50):
  """Stage 1: only the head trains. Stage 2: also the top `fine_tune_layers` backbone
  layers, BatchNorm excepted (its statistics stay ImageNet's). Recompile afterwards."""
  backbone = backbone_of(inner)
  backbone.trainable = stage == 2
  if stage == 2:
    cut = len(backbone.layers) - fine_tune_layers
    for index, layer in enumerate(backbone.layers):
      layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
  # The rule that keeps BatchNorm in inference mode (see build_inner_model): never trainable.
  trainable_batchnorm = [layer.name for layer in backbone.layers
                         if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
  if trainable_batchnorm:
    raise AssertionError(f"BatchNorm layers must stay frozen, found trainable: {trainable_batchnorm[:3]}")


def float32_copy(inner: keras.Model) -> keras.Model:
  """The inner model rebuilt under float32 with the same weights, for saving: a model
  trained under mixed precision then runs at full speed and precision on any CPU."""
  if inner.dtype_policy.name == "float32":
    return inner
  policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    copy = build_inner_model("none", num_classes=inner.output_shape[-1],
                             dropout=inner.get_layer("dropout").rate)
  finally:
    keras.mixed_precision.set_global_policy(policy)
  copy.set_weights(inner.get_weights())
  return copy
