"""--mixup and --cutmix: Beta draws from the right distribution under XLA, images and labels mixed
by one share, the class weights following the mixed label, a draw per replica, and the settings
in the fingerprint."""


import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import helpers
from job import config as config_lib, mixing, model as model_lib, run_state, train


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.4, 1.0, 3.0])
def test_the_gamma_draws_follow_gamma_alpha(alpha, compiled):
  # α = 1 is the one that tells a missing acceptance step (candidates of (1 + cz)³ taken as they
  # come): p ≈ 1e-14 then; near-Gamma candidates pass at the others.
  sample = lambda seed: mixing.log_gamma_sample(alpha, (20000,), seed)  # noqa: E731
  draws = (tf.function(sample, jit_compile=True) if compiled else sample)(tf.constant([1, 2]))
  assert stats.kstest(np.exp(draws.numpy().astype(np.float64)), stats.gamma(alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize("alpha", [0.2, 0.8])
def test_the_shares_follow_beta_alpha_alpha_compiled_by_xla(alpha):
  sample = tf.function(lambda seed: mixing.beta_sample(alpha, (20000,), seed), jit_compile=True)
  shares = sample(tf.constant([5, 6])).numpy().astype(np.float64)
  assert 0 <= shares.min() and shares.max() <= 1
  # Compared away from 0 and 1, where float32 cannot tell Beta(0.2, 0.2)'s draws from the ends.
  inner = shares[(shares > 1e-3) & (shares < 1 - 1e-3)]
  beta = stats.beta(alpha, alpha)
  span = beta.cdf(1 - 1e-3) - beta.cdf(1e-3)
  assert stats.kstest(inner, lambda x: (beta.cdf(x) - beta.cdf(1e-3)) / span).pvalue > 1e-3
  assert abs(len(inner) / len(shares) - span) < 0.02


def _batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
  labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
  return images, labels


def test_mixup_blends_each_image_and_its_label_with_its_partner_by_one_share():
  images, labels = _batch()
  shares = np.array([0.7, 0.2, 0.5, 0.9], np.float32)
  mixed, mixed_labels = mixing.mix(images, labels, shares=shares, use_cutmix=tf.constant([False] * 4),
                                   centres=tf.zeros((4, 2)), mixed=tf.constant([True, True, True, False]))
  partner = images[::-1]
  expected = shares[:, None, None, None] * images + (1 - shares[:, None, None, None]) * partner
  expected[3] = images[3]  # not mixed
  np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6)
  expected_labels = shares[:, None] * labels + (1 - shares[:, None]) * labels[::-1]
  expected_labels[3] = labels[3]
  np.testing.assert_allclose(mixed_labels.numpy(), expected_labels, rtol=1e-6)


def test_cutmix_pastes_a_box_and_the_label_share_is_the_area_left():
  images, labels = _batch()
  shares = np.array([0.75, 0.75, 0.0, 0.5], np.float32)  # a box of a quarter, the whole image, half
  centres = np.array([[0.5, 0.5], [0.0, 0.0], [0.5, 0.5], [0.5, 0.5]], np.float32)
  mixed, mixed_labels = mixing.mix(images, labels, shares=shares, use_cutmix=tf.constant([True] * 4),
                                   centres=centres, mixed=tf.constant([True] * 4))
  mixed = mixed.numpy()
  partner = images[::-1]
  # Image 0: a 4×4 box in the middle (side √0.25 of 8) from its partner, the rest its own.
  np.testing.assert_array_equal(mixed[0, 2:6, 2:6], partner[0, 2:6, 2:6])
  outside = np.ones((8, 8), bool)
  outside[2:6, 2:6] = False
  np.testing.assert_array_equal(mixed[0][outside], images[0][outside])
  # Image 1: the same box centred on a corner, clipped: 2×2 pixels, so 15/16 of its own label left.
  np.testing.assert_array_equal(mixed[1, :2, :2], partner[1, :2, :2])
  np.testing.assert_array_equal(mixed[1, 2:], images[1, 2:])
  np.testing.assert_allclose(mixed_labels.numpy()[1], 15 / 16 * labels[1] + 1 / 16 * labels[2])
  np.testing.assert_array_equal(mixed[2], partner[2])  # share 0: all of the partner
  own = (mixed[3] == images[3]).all(axis=-1).mean()
  np.testing.assert_allclose(mixed_labels.numpy()[3], own * labels[3] + (1 - own) * labels[0], rtol=1e-6)


def test_the_class_weights_follow_the_mixed_label():
  mixed = np.array([[0.25, 0.75, 0.0]], np.float32)
  y_pred = np.array([[0.2, 0.7, 0.1]], np.float32)
  loss = train.ClassWeightedCrossentropy([1.0, 3.0, 1.0])
  expected = -(mixed * np.log(y_pred)).sum() * (0.25 * 1.0 + 0.75 * 3.0)
  np.testing.assert_allclose(keras.ops.convert_to_numpy(loss.call(mixed, y_pred)), [expected], rtol=1e-5)


def _wrapper(**flags):
  cfg = config_lib.TrainConfig(data_dir="unused", seed=3, weights="none", **flags)
  inputs = keras.Input((32, 32, 3), dtype="uint8")
  pooled = keras.layers.GlobalAveragePooling2D()(keras.ops.cast(inputs, "float32") / 255.0)
  inner = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
  return cfg, model_lib.build_training_model(inner, 32, cfg.seed, augment=False, mixing=config_lib.mixing(cfg))


def test_mixing_trains_under_xla_and_leaves_evaluation_unmixed():
  cfg, wrapper = _wrapper(mixup=0.4, cutmix=1.0)
  assert isinstance(wrapper, mixing.MixingTrainer)
  train.compile_model(wrapper, tf.distribute.get_strategy(), cfg, 1e-3, xla=True,
                      class_weights=np.array([1.0, 2.0, 1.0]))
  images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
  labels = np.eye(3, dtype=np.float32)[np.arange(16) % 3]
  history = wrapper.fit(images, labels, batch_size=8, epochs=2, verbose=0).history
  assert np.isfinite(history["loss"]).all()
  # Unmixed labels are one-hot: the accuracy of an evaluation is of whole images.
  evaluated = wrapper.evaluate(images, labels, batch_size=8, verbose=0, return_dict=True)
  predicted = wrapper.predict(images, batch_size=8, verbose=0).argmax(axis=1)
  assert evaluated["accuracy"] == pytest.approx((predicted == labels.argmax(axis=1)).mean())
  _, plain = _wrapper()
  assert not isinstance(plain, mixing.MixingTrainer)  # both off: Keras's own step


def test_the_training_step_hands_keras_a_mixed_uint8_batch_and_soft_labels(monkeypatch):
  _, wrapper = _wrapper(mixup=0.4, cutmix=1.0)
  keras_step = next(c for c in type(wrapper).__mro__[1:] if "train_step" in vars(c))  # what super() calls
  seen = []
  monkeypatch.setattr(keras_step, "train_step", lambda self, data: seen.append(data) or {})
  images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  labels = np.eye(3, dtype=np.float32)[np.arange(8) % 3]
  wrapper.train_step((tf.constant(images), tf.constant(labels)))
  (mixed, mixed_labels), = seen
  assert mixed.dtype == tf.uint8 and mixed.shape == images.shape
  changed = (mixed.numpy() != images).any(axis=(1, 2, 3))
  soft = (mixed_labels.numpy() % 1 != 0).any(axis=1)
  assert changed.sum() >= 6 and soft.sum() >= 6  # every image mixed (--mix_probability=1), bar λ ≈ 1
  np.testing.assert_array_equal(changed, soft | changed)  # a soft label comes with a changed image


def test_each_replica_mixes_with_its_own_draw():
  first, second = helpers.draws_on_two_replicas(
      'mixing.MixingTrainer(*(lambda x: (x, tf.keras.layers.Dense(2)(x)))(tf.keras.Input((4,))), mixup=0.4, seed=3)',
      'drawer.draw(8, drawer.step_seed())["shares"]')
  assert not np.allclose(first, second), "two replicas drew the same shares"


def test_mixing_shapes_the_fingerprint_and_nonsense_is_refused():
  plain = run_state.fingerprint(config_lib.TrainConfig(data_dir="d"), "sha", 1)
  assert plain["mixing"] is None
  # Without mixing the probability means nothing; records from before mixing existed are unmixed.
  assert run_state.differences(plain, run_state.fingerprint(
      config_lib.TrainConfig(data_dir="d", mix_probability=0.5), "sha", 1)) == []
  assert run_state.differences({k: v for k, v in plain.items() if k != "mixing"}, plain) == []
  mixed = run_state.fingerprint(config_lib.TrainConfig(data_dir="d", cutmix=1.0), "sha", 1)
  assert run_state.differences(plain, mixed) == ["mixing: None → {'mixup': 0.0, 'cutmix': 1.0, 'probability': 1.0}"]
  for flags, message in (({"mixup": -0.2}, "--mixup=-0.2: expected α ≥ 0"),
                         ({"cutmix": float("inf")}, "--cutmix=inf: expected α ≥ 0"),
                         ({"mix_probability": 0.0}, "--mix_probability=0.0 must be above 0 and at most 1")):
    with pytest.raises(config_lib.cli.UserError, match=message):
      config_lib.validated(config_lib.TrainConfig(data_dir="d", **flags))
