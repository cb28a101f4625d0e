r"""The training job: ResNet-50 on HAM10000 shards, in two stages.

  python -m job.train --data_dir=gs://bucket/shards --model_dir=gs://bucket/run1

Stage 1 trains the head on a frozen backbone; stage 2 unfreezes the top
layers at a lower rate. A finished stage leaves a marker and its weights in
checkpoints/, and BackupAndRestore keeps the unfinished one, so a restarted
job skips what is done and resumes mid-stage.
"""

import dataclasses
import math
import platform
import sys

import keras
import numpy as np
import sklearn
import tensorflow as tf
from absl import logging

from job import accelerators, artifacts, callbacks as callbacks_lib, config as config_lib, data, distribute_utils
from job import evaluate as evaluate_lib, keras_compat, model as model_lib, optimization, performance
from job import ensemble, patient_metadata, predict, run_state
from tfrecords import cli, fileio, manifest as manifest_lib, progress

DEBUG_TRAIN_EXAMPLES, DEBUG_EVAL_EXAMPLES = 64, 32
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as if the signal had ended the process


@dataclasses.dataclass
class Run:
  """What both stages share."""
  config: config_lib.TrainConfig
  strategy: tf.distribute.Strategy
  inner: keras.Model
  wrapper: keras.Model
  train_examples: tf.data.Dataset  # decoded and cached once; each stage shuffles it with its own seed
  train_info: data.SplitInfo
  validation: data.ValidationData
  steps_per_epoch: int
  steps_per_execution: int
  xla: bool  # the training step is XLA-compiled
  class_weights: np.ndarray | None
  learning_rates: dict[int, float]  # per stage, scaled to the global batch
  manifest_sha256: str
  model_dir: str  # where this worker writes (a temporary folder on non-chief workers)
  chief: bool

  def train_batches(self, stage: int) -> tf.data.Dataset:
    """A stage's own training batches: a second `fit` on one dataset is not repeatable
    (job/data.py, train_batches)."""
    seed = int(np.random.SeedSequence([self.config.seed, stage]).generate_state(1)[0])
    return data.train_batches(self.train_examples, self.train_info, self.config.global_batch_size, seed=seed,
                              num_workers=max(1, distribute_utils.cluster_size_from_tf_config()))

  def fingerprint(self, stage: int) -> dict:
    return run_state.fingerprint(self.config, self.manifest_sha256, stage)

  def path(self, *parts):
    return artifacts.path(self.model_dir, *parts)

  def checkpoint_path(self, *parts):
    # Every worker reads the chief's stage markers, so that all skip the same stages;
    # only the chief writes them.
    return fileio.join(self.config.checkpoint_root, artifacts.CHECKPOINTS_DIR, *parts)


def monitor_mode(monitor: str) -> str:
  return "min" if monitor.endswith("loss") else "max"


class ClassWeightedCrossentropy(keras.losses.Loss):
  """Categorical cross-entropy, each image weighted by its true class's weight.

  The class weights live in the loss rather than in sample weights, so that
  sample weights stay free for the validation padding (job/data.py) and the
  accuracy and F1 stay unweighted figures; the validation loss is the same
  class-weighted objective as the training loss."""

  def __init__(self, class_weights, label_smoothing=0.0, name="class_weighted_crossentropy", **kwargs):
    super().__init__(name=name, **kwargs)
    self.class_weights = [float(w) for w in class_weights]
    self.label_smoothing = float(label_smoothing)

  def call(self, y_true, y_pred):
    # The weight of the hard label, the smoothing applied after (--label_smoothing).
    weights = keras.ops.sum(y_true * keras.ops.convert_to_tensor(self.class_weights, y_true.dtype), axis=-1)
    return keras.losses.categorical_crossentropy(y_true, y_pred, label_smoothing=self.label_smoothing) * weights

  def get_config(self):
    return {**super().get_config(), "class_weights": self.class_weights, "label_smoothing": self.label_smoothing}


