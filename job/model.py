"""The two models: the inner classifier that is saved, and the training wrapper.

inner model (what `best_model.keras` holds, input preprocessed as the seed's
inference example feeds it, any image size):
  [a float32 front that turns that input into what the backbone takes: job/backbones.py] →
  the backbone (`--backbone`, no top, BatchNorm frozen: never trainable, so in inference
  mode) → GlobalAveragePooling → [joined with the metadata branch] → Dropout(0.3) →
  Dense(one per class of the shards' manifest, softmax, float32)

  ResNet-50, the default, takes that input as is: its inner model is the seed's.
  --color_constancy=shades_of_gray puts job/color_constancy.py's layer first (in training,
  the wrapper corrects before its augmentation instead).
  With --metadata, the model also takes each field encoded (job/patient_metadata.py),
  one input per field named after it: concatenated → Dense(32, relu), joined to the
  pooled image features, as the ISIC 2019 winner's metadata branch.

training wrapper (never saved as a model; runs on the accelerator, and
compiles under XLA whole):
  uint8 → float → [Shades of Gray] → random flip / rotation / zoom / contrast (job/augment.py, in
  0-255 space: the contrast clips to its value range) → preprocess_input →
  inner model
"""

import keras
import numpy as np
import tensorflow as tf

from job import augment as augment_lib, backbones, color_constancy as color_constancy_lib, mixing as mixing_lib, patient_metadata
from tfrecords import cli, fileio


def preprocess(images):
  """uint8 or float images in 0-255 → what the inner model takes: ResNet-50's "caffe"
  preprocessing (RGB→BGR, minus the ImageNet mean, no scaling), as the seed's example does."""
  return keras.applications.resnet50.preprocess_input(keras.ops.cast(images, "float32"))


@keras.saving.register_keras_serializable(package="ham10000")
class ResNetPreprocess(keras.layers.Layer):
  """`preprocess` as a layer of the training wrapper."""

  def call(self, inputs):
    return preprocess(inputs)


def build_backbone(weights: str, backbone: str = backbones.DEFAULT) -> keras.Model:
  """The backbone without its top (job/backbones.py). weights: "imagenet", "none", or a local or
  gs:// weights file of that backbone without its top."""
  spec = backbones.get(backbone)
  if weights not in ("imagenet", "none") and not tf.io.gfile.exists(weights):
    raise FileNotFoundError(f"--weights={weights}: no such file (expected imagenet, none, or a "
                            f"{spec.application} no-top weights file, local or gs://)")
  # "imagenet": Keras downloads the weights once and caches them in ~/.keras (a file named after
  # the application's own model name, which is why the backbone keeps it).
  model = getattr(keras.applications, spec.application)(
      include_top=False, input_shape=(None, None, 3), weights="imagenet" if weights == "imagenet" else None,
      **dict(spec.options))
  if weights not in ("imagenet", "none"):
    try:
      model.load_weights(fileio.copy_to_local(weights))  # h5py opens local files only
    except (ValueError, OSError, KeyError) as e:
      raise cli.UserError(f"--weights={weights} is not a {spec.application} no-top weights file (--backbone="
                          f"{backbone}): {str(e).splitlines()[0][:200]}") from None
  if spec.cut_stem_at:
    model = keras.Model(model.get_layer(spec.cut_stem_at).input, model.output, name=model.name)
  return model


