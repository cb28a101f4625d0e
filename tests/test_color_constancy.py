"""--color_constancy=shades_of_gray: the saved model's first layer corrects each image as Shades of
Gray does, compiles under XLA and mixed precision, and stays in the model that is saved."""

import numpy as np
import pytest
import tensorflow as tf

from job import backbones, color_constancy, config as config_lib, model as model_lib, run_state
from tfrecords import cli


def shades_of_gray(rgb: np.ndarray, power: float = 6) -> np.ndarray:
  """The ISIC 2019 winner's Shades of Gray, in numpy, on 0-255 RGB images [..., H, W, 3]."""
  rgb = rgb.astype(np.float64)
  illuminant = np.power(np.mean(np.power(rgb / 255.0, power), axis=(-3, -2), keepdims=True), 1 / power)
  unit = illuminant / np.linalg.norm(illuminant, axis=-1, keepdims=True)
  return np.clip(rgb / (unit * np.sqrt(3)), 0, 255)


def _caffe(rgb):
  return rgb[..., ::-1].astype(np.float32) - np.asarray(backbones.CAFFE_MEAN_BGR, np.float32)


def _tinted(n=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  grey = rng.uniform(20, 200, (n, size, size, 1))
  tint = rng.uniform(0.6, 1.2, (n, 1, 1, 3))  # one illuminant per image
  return np.clip(grey * tint, 0, 255)


def test_the_layer_corrects_as_shades_of_gray_and_leaves_a_grey_lit_image_alone():
  images = _tinted()
  corrected = color_constancy.ShadesOfGray()(_caffe(images)).numpy()
  expected = _caffe(shades_of_gray(images))
  np.testing.assert_allclose(corrected, expected, atol=2e-3)
  # The illuminant it estimates afterwards is grey: the channels' p-means agree.
  back = corrected[..., ::-1] + np.asarray(backbones.CAFFE_MEAN_BGR)[::-1]
  means = np.power(np.mean(np.power(back / 255, 6), axis=(1, 2)), 1 / 6)
  np.testing.assert_allclose(means / means.mean(axis=1, keepdims=True), 1, atol=2e-3)
  grey = np.repeat(_tinted()[..., :1], 3, axis=-1)
  np.testing.assert_allclose(color_constancy.ShadesOfGray()(_caffe(grey)).numpy(), _caffe(grey), atol=2e-3)
  rgb = color_constancy.ShadesOfGray(space="rgb")(images.astype(np.float32)).numpy()  # the wrapper's, on 0-255 RGB
  np.testing.assert_allclose(rgb, shades_of_gray(images), atol=2e-3)


def test_training_corrects_before_the_augmentation_and_inference_inside_the_model():
  inner = model_lib.build_inner_model("none", num_classes=3, color_constancy="shades_of_gray")
  wrapper = model_lib.build_training_model(inner, 16, augment=False)
  names = [layer.name for layer in wrapper.layers]
  assert names.index("shades_of_gray_before_augment") < names.index("preprocess")
  images = _caffe(_tinted())
  layer = inner.get_layer(model_lib.COLOR_CONSTANCY_LAYER)
  np.testing.assert_array_equal(layer(images, training=True).numpy(), images)  # the wrapper corrected already
  np.testing.assert_allclose(layer(images, training=False).numpy(), _caffe(shades_of_gray(_tinted())), atol=2e-3)
  # In inference the two passes agree with the saved model's one: a corrected image stays as it is.
  uint8 = np.round(_tinted()).astype(np.uint8)
  np.testing.assert_allclose(wrapper.predict(uint8, verbose=0),
                             inner(model_lib.preprocess(uint8), training=False).numpy(), atol=1e-4)


def test_a_model_with_it_compiles_under_xla_in_bfloat16_and_keeps_it_when_saved(tmp_path):
  from job import performance
  policy = tf.keras.mixed_precision.global_policy()
  performance.set_policy("mixed_bfloat16")
  try:
    inner = model_lib.build_inner_model("none", num_classes=3, color_constancy="shades_of_gray")
    assert inner.get_layer(model_lib.COLOR_CONSTANCY_LAYER).compute_dtype == "float32"
    images = _caffe(_tinted(size=32))
    compiled = tf.function(lambda x: inner(x, training=False), jit_compile=True)(tf.constant(images))
    assert np.isfinite(compiled.numpy()).all()
    copy = model_lib.float32_copy(inner)
  finally:
    tf.keras.mixed_precision.set_global_policy(policy)
  assert model_lib.color_constancy_of(copy) == "shades_of_gray"
  copy.save(tmp_path / "m.keras")
  loaded = tf.keras.models.load_model(tmp_path / "m.keras")  # with this package imported
  np.testing.assert_allclose(loaded(images).numpy(), copy(images).numpy(), atol=1e-6)
  assert model_lib.color_constancy_of(model_lib.build_inner_model("none", num_classes=3)) == "none"


def test_it_shapes_the_fingerprint_and_a_bad_value_is_named():
  plain = run_state.fingerprint(config_lib.TrainConfig(data_dir="d"), "sha", 1)
  corrected = run_state.fingerprint(config_lib.TrainConfig(data_dir="d", color_constancy="shades_of_gray"), "sha", 1)
  assert run_state.differences(plain, corrected) == ["color_constancy: 'none' → 'shades_of_gray'"]
  assert run_state.differences({k: v for k, v in plain.items() if k != "color_constancy"}, plain) == []
  with pytest.raises(cli.UserError, match="--color_constancy=grey_world: expected one of none, shades_of_gray"):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", color_constancy="grey_world"))