def compile_model(wrapper: keras.Model, strategy: tf.distribute.Strategy, cfg: config_lib.TrainConfig,
                  learning_rate: float, xla: bool, steps_per_execution: int | None = None,
                  class_weights: np.ndarray | None = None):
  """(Re)compiles the wrapper: needed after changing `trainable`. The metrics are weighted
  metrics: the validation padding weighs 0 in them (training batches carry no weights)."""
  loss = (ClassWeightedCrossentropy(class_weights, cfg.label_smoothing) if class_weights is not None
          else keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing))
  with strategy.scope():
    wrapper.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss,
        weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                          keras.metrics.F1Score(average="macro", name="f1")],
        jit_compile=xla,
        steps_per_execution=steps_per_execution or cfg.steps_per_execution,
        run_eagerly=cfg.run_eagerly)
  if xla and not wrapper.jit_compile:  # Keras turns XLA off, with a warning, for layers without it
    unsupported = sorted({layer.name for layer in wrapper._flatten_layers() if not layer.supports_jit})  # pylint: disable=protected-access
    raise RuntimeError(f"--jit_compile: XLA was requested but Keras turned it off (layers without "
                       f"XLA support: {', '.join(unsupported) or 'none'})")


def stage_callbacks(run: Run, stage: int, initial_epoch: int) -> list[keras.callbacks.Callback]:
  cfg = run.config
  mode = monitor_mode(cfg.monitor)
  early_stopping = keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cfg.patience)
  reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-7)
  # Every worker restores the chief's backup, so that all resume at the same step with the
  # same weights; the others save theirs apart (one folder shared by two writers fails on
  # h5 file locks), in their temporary folder.
  backup = fileio.join(cfg.checkpoint_root, artifacts.BACKUP_DIR, f"stage{stage}")
  own_backup = backup if run.chief else run.path(
      artifacts.BACKUP_DIR, f"stage{stage}-worker{run.strategy.cluster_resolver.task_id}")
  callbacks = [
      callbacks_lib.CheckWritesAllowed(run.model_dir),  # first: a lost lease stops before any write
      callbacks_lib.StopOnNonFiniteLoss(stage, run.learning_rates[stage]),  # before any saving
      callbacks_lib.BestModelCheckpoint(run.inner, run.path(artifacts.BEST_MODEL_FILE),
                                        run.path(artifacts.BEST_MODEL_STATE_FILE), cfg.monitor, mode, stage,
                                        run.fingerprint(stage), write=run.chief),
      callbacks_lib.HistoryCSV(run.path(artifacts.HISTORY_FILE), stage, write=run.chief),
      early_stopping,
      reduce_lr,
      keras.callbacks.TensorBoard(cfg.logs_dir if run.chief else run.path(artifacts.LOGS_DIR)),
  ]
  warmup_steps = round(cfg.warmup_epochs * run.steps_per_epoch)
  if warmup_steps:
    callbacks.append(optimization.WarmUp(run.learning_rates[stage], warmup_steps, initial_epoch,
                                         run.steps_per_epoch))
  if run.chief and callbacks_lib.in_tuning_trial():
    callbacks.append(callbacks_lib.HypertuneReporter(cfg.monitor))
  # Last: an epoch counts as done in the backup once the other callbacks have run.
  callbacks.append(callbacks_lib.PreemptibleBackup(
      own_backup, save_freq=cfg.backup_steps or "epoch", restore_dir=backup,
      fingerprint=run.fingerprint(stage), stateful_callbacks=[early_stopping, reduce_lr]))
  return callbacks


