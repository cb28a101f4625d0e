"""--backbone: every backbone of the registry builds as job/backbones.py says, takes the seed's
preprocessing, fine-tunes its share in stage 2, and saves a model the seed's plain load_model reads.
One backbone per family trains a step in each stage; one (EfficientNet-B0) runs job.train whole,
as on a TPU (XLA, bfloat16)."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import helpers
from helpers import run_module
from job import backbones, config as config_lib, model as model_lib, train

FAMILIES = ("resnet50v2", "efficientnet_b0", "efficientnetv2_b0", "convnext_tiny")  # and resnet50, everywhere


def _images(n=4, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.mark.slow  # builds all thirteen (about a minute)
@pytest.mark.parametrize("name", backbones.NAMES)
def test_the_registry_says_what_each_backbone_is(name):
  spec = backbones.get(name)
  inner = model_lib.build_inner_model("none", num_classes=7, backbone=name)
  assert inner.name == spec.model_name and model_lib.backbone_name(inner) == name
  layers = model_lib.flattened(model_lib.backbone_of(inner))
  assert len(layers) == spec.layers
  names = [layer.name for layer in layers]
  if name == "resnet50":
    assert spec.fine_tune_layers == 50  # the seed's
  else:
    start = backbones.fine_tune_start(names)
    assert len(names) - start == spec.fine_tune_layers
    assert backbones.block_of(names[start]) != backbones.block_of(names[start - 1])  # a whole block
    assert abs(spec.fine_tune_layers / spec.layers - backbones.FINE_TUNE_SHARE) < 0.05
  model_lib.set_trainable_for_stage(inner, stage=2)
  trainable = [layer for layer in layers if layer.trainable]
  assert trainable and layers.index(trainable[0]) >= spec.layers - spec.fine_tune_layers
  assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
  assert inner(model_lib.preprocess(_images(1)), training=False).shape == (1, 7)
  keras.backend.clear_session()


@pytest.mark.parametrize("scaling, expected", [
    ("mean_std", lambda rgb: (rgb - np.array(backbones.IMAGENET_MEAN_RGB)) / np.array(backbones.IMAGENET_STD_RGB)),
    ("symmetric", lambda rgb: rgb / 127.5 - 1),
    ("v2", lambda rgb: rgb / 128.0 - 1),
])
def test_the_front_undoes_the_seeds_preprocessing_in_float32_under_mixed_precision(scaling, expected):
  spec = next(b for b in backbones.REGISTRY.values() if b.scaling == scaling)
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    inputs = x = keras.Input((None, None, 3))
    for layer in model_lib.input_front(spec):
      x = layer(x)
    front = keras.Model(inputs, x)  # as the inner model holds it
    rgb = _images(8, 16).astype(np.float64)
    out = front(model_lib.preprocess(rgb.astype(np.uint8))).numpy()
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected(rgb), atol=1.5e-5)
  assert model_lib.input_front(backbones.get("resnet50")) == []  # the seed's ResNet-50 takes it as is


def test_resnet50_is_the_seeds_model_to_the_weight():
  keras.utils.set_random_seed(3)
  ours = model_lib.build_inner_model("none", num_classes=7)
  keras.utils.set_random_seed(3)
  backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
  inputs = keras.Input((None, None, 3))
  x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
  x = keras.layers.Dropout(0.3)(x)
  seeds = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(x))
  assert [type(layer).__name__ for layer in ours.layers] == [type(layer).__name__ for layer in seeds.layers]
  assert [w.shape for w in ours.weights] == [w.shape for w in seeds.weights]
  assert all(np.array_equal(a, b) for a, b in zip(ours.get_weights(), seeds.get_weights()))


def test_efficientnet_is_one_graph_whatever_its_weights_come_from(tmp_path, monkeypatch):
  """Keras's EfficientNet adds a Rescaling to its stem only for weights="imagenet": the backbone
  here starts after the stem's scaling, so the ImageNet build and the others are the same layers."""
  from keras.src.utils import file_utils
  full = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3))
  path = str(tmp_path / "efficientnetb0_notop.weights.h5")
  full.save_weights(path)
  monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: path)  # "downloaded" from the cache
  imagenet = model_lib.build_backbone("imagenet", "efficientnet_b0")
  plain = model_lib.build_backbone("none", "efficientnet_b0")
  from_file = model_lib.build_backbone(path, "efficientnet_b0")

  def layers(model):
    return [(type(layer).__name__, layer.name) for layer in model.layers[1:]]
  assert layers(imagenet) == layers(plain) == layers(from_file)
  assert not any(type(layer).__name__ in ("Rescaling", "Normalization") for layer in imagenet.layers)
  assert all(np.array_equal(a, b) for a, b in zip(imagenet.get_weights(), from_file.get_weights()))
  with pytest.raises(config_lib.cli.UserError, match=r"^--weights=.*efficientnetb0_notop.weights.h5 is not a "
                     r"ResNet50V2 no-top weights file \(--backbone=resnet50v2\): "):
    model_lib.build_backbone(path, "resnet50v2")


