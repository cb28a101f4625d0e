"""A run you can trust: one run per model_dir, learning rates that follow the batch, callbacks
that survive a restart, a cache that fits, and epochs of the length asked for."""

import json
import os
import re
import shutil
import time
import uuid

import keras
import numpy as np
import pytest

from job import callbacks as callbacks_lib, config as config_lib, data, optimization, run_state, train
from tfrecords import cli, fileio


def _write_records(cfg, fingerprint_of_stage):
  """Stage markers, a backup and a best-model record as a run with these settings leaves them."""
  for stage in (1, 2):
    fileio.write_json(os.path.join(cfg.checkpoint_root, "checkpoints", f"stage{stage}.json"),
                      {"stage": stage, "next_epoch": stage, "fingerprint": fingerprint_of_stage(stage)})
  fileio.write_json(os.path.join(cfg.checkpoint_root, "backup", "stage2", "training_metadata.json"),
                    {"epoch": 1, "batch": 0, "fingerprint": fingerprint_of_stage(2)})
  fileio.write_json(os.path.join(cfg.model_dir, "best_model.json"),
                    {"monitor": "val_f1", "value": 0.5, "stage": 2, "fingerprint": fingerprint_of_stage(2)})
  fileio.write_json(os.path.join(cfg.model_dir, "run_config.json"), {"image_size": cfg.image_size})


def test_a_model_dir_holding_another_run_is_refused_then_cleared_on_overwrite(tmp_path):
  earlier = config_lib.TrainConfig(data_dir="d", model_dir=str(tmp_path / "run"),
                                   checkpoint_dir=str(tmp_path / "aip_checkpoints"), image_size=64)
  _write_records(earlier, lambda stage: run_state.fingerprint(earlier, "sha-a", stage))
  # The same settings resume; settings that do not shape the model may change.
  run_state.check(earlier, "sha-a", overwrite=False, chief=True)
  same = config_lib.TrainConfig(**{**earlier.__dict__, "stage1_epochs": 30, "patience": 2,
                                   "mixed_precision": "bfloat16", "steps_per_execution": 4})
  run_state.check(same, "sha-a", overwrite=False, chief=True)

  other = config_lib.TrainConfig(**{**earlier.__dict__, "image_size": 32})
  with pytest.raises(cli.UserError, match=r"holds another run \(image_size: 64 → 32; .*--overwrite"):
    run_state.check(other, "sha-a", overwrite=False, chief=True)
  with pytest.raises(cli.UserError, match="manifest_sha256: 'sha-a' → 'sha-b'"):
    run_state.check(earlier, "sha-b", overwrite=False, chief=True)
  compiled = config_lib.TrainConfig(**{**earlier.__dict__, "jit_compile": "on"})  # another augmentation stream
  with pytest.raises(cli.UserError, match="jit_compile: 'auto' → 'on'"):
    run_state.check(compiled, "sha-a", overwrite=False, chief=True)
  before_it_was_recorded = {k: v for k, v in run_state.fingerprint(earlier, "sha-a", 2).items() if k != "jit_compile"}
  assert run_state.differences(before_it_was_recorded, run_state.fingerprint(compiled, "sha-a", 2)) == []
  stage2_only = config_lib.TrainConfig(**{**earlier.__dict__, "fine_tune_layers": 10})
  with pytest.raises(cli.UserError, match="fine_tune_layers: 50 → 10"):
    run_state.check(stage2_only, "sha-a", overwrite=False, chief=True)
  seeds_count = config_lib.TrainConfig(**{**earlier.__dict__, "fine_tune_layers": 50})  # ResNet-50's default, given
  run_state.check(seeds_count, "sha-a", overwrite=False, chief=True)
  another_backbone = config_lib.TrainConfig(**{**earlier.__dict__, "backbone": "efficientnet_b0"})
  with pytest.raises(cli.UserError, match="backbone: 'resnet50' → 'efficientnet_b0'"):
    run_state.check(another_backbone, "sha-a", overwrite=False, chief=True)
  # Records from before --backbone existed were ResNet-50's.
  before_backbones = {k: v for k, v in run_state.fingerprint(earlier, "sha-a", 2).items() if k != "backbone"}
  assert run_state.differences(before_backbones, run_state.fingerprint(earlier, "sha-a", 2)) == []
  assert run_state.differences(before_backbones, run_state.fingerprint(another_backbone, "sha-a", 2)) == [
      "backbone: 'resnet50' → 'efficientnet_b0'", "fine_tune_layers: 50 → 75"]
  assert json.load(open(tmp_path / "run" / "run_config.json")) == {"image_size": 64}  # untouched

  run_state.check(other, "sha-a", overwrite=True, chief=False)  # another worker: clears nothing
  assert (tmp_path / "aip_checkpoints" / "checkpoints" / "stage1.json").exists()
  run_state.check(other, "sha-a", overwrite=True, chief=True)
  assert not (tmp_path / "aip_checkpoints" / "checkpoints").exists()
  assert not (tmp_path / "aip_checkpoints" / "backup").exists()
  assert not (tmp_path / "run" / "best_model.json").exists() and not (tmp_path / "run" / "run_config.json").exists()
  run_state.check(other, "sha-a", overwrite=False, chief=True)  # now empty: nothing to refuse