def input_front(spec: backbones.Backbone) -> list[keras.layers.Layer]:
  """Layers that turn the inner model's input ("caffe": BGR minus the mean) into what the
  backbone takes, in float32 whatever the policy (job/backbones.py)."""
  if spec.scaling == "caffe":
    return []
  to_rgb = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, dtype="float32", name="bgr_to_rgb",
                               kernel_initializer=keras.initializers.Constant(np.eye(3)[::-1].reshape(1, 1, 3, 3)))
  front = [keras.layers.Rescaling(1.0, offset=list(backbones.CAFFE_MEAN_BGR), dtype="float32", name="undo_caffe_mean"),
           to_rgb]
  if spec.scaling == "mean_std":
    front.append(keras.layers.Normalization(mean=list(backbones.IMAGENET_MEAN_RGB), dtype="float32",
                                            variance=[s ** 2 for s in backbones.IMAGENET_STD_RGB],
                                            name="imagenet_mean_std"))
  elif spec.scaling == "symmetric":
    front.append(keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name="to_symmetric"))
  elif spec.scaling == "v2":
    front.append(keras.layers.Rescaling(1 / 128.0, offset=-1.0, dtype="float32", name="to_symmetric"))
  else:
    raise ValueError(spec.scaling)
  return front


METADATA_UNITS = 32
COLOR_CONSTANCY_LAYER = "shades_of_gray"


def color_constancy_of(inner: keras.Model) -> str:
  """The --color_constancy an inner model was built with."""
  return "shades_of_gray" if any(layer.name == COLOR_CONSTANCY_LAYER for layer in inner.layers) else "none"


def metadata_inputs(fields: tuple[str, ...]) -> dict[str, keras.KerasTensor]:
  return {field: keras.Input((patient_metadata.WIDTHS[field],), name=field) for field in fields}


def build_inner_model(weights: str, num_classes: int, dropout: float = 0.3,
                      backbone: str = backbones.DEFAULT, metadata: tuple[str, ...] = (),
                      color_constancy: str = "none") -> keras.Model:
  """color_constancy: --color_constancy (job/color_constancy.py), the model's first layer when not none."""
  spec = backbones.get(backbone)
  network = build_backbone(weights, backbone)
  image = keras.Input((None, None, 3), name="image")
  fields = metadata_inputs(metadata)
  x = image
  if color_constancy == "shades_of_gray":
    x = color_constancy_lib.ShadesOfGray(inference_only=True, name=COLOR_CONSTANCY_LAYER)(x)
  for layer in input_front(spec):
    x = layer(x)
  # BatchNorm keeps ImageNet's statistics in both stages because no BatchNorm layer is ever
  # trainable (set_trainable_for_stage): Keras uses batch statistics only when `training and
  # self.trainable`. The training=False here does not hold on its own: Keras 3.15 replaces a
  # nested model's recorded `training` with the outer call's (the wrapper's training=True).
  x = network(x, training=False)
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  if fields:
    encoded = (keras.layers.Concatenate(name="metadata")(list(fields.values())) if len(fields) > 1
               else next(iter(fields.values())))
    branch = keras.layers.Dense(METADATA_UNITS, activation="relu", name="metadata_dense")(encoded)
    x = keras.layers.Concatenate(name="image_and_metadata")([x, branch])
  x = keras.layers.Dropout(dropout, name="dropout")(x)
  outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                               name="probabilities")(x)
  # An image-only model keeps the seed's one input (its example calls predict on an image batch).
  return keras.Model({"image": image, **fields} if fields else image, outputs, name=spec.model_name)


IMAGE_INPUT = "image_uint8"  # the training wrapper's image input


def inner_inputs(inner: keras.Model, images, encoded: dict | None = None):
  """What the inner model takes: the preprocessed images, with its fields (encoded) when it has any."""
  fields = patient_metadata.fields_of(inner)
  if not fields:
    return images
  return {"image": images, **{field: encoded[field] for field in fields}}


