"""One worker of a tiny two-worker `model.fit`, for tests/test_multi_worker.py.

  python multi_worker_fit.py none|build|full   (TF_CONFIG set by the test)

Every sample is the same, so the two workers' training must match training on
one device exactly: the script prints both final losses as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from job import keras_compat

FIXES = {"none": None, "build": dict(fix_build=True, fix_reduce=False), "full": {}}


def train(strategy):
  x = np.tile(np.linspace(-1, 1, 8, dtype=np.float32), (64, 1))
  y = np.tile(np.eye(3, dtype=np.float32)[1], (64, 1))
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.5), "categorical_crossentropy")
  history = model.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0)
  return history.history["loss"]


if __name__ == "__main__":
  if FIXES[sys.argv[1]] is not None:
    keras_compat.apply(**FIXES[sys.argv[1]])
  multi_worker = train(tf.distribute.MultiWorkerMirroredStrategy())
  one_device = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
  print(json.dumps({"multi_worker": multi_worker, "one_device": one_device}))