def test_learning_rates_follow_the_global_batch():
  assert optimization.scaled_learning_rate(1e-4, 32, 32, "sqrt") == 1e-4  # the seed's, at its batch
  assert optimization.scaled_learning_rate(1e-4, 256, 32, "sqrt") == pytest.approx(1e-4 * 8 ** 0.5)
  assert optimization.scaled_learning_rate(1e-4, 256, 32, "linear") == pytest.approx(8e-4)
  assert optimization.scaled_learning_rate(1e-4, 8, 32, "sqrt") == pytest.approx(0.5e-4)  # both ways
  assert optimization.scaled_learning_rate(1e-4, 256, 32, "none") == 1e-4


def _tiny_model(learning_rate):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
  model.compile(keras.optimizers.Adam(learning_rate), "categorical_crossentropy")
  return model


class _LearningRates(keras.callbacks.Callback):
  def on_train_batch_end(self, batch, logs=None):
    self.seen = getattr(self, "seen", []) + [float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))]


def test_warm_up_rises_linearly_then_leaves_the_rate_alone():
  model = _tiny_model(0.1)
  x, y = np.zeros((16, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(16) % 2]
  rates = _LearningRates()
  # A stage starting at epoch 3, 4 steps an epoch, a warm-up of 1.5 epochs (6 steps).
  model.fit(x, y, batch_size=4, epochs=6, initial_epoch=3, verbose=0, shuffle=False,
            callbacks=[optimization.WarmUp(0.1, 6, first_epoch=3, steps_per_epoch=4), rates])
  assert rates.seen[:6] == pytest.approx([0.1 * k / 6 for k in range(1, 7)])
  assert rates.seen[6:] == pytest.approx([0.1] * 6)
  model.optimizer.learning_rate = 0.05  # as ReduceLROnPlateau would: past the warm-up, kept
  rates.seen = []
  model.fit(x, y, batch_size=4, epochs=8, initial_epoch=6, verbose=0, shuffle=False,
            callbacks=[optimization.WarmUp(0.1, 6, first_epoch=3, steps_per_epoch=4), rates])
  assert rates.seen == pytest.approx([0.05] * 8)


def _rates_seen(model, epochs, callbacks, initial_epoch=0) -> "_LearningRates":
  """Fits `model` on 16 rows in batches of 4 (4 steps an epoch), recording the rate of each step."""
  x, y = np.zeros((16, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(16) % 2]
  rates = _LearningRates()
  model.fit(x, y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch, verbose=0, shuffle=False,
            callbacks=[*callbacks, rates])
  return rates


class _HalveAfterEpoch(keras.callbacks.Callback):
  """ReduceLROnPlateau's act (factor 0.5) at the end of one epoch."""

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      self.model.optimizer.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)) * 0.5


def test_warm_up_reads_the_rate_under_a_distribution_strategy():
  """Under tf.distribute the rate is a MirroredVariable, which float() does not take."""
  import tensorflow as tf
  with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
    model = _tiny_model(0.1)
  rates = _rates_seen(model, epochs=2, callbacks=[optimization.WarmUp(0.1, 6, first_epoch=0, steps_per_epoch=4),
                                                  _HalveAfterEpoch(0)])
  assert rates.seen[:4] == pytest.approx([0.1 * k / 6 for k in range(1, 5)])
  assert rates.seen[4:] == pytest.approx([0.05 * 5 / 6, 0.05, 0.05, 0.05])