def build_training_model(inner: keras.Model, image_size: int, seed: int = 0,
                         augment: "bool | keras.layers.Layer" = True,
                         mixing: dict | None = None) -> keras.Model:
  """augment: True, the seed's augmentation; a layer (`augmentation_of`); False leaves the
  random layers out (benchmarks measure what they cost). mixing: MixingTrainer's settings
  (`config.mixing`), whose training step mixes the batch; None: Keras's own step. An inner
  model with metadata: the wrapper takes {"image_uint8", each field} (data.py's batches)."""
  image = keras.Input((image_size, image_size, 3), dtype="uint8", name=IMAGE_INPUT)
  fields = metadata_inputs(patient_metadata.fields_of(inner))
  x = keras.ops.cast(image, "float32")  # layers below cast on to the policy's compute dtype
  if color_constancy_of(inner) == "shades_of_gray":  # before the augmentation (job/color_constancy.py)
    x = color_constancy_lib.ShadesOfGray(space="rgb", name="shades_of_gray_before_augment")(x)
  if augment is True:
    augment = augmentation(seed)
  if augment is not False:
    x = augment(x)
  x = ResNetPreprocess(name="preprocess")(x)
  outputs = inner({"image": x, **fields} if fields else x)
  inputs = {IMAGE_INPUT: image, **fields} if fields else image
  if mixing:
    return mixing_lib.MixingTrainer(inputs, outputs, name="training_wrapper", seed=seed, **mixing)
  return keras.Model(inputs, outputs, name="training_wrapper")


def augmentation(seed: int = 0) -> keras.layers.Layer:
  """The seed's flip, rotation (0.1), zoom (0.1) and contrast (0.1), in 0-255 space, with ops
  that XLA compiles (Keras's RandomRotation and RandomZoom do not)."""
  return augment_lib.RandomAugmentation(rotation=0.1, zoom=0.1, contrast=0.1, value_range=(0, 255),
                                    seed=seed, name="augment")


def augmentation_of(cfg) -> keras.layers.Layer:
  """The augmentation a TrainConfig asks for (--augment and its --aug_* strengths)."""
  if cfg.augment == "seed":
    return augmentation(cfg.seed)
  return augment_lib.DermoscopyAugmentation(
      rotation=cfg.aug_rotation, zoom=cfg.aug_zoom, shift=cfg.aug_shift, brightness=cfg.aug_brightness,
      contrast=cfg.aug_contrast, saturation=cfg.aug_saturation, hue=cfg.aug_hue, cutout=cfg.aug_cutout,
      value_range=(0, 255), seed=cfg.seed, name="augment")


def backbone_name(inner: keras.Model) -> str:
  """The --backbone an inner model was built with (its name says it)."""
  name = inner.name.removeprefix("ham10000_")
  if name not in backbones.REGISTRY:
    raise ValueError(f"{inner.name} is not an inner model of this job")
  return name


def backbone_of(inner: keras.Model) -> keras.Model:
  return next(layer for layer in inner.layers if isinstance(layer, keras.Model))


def flattened(model: keras.Model) -> list[keras.layers.Layer]:
  """A model's layers, those of nested models (ConvNeXt's stages) in their place."""
  return [leaf for layer in model.layers
          for leaf in (flattened(layer) if isinstance(layer, keras.Model) else [layer])]


def set_trainable_for_stage(inner: keras.Model, stage: int, fine_tune_layers: int | None = None):
  """Stage 1: only the head trains. Stage 2: also the top `fine_tune_layers` layers of the
  flattened backbone (default: the backbone's own share, job/backbones.py), BatchNorm excepted
  (its statistics stay ImageNet's; ConvNeXt's LayerNorms keep none, and train with the rest).
  Recompile afterwards."""
  backbone = backbone_of(inner)
  layers = flattened(backbone)
  backbone.trainable = stage == 2
  if stage == 2:
    count = backbones.get(backbone_name(inner)).fine_tune_layers if fine_tune_layers is None else fine_tune_layers
    cut = len(layers) - min(count, len(layers))
    for index, layer in enumerate(layers):
      layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
  # The rule that keeps BatchNorm in inference mode (see build_inner_model): never trainable.
  trainable_batchnorm = [layer.name for layer in layers
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
                             dropout=inner.get_layer("dropout").rate, backbone=backbone_name(inner),
                             metadata=patient_metadata.fields_of(inner), color_constancy=color_constancy_of(inner))
  finally:
    keras.mixed_precision.set_global_policy(policy)
  copy.set_weights(inner.get_weights())
  return copy