@pytest.mark.slow  # a step of each stage for four backbones
@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_trains_a_step_per_stage_and_saves_what_plain_load_model_reads(name, tmp_path):
  keras.utils.set_random_seed(0)
  inner = model_lib.build_inner_model("none", num_classes=7, backbone=name)
  wrapper = model_lib.build_training_model(inner, 32)
  cfg = config_lib.TrainConfig(data_dir="unused", backbone=name, run_eagerly=True)  # eager: no minute-long trace
  images, labels = _images(4), np.eye(7, dtype=np.float32)[[0, 1, 2, 3]]
  for stage in (1, 2):
    model_lib.set_trainable_for_stage(inner, stage)
    train.compile_model(wrapper, tf.distribute.get_strategy(), cfg, 1e-3, xla=False)
    before = [w.numpy().copy() for w in inner.trainable_weights]
    wrapper.fit(images, labels, epochs=1, verbose=0)
    moved = [not np.array_equal(a, w.numpy()) for a, w in zip(before, inner.trainable_weights)]
    # Nearly all: deep in a randomly initialised network a gradient can be too small for one
    # Adam step to change a float32 weight (EfficientNet's squeeze-excite kernels, say).
    assert moved[-1] and sum(moved) >= 0.9 * len(moved), (stage, sum(moved), len(moved))
  assert not inner.get_layer("bgr_to_rgb").trainable and inner.get_layer("bgr_to_rgb").weights
  expected = wrapper(images, training=False).numpy()
  np.testing.assert_allclose(inner(model_lib.preprocess(images), training=False).numpy(), expected, atol=1e-5)
  inner.save(tmp_path / "best_model.keras")
  loaded = keras.saving.load_model(tmp_path / "best_model.keras")  # safe mode, nothing of ours
  np.testing.assert_allclose(loaded.predict(model_lib.preprocess(images), verbose=0), expected, atol=1e-5)
  keras.mixed_precision.set_global_policy("mixed_float16")  # trained on a GPU: saved in float32
  try:
    mixed = model_lib.build_inner_model("none", num_classes=7, backbone=name)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  mixed.set_weights(inner.get_weights())
  copy = model_lib.float32_copy(mixed)
  assert copy.get_layer("avg_pool").dtype_policy.name == "float32"
  assert all(np.array_equal(a, b) for a, b in zip(inner.get_weights(), copy.get_weights()))
  keras.backend.clear_session()


@pytest.fixture(scope="module")
def efficientnet_run(shards_dir, tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("efficientnet") / "run")
  # As on a TPU: the whole step XLA-compiled, static shapes, bfloat16, several steps per execution.
  flags = [f"--data_dir={shards_dir}", f"--model_dir={run_dir}", "--backbone=efficientnet_b0", "--weights=none",
           "--image_size=32", "--global_batch_size=16", "--stage1_epochs=1", "--stage2_epochs=1", "--debug",
           "--strategy=one_device", "--jit_compile=on", "--mixed_precision=bfloat16", "--steps_per_execution=2",
           # and the augmentation a user would pair it with
           "--augment=dermoscopy", "--label_smoothing=0.1", "--mixup=0.4", "--cutmix=1.0"]
  run_module("job.train", *flags)
  return run_dir, flags


@pytest.mark.slow
def test_an_efficientnet_run_serves_predicts_and_loads_in_the_seeds_example(efficientnet_run, synthetic_dir,
                                                                           tmp_path):
  run_dir, _ = efficientnet_run
  run_config = json.load(open(os.path.join(run_dir, "run_config.json")))
  assert run_config["flags"]["backbone"] == "efficientnet_b0"
  assert run_config["xla"] is True and run_config["dtype_policy"] == "mixed_bfloat16"
  assert run_config["fingerprint"]["backbone"] == "efficientnet_b0"
  assert run_config["fingerprint"]["augmentation"]["preset"] == "dermoscopy"
  assert run_config["fingerprint"]["label_smoothing"] == 0.1
  assert run_config["fingerprint"]["mixing"] == {"mixup": 0.4, "cutmix": 1.0, "probability": 1.0}
  assert run_config["fingerprint"]["fine_tune_layers"] == backbones.get("efficientnet_b0").fine_tune_layers
  assert json.load(open(os.path.join(run_dir, "metrics.json")))["predictor"]["backbones"] == ["efficientnet_b0"]
  paths = helpers.synthetic_image_paths(synthetic_dir, 2)
  run_module("job.predict", f"--model_dir={run_dir}", f"--output={tmp_path / 'p.csv'}", *paths)
  predicted = pd.read_csv(tmp_path / "p.csv")
  serve = tf.saved_model.load(os.path.join(run_dir, "serving", "1")).signatures["serving_default"]
  served = serve(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))["probabilities"].numpy()
  np.testing.assert_allclose(served, predicted[[c for c in predicted if c.startswith("p_")]].to_numpy(), atol=1e-5)
  label, probability = helpers.run_seed_inference_example(run_dir, paths[0], tmp_path)
  assert label in run_config["class_names"] and 0 <= probability <= 1


@pytest.mark.slow
def test_a_run_is_not_resumed_with_another_backbone(efficientnet_run):
  _, flags = efficientnet_run
  result = run_module("job.train", *[f for f in flags if not f.startswith("--backbone")], "--backbone=resnet50v2",
                      check=False)
  assert result.returncode == 1
  assert "backbone: 'efficientnet_b0' → 'resnet50v2'" in result.stderr.strip().splitlines()[-1]
