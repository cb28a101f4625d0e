"""Shared fixtures: one synthetic dataset and one conversion for the whole session."""

import os

import pytest

from helpers import NUM_IMAGES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  from tfrecords import synthetic
  root = tmp_path_factory.mktemp("ham10000")
  return synthetic.write_dataset(str(root), num_images=NUM_IMAGES, seed=1, layout="kaggle", workers=2)


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
