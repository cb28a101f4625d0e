"""The training step as an accelerator runs it: augmentation that XLA compiles, and XLA decided by the job."""

import json
import math
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO, python_warnings, run_module
from job import augment, config as config_lib, model as model_lib, performance, train

# A smooth image (bilinear upsampling of random 8×8 noise) and a rough one (pixel noise).
RNG = np.random.default_rng(0)
IMAGES = np.concatenate([
    tf.image.resize(RNG.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32), (64, 48)).numpy(),
    RNG.uniform(0, 255, (1, 64, 48, 3)).astype(np.float32)])
BATCH = len(IMAGES)
# Both ours and Keras's sample bilinearly at the same coordinates; they differ only in how
# float32 rounds those coordinates (~1e-5 px), times the steepest step between neighbouring
# pixels (< 255 grey levels per px): a few thousandths of a grey level, on every pixel, borders
# (reflected) included. A mistake in angle, centre, direction or fill shows as tens of levels.
TOLERANCE = 0.01


def warp(angles_degrees=0.0, zoom=1.0, flip=False):
  matrices = augment.transform_matrices(tf.fill([BATCH], angles_degrees * math.pi / 180),
                                        tf.fill([BATCH], zoom), tf.fill([BATCH], flip))
  return augment.affine_sample(tf.constant(IMAGES), matrices).numpy()


@pytest.mark.parametrize("degrees", [20.0, -33.0, 36.0])
def test_rotation_matches_keras_random_rotation(degrees):
  fraction = degrees / 360  # Keras's factor is a fraction of a full turn
  expected = keras.layers.RandomRotation((fraction, fraction), fill_mode="reflect")(IMAGES, training=True)
  assert np.abs(warp(angles_degrees=degrees) - expected).max() < TOLERANCE


@pytest.mark.parametrize("zoom", [0.9, 1.1])
def test_zoom_matches_keras_random_zoom(zoom):
  expected = keras.layers.RandomZoom((zoom - 1, zoom - 1), fill_mode="reflect")(IMAGES, training=True)
  assert np.abs(warp(zoom=zoom) - expected).max() < TOLERANCE


def test_flip_mirrors_and_contrast_matches_tensorflows():
  assert np.array_equal(warp(flip=True), IMAGES[:, :, ::-1])
  factors = tf.constant([0.9, 1.0, 1.1])
  expected = [tf.clip_by_value(tf.image.adjust_contrast(image, float(f)), 0, 255) for image, f in
              zip(IMAGES, factors.numpy())]
  assert np.abs(augment.adjust_contrast(tf.constant(IMAGES), factors) - np.stack(expected)).max() < 1e-3


def test_random_draws_stay_in_the_seed_layers_ranges():
  layer = model_lib.augmentation(seed=3)
  draws = {k: v.numpy() for k, v in layer.draw(20_000).items()}
  max_angle = 0.1 * 2 * math.pi  # RandomRotation(0.1): ±36°
  assert -max_angle <= draws["angles"].min() < -0.95 * max_angle
  assert 0.95 * max_angle < draws["angles"].max() <= max_angle
  for key in ("zooms", "contrasts"):  # RandomZoom(0.1), RandomContrast(0.1)
    assert 0.9 <= draws[key].min() < 0.905 and 1.095 < draws[key].max() <= 1.1, key
  assert 0.48 < draws["flips"].mean() < 0.52
  images = tf.constant(IMAGES)
  assert layer(images, training=False) is images
  augmented = layer(images, training=True).numpy()
  assert augmented.shape == IMAGES.shape and not np.allclose(augmented, IMAGES)
  assert augmented.min() >= 0 and augmented.max() <= 255


def test_xla_decision_is_the_jobs(monkeypatch):
  assert not performance.use_xla("auto", "one_device")  # a CPU: XLA measured 6× slower
  assert performance.use_xla("auto", "tpu")
  assert performance.use_xla("on", "one_device") and not performance.use_xla("off", "tpu")
  assert not performance.use_xla("on", "one_device", run_eagerly=True)
  monkeypatch.setattr(tf.config, "list_physical_devices",
                      lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
  assert performance.use_xla("auto", "one_device")  # one GPU
  assert not performance.use_xla("auto", "mirrored") and not performance.use_xla("auto", "multi_worker")
  assert performance.use_xla("on", "mirrored")  # several GPUs: only when asked for


def _small_model(augmentation: keras.layers.Layer) -> keras.Model:
  inputs = keras.Input((32, 32, 3))
  pooled = keras.layers.GlobalAveragePooling2D()(augmentation(inputs))
  return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(pooled))


