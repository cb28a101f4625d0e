"""Callbacks that span both stages and survive restarts.

The stock ModelCheckpoint would save the training wrapper and CSVLogger fails
on non-local paths (TF 2.21 / Keras 3.15: "'GFile' object has no attribute
'closed'"), so the best model and the history have small callbacks of their own
that write through tfrecords.fileio.
"""

import csv
import io
import math
import os
import posixpath
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from job import keras_compat, model as model_lib
from tfrecords import cli, fileio


def _plain(value):
  """A callback's number as JSON holds it (Keras keeps some as numpy scalars; ±inf stays)."""
  if value is None or isinstance(value, (int, np.integer)):
    return None if value is None else int(value)
  return float(value)


def better(mode: str, value: float, best: float | None) -> bool:
  if best is None or math.isnan(best):
    return not math.isnan(value)
  return value > best if mode == "max" else value < best


class BestModelCheckpoint(keras.callbacks.Callback):
  """Saves the inner model (float32) whenever `monitor` improves.

  The best value so far lives in `state_path` beside the model, so stage 2 and
  a resumed run save only a model better than any saved before (as Keras's
  `initial_value_threshold` would, carried across fits)."""

  def __init__(self, inner, model_path, state_path, monitor, mode, stage, fingerprint, write=True):
    super().__init__()
    self.inner, self.model_path, self.state_path = inner, model_path, state_path
    self.monitor, self.mode, self.stage, self.write = monitor, mode, stage, write
    self.fingerprint = fingerprint
    self.best = None
    if tf.io.gfile.exists(state_path):
      state = fileio.read_json(state_path)
      if state.get("monitor") == monitor:
        self.best = state["value"]

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    if value is None:
      logging.warning("best model: %s is not in the logs (%s)", self.monitor, sorted(logs or {}))
      return
    value = float(value)
    if not better(self.mode, value, self.best):
      return
    logging.info("epoch %d: %s improved from %s to %.4f, saving %s", epoch + 1, self.monitor,
                 "none" if self.best is None else f"{self.best:.4f}", value, self.model_path)
    self.best = value
    if self.write:
      with fileio.local_copy_then_upload(self.model_path, ".keras") as tmp:
        model_lib.float32_copy(self.inner).save(tmp)
      fileio.write_json(self.state_path, {"monitor": self.monitor, "value": value, "epoch": epoch,
                                          "stage": self.stage, "fingerprint": self.fingerprint})


