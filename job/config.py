"""The training job's settings: a frozen TrainConfig, and the flags that fill it.

Each default is written once, in TrainConfig; the flags take theirs from it.
The flags are read once, into a TrainConfig (flags are never mutated), and
checked there: a bad value ends the job before anything is built or written.
"""

import dataclasses
import os

from absl import flags

from job import accelerators, artifacts, data, distribute_utils, model as model_lib, optimization, performance
from tfrecords import cli

FLAGS = flags.FLAGS
MONITORS = ("val_f1", "val_accuracy", "val_loss")
MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  data_dir: str
  model_dir: str = "artifacts"
  checkpoint_dir: str | None = None
  tensorboard_dir: str | None = None
  strategy: str = "auto"
  tpu: str = ""
  expected_accelerator: str = ""  # what the job must see before it starts (job/accelerators.py)
  cpu_devices: int = 0
  mixed_precision: str = "auto"
  image_size: int = 224
  global_batch_size: int = 32
  weights: str = "imagenet"
  stage1_epochs: int = 10
  stage2_epochs: int = 10
  fine_tune_layers: int = 50
  stage1_lr: float = 1e-4  # the seed's, for batch 32 (base_batch_size)
  stage2_lr: float = 2e-5
  lr_scaling: str = "sqrt"
  base_batch_size: int = 32
  warmup_epochs: float = 1.0
  monitor: str = "val_f1"
  patience: int = 6
  class_weights: bool = True
  jit_compile: str = "auto"
  steps_per_execution: int = 1
  cache: str = "auto"
  backup_steps: int = 0
  seed: int = 0
  deterministic: bool = False
  debug: bool = False
  verify_shards: bool = True
  run_eagerly: bool = False
  evaluate: bool = True
  serving: bool = True
  export_dir: str | None = None
  overwrite: bool = False

  @property
  def checkpoint_root(self) -> str:
    return self.checkpoint_dir or self.model_dir

  @property
  def serving_dir(self) -> str | None:
    """Where the serving SavedModel goes at the end of training (None: not written)."""
    if not self.serving:
      return None
    return self.export_dir or artifacts.path(self.model_dir, artifacts.SERVING_DIR, artifacts.SERVING_VERSION)

  @property
  def logs_dir(self) -> str:
    return self.tensorboard_dir or artifacts.path(self.model_dir, artifacts.LOGS_DIR)


def default(name: str):
  return TrainConfig.__dataclass_fields__[name].default


def define_flags():
  d = default
  flags.DEFINE_string("data_dir", None, "Converted shards (local or gs://), with manifest.json.")
  flags.DEFINE_string("model_dir", None, "Where artifacts go (local or gs://). Default: "
                      f"$AIP_MODEL_DIR on Vertex AI, else {d('model_dir')}/.")
  flags.DEFINE_string("checkpoint_dir", None, "Stage checkpoints and backups. Default: "
                      "$AIP_CHECKPOINT_DIR on Vertex AI, else --model_dir.")
  flags.DEFINE_string("tensorboard_dir", None, "TensorBoard logs. Default: $AIP_TENSORBOARD_LOG_DIR, else "
                      "--model_dir/logs.")
  flags.DEFINE_enum("strategy", d("strategy"), distribute_utils.STRATEGIES, "tf.distribute strategy.")
  flags.DEFINE_string("expected_accelerator", None, "What this job was given and must see before it "
                      "reads any data, as TYPE:COUNT per machine (NVIDIA_L4:1, GPU:2 for any model; none: "
                      f"no check). Default: ${accelerators.EXPECTED_ACCELERATOR_ENV}, which the launchers set.")
  flags.DEFINE_string("tpu", d("tpu"), "TPU for --strategy=tpu: local, a name or grpc:// address.")
  flags.DEFINE_integer("cpu_devices", d("cpu_devices"), "Split the CPU into N logical devices (runs "
                       "mirrored without GPUs; for tests and debugging).")
  flags.DEFINE_enum("mixed_precision", d("mixed_precision"), performance.MIXED_PRECISION,
                    "auto: mixed_float16 on GPU, mixed_bfloat16 on TPU, float32 on CPU.")
  flags.DEFINE_integer("image_size", d("image_size"), "Training image size (square).")
  flags.DEFINE_integer("global_batch_size", d("global_batch_size"), "Batch size over all replicas (a "
                       "multiple of their number).")
  flags.DEFINE_string("weights", d("weights"), "imagenet, none (random init) or a ResNet-50 "
                      "no-top weights file (local or gs://).")
  flags.DEFINE_integer("stage1_epochs", d("stage1_epochs"), "Epochs training the head on a frozen backbone.")
  flags.DEFINE_integer("stage2_epochs", d("stage2_epochs"), "Epochs fine-tuning the top layers.")
  flags.DEFINE_integer("fine_tune_layers", d("fine_tune_layers"), "Backbone layers unfrozen in stage 2 "
                       "(BatchNorm stays frozen).")
  flags.DEFINE_float("stage1_lr", d("stage1_lr"), "Adam learning rate in stage 1, at --base_batch_size.")
  flags.DEFINE_float("stage2_lr", d("stage2_lr"), "Adam learning rate in stage 2, at --base_batch_size.")
  flags.DEFINE_enum("lr_scaling", d("lr_scaling"), optimization.LR_SCALING, "How the learning rates "
                    "follow --global_batch_size: sqrt (Adam's rule, Malladi et al. 2022), linear, none.")
  flags.DEFINE_integer("base_batch_size", d("base_batch_size"), "The batch the learning rates are for.")
  flags.DEFINE_float("warmup_epochs", d("warmup_epochs"), "Linear warm-up to the learning rate at the "
                     "start of each stage, in epochs (fractions allowed; 0: none).")
  flags.DEFINE_enum("monitor", d("monitor"), MONITORS, "Metric for the best model and early stopping "
                    "(val_f1: Keras's macro F1Score).")
  flags.DEFINE_integer("patience", d("patience"), "EarlyStopping patience, in epochs.")
  flags.DEFINE_bool("class_weights", d("class_weights"), "Weight the loss by inverse class frequency.")
  flags.DEFINE_enum("jit_compile", d("jit_compile"), performance.JIT_COMPILE, "XLA-compile the training "
                    "step, augmentation included. auto: on for TPUs and one GPU; off for several GPUs "
                    "or workers (a preflight with and without it tells whether it pays) and on CPUs.")
  flags.DEFINE_integer("steps_per_execution", d("steps_per_execution"), "Training steps per "
                       "tf.function call (at most an epoch's).")
  flags.DEFINE_enum("cache", d("cache"), data.CACHE_MODES, "Where decoded images are cached: memory, "
                    "disk (a local file), none; auto: memory when it fits with room to spare, else disk.")
  flags.DEFINE_integer("backup_steps", d("backup_steps"), "Also back up every N training steps (0: at "
                       "each epoch's end only). A backup is always saved on SIGTERM.")
  flags.DEFINE_integer("seed", d("seed"), "Random seed (weights, shuffling, augmentation).")
  flags.DEFINE_bool("deterministic", d("deterministic"), "Repeatable runs: TensorFlow's op determinism "
                    "with --seed, so the same flags on the same machine write the same history and "
                    "metrics (slower; on one CPU device shown by the tests, on GPUs as TensorFlow documents).")
  flags.DEFINE_bool("debug", d("debug"), "A small subset (64 train, 32 validation and test images) "
                    "for a quick run on one GPU or CPU.")
  flags.DEFINE_bool("verify_shards", d("verify_shards"), "Check every shard's sha256 against the "
                    "manifest before training (in parallel); --noverify_shards skips it for very large "
                    "sets, and a damaged shard is then named only when training reads it.")
  flags.DEFINE_bool("run_eagerly", d("run_eagerly"), "Run the model eagerly (slow; for debugging).")
  flags.DEFINE_bool("evaluate", d("evaluate"), "Evaluate the best model on the test split at the end.")
  flags.DEFINE_bool("serving", d("serving"), "At the end, write the serving SavedModel (JPEG bytes in, "
                    "calibrated probabilities out), ready to upload to Vertex AI; --noserving skips it.")
  flags.DEFINE_string("export_dir", d("export_dir"), "Where the serving SavedModel goes (default: "
                      "--model_dir/serving/1, TF Serving's layout of a base folder and a version; "
                      "$AIP_MODEL_DIR/serving/1 on Vertex AI).")
  flags.DEFINE_bool("overwrite", d("overwrite"), "Clear another run's state in --model_dir (and "
                    "--checkpoint_dir) instead of stopping.")


