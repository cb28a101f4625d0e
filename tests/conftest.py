"""Shared fixtures: one synthetic dataset and one conversion for the whole session."""

import os
import shutil

import pytest

from helpers import NUM_IMAGES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Fixtures that train a run, render a second dataset or start a server: a test that uses one is
# slow whatever it does itself. `pytest -m "not slow"` is the quick subset to run while working.
SLOW_FIXTURES = {"trained_run", "tf215_python", "tf219_python", "scorer_python", "isic_test_conversion", "isic_training_dir"}


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  from tfrecords import synthetic
  root = tmp_path_factory.mktemp("ham10000")
  return synthetic.write_dataset(str(root), num_images=NUM_IMAGES, seed=1, layout="kaggle", workers=2)


@pytest.fixture
def small_copy(synthetic_dir, tmp_path):
  """A writable copy of the dataset (image folders and CSV only)."""
  root = tmp_path / "copy"
  root.mkdir()
  for name in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
    shutil.copytree(os.path.join(synthetic_dir, name), root / name)
  shutil.copy(os.path.join(synthetic_dir, "HAM10000_metadata.csv"), root)
  return root


@pytest.fixture(scope="session")
def source(synthetic_dir):
  from tfrecords import sources
  return sources.open_source(synthetic_dir)


@pytest.fixture(scope="session")
def shards_dir(source, tmp_path_factory):
  from tfrecords import convert
  out = str(tmp_path_factory.mktemp("shards"))
  settings = convert.Settings(source=source.description)
  convert.convert(source, out, settings, workers=2)
  return out


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
  """A ResNet-50 no-top weights file made here (ImageNet's cannot be downloaded offline)."""
  import keras
  from job import model as model_lib
  path = str(tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5")
  keras.utils.set_random_seed(7)
  model_lib.build_backbone("none").save_weights(path)
  return path


@pytest.fixture(scope="session")
def trained_run(shards_dir, weights_file, tmp_path_factory):
  """One small run of both stages with every artifact written to ram://, then copied out."""
  from helpers import copy_tree
  from job import config as config_lib, train
  cfg = config_lib.TrainConfig(data_dir=shards_dir, model_dir="ram://trained_run", weights=weights_file,
                               image_size=32, global_batch_size=16, stage1_epochs=2, stage2_epochs=1,
                               stage1_lr=1e-3, mixed_precision="off", strategy="one_device")
  metrics = train.train_and_evaluate(cfg)
  local = str(tmp_path_factory.mktemp("trained_run"))
  copy_tree("ram://trained_run", local)
  return metrics, local


@pytest.fixture(scope="session")
def tf215_python(request):
  """TensorFlow 2.15, the newest of Vertex AI's pre-built prediction containers, on its own."""
  from helpers import cached_venv
  return cached_venv(request, "tensorflow-cpu-2.15", ["tensorflow-cpu==2.15.*"])


@pytest.fixture(scope="session")
def tf219_python(request):
  """TensorFlow 2.19, the release Dockerfile.serving's TensorFlow Serving is built on."""
  from helpers import cached_venv
  return cached_venv(request, "tensorflow-cpu-2.19", ["tensorflow-cpu==2.19.*"])
