"""Unit tests of the job's plumbing: pipeline, class weights, model stages, strategy choice."""

import hashlib
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from job import config as config_lib, data, distribute_utils, model as model_lib, performance, train
from tfrecords import features, manifest as manifest_lib

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def manifest(shards_dir):
  return manifest_lib.read(shards_dir)


def test_pipeline_shapes_and_dtypes(shards_dir, manifest):
  info = manifest_lib.split_info(shards_dir, manifest, "train")
  train_batches = data.train_dataset(info, IMAGE_SIZE, 8)
  images, labels = next(iter(train_batches))
  assert images.dtype == tf.uint8 and images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert labels.dtype == tf.float32 and labels.shape == (8, 7)
  assert np.allclose(labels.numpy().sum(axis=1), 1)
  # One static shape for every batch, as XLA and TPUs need, under every strategy.
  assert train_batches.element_spec[0].shape.as_list() == [8, IMAGE_SIZE, IMAGE_SIZE, 3]
  predict = data.prediction_dataset(manifest_lib.split_info(shards_dir, manifest, "validation"), IMAGE_SIZE, 8)
  assert sum(int(x.shape[0]) for x, _, _ in predict) == manifest["splits"]["validation"]["num_examples"]


def _digest(image) -> str:
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_labels_stay_with_their_images_through_the_shuffled_pipeline(shards_dir, manifest):
  info = manifest_lib.split_info(shards_dir, manifest, "train")
  # Ground truth straight from the shards: image content → label.
  truth = {}
  for record in tf.data.TFRecordDataset(info.files):
    example = features.parse_example(record, [features.IMAGE_ENCODED, features.LABEL])
    image = features.decode_and_resize(example[features.IMAGE_ENCODED], IMAGE_SIZE).numpy()
    truth[_digest(image)] = int(example[features.LABEL])
  dataset = data.train_dataset(info, IMAGE_SIZE, 16, seed=3)
  seen = 0
  for images, labels in dataset.take(2 * len(truth) // 16):
    for image, label in zip(images.numpy(), labels.numpy()):
      assert np.argmax(label) == truth[_digest(image)]
      seen += 1
  assert seen >= len(truth)


@pytest.mark.parametrize("batch_size", [7, 16, 1000])
def test_validation_batches_are_whole_and_padding_changes_no_figure(shards_dir, manifest, batch_size):
  """Padding the last validation batch (static shapes; no empty batch for any replica) leaves
  loss, accuracy and macro F1 exactly those of the real images, for a remainder of any size
  and a split smaller than one batch."""
  info = manifest_lib.split_info(shards_dir, manifest, "validation")
  validation = data.validation_dataset(info, IMAGE_SIZE, batch_size)
  assert validation.num_examples == info.num_examples
  batches = list(validation.dataset)
  assert len(batches) == validation.steps == int(np.ceil(info.num_examples / batch_size))
  assert all(images.shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3) for images, _, _ in batches)
  weights = np.concatenate([w.numpy() for _, _, w in batches])
  assert (weights > 0).sum() == info.num_examples and (weights[info.num_examples:] == 0).all()

  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8"),
                            keras.layers.Rescaling(1 / 255), keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(7, activation="softmax")])
  cfg = config_lib.TrainConfig(data_dir=shards_dir)
  train.compile_model(model, tf.distribute.get_strategy(), cfg, 1e-3, xla=False)
  padded = model.evaluate(validation.dataset, steps=validation.steps, return_dict=True, verbose=0)
  plain = data.prediction_dataset(info, IMAGE_SIZE, 1000).map(lambda x, y, _: (x, y))
  exact = model.evaluate(plain, return_dict=True, verbose=0)  # one batch, no padding, no weights
  for key in ("loss", "accuracy", "f1"):
    assert padded[key] == pytest.approx(exact[key], rel=1e-5), key


def test_class_weighted_loss_weighs_each_image_by_its_class():
  weights = np.array([2.0, 1, 1, 1, 1, 0.5, 1])
  labels = np.eye(7, dtype=np.float32)[[0, 5, 5]]
  probabilities = np.full((3, 7), 0.1, np.float32)
  probabilities[:, 0] = 0.4
  plain = keras.losses.CategoricalCrossentropy(reduction=None)(labels, probabilities).numpy()
  weighted = train.ClassWeightedCrossentropy(weights, reduction=None)(labels, probabilities).numpy()
  assert weighted == pytest.approx(plain * [2.0, 0.5, 0.5])
  # No label (the validation padding) → no loss, whatever the class weights.
  assert train.ClassWeightedCrossentropy(weights)(np.zeros((1, 7), np.float32), probabilities[:1]) == 0


