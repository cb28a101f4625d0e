"""Where the job leans on Keras internals: each place gated to the Keras versions checked.

Two fixes that let Keras 3's `model.fit` run under MultiWorkerMirroredStrategy
(`apply`), and the private parts of Keras that the job's own callbacks use
(`check_backup_internals`, `forget_restored_epoch`).

Upstream: keras-team/keras#20585 (open as of Keras 3.15). As shipped, `fit` on
several workers fails twice in `keras/src/backend/tensorflow/trainer.py`:

1. `_maybe_symbolic_build` builds the model's metrics and optimizer from the
   first batch, and reduces that batch across replicas to get one. Across
   workers the reduction is a collective op, and it fails: "Attempt to convert a
   value (PerReplica…) with an unsupported type". Only the batch's shapes and
   dtypes matter there, so this takes the first local replica's batch instead.
2. `reduce_per_replica` then reduces each step's logs with
   `strategy.reduce("MEAN", v, axis=0)`; the logs are scalars, so: "Invalid
   reduction dimension 0 for input with 0 dimensions". Scalars are reduced
   with `axis=None` (the mean over replicas, as MirroredStrategy gets).

We patch those two functions rather than write a custom training loop so that
every strategy trains through the same `fit`, callbacks included. The patch
applies only to the Keras versions known to need it; `tests/test_multi_worker.py`
checks on every run that the installed Keras still fails without it.
"""

import keras
import tensorflow as tf
from absl import logging

# Every Keras 3 release up to the one setup.py pins carries the bug.
AFFECTED_VERSIONS = ((3, 0), (3, 15))


def major_minor(version: str = keras.__version__) -> tuple[int, int]:
  return tuple(int(part) for part in version.split(".")[:2])


def needed(version: str = keras.__version__) -> bool:
  return AFFECTED_VERSIONS[0] <= major_minor(version) <= AFFECTED_VERSIONS[1]


def _first_local(value):
  if isinstance(value, tf.distribute.DistributedValues):
    return value.values[0]
  return value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
  """As Keras's, but takes one replica's batch instead of reducing across workers."""
  if self._distribute_strategy is None:  # pylint: disable=protected-access
    return
  if iterator is not None:
    for _, _, it in iterator:
      data_batch = tf.nest.map_structure(_first_local, next(it))
      break
  with self.distribute_strategy.scope():
    self._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access


def _patched_reduce_per_replica(original, is_multi_worker):

  def reduce_per_replica(values, strategy, reduction):
    if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
      return original(values, strategy, reduction)

    def reduce(value):
      if _first_local(value).shape.rank == 0:
        return strategy.reduce("MEAN", value, axis=None)
      return original(value, strategy, reduction)

    return tf.nest.map_structure(reduce, values)

  reduce_per_replica.patched_by_keras_compat = True
  return reduce_per_replica


def apply(fix_build: bool = True, fix_reduce: bool = True) -> bool:
  """Patches the installed Keras if its version needs it; returns whether it did.

  `fix_build`/`fix_reduce` apply one fix alone: the test that shows each is
  still needed uses them."""
  if not needed():
    return False
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  if fix_build:
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build  # pylint: disable=protected-access
  if fix_reduce and not getattr(trainer.reduce_per_replica, "patched_by_keras_compat", False):
    trainer.reduce_per_replica = _patched_reduce_per_replica(
        trainer.reduce_per_replica, trainer._collective_all_reduce_multi_worker)  # pylint: disable=protected-access
  logging.info("Keras %s: MultiWorkerMirroredStrategy fixes applied (keras-team/keras#20585)",
               keras.__version__)
  return True


# The private parts of keras.callbacks.BackupAndRestore that PreemptibleBackup
# (job/callbacks.py) reads or replaces, and the versions they were checked on.
BACKUP_INTERNALS_CHECKED = ((3, 0), (3, 15))
BACKUP_ATTRIBUTES = ("_weights_path", "_training_metadata_path", "_last_batch_seen")
BACKUP_METHODS = ("_save_model",)


def missing_backup_internals(callback: keras.callbacks.BackupAndRestore) -> list[str]:
  return ([name for name in BACKUP_ATTRIBUTES if not hasattr(callback, name)]
          + [name for name in BACKUP_METHODS if not callable(getattr(type(callback), name, None))])


def check_backup_internals(callback: keras.callbacks.BackupAndRestore):
  """Stops with a clear error, rather than a wrong resume, where Keras has changed them."""
  missing = missing_backup_internals(callback)
  if missing:
    checked = "-".join(".".join(map(str, v)) for v in BACKUP_INTERNALS_CHECKED)
    raise RuntimeError(f"Keras {keras.__version__}: BackupAndRestore has no {', '.join(missing)}; "
                       f"job/callbacks.py's PreemptibleBackup was written for Keras {checked}")


def forget_restored_epoch(model: keras.Model):
  """BackupAndRestore sets `model._initial_epoch` when it restores a backup, and Keras (3.0-3.15)
  never clears it: without this, stage 2 after a resumed stage 1 would start at stage 1's
  resumed epoch instead of its own `initial_epoch`."""
  if not hasattr(model, "_initial_epoch"):
    raise RuntimeError(f"Keras {keras.__version__}: Model has no _initial_epoch; check "
                       "job/keras_compat.forget_restored_epoch against this version")
  model._initial_epoch = None  # pylint: disable=protected-access