def test_warm_up_never_raises_a_rate_that_the_plateau_callback_lowered():
  """A warm-up of 3.5 epochs (14 steps of 4 an epoch) with the rate halved after epoch 1."""
  rates = _rates_seen(_tiny_model(0.1), epochs=5,
                      callbacks=[optimization.WarmUp(0.1, 14, first_epoch=0, steps_per_epoch=4), _HalveAfterEpoch(1)])
  assert rates.seen[:8] == pytest.approx([0.1 * k / 14 for k in range(1, 9)])
  assert rates.seen[8:14] == pytest.approx([0.05 * k / 14 for k in range(9, 15)])  # half of the warm-up
  assert rates.seen[14:] == pytest.approx([0.05] * 6)  # not back up to 0.1
  # Resumed at epoch 3 from a backup that held the lowered rate (0.05 · 12/14 at step 12).
  rates = _rates_seen(_tiny_model(0.05 * 12 / 14), epochs=5, initial_epoch=3,
                      callbacks=[optimization.WarmUp(0.1, 14, first_epoch=0, steps_per_epoch=4)])
  assert rates.seen == pytest.approx([0.05 * 13 / 14, 0.05 * 14 / 14, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])


def test_early_stopping_and_reduce_lr_resume_where_they_were(tmp_path):
  """A flat validation loss: uninterrupted, EarlyStopping(patience=3) stops after epoch 4 and
  ReduceLROnPlateau(patience=2) halves the rate after epoch 3. Stopped after epoch 2 and
  resumed from the backup, the stage must do exactly the same."""
  x, y = np.zeros((8, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(8) % 2]

  def fit(epochs, stop_after=None):
    model = _tiny_model(0.0)  # nothing changes: the loss is flat
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3)
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2)
    backup = callbacks_lib.PreemptibleBackup(str(tmp_path / "backup"), fingerprint={"run": 1},
                                             stateful_callbacks=[early, reduce_lr])

    class StopAfter(keras.callbacks.Callback):  # the SIGTERM that Vertex AI sends, at an epoch's end
      def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == stop_after:
          backup.requested = True

    model.optimizer.learning_rate = 0.0
    history = model.fit(x, y, validation_data=(x, y), batch_size=4, epochs=epochs, verbose=0,
                        callbacks=[StopAfter(), early, reduce_lr, backup])
    return history, model

  uninterrupted, _ = fit(10)
  assert uninterrupted.epoch == [0, 1, 2, 3]
  with pytest.raises(callbacks_lib.Preempted):
    fit(10, stop_after=2)
  saved = json.load(open(tmp_path / "backup" / "training_metadata.json"))
  assert saved["callbacks"]["EarlyStopping"]["wait"] == 1 and saved["fingerprint"] == {"run": 1}
  resumed, _ = fit(10)
  assert resumed.epoch == [2, 3]  # stops where the uninterrupted run stopped
  assert resumed.history["learning_rate"] == pytest.approx(uninterrupted.history["learning_rate"][2:])