def fit_stage(run: Run, stage: int, epochs: int, initial_epoch: int) -> int:
  """Fits one stage; returns the next epoch number. Leaves a marker when done."""
  marker = run.checkpoint_path(f"stage{stage}.json")
  weights = run.checkpoint_path(f"stage{stage}.weights.h5")
  done = fileio.read_json(marker) if tf.io.gfile.exists(marker) else None
  # Another run's marker is only ever seen here under --overwrite, by a worker that read it
  # before the chief cleared it: it is not this run's, so the stage is not done.
  if done and done.get("fingerprint") == run.fingerprint(stage):
    logging.info("stage %d already finished (epoch %d): loading its weights", stage, done["next_epoch"])
    if epochs > done.get("epochs", epochs):
      logging.info("--stage%d_epochs=%d asks for more than the %d epochs stage %d ran: the finished "
                   "stage is kept as it is (a new --model_dir trains it longer)", stage, epochs,
                   done["epochs"], stage)
    run.inner.load_weights(fileio.copy_to_local(weights))
    return done["next_epoch"]
  if epochs == 0:
    return initial_epoch
  keras_compat.forget_restored_epoch(run.wrapper)
  history = run.wrapper.fit(run.train_batches(stage), epochs=initial_epoch + epochs, initial_epoch=initial_epoch,
                            steps_per_epoch=run.steps_per_epoch, validation_data=run.validation.dataset,
                            validation_steps=run.validation.steps,
                            callbacks=stage_callbacks(run, stage, initial_epoch),
                            shuffle=False,  # the dataset shuffles itself; Keras would warn it ignores this
                            verbose=progress.keras_verbosity())
  next_epoch = (max(history.epoch) + 1) if history.epoch else initial_epoch + epochs
  if run.chief:
    with fileio.local_copy_then_upload(weights, ".weights.h5") as tmp:
      run.inner.save_weights(tmp)
    fileio.write_json(marker, {"stage": stage, "next_epoch": next_epoch, "epochs": epochs,  # after the weights
                               "fingerprint": run.fingerprint(stage)})
  return next_epoch


def train_head(run: Run, initial_epoch: int = 0) -> int:
  """Stage 1: the backbone is frozen; only the new head learns."""
  model_lib.set_trainable_for_stage(run.inner, stage=1)
  compile_model(run.wrapper, run.strategy, run.config, run.learning_rates[1], run.xla,
                run.steps_per_execution, run.class_weights)
  return fit_stage(run, 1, run.config.stage1_epochs, initial_epoch)


def fine_tune(run: Run, initial_epoch: int) -> int:
  """Stage 2: the top layers of the backbone learn too, at a lower rate."""
  model_lib.set_trainable_for_stage(run.inner, stage=2, fine_tune_layers=run.config.fine_tune_layers)
  compile_model(run.wrapper, run.strategy, run.config, run.learning_rates[2], run.xla,
                run.steps_per_execution, run.class_weights)
  return fit_stage(run, 2, run.config.stage2_epochs, initial_epoch)


def run_config(cfg: config_lib.TrainConfig, strategy, policy: str, xla: bool, class_names,
               learning_rates: dict[int, float], manifest_sha256: str, manifest: dict,
               metadata_counts: dict | None = None) -> dict:
  return {
      # --metadata: each field's categories in the train split (job.predict warns of one it lacks).
      **({"metadata_counts": metadata_counts} if metadata_counts else {}),
      "flags": dataclasses.asdict(cfg),
      "image_size": cfg.image_size,
      "seed": cfg.seed,
      "class_names": list(class_names),
      "strategy": distribute_utils.public_name(strategy),
      "num_replicas": strategy.num_replicas_in_sync,
      "dtype_policy": policy,
      "xla": xla,  # in effect: compile_model stops the job if Keras turns it off
      "effective_learning_rates": {f"stage{stage}": lr for stage, lr in learning_rates.items()},
      "manifest_sha256": manifest_sha256,
      "split_checksums": manifest_lib.split_checksums(manifest),  # what job.evaluate may call this run's splits
      "fingerprint": run_state.fingerprint(cfg, manifest_sha256, stage=2),
      "command": sys.argv,
      "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                   "keras": keras.__version__, "numpy": np.__version__,
                   "scikit-learn": sklearn.__version__},
  }