def test_class_weights_are_sklearns_balanced():
  weights = data.class_weights([10, 30, 0, 60, 10, 80, 10])
  total, present = 200, 6
  assert weights[0] == pytest.approx(total / (present * 10))
  assert weights[5] == pytest.approx(total / (present * 80))
  assert weights[2] == 1.0  # an absent class gets a neutral weight
  assert weights[0] > weights[1] > weights[3] > weights[5]


def test_preprocess_is_caffe_mode():
  pixel = np.array([[[[255, 0, 10]]]], dtype=np.uint8)
  out = model_lib.preprocess(pixel).numpy()[0, 0, 0]
  # RGB→BGR, then minus the ImageNet BGR mean; no scaling to [-1, 1].
  assert out == pytest.approx([10 - 103.939, 0 - 116.779, 255 - 123.68])


@pytest.fixture
def inner():
  """A fresh seven-class inner model for each test (the stage tests change `trainable`)."""
  return model_lib.build_inner_model("none", num_classes=7)


def test_inner_model_structure(inner):
  assert inner.input_shape == (None, None, None, 3)  # any image size, the seed's 224 included
  assert inner.output_shape == (None, 7)
  assert [l.name for l in inner.layers[1:]] == ["resnet50", "avg_pool", "dropout", "probabilities"]
  assert inner.name == "ham10000_resnet50" and model_lib.backbone_name(inner) == "resnet50"
  assert inner.get_layer("dropout").rate == 0.3
  assert inner.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
  assert inner(np.zeros((1, 224, 224, 3), np.float32)).shape == (1, 7)


def test_stage_trainability(inner):
  backbone = model_lib.backbone_of(inner)
  model_lib.set_trainable_for_stage(inner, stage=1)
  assert [w.path for w in inner.trainable_weights] == ["probabilities/kernel", "probabilities/bias"]
  model_lib.set_trainable_for_stage(inner, stage=2, fine_tune_layers=50)
  top = backbone.layers[-50:]
  for layer in backbone.layers:
    expected = layer in top and not isinstance(layer, keras.layers.BatchNormalization)
    assert layer.trainable == expected, layer.name
  assert any(isinstance(l, keras.layers.BatchNormalization) for l in top)
  trainable_backbone = [w for w in inner.trainable_weights if not w.path.startswith("probabilities")]
  assert trainable_backbone and all("_bn" not in w.path for w in trainable_backbone)