def test_a_resumed_stage_draws_on_from_where_its_backup_left_the_random_streams(tmp_path):
  """The augmentation's and the mixing's SeedGenerators are not weights (save_weights leaves
  them out): restored from the backup, a resumed stage draws what an uninterrupted one would
  draw next, not its first epochs' augmentation again."""
  from job import model as model_lib
  x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  y = np.eye(2, dtype=np.float32)[np.arange(8) % 2]

  def fit(epochs, stop_after=None):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((None, None, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    model = model_lib.build_training_model(inner, 32, seed=3, mixing={"mixup": 0.4, "cutmix": 0.0, "probability": 1.0})
    model.compile(keras.optimizers.Adam(0.0), "categorical_crossentropy")
    backup = callbacks_lib.PreemptibleBackup(str(tmp_path / "backup"), fingerprint={"run": 1})

    class StopAfter(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == stop_after:
          backup.requested = True

    class Seen(keras.callbacks.Callback):  # the streams' states when each epoch begins
      states = []

      def on_epoch_begin(self, epoch, logs=None):
        self.states.append([v.numpy().tolist() for v in callbacks_lib.random_states(self.model)])

    seen = Seen()
    seen.states = []
    try:
      model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, callbacks=[StopAfter(), seen, backup])
    except callbacks_lib.Preempted:
      pass
    return seen.states

  uninterrupted = fit(3)
  assert len(uninterrupted[0]) == 2 and uninterrupted[0] != uninterrupted[1]  # augmentation and mixing
  shutil.rmtree(tmp_path / "backup", ignore_errors=True)
  assert fit(3, stop_after=2) == uninterrupted[:2]
  assert fit(3) == uninterrupted[2:]  # epoch 3 begins where the uninterrupted run's did


def test_a_backup_of_another_run_is_not_restored(tmp_path):
  x, y = np.zeros((8, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(8) % 2]
  fileio.write_json(str(tmp_path / "backup" / "training_metadata.json"),
                    {"epoch": 5, "batch": 0, "fingerprint": {"run": "other"}})
  model = _tiny_model(0.01)
  backup = callbacks_lib.PreemptibleBackup(str(tmp_path / "backup"), fingerprint={"run": 1})
  history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[backup])
  assert history.epoch == [0, 1]  # not resumed at epoch 5


def test_the_cache_goes_to_disk_when_memory_is_short(tmp_path, shards_dir):
  assert data.choose_cache("auto", 10_000, 224, available=64 * 2**30) == "memory"  # 1.5 GB of 64
  assert data.choose_cache("auto", 10_000, 224, available=2 * 2**30) == "disk"
  assert data.choose_cache("memory", 10_000, 224, available=1) == "memory"  # as asked
  from tfrecords import manifest as manifest_lib
  info = manifest_lib.split_info(shards_dir, manifest_lib.read(shards_dir), "validation")
  on_disk = data.validation_dataset(info, 16, 8, cache="disk")
  in_memory = data.validation_dataset(info, 16, 8, cache="memory")
  for _ in range(2):  # the second pass reads the cache file
    for (a, la, wa), (b, lb, wb) in zip(on_disk.dataset, in_memory.dataset):
      assert np.array_equal(a, b) and np.array_equal(la, lb) and np.array_equal(wa, wb)


def test_steps_per_execution_never_lengthens_an_epoch():
  assert train.epoch_steps(100, 32, 1) == (4, 1)
  assert train.epoch_steps(100, 32, 8) == (4, 4)  # capped at the epoch
  assert train.epoch_steps(1000, 32, 8) == (32, 8)
  steps, per_execution = train.epoch_steps(320, 32, 3)  # 10 steps: whole executions of 3 → 9
  assert steps % per_execution == 0 and steps <= 10


def test_nonsense_learning_rates_and_layer_counts_are_refused():
  for flag, value in (("stage1_lr", -1.0), ("stage2_lr", 0.0), ("stage1_lr", float("nan"))):
    with pytest.raises(cli.UserError, match=f"--{flag}={value} must be a positive learning rate"):
      config_lib.validated(config_lib.TrainConfig(data_dir="d", **{flag: value}))
  with pytest.raises(cli.UserError, match="--fine_tune_layers=10000: the resnet50 backbone has 175 layers"):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", fine_tune_layers=10000))
  with pytest.raises(cli.UserError, match="--fine_tune_layers=137: the convnext_tiny backbone has 136 layers"):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", backbone="convnext_tiny", fine_tune_layers=137))
  config_lib.validated(config_lib.TrainConfig(data_dir="d", backbone="efficientnet_b4", fine_tune_layers=400))
  with pytest.raises(cli.UserError, match="--backbone=resnet51: expected one of resnet50, resnet50v2, "):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", backbone="resnet51"))


def test_a_nan_loss_stops_the_stage_and_keeps_the_best_model(tmp_path):
  x, y = np.ones((8, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(8) % 2]
  model = _tiny_model(0.01)
  best = callbacks_lib.BestModelCheckpoint(model, str(tmp_path / "best_model.keras"),
                                           str(tmp_path / "best_model.json"), "val_loss", "min", 1, {"run": 1})
  model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0, callbacks=[best])
  saved = (tmp_path / "best_model.keras").read_bytes()
  model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
  with pytest.raises(callbacks_lib.NonFiniteLoss, match="stage 2, epoch 2, step 1: the training loss is nan"):
    model.fit(x, y, validation_data=(x, y), epochs=2, initial_epoch=1, verbose=0,
              callbacks=[callbacks_lib.StopOnNonFiniteLoss(2, 1e-3), best])
  assert (tmp_path / "best_model.keras").read_bytes() == saved


def _kill(lease):
  """What SIGKILL does to a job: its heartbeat stops, and nothing releases the lease."""
  lease._stop.set()  # pylint: disable=protected-access
  lease._thread.join()  # pylint: disable=protected-access


def test_one_job_at_a_time_holds_a_model_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("CLOUD_ML_JOB_ID", raising=False)
  model_dir, run = str(tmp_path / "run"), {"image_size": 32}
  first = run_state.Lease(model_dir, run, seconds=60).acquire()
  with pytest.raises(run_state.ModelDirInUse, match=f"is in use by another job \\({re.escape(first.holder)}"):
    run_state.Lease(model_dir, run).acquire()
  first.release()
  assert not os.path.exists(os.path.join(model_dir, ".lease.json"))

  renewed = run_state.Lease(model_dir, run, seconds=0.5).acquire()  # a heartbeat every 0.1 s
  time.sleep(1.0)
  assert json.load(open(os.path.join(model_dir, ".lease.json")))["expires"] > time.time()
  _kill(renewed)
  time.sleep(0.6)
  taken = run_state.Lease(model_dir, run).acquire()  # expired: a killed job's lease is taken over
  _kill(taken)

  monkeypatch.setenv("CLOUD_ML_JOB_ID", "12345")  # Vertex AI restarting the same job
  with pytest.raises(run_state.ModelDirInUse):  # another job's live lease, even for the same run
    run_state.Lease(model_dir, run).acquire()
  os.remove(os.path.join(model_dir, ".lease.json"))
  before_restart = run_state.Lease(model_dir, run, seconds=600).acquire()
  _kill(before_restart)
  with pytest.raises(run_state.ModelDirInUse):  # the same job with other settings waits
    run_state.Lease(model_dir, {"image_size": 64}).acquire()
  monkeypatch.setenv("CLOUD_ML_JOB_ID", "67890")
  with pytest.raises(run_state.ModelDirInUse, match="Vertex AI job 12345"):
    run_state.Lease(model_dir, run).acquire()
  monkeypatch.setenv("CLOUD_ML_JOB_ID", "12345")
  restarted = run_state.Lease(model_dir, run).acquire()  # at once, without waiting for expiry
  restarted.release()


def test_a_lease_without_exclusive_create_renews_itself_while_the_job_writes():
  """On ram:// (no exclusive create) a renewal is itself a guarded write: it must not wait on
  the lock it holds (a hang one heartbeat into every such run, once)."""
  import tensorflow as tf
  model_dir = f"ram://lease-{uuid.uuid4().hex}"
  lease = run_state.Lease(model_dir, {"image_size": 32}, seconds=0.5).acquire()  # a heartbeat every 0.1 s
  try:
    time.sleep(1.0)
    with tf.io.gfile.GFile(f"{model_dir}/.lease.json") as f:
      assert json.load(f)["expires"] > time.time()  # renewed in the last half second
    fileio.write_json(f"{model_dir}/history.json", {"epoch": 1})  # a job's write, between renewals
  finally:
    lease.release()
  assert not lease._thread.is_alive()  # pylint: disable=protected-access
  assert not tf.io.gfile.exists(f"{model_dir}/.lease.json")


def test_a_takeover_right_after_a_renewal_is_seen(tmp_path, monkeypatch):
  """Another job writes its lease between a renewal's write and anything after it: the renewal
  holds the token its own write returned, so the next one sees the takeover."""
  model_dir = str(tmp_path / "run")
  replace = run_state._LocalStore.replace  # pylint: disable=protected-access

  def replaced_then_taken_over(store, text, token):
    ours = replace(store, text, token)
    if ours is not None:
      time.sleep(0.01)  # a later mtime: another token
      with open(store.path, "w") as f:
        json.dump({"holder": "vm-3 pid 9", "expires": time.time() + 600}, f)
    return ours
  monkeypatch.setattr(run_state._LocalStore, "replace", replaced_then_taken_over)  # pylint: disable=protected-access
  lease = run_state.Lease(model_dir, {"run": 1}, seconds=0.5).acquire()  # a heartbeat every 0.1 s
  try:
    deadline = time.time() + 5
    while lease.lost is None and time.time() < deadline:
      time.sleep(0.05)
    assert lease.lost == "it was taken over by vm-3 pid 9"
    assert json.load(open(os.path.join(model_dir, ".lease.json")))["holder"] == "vm-3 pid 9"  # not written over
  finally:
    lease.release()


def test_a_second_job_into_a_held_model_dir_stops_at_once(shards_dir, tmp_path):
  from helpers import run_module
  model_dir = tmp_path / "busy"
  model_dir.mkdir()
  (model_dir / ".lease.json").write_text(json.dumps(
      {"holder": "vm-7 pid 42", "job_id": None, "fingerprint": "{}", "expires": time.time() + 600}))
  result = run_module("job.train", f"--data_dir={shards_dir}", f"--model_dir={model_dir}", "--weights=none", "--noserving",
                      check=False)
  assert result.returncode == 1
  assert "is in use by another job (vm-7 pid 42" in result.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(model_dir)) == [".lease.json"]  # nothing written


def test_a_lease_left_by_a_process_that_ended_on_this_host_is_taken_over(tmp_path, monkeypatch):
  import socket
  import subprocess
  monkeypatch.delenv("CLOUD_ML_JOB_ID", raising=False)
  gone = subprocess.Popen(["true"])  # a pid that no longer runs
  gone.wait()
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  record = {"holder": "killed job", "pid": gone.pid, "job_id": None, "fingerprint": "{}",
            "expires": time.time() + 600}
  (model_dir / ".lease.json").write_text(json.dumps({**record, "host": "another-host"}))
  with pytest.raises(run_state.ModelDirInUse):  # another host's: it may still run there
    run_state.Lease(str(model_dir), {}).acquire()
  (model_dir / ".lease.json").write_text(json.dumps({**record, "host": socket.gethostname()}))
  run_state.Lease(str(model_dir), {}).acquire().release()


@pytest.mark.parametrize("text, what", [("null", "not a lease record"), ("[1, 2]", "not a lease record"),
                                        ('{"expires": "soon"}', "not a lease record"), ("", "empty"),
                                        ("{not json", "not JSON")])
def test_a_lease_file_that_is_not_a_lease_is_named_not_taken_over(tmp_path, text, what):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / ".lease.json").write_text(text)
  with pytest.raises(cli.UserError, match=rf"^{re.escape(str(model_dir / '.lease.json'))} is not a lease this job "
                     rf"wrote \({what}\): if no job is running into --model_dir, delete it and rerun$"):
    run_state.Lease(str(model_dir), {}).acquire()
  assert (model_dir / ".lease.json").read_text() == text
  assert os.listdir(model_dir) == [".lease.json"]  # the exclusive create left no file of its own