def epoch_steps(num_train: int, global_batch_size: int, steps_per_execution: int) -> tuple[int, int]:
  """Steps per epoch (one pass over the train split) and steps per execution.

  Keras runs whole executions, so an epoch of 10 steps at --steps_per_execution=8
  would run 16: the execution is capped at the epoch, and the epoch rounded down
  to whole executions (the train split repeats, so no image is left out for good)."""
  steps = max(1, math.ceil(num_train / global_batch_size))
  per_execution = min(steps_per_execution, steps)
  rounded = steps - steps % per_execution
  if (per_execution, rounded) != (steps_per_execution, steps):
    logging.info("--steps_per_execution=%d with %d steps per epoch: running %d steps per epoch in "
                 "executions of %d", steps_per_execution, steps, rounded, per_execution)
  return rounded, per_execution


def splits_read(cfg: config_lib.TrainConfig) -> tuple[str, ...]:
  """The splits a run reads: the test split only when it evaluates at the end."""
  return ("train", "validation") + (("test",) if cfg.evaluate else ())


def preflight(cfg: config_lib.TrainConfig) -> dict:
  """Fails in seconds, not after an hour of training, when data or model_dir is unusable."""
  if tf.io.gfile.exists(cfg.model_dir) and not tf.io.gfile.isdir(cfg.model_dir):
    raise cli.UserError(f"--model_dir={cfg.model_dir} is a file, not a folder")
  manifest = manifest_lib.read(cfg.data_dir)
  for split in splits_read(cfg):
    if not data.split_info(cfg.data_dir, manifest, split, cfg.fold).num_examples:  # names a missing split too
      raise cli.UserError(f"--data_dir={cfg.data_dir}: the {split} split holds no images")
  manifest_lib.check_shards(cfg.data_dir, manifest, splits_read(cfg), checksums=cfg.verify_shards)
  return manifest


def set_up_devices(cfg: config_lib.TrainConfig) -> tuple[tf.distribute.Strategy, str, bool]:
  """The strategy, the dtype policy (set) and whether XLA compiles the step; seeds set."""
  if cfg.deterministic:
    # With the seeds set below: the same kernels, tf.data order and random draws each run
    # (tf.data's `deterministic=False` is overridden). It cannot be undone in this process.
    tf.config.experimental.enable_op_determinism()
  if cfg.cpu_devices:
    distribute_utils.use_logical_cpu_devices(cfg.cpu_devices)
  strategy = distribute_utils.get_strategy(cfg.strategy, cfg.tpu)
  if cfg.global_batch_size % strategy.num_replicas_in_sync:
    # Each replica gets an equal share of every batch: one static shape per replica.
    raise cli.UserError(f"--global_batch_size={cfg.global_batch_size} must be a multiple of the "
                        f"{strategy.num_replicas_in_sync} replicas")
  strategy_name = distribute_utils.resolve_strategy_name(cfg.strategy)
  if cfg.steps_per_execution > 1 and strategy.num_replicas_in_sync > 1 and strategy_name != "tpu":
    # Keras 3.15 runs several steps per execution in a tf.while_loop whose body is a tf.cond around
    # the distributed step; under MirroredStrategy (and MultiWorkerMirrored, built on the same
    # cross-replica calls) with more than one replica, the first execution fails with "You must
    # feed a value for placeholder tensor 'while/…/Placeholder'" (keras-team/keras#19246, open;
    # tests/test_train.py keeps a check that it still does). TPUStrategy compiles the loop itself.
    raise cli.UserError(f"--steps_per_execution={cfg.steps_per_execution} under --strategy={strategy_name} with "
                        f"{strategy.num_replicas_in_sync} replicas: Keras's multi-step loop fails under several "
                        "GPU or CPU replicas (keras-team/keras#19246); leave it at 1 there (it pays on TPUs and "
                        "on one device)")
  policy = performance.policy_name(cfg.mixed_precision, strategy_name)
  performance.set_policy(policy)
  xla = performance.use_xla(cfg.jit_compile, strategy_name, cfg.run_eagerly)
  keras.utils.set_random_seed(cfg.seed)
  return strategy, policy, xla


