"""--augment=dermoscopy: the symmetries of the square exactly as numpy's, colour jitter that
does what it says, cutout, XLA, a draw per replica; --label_smoothing; both in the fingerprint."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from job import augment, config as config_lib, model as model_lib, run_state, train

PATTERN = np.arange(4 * 6 * 6 * 3, dtype=np.float32).reshape(4, 6, 6, 3) * 0.5  # every value its own, in 0-255


def _layer(**strengths):
  cfg = config_lib.TrainConfig(data_dir="unused", augment="dermoscopy", seed=3, **strengths)
  return model_lib.augmentation_of(cfg)


@pytest.mark.parametrize("size", [5, 6])
def test_quarter_turns_and_flips_map_a_pattern_as_numpy_does(size):
  images = np.arange(4 * size * size * 2, dtype=np.float32).reshape(4, size, size, 2)
  turned = augment.quarter_turns(tf.constant(images), tf.constant([0, 1, 2, 3])).numpy()
  for i, turns in enumerate((0, 1, 2, 3)):
    assert np.array_equal(turned[i], np.rot90(images[i], turns)), turns
  where = tf.constant([True, False, True, False])
  assert np.array_equal(augment.flip(tf.constant(images), where, axis=1).numpy()[[0, 2]], images[[0, 2], ::-1])
  assert np.array_equal(augment.flip(tf.constant(images), where, axis=2).numpy()[[0, 2]], images[[0, 2], :, ::-1])
  assert np.array_equal(augment.flip(tf.constant(images), where, axis=2).numpy()[[1, 3]], images[[1, 3]])


def test_without_jitter_a_draw_is_one_of_the_squares_eight_symmetries_exactly():
  layer = _layer(aug_rotation=0.0, aug_zoom=0.0, aug_shift=0.0, aug_brightness=0.0, aug_contrast=0.0,
                 aug_saturation=0.0, aug_hue=0.0, aug_cutout=0.0)
  draws = layer.draw(4)
  out = layer.apply(tf.constant(PATTERN), **draws).numpy()
  for i in range(4):
    expected = np.rot90(PATTERN[i], int(draws["turns"][i]))
    expected = expected[::-1] if draws["flips_up_down"][i] else expected
    expected = expected[:, ::-1] if draws["flips"][i] else expected
    np.testing.assert_allclose(out[i], np.clip(expected, 0, 255), atol=1e-3)
  assert len({int(t) for t in layer.draw(400)["turns"]}) == 4  # every quarter turn is drawn


def test_a_third_of_a_hue_turn_cycles_the_channels_and_grey_stays_grey():
  rgb = tf.constant([[[[200.0, 50.0, 10.0], [90.0, 90.0, 90.0]]]])
  one = tf.ones([1])
  turned = augment.adjust_colour(rgb, 0 * one, one, one, one * 2 * math.pi / 3).numpy()[0, 0]
  np.testing.assert_allclose(turned[0], [10.0, 200.0, 50.0], atol=1e-3)  # R→G, G→B, B→R
  np.testing.assert_allclose(turned[1], [90.0, 90.0, 90.0], atol=1e-3)
  desaturated = augment.adjust_colour(rgb, 0 * one, one, 0 * one, 0 * one).numpy()[0, 0, 0]
  np.testing.assert_allclose(desaturated, [260 / 3] * 3, atol=1e-3)  # saturation 0: the pixel's grey
  brighter = augment.adjust_colour(rgb, 100 * one, one, one, 0 * one).numpy()[0, 0]
  np.testing.assert_allclose(brighter, [[255.0, 150.0, 110.0], [190.0, 190.0, 190.0]], atol=1e-3)  # clipped


def test_cutout_fills_one_square_of_the_side_asked_for():
  images = tf.fill([2, 10, 10, 3], 7.0)
  out = augment.cutout(images, tf.constant([[0.5, 0.5], [0.0, 0.0]]), side=0.4).numpy()
  hole = np.all(out == np.array(augment.CUTOUT_FILL_RGB, np.float32), axis=-1)
  assert hole[0].sum() == 16 and hole[0][3:7, 3:7].all()  # a 4×4 square in the middle
  assert hole[1].sum() == 4 and hole[1][:2, :2].all()  # at a corner: clipped
  assert np.all(out[~hole] == 7.0)


def test_the_dermoscopy_preset_compiles_under_xla_and_trains_a_step():
  layer = _layer()
  inputs = keras.Input((32, 32, 3))
  pooled = keras.layers.GlobalAveragePooling2D()(layer(inputs))
  model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(pooled))
  train.compile_model(model, tf.distribute.get_strategy(), config_lib.TrainConfig(data_dir="unused"), 1e-3,
                      xla=True)
  assert model.jit_compile
  images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
  model.fit(images, np.eye(7, dtype=np.float32)[np.arange(8) % 7], epochs=1, verbose=0)
  compiled = tf.function(lambda x: layer(x, training=True), jit_compile=True)(tf.constant(images)).numpy()
  assert compiled.shape == images.shape and 0 <= compiled.min() and compiled.max() <= 255
  assert not np.allclose(compiled, images)


def test_each_replica_draws_its_own_dermoscopy_augmentation():
  first, second = helpers.draws_on_two_replicas(
      'model_lib.augmentation_of(config_lib.TrainConfig(data_dir="unused", augment="dermoscopy", seed=3))',
      'tf.concat([drawer.draw(4)[k] for k in ("hue", "turns")], 0)')
  assert not np.allclose(first, second), "two replicas drew the same transformations"


def test_label_smoothing_smooths_the_target_and_weighs_by_the_hard_label():
  y_true = np.array([[0, 1, 0], [1, 0, 0]], np.float32)
  y_pred = np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]], np.float32)
  loss = train.ClassWeightedCrossentropy([1.0, 3.0, 1.0], label_smoothing=0.3)
  smoothed = y_true * 0.7 + 0.1
  expected = -(smoothed * np.log(y_pred)).sum(axis=1) * np.array([3.0, 1.0])
  np.testing.assert_allclose(keras.ops.convert_to_numpy(loss.call(y_true, y_pred)), expected, rtol=1e-5)


def test_the_augmentation_and_smoothing_shape_the_fingerprint_and_nonsense_is_refused():
  seed = config_lib.TrainConfig(data_dir="d")
  fingerprint = run_state.fingerprint(seed, "sha", 1)
  assert fingerprint["augmentation"] == "seed" and fingerprint["label_smoothing"] == 0.0
  # The preset's strengths mean nothing to the seed's augmentation: not a difference.
  assert run_state.differences(fingerprint, run_state.fingerprint(
      config_lib.TrainConfig(data_dir="d", aug_hue=0.2), "sha", 1)) == []
  dermoscopy = config_lib.TrainConfig(data_dir="d", augment="dermoscopy")
  assert run_state.differences(fingerprint, run_state.fingerprint(dermoscopy, "sha", 1))[0].startswith(
      "augmentation: 'seed' → {'preset': 'dermoscopy', 'rotation': 0.125")
  before = {k: v for k, v in fingerprint.items() if k not in ("augmentation", "label_smoothing")}
  assert run_state.differences(before, fingerprint) == []  # records from before: the seed's, unsmoothed
  for flag, value in (("aug_hue", -0.1), ("label_smoothing", 1.0), ("aug_cutout", 1.5)):
    with pytest.raises(config_lib.cli.UserError, match=f"--{flag}={value} must be at least 0 and below 1"):
      config_lib.validated(config_lib.TrainConfig(data_dir="d", **{flag: value}))