def config_from_flags() -> TrainConfig:
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)}
  values["model_dir"] = FLAGS.model_dir or os.environ.get("AIP_MODEL_DIR") or default("model_dir")
  values["checkpoint_dir"] = FLAGS.checkpoint_dir or os.environ.get("AIP_CHECKPOINT_DIR")
  values["tensorboard_dir"] = FLAGS.tensorboard_dir or os.environ.get("AIP_TENSORBOARD_LOG_DIR")
  values["expected_accelerator"] = (FLAGS.expected_accelerator if FLAGS.expected_accelerator is not None
                                    else os.environ.get(accelerators.EXPECTED_ACCELERATOR_ENV, ""))
  return validated(TrainConfig(**values))


def expected_accelerator(cfg: TrainConfig) -> "accelerators.Expected | None":
  given = "expected_accelerator" in FLAGS and FLAGS.is_parsed() and FLAGS["expected_accelerator"].present
  source = ("--expected_accelerator" if given
            else f"${accelerators.EXPECTED_ACCELERATOR_ENV}")
  return accelerators.parse_expected(cfg.expected_accelerator, source)


def validated(cfg: TrainConfig) -> TrainConfig:
  """`cfg`, or a UserError naming the first flag whose value cannot work."""
  if not cfg.data_dir:
    raise cli.UserError("--data_dir is required (the converter's output folder)")
  for name in ("image_size", "global_batch_size", "steps_per_execution", "base_batch_size"):
    if getattr(cfg, name) < 1:
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must be at least 1")
  for name in ("stage1_epochs", "stage2_epochs", "fine_tune_layers", "backup_steps", "cpu_devices",
               "warmup_epochs"):
    if getattr(cfg, name) < 0:
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must not be negative")
  if cfg.stage1_epochs == cfg.stage2_epochs == 0:
    raise cli.UserError("--stage1_epochs=0 --stage2_epochs=0: nothing to train (at least one epoch in all)")
  if cfg.image_size < MIN_IMAGE_SIZE:
    raise cli.UserError(f"--image_size={cfg.image_size}: ResNet-50 halves an image five times, so it takes "
                        f"{MIN_IMAGE_SIZE} px or more")
  for name in ("stage1_lr", "stage2_lr"):
    if not 0 < getattr(cfg, name) < float("inf"):
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must be a positive learning rate")
  expected_accelerator(cfg)  # names the flag or variable when malformed
  if cfg.fine_tune_layers > model_lib.BACKBONE_LAYERS:
    raise cli.UserError(f"--fine_tune_layers={cfg.fine_tune_layers}: the ResNet-50 backbone has "
                        f"{model_lib.BACKBONE_LAYERS} layers")
  return cfg