def test_a_takeover_is_seen_before_the_next_write_and_a_touch_is_not_one(tmp_path, monkeypatch):
  monkeypatch.delenv("CLOUD_ML_JOB_ID", raising=False)
  model_dir = tmp_path / "run"
  first = run_state.Lease(str(model_dir), {"run": 1}, seconds=300).acquire()
  try:
    os.utime(model_dir / ".lease.json")  # touched: still this job's
    fileio.write_atomic(str(model_dir / "history.csv"), "epoch 1")
    record = json.loads((model_dir / ".lease.json").read_text())
    (model_dir / ".lease.json").write_text(json.dumps({**record, "expires": time.time() - 1}))  # edited
    fileio.write_atomic(str(model_dir / "history.csv"), "epoch 2")  # its own record still: adopted
    second = run_state.Lease(str(model_dir), {"run": 1}, seconds=300).acquire()  # expired: taken over
    try:
      with pytest.raises(run_state.LeaseLost, match=rf"taken over by {re.escape(second.holder)}"):
        fileio.write_atomic(str(model_dir / "history.csv"), "epoch 3 of the first job")  # not 60 s later
      assert (model_dir / "history.csv").read_text() == "epoch 2"
    finally:
      second.release()
  finally:
    first.release()


def test_a_lease_far_in_the_future_is_named_with_its_date(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / ".lease.json").write_text(json.dumps({"holder": "vm-7 pid 42", "expires": time.time() + 400 * 86400}))
  with pytest.raises(run_state.ModelDirInUse, match=r"its lease runs to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d unless"):
    run_state.Lease(str(model_dir), {}).acquire()