def test_no_batchnorm_statistic_moves_in_a_stage_2_training_step(inner):
  """Through the training wrapper, compiled as the job compiles it: its training=True reaches
  the backbone whatever the inner call says, so only BatchNorm's being frozen keeps ImageNet's
  statistics."""
  model_lib.set_trainable_for_stage(inner, stage=2)
  wrapper = model_lib.build_training_model(inner, IMAGE_SIZE)
  train.compile_model(wrapper, tf.distribute.get_strategy(), config_lib.TrainConfig(data_dir="unused"), 1e-3,
                      xla=False)
  norms = [l for l in model_lib.backbone_of(inner).layers if isinstance(l, keras.layers.BatchNormalization)]
  before = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in norms]
  kernel = inner.get_layer("probabilities").kernel.numpy().copy()
  images = np.random.randint(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  wrapper.fit(images, np.eye(7, dtype=np.float32)[[0, 1, 2, 3]], epochs=1, verbose=0)
  assert not np.array_equal(kernel, inner.get_layer("probabilities").kernel.numpy())  # it did train
  for layer, (mean, variance) in zip(norms, before):
    assert np.array_equal(mean, layer.moving_mean.numpy()) and np.array_equal(variance, layer.moving_variance.numpy()), layer.name


def test_training_wrapper_takes_uint8_and_augments_only_in_training(inner):
  wrapper = model_lib.build_training_model(inner, IMAGE_SIZE)
  images = np.random.randint(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  inference = wrapper(images, training=False).numpy()
  expected = inner(model_lib.preprocess(images), training=False).numpy()
  assert np.allclose(inference, expected, atol=1e-5)  # wrapper = preprocess + inner, nothing else
  augment = wrapper.get_layer("augment")
  assert not np.allclose(augment(images.astype(np.float32), training=True), images)
  plain = model_lib.build_training_model(inner, IMAGE_SIZE, augment=False)
  assert "augment" not in [layer.name for layer in plain.layers]
  assert np.allclose(plain(images, training=False).numpy(), expected, atol=1e-5)


def test_weights_file_is_loaded(tmp_path):
  backbone = model_lib.build_backbone("none")
  path = str(tmp_path / "resnet50_notop.weights.h5")
  backbone.save_weights(path)
  loaded = model_lib.build_backbone(path)
  assert all(np.array_equal(a, b) for a, b in zip(backbone.get_weights(), loaded.get_weights()))
  with pytest.raises(FileNotFoundError, match="--weights=/nowhere.h5"):
    model_lib.build_backbone("/nowhere.h5")


def test_float32_copy_for_saving_after_mixed_precision():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    mixed = model_lib.build_inner_model("none", num_classes=7)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert mixed.get_layer("avg_pool").dtype_policy.name == "mixed_bfloat16"
  copy = model_lib.float32_copy(mixed)
  assert copy.get_layer("avg_pool").dtype_policy.name == "float32"
  assert all(np.array_equal(a, b) for a, b in zip(mixed.get_weights(), copy.get_weights()))


def test_strategy_choice(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert distribute_utils.resolve_strategy_name("auto") == "one_device"  # no GPU, no TPU here
  cluster = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
             "task": {"type": "worker", "index": 0}}
  monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
  assert distribute_utils.resolve_strategy_name("auto") == "multi_worker"
  assert distribute_utils.resolve_strategy_name("mirrored") == "mirrored"
  assert isinstance(distribute_utils.get_strategy("one_device"), tf.distribute.OneDeviceStrategy)


def test_tpu_choices_that_run_without_a_tpu(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  monkeypatch.setenv("TPU_NAME", "my-tpu")  # set on Cloud TPU VMs
  assert distribute_utils.resolve_strategy_name("auto") == "tpu"
  with pytest.raises(RuntimeError, match="--strategy=tpu --tpu=local: no TPU found"):
    distribute_utils.get_strategy("tpu", "local")


def test_mixed_precision_policy_choice():
  assert performance.policy_name("auto", "tpu") == "mixed_bfloat16"
  assert performance.policy_name("auto", "one_device") == "float32"  # this machine has no GPU
  assert performance.policy_name("float16", "mirrored") == "mixed_float16"
  assert performance.policy_name("off", "tpu") == "float32"


def test_a_manifest_that_disagrees_with_its_shards_is_named(shards_dir, tmp_path):
  import shutil
  data_dir = tmp_path / "edited"
  shutil.copytree(shards_dir, data_dir)
  manifest = json.load(open(data_dir / "manifest.json"))
  six = {name: index for name, index in manifest["label_map"].items() if name != "vasc"}
  edited = {**manifest, "label_map": six}
  json.dump(edited, open(data_dir / "manifest.json", "w"))
  with pytest.raises(manifest_lib.cli.UserError, match=r"manifest.json: its label_map .* differs from .*label_map.json"):
    manifest_lib.read(str(data_dir))
  json.dump(six, open(data_dir / "label_map.json", "w"))  # both edited alike: the counts still say vasc
  with pytest.raises(manifest_lib.cli.UserError, match=r"the train split holds vasc images, which its label_map"):
    manifest_lib.read(str(data_dir))
  json.dump({**six, "vasc": 9}, open(data_dir / "label_map.json", "w"))
  json.dump({**manifest, "label_map": {**six, "vasc": 9}}, open(data_dir / "manifest.json", "w"))
  with pytest.raises(manifest_lib.cli.UserError, match=r"does not number its classes 0..6"):
    manifest_lib.read(str(data_dir))


def test_a_label_beyond_the_manifests_classes_stops_the_pipeline(shards_dir):
  manifest = manifest_lib.read(shards_dir)
  info = manifest_lib.split_info(shards_dir, manifest, "train")
  six = manifest_lib.SplitInfo(info.name, info.files, info.num_examples, info.class_counts[:6])
  with pytest.raises(tf.errors.InvalidArgumentError, match=data.LABEL_OUTSIDE_MAP):
    for _ in data.validation_dataset(six, IMAGE_SIZE, 64, cache="none").dataset:
      pass