def build_models(cfg: config_lib.TrainConfig, strategy: tf.distribute.Strategy,
                 num_classes: int) -> tuple[keras.Model, keras.Model]:
  """The inner model and the training wrapper around it, in the strategy's scope."""
  with strategy.scope():
    inner = model_lib.build_inner_model(cfg.weights, num_classes=num_classes, backbone=cfg.backbone,
                                        metadata=cfg.metadata, color_constancy=cfg.color_constancy)
    wrapper = model_lib.build_training_model(inner, cfg.image_size, cfg.seed, model_lib.augmentation_of(cfg),
                                             config_lib.mixing(cfg))
  return inner, wrapper


def train_and_evaluate(cfg: config_lib.TrainConfig) -> dict:
  """Trains both stages and evaluates; returns the test metrics (or {})."""
  # First, before any data is read: a job given GPUs that TensorFlow cannot use stops here.
  accelerators.guard(config_lib.expected_accelerator(cfg))
  strategy, policy, xla = set_up_devices(cfg)
  chief = distribute_utils.is_chief(strategy)
  if chief and callbacks_lib.in_tuning_trial():
    callbacks_lib.hypertune_reporter()  # a trial that could never report stops before it trains
  manifest = preflight(cfg)
  manifest_sha256 = fileio.sha256_of(fileio.join(cfg.data_dir, manifest_lib.MANIFEST_FILE))
  # Before anything is written or cleared, the chief takes the model_dir for this job...
  lease = run_state.Lease(cfg.model_dir, run_state.fingerprint(cfg, manifest_sha256, stage=2)).acquire() \
      if chief else None
  try:
    if chief:
      fileio.check_writable(cfg.model_dir, "--model_dir")
      for left in fileio.remove_temporaries(cfg.model_dir):  # an earlier attempt killed mid-write
        logging.info("removed %s, left by an earlier attempt", left)
    # ... and before anything is built: does the model_dir hold another run?
    run_state.check(cfg, manifest_sha256, cfg.overwrite, chief)
    return _train(cfg, strategy, policy, xla, chief, manifest, manifest_sha256)
  finally:
    if lease:
      lease.release()