def test_a_killed_jobs_disk_cache_is_removed_at_the_next_start(tmp_path):
  import subprocess
  gone = subprocess.Popen(["true"])  # a pid that no longer runs
  gone.wait()
  (tmp_path / f"{data.DISK_CACHE_PREFIX}{gone.pid}-abc").mkdir()
  (tmp_path / f"{data.DISK_CACHE_PREFIX}{gone.pid}-abc" / "train_0.data").write_bytes(b"decoded")
  (tmp_path / f"{data.DISK_CACHE_PREFIX}{os.getpid()}-def").mkdir()  # a running process's
  (tmp_path / "other").mkdir()
  assert data.remove_stale_disk_caches(str(tmp_path)) == [f"{data.DISK_CACHE_PREFIX}{gone.pid}-abc"]
  assert sorted(os.listdir(tmp_path)) == [f"{data.DISK_CACHE_PREFIX}{os.getpid()}-def", "other"]


class _FlakyStore:
  """A lease store whose renewals fail `failures` times (a network error), then answer `then`
  (the new token; None: refused)."""

  def __init__(self, failures, then="token-2"):
    self.failures, self.then, self.calls = failures, then, 0

  def replace(self, text, token):
    self.calls += 1
    if self.calls <= self.failures:
      raise ConnectionError("503 Service Unavailable")
    return self.then

  def read(self):
    return json.dumps({"holder": "vm-9 pid 7"}), "token"

  def delete(self, token):
    pass


