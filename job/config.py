"""The training job's flags, read once into a frozen TrainConfig (flags are never mutated)."""

import dataclasses
import os

from absl import flags

from job import distribute_utils, performance

FLAGS = flags.FLAGS
MONITORS = ("val_f1", "val_accuracy", "val_loss")


def define_flags():
  flags.DEFINE_string("data_dir", None, "Converted shards (local or gs://), with manifest.json.")
  flags.DEFINE_string("model_dir", None, "Where artifacts go (local or gs://). Default: "
                      "$AIP_MODEL_DIR on Vertex AI, else artifacts/.")
  flags.DEFINE_string("checkpoint_dir", None, "Stage checkpoints and backups. Default: "
                      "$AIP_CHECKPOINT_DIR on Vertex AI, else --model_dir.")
  flags.DEFINE_string("tensorboard_dir", None, "TensorBoard logs. Default: $AIP_TENSORBOARD_LOG_DIR, else "
                      "--model_dir/logs.")
  flags.DEFINE_enum("strategy", "auto", distribute_utils.STRATEGIES, "tf.distribute strategy.")
  flags.DEFINE_string("tpu", "", "TPU for --strategy=tpu: local, a name or grpc:// address.")
  flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into N logical devices (runs mirrored "
                       "without GPUs; for tests and debugging).")
  flags.DEFINE_enum("mixed_precision", "auto", performance.MIXED_PRECISION,
                    "auto: mixed_float16 on GPU, mixed_bfloat16 on TPU, float32 on CPU.")
  flags.DEFINE_integer("image_size", 224, "Training image size (square).")
  flags.DEFINE_integer("global_batch_size", 32, "Batch size over all replicas.")
  flags.DEFINE_string("weights", "imagenet", "imagenet, none (random init) or a ResNet-50 "
                      "no-top weights file (local or gs://).")
  flags.DEFINE_integer("stage1_epochs", 10, "Epochs training the head on a frozen backbone.")
  flags.DEFINE_integer("stage2_epochs", 10, "Epochs fine-tuning the top layers.")
  flags.DEFINE_integer("fine_tune_layers", 50, "Backbone layers unfrozen in stage 2 (BatchNorm stays frozen).")
  flags.DEFINE_float("stage1_lr", 1e-4, "Adam learning rate in stage 1.")
  flags.DEFINE_float("stage2_lr", 2e-5, "Adam learning rate in stage 2.")
  flags.DEFINE_enum("monitor", "val_f1", MONITORS, "Metric for the best model and early stopping "
                    "(val_f1: Keras's macro F1Score).")
  flags.DEFINE_integer("patience", 6, "EarlyStopping patience, in epochs.")
  flags.DEFINE_bool("class_weights", True, "Weight the loss by inverse class frequency.")
  flags.DEFINE_enum("jit_compile", "auto", performance.JIT_COMPILE, "XLA-compile the training "
                    "step, augmentation included. auto: on for TPUs and GPUs, off on CPUs.")
  flags.DEFINE_integer("steps_per_execution", 1, "Training steps per tf.function call.")
  flags.DEFINE_integer("backup_steps", 0, "Also back up every N training steps (0: at each epoch's "
                       "end only). A backup is always saved on SIGTERM.")
  flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, augmentation).")
  flags.DEFINE_bool("debug", False, "A small subset (64 train, 32 validation and test images) "
                    "for a quick run on one GPU or CPU.")
  flags.DEFINE_bool("run_eagerly", False, "Run the model eagerly (slow; for debugging).")
  flags.DEFINE_bool("evaluate", True, "Evaluate the best model on the test split at the end.")
  flags.DEFINE_string("export_dir", None, "Also write a serving SavedModel (JPEG bytes in, "
                      "calibrated probabilities out) here at the end.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  data_dir: str
  model_dir: str = "artifacts"
  checkpoint_dir: str | None = None
  tensorboard_dir: str | None = None
  strategy: str = "auto"
  tpu: str = ""
  cpu_devices: int = 0
  mixed_precision: str = "auto"
  image_size: int = 224
  global_batch_size: int = 32
  weights: str = "imagenet"
  stage1_epochs: int = 10
  stage2_epochs: int = 10
  fine_tune_layers: int = 50
  stage1_lr: float = 1e-4
  stage2_lr: float = 2e-5
  monitor: str = "val_f1"
  patience: int = 6
  class_weights: bool = True
  jit_compile: str = "auto"
  steps_per_execution: int = 1
  backup_steps: int = 0
  seed: int = 0
  debug: bool = False
  run_eagerly: bool = False
  evaluate: bool = True
  export_dir: str | None = None

  @property
  def checkpoint_root(self) -> str:
    return self.checkpoint_dir or self.model_dir

  @property
  def logs_dir(self) -> str:
    return self.tensorboard_dir or os.path.join(self.model_dir, "logs")


def config_from_flags() -> TrainConfig:
  if not FLAGS.data_dir:
    raise flags.ValidationError("--data_dir is required (the converter's output folder)")
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig) if f.name in FLAGS}
  values["model_dir"] = FLAGS.model_dir or os.environ.get("AIP_MODEL_DIR") or "artifacts"
  values["checkpoint_dir"] = FLAGS.checkpoint_dir or os.environ.get("AIP_CHECKPOINT_DIR")
  values["tensorboard_dir"] = FLAGS.tensorboard_dir or os.environ.get("AIP_TENSORBOARD_LOG_DIR")
  for name in ("image_size", "global_batch_size", "steps_per_execution"):
    if values[name] < 1:
      raise flags.ValidationError(f"--{name} must be at least 1")
  for name in ("stage1_epochs", "stage2_epochs", "fine_tune_layers", "backup_steps"):
    if values[name] < 0:
      raise flags.ValidationError(f"--{name} must not be negative")
  return TrainConfig(**values)