def _train(cfg: config_lib.TrainConfig, strategy: tf.distribute.Strategy, policy: str, xla: bool, chief: bool,
           manifest: dict, manifest_sha256: str) -> dict:
  """The run itself, once the model_dir is this job's and this run's."""
  class_names = manifest_lib.class_names(manifest)
  learning_rates = {stage: optimization.scaled_learning_rate(lr, cfg.global_batch_size, cfg.base_batch_size,
                                                             cfg.lr_scaling)
                    for stage, lr in ((1, cfg.stage1_lr), (2, cfg.stage2_lr))}
  model_dir = distribute_utils.writable_dir(cfg.model_dir, strategy)

  train_info, val_info = (data.split_info(cfg.data_dir, manifest, split, cfg.fold) for split in ("train", "validation"))
  take_train = DEBUG_TRAIN_EXAMPLES if cfg.debug else None
  take_eval = DEBUG_EVAL_EXAMPLES if cfg.debug else None
  num_train = min(train_info.num_examples, take_train or train_info.num_examples)
  weights = data.class_weights(train_info.class_counts) if cfg.class_weights else None
  num_val = min(val_info.num_examples, take_eval or val_info.num_examples)
  cache = data.choose_cache(cfg.cache, num_train + num_val, cfg.image_size)
  metadata_counts = data.metadata_counts(train_info, cfg.metadata) if cfg.metadata else None
  if metadata_counts and patient_metadata.never_known(metadata_counts):
    raise cli.UserError(f"--metadata={','.join(cfg.metadata)}: the train split of --data_dir={cfg.data_dir} records no "
                        f"{', '.join(patient_metadata.never_known(metadata_counts))} for any image: a branch on it "
                        "would learn nothing; leave it out of --metadata")
  train_examples = data.train_examples(train_info, cfg.image_size, seed=cfg.seed, take=take_train, cache=cache,
                                       metadata=cfg.metadata)
  validation = data.validation_dataset(val_info, cfg.image_size, cfg.global_batch_size, take=take_eval,
                                       cache=cache, metadata=cfg.metadata)
  steps_per_epoch, steps_per_execution = epoch_steps(num_train, cfg.global_batch_size,
                                                     cfg.steps_per_execution)
  logging.info("train: %d images, %d steps of %d per epoch; validation: %d images in %d steps; "
               "class weights %s; XLA %s; learning rates %.3g, %.3g (%s scaling from batch %d)",
               num_train, steps_per_epoch, cfg.global_batch_size, validation.num_examples,
               validation.steps, None if weights is None else np.round(weights, 2).tolist(),
               "on" if xla else "off", learning_rates[1], learning_rates[2], cfg.lr_scaling,
               cfg.base_batch_size)

  inner, wrapper = build_models(cfg, strategy, len(class_names))
  if chief:  # once the model is built: a run that fails before (bad --weights, say) leaves no record
    fileio.write_json(artifacts.path(model_dir, artifacts.RUN_CONFIG_FILE),
                      run_config(cfg, strategy, policy, xla, class_names, learning_rates, manifest_sha256,
                                 manifest, metadata_counts))
    artifacts.write_label_map(model_dir, class_names)
  state = Run(cfg, strategy, inner, wrapper, train_examples, train_info, validation, steps_per_epoch,
              steps_per_execution, xla, weights, learning_rates, manifest_sha256, model_dir, chief)
  try:
    epoch = train_head(state)
    fine_tune(state, epoch)
  except tf.errors.DataLossError:
    # TensorFlow's "corrupted record at 28912" names no file: the checksums do.
    manifest_lib.check_shards(cfg.data_dir, manifest, ("train", "validation"))
    raise
  except tf.errors.InvalidArgumentError as e:
    if data.LABEL_OUTSIDE_MAP not in str(e):
      raise
    message = next(line for line in str(e).splitlines() if data.LABEL_OUTSIDE_MAP in line)
    raise cli.UserError(f"--data_dir={cfg.data_dir}: {message.split(data.LABEL_OUTSIDE_MAP + ': ', 1)[-1]} "
                        f"({manifest_lib.MANIFEST_FILE} disagrees with its shards: convert again with "
                        "--overwrite)") from None
  finally:
    if not chief:  # its temporary folder, stopped or not
      fileio.remove_if_exists(model_dir)

  metrics = {}
  # Calibration and evaluation run on the chief alone, outside the strategy: no collective
  # step for the other workers to wait on.
  if chief:
    evaluate_lib.calibrate(model_dir, cfg.data_dir, take=take_eval)
  if cfg.evaluate and chief:
    metrics = evaluate_lib.evaluate(model_dir, cfg.data_dir, "test", take=take_eval)
  if cfg.serving_dir and chief:
    predict.export_serving(ensemble.load([model_dir]), cfg.serving_dir)
    logging.info("serving SavedModel (image_bytes in, calibrated probabilities out) in %s", cfg.serving_dir)
  logging.info("artifacts in %s", cfg.model_dir)
  return metrics


def main(argv):
  del argv
  try:
    train_and_evaluate(config_lib.config_from_flags())
  except callbacks_lib.Preempted as preempted:
    logging.warning("preempted: %s; a restart resumes from it", preempted)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, config_lib.define_flags)