class HistoryCSV(keras.callbacks.Callback):
  """history.csv: one row per epoch of both stages, with `stage` and a continuous `epoch`.

  Rewritten whole each epoch (non-local files cannot be appended to); a resumed
  run replaces rows from the epochs it repeats."""

  def __init__(self, path, stage, write=True):
    super().__init__()
    self.path, self.stage, self.write = path, stage, write

  def _read(self):
    if not tf.io.gfile.exists(self.path):
      return []
    with tf.io.gfile.GFile(self.path, "r") as f:
      return list(csv.DictReader(f))

  def on_epoch_end(self, epoch, logs=None):
    if not self.write:
      return
    row = {"stage": self.stage, "epoch": epoch,
           "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))}
    row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
    rows = [r for r in self._read() if int(r["epoch"]) < epoch] + [row]
    columns = list(dict.fromkeys(["stage", "epoch", *(k for r in rows for k in r)]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_atomic(self.path, out.getvalue())


def in_tuning_trial() -> bool:
  return bool(os.environ.get("CLOUD_ML_TRIAL_ID"))


def hypertune_reporter():
  """cloudml-hypertune's reporter, once its metric file is known to be writable by this user.

  The library rewrites CLOUD_ML_HP_METRIC_FILE (default /tmp/hypertune/output.metrics) at every
  report and creates its folder when it starts; where the platform's folder is writable by root
  only, a non-root image cannot report (GoogleCloudPlatform/cloudml-hypertune#6, open). The GPU
  image creates /var/hypertune and /tmp/hypertune for its user (Dockerfile); elsewhere, this
  stops the trial before it trains, in one line, instead of failing at its first epoch."""
  import hypertune  # pylint: disable=g-import-not-at-top
  path = os.environ.get("CLOUD_ML_HP_METRIC_FILE", "/tmp/hypertune/output.metrics")
  try:
    reporter = hypertune.HyperTune()
    with open(reporter.metric_path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise cli.UserError(f"tuning trial: cloudml-hypertune cannot write its metric file {path} as uid {os.getuid()} "
                        f"({e.strerror or e}): the tuning service would never get a figure. Run the trial as a "
                        "user who can write that folder (GoogleCloudPlatform/cloudml-hypertune#6)") from e
  return reporter


class HypertuneReporter(keras.callbacks.Callback):
  """Reports `monitor` to Vertex AI hyperparameter tuning when the job runs as a trial.

  Vertex AI sets CLOUD_ML_TRIAL_ID in a tuning trial; cloudml-hypertune writes
  the figure where the tuning service reads it."""

  def __init__(self, monitor):
    super().__init__()
    self.monitor, self.reporter = monitor, hypertune_reporter()

  def on_epoch_end(self, epoch, logs=None):
    if self.monitor in (logs or {}):
      self.reporter.report_hyperparameter_tuning_metric(
          hyperparameter_metric_tag=self.monitor, metric_value=float(logs[self.monitor]), global_step=epoch)


class NonFiniteLoss(cli.UserError):
  """The training loss became NaN or infinite: the run stops, and publishes nothing from it."""


class CheckWritesAllowed(keras.callbacks.Callback):
  """First of the callbacks: stops the job once its writes are forbidden (the model_dir's lease
  lost, job/run_state.py), before any later callback writes (TensorBoard, the backup)."""

  def __init__(self, model_dir: str):
    super().__init__()
    self.model_dir = model_dir

  def on_train_batch_end(self, batch, logs=None):
    fileio.check_write(None)  # what the heartbeat knows: no look at the lease on every step

  def on_epoch_end(self, epoch, logs=None):
    fileio.check_write(self.model_dir)  # the epoch's writes follow: the lease is looked at


class StopOnNonFiniteLoss(keras.callbacks.Callback):
  """Stops the job, naming the stage, epoch and step, when the loss is NaN or infinite.

  Keras's TerminateOnNaN only ends `fit`, after which the job would mark the stage finished
  and go on to publish a NaN model. This raises instead, before the epoch's end, so the best
  model, the stage marker and the backup all stay as they were before it."""

  def __init__(self, stage: int, learning_rate: float):
    super().__init__()
    self.stage, self.learning_rate = stage, learning_rate
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      raise NonFiniteLoss(f"stage {self.stage}, epoch {self._epoch + 1}, step {batch + 1}: the training "
                          f"loss is {float(loss)} (learning rate {self.learning_rate:.3g}); the best model "
                          "and the backups keep what was saved before it. Lower "
                          f"--stage{self.stage}_lr, or check the data")


class Preempted(Exception):
  """SIGTERM arrived and the backup is saved: the process should exit and be restarted."""


def random_states(model: keras.Model) -> list:
  """The model's SeedGenerator states (the augmentation's, the mixing's), in the model's order,
  which a rebuilt model shares (their names do not: Keras numbers them per process)."""
  return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class PreemptibleBackup(keras.callbacks.BackupAndRestore):
  """Keras's BackupAndRestore, which also backs up and stops on SIGTERM.

  Vertex AI sends SIGTERM when it reclaims a spot VM (or for TPU maintenance)
  and SIGKILL about 30 s later. The handler only raises a flag; after the
  running step, this saves the backup and raises `Preempted`. A normal stop
  would not do: BackupAndRestore deletes its backup when `fit` ends, and the
  stage would be marked finished.

  Keras 3.15 writes the backup in place, so a SIGKILL during the write leaves a
  file that cannot be read ("file signature not found") and the restart fails:
  here the weights are written beside it and moved into place, then the
  metadata. Two more changes, for step-level backups (`save_freq`=N): it
  records the epoch it is in (Keras records only the last finished epoch of
  this `fit`, 0 before any, so a backup taken mid-epoch after a restart points
  to the stage's start), and it also saves at each epoch's end. Keras resumes a
  backup at the start of the epoch recorded, with the weights as saved.

  With several workers, each worker restores the chief's backup (`restore_dir`)
  and saves its own apart. Each stops at the end of its own current step, so on
  SIGTERM a worker a step ahead waits for the others until SIGKILL: the backup
  on SIGTERM is best effort there, and the restart resumes from the chief's
  latest backup either way.

  Place it last among the callbacks: at an epoch's end the others (history,
  best model) have then run before the backup says that epoch is done."""

  def __init__(self, backup_dir, save_freq="epoch", restore_dir=None, fingerprint=None,
               stateful_callbacks=()):
    super().__init__(backup_dir, save_freq=save_freq)
    keras_compat.check_backup_internals(self)  # the private parts of Keras used below
    self.restore_dir = restore_dir or backup_dir  # another worker's backup (the chief's) to resume from
    self.fingerprint = fingerprint  # the run's: a backup of another run is not restored
    self.stateful_callbacks = list(stateful_callbacks)
    self.requested = False
    self._previous_handler = None

  def _request(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a backup after the current step")
    self.requested = True

  def on_train_begin(self, logs=None):
    own_paths = self._weights_path, self._training_metadata_path
    self._weights_path = fileio.join(self.restore_dir, posixpath.basename(self._weights_path))
    self._training_metadata_path = fileio.join(self.restore_dir,
                                               posixpath.basename(self._training_metadata_path))
    saved = (fileio.read_json(self._training_metadata_path)
             if tf.io.gfile.exists(self._training_metadata_path) else None)
    try:
      if saved is not None and saved.get("fingerprint") == self.fingerprint:
        super().on_train_begin(logs)  # restores the weights and the epoch from restore_dir
        self._restore_callback_states(saved.get("callbacks", {}))
        self._restore_random_states(saved.get("random_states"))
    finally:
      self._weights_path, self._training_metadata_path = own_paths
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      self._previous_handler = signal.signal(signal.SIGTERM, self._request)

  def on_epoch_begin(self, epoch, logs=None):
    self._current_epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    super().on_train_batch_end(batch, logs)
    if self.requested:
      self._save_and_stop(f"epoch {self._current_epoch + 1}, step {batch + 1}")

  def on_epoch_end(self, epoch, logs=None):
    super().on_epoch_end(epoch, logs)  # now resumes at epoch + 1; saves when save_freq="epoch"
    if self.save_freq != "epoch":
      self._save_model()
    if self.requested:  # arrived during validation: the epoch is done and saved
      self._stop(f"the end of epoch {epoch + 1}")

  def on_train_end(self, logs=None):
    self._restore_handler()
    super().on_train_end(logs)

  def _save_model(self):
    with fileio.local_copy_then_upload(self._weights_path, ".weights.h5") as tmp:
      self.model.save_weights(tmp)
    fileio.write_json(self._training_metadata_path,  # after the weights it describes
                      {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                       "fingerprint": self.fingerprint, "callbacks": self._callback_states(),
                       "random_states": [v.numpy().tolist() for v in random_states(self.model)]})

  def _restore_random_states(self, states: list | None):
    # The augmentation's and the mixing's SeedGenerator states are not weights: save_weights
    # leaves them out, and a resumed stage would draw its first epochs' augmentation again.
    variables = random_states(self.model)
    if states is None or len(states) != len(variables):  # a backup from before they were saved
      return
    for variable, value in zip(variables, states):
      variable.assign(np.asarray(value, dtype=variable.dtype))

  # What EarlyStopping and ReduceLROnPlateau count between epochs: saved with the backup, so
  # a resumed stage stops and lowers the rate exactly where an uninterrupted one would.
  STATE = {"EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
           "ReduceLROnPlateau": ("wait", "best", "cooldown_counter")}

  def _callback_states(self) -> dict:
    return {type(c).__name__: {name: _plain(getattr(c, name)) for name in self.STATE[type(c).__name__]}
            for c in self.stateful_callbacks}

  def _restore_callback_states(self, states: dict):
    for callback in self.stateful_callbacks:
      for name, value in states.get(type(callback).__name__, {}).items():
        setattr(callback, name, value)
      if type(callback).__name__ in states:
        logging.info("resumed %s: %s", type(callback).__name__, states[type(callback).__name__])

  def _save_and_stop(self, where):
    self._save_model()
    self._stop(where)

  def _stop(self, where):
    self._restore_handler()
    raise Preempted(f"backup saved in {self.backup_dir} at {where}")

  def _restore_handler(self):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