def test_compile_refuses_a_model_that_xla_cannot_compile():
  cfg = config_lib.TrainConfig(data_dir="unused")
  keras_layers = _small_model(keras.layers.RandomRotation(0.1, name="keras_rotation"))
  with pytest.raises(RuntimeError, match="keras_rotation"):
    train.compile_model(keras_layers, tf.distribute.get_strategy(), cfg, 1e-3, xla=True)
  ours = _small_model(model_lib.augmentation())
  train.compile_model(ours, tf.distribute.get_strategy(), cfg, 1e-3, xla=True)
  assert ours.jit_compile


@pytest.mark.slow
def test_training_step_compiles_under_xla_in_the_tpu_configuration(shards_dir, tmp_path):
  """One device, static shapes, mixed_bfloat16, several steps per execution: both stages
  train with the whole step (augmentation included) XLA-compiled."""
  model_dir = tmp_path / "xla"
  result = run_module("job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}",
                      "--strategy=one_device", "--jit_compile=on", "--mixed_precision=bfloat16",
                      "--steps_per_execution=2", "--weights=none", "--noserving", "--image_size=32",
                      "--global_batch_size=16", "--stage1_epochs=1", "--stage2_epochs=1", "--debug",
                      "--noevaluate", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
  log = result.stdout + result.stderr
  assert python_warnings(result.stderr) == []  # a healthy run's log warns of nothing
  assert "Compiled cluster using XLA" in log
  assert "Model doesn't support `jit_compile=True`" not in log
  config = json.loads((model_dir / "run_config.json").read_text())
  assert config["xla"] is True and config["dtype_policy"] == "mixed_bfloat16"
  assert (model_dir / "checkpoints" / "stage2.json").exists()


REPLICA_DRAWS = """
import json, tensorflow as tf
from job import distribute_utils, model as model_lib
distribute_utils.use_logical_cpu_devices(2)
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
  layer = model_lib.augmentation(seed=3)
step = tf.function(lambda: layer.draw(4)["angles"])
print(json.dumps([[t.numpy().tolist() for t in strategy.experimental_local_results(strategy.run(step))]
                  for _ in range(2)]))
"""


def test_each_replica_draws_its_own_augmentation():
  """Under MirroredStrategy every replica reads the same SeedGenerator state: without the replica
  folded into the seed, two replicas transform their halves of a batch identically."""
  result = subprocess.run([sys.executable, "-c", REPLICA_DRAWS], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  steps = json.loads(result.stdout.strip().splitlines()[-1])
  for first, second in steps:
    assert not np.allclose(first, second), "two replicas drew the same angles"
  assert not np.allclose(steps[0][0], steps[1][0]), "a replica drew the same angles twice"


def test_a_replicas_draws_compile_under_xla():
  """XLA over logical CPU devices cannot place the generator's state (a CPU-only limit), so the
  replica's draw is compiled here on one device, with its place in the group given."""
  layer = model_lib.augmentation(seed=3)
  draw = tf.function(lambda replica: layer.draw(4, replica=replica)["angles"], jit_compile=True)
  eager = [layer.draw(4, replica=r)["angles"].numpy() for r in (0, 1)]  # generator states 0, 1
  compiled = [draw(tf.constant(r)).numpy() for r in (0, 1)]  # states 2, 3
  assert not np.allclose(compiled[0], compiled[1]) and not np.allclose(eager[0], eager[1])
  fresh = model_lib.augmentation(seed=3)
  assert np.allclose(eager[0], fresh.draw(4, replica=0)["angles"].numpy())  # repeatable from the seed


def test_one_replica_draws_what_keras_draws_for_the_seed():
  layer, reference = model_lib.augmentation(seed=5), keras.random.SeedGenerator(5)
  angles = layer.draw(6)["angles"].numpy()
  max_angle = 0.1 * 2 * math.pi
  assert np.allclose(angles, keras.random.uniform((6,), -max_angle, max_angle, seed=reference).numpy())