def _lease_with(store, seconds, tmp_path, monkeypatch):
  monkeypatch.setattr(run_state, "_store", lambda path: store)
  monkeypatch.setattr(store, "create", lambda text: "token", raising=False)
  return run_state.Lease(str(tmp_path / "run"), {}, seconds=seconds).acquire()


def test_a_lease_renewal_that_fails_is_retried_and_the_lease_kept(tmp_path, monkeypatch, caplog):
  lease = _lease_with(_FlakyStore(failures=2), 10, tmp_path, monkeypatch)
  try:
    lease._stop.wait(2 + 3.5)  # pylint: disable=protected-access  (a renewal at 2 s, retries after 1 and 2 s)
    assert lease.lost is None and "retrying in 1 s" in caplog.text
    lease.check()
  finally:
    lease.release()


def test_a_lost_lease_stops_every_later_write(tmp_path, monkeypatch):
  taken = _lease_with(_FlakyStore(failures=0, then=None), 0.25, tmp_path, monkeypatch)
  time.sleep(0.3)
  assert taken.lost == "it was taken over by vm-9 pid 7"
  with pytest.raises(run_state.LeaseLost, match=r"no longer holds its lease: it was taken over by vm-9 pid 7; "
                     r"it stopped before writing anything more \(it was about to write .*history.csv\)"):
    fileio.write_atomic(str(tmp_path / "run" / "history.csv"), "x")
  assert not (tmp_path / "run" / "history.csv").exists()
  # Inside a stage: the first callback stops fit before the best-model save after it writes.
  model = _tiny_model(0.1)
  x, y = np.zeros((8, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(8) % 2]
  best = callbacks_lib.BestModelCheckpoint(model, str(tmp_path / "best_model.keras"), str(tmp_path / "best.json"),
                                           "val_loss", "min", 1, {})
  with pytest.raises(run_state.LeaseLost):
    model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0,
              callbacks=[callbacks_lib.CheckWritesAllowed(str(tmp_path / "run")), best])
  assert not (tmp_path / "best_model.keras").exists()
  taken.release()
  fileio.write_atomic(str(tmp_path / "after_release.txt"), "x")  # the guard goes with the lease


def test_a_lease_never_renewed_for_its_term_is_lost(tmp_path, monkeypatch):
  lease = _lease_with(_FlakyStore(failures=10 ** 6), 0.5, tmp_path, monkeypatch)
  try:
    deadline = time.time() + 5
    while lease.lost is None and time.time() < deadline:
      time.sleep(0.05)
    assert lease.lost and lease.lost.startswith("it could not be renewed for 0.5 s, its whole term")
  finally:
    lease.release()


def test_a_malformed_lease_file_is_named(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / ".lease.json").write_text("{not json")
  with pytest.raises(run_state.cli.UserError, match=r"\.lease\.json is not a lease this job wrote .* delete it"):
    run_state.Lease(str(tmp_path / "run"), {}).acquire()
