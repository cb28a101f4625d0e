"""The training job's settings: a frozen TrainConfig, and the flags that fill it.

Each default is written once, in TrainConfig; the flags take theirs from it.
The flags are read once, into a TrainConfig (flags are never mutated), and
checked there: a bad value ends the job before anything is built or written.
"""

import dataclasses
import functools
import os

from absl import flags

from job import accelerators, backbones
from tfrecords import cli

FLAGS = flags.FLAGS
MONITORS = ("val_f1", "val_accuracy", "val_loss")
# The choices of the flags, here so that the launchers check a job's flags without TensorFlow.
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")  # job/distribute_utils.py
MIXED_PRECISION = ("auto", "float16", "bfloat16", "off")  # job/performance.py
JIT_COMPILE = ("auto", "on", "off")
CACHE_MODES = ("auto", "memory", "disk", "none")  # job/data.py
LR_SCALING = ("sqrt", "linear", "none")  # job/optimization.py
AUGMENT = ("seed", "dermoscopy")  # job/augment.py
COLOR_CONSTANCY = ("none", "shades_of_gray")  # job/color_constancy.py
# The dermoscopy preset's strengths (--aug_<name>), each a TrainConfig field "aug_<name>".
AUGMENT_STRENGTHS = ("rotation", "zoom", "shift", "brightness", "contrast", "saturation", "hue", "cutout")
MIN_IMAGE_SIZE = 32
METADATA_FIELDS = ("age", "sex", "localization")  # job/patient_metadata.py
METADATA_REFUSED = {"dx_type": "how the diagnosis was confirmed (histo, follow_up, …) gives the label away"}


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
  backbone: str = backbones.DEFAULT  # job/backbones.py
  weights: str = "imagenet"
  stage1_epochs: int = 10
  stage2_epochs: int = 10
  fine_tune_layers: int | None = None  # None: the backbone's share (job/backbones.py; ResNet-50: 50)
  stage1_lr: float = 1e-4  # the seed's, for batch 32 (base_batch_size)
  stage2_lr: float = 2e-5
  lr_scaling: str = "sqrt"
  base_batch_size: int = 32
  warmup_epochs: float = 1.0
  augment: str = "seed"
  aug_rotation: float = 0.125  # of a full turn: ±45°, beside the quarter turns
  aug_zoom: float = 0.1
  aug_shift: float = 0.1  # of the side
  aug_brightness: float = 0.1  # of the value range
  aug_contrast: float = 0.1
  aug_saturation: float = 0.1
  aug_hue: float = 0.05  # of a full turn of hue
  aug_cutout: float = 0.3  # the hole's side, of the image's; 0: none
  label_smoothing: float = 0.0
  color_constancy: str = "none"
  mixup: float = 0.0  # Beta(α, α) of mixup's share; 0: off (job/mixing.py)
  cutmix: float = 0.0  # the same for CutMix
  mix_probability: float = 1.0  # of a training image being mixed, when either is on
  metadata: tuple[str, ...] = ()  # patient fields the model takes beside the image, in METADATA_FIELDS order
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
  fold: int | None = None  # of a conversion with --folds: validate on it, train on the others

  @property
  def checkpoint_root(self) -> str:
    return self.checkpoint_dir or self.model_dir

  @property
  def serving_dir(self) -> str | None:
    """Where the serving SavedModel goes at the end of training (None: not written)."""
    if not self.serving:
      return None
    from job import artifacts  # pylint: disable=g-import-not-at-top  (TensorFlow: not for the launchers)
    return self.export_dir or artifacts.path(self.model_dir, artifacts.SERVING_DIR, artifacts.SERVING_VERSION)

  @property
  def logs_dir(self) -> str:
    from job import artifacts  # pylint: disable=g-import-not-at-top
    return self.tensorboard_dir or artifacts.path(self.model_dir, artifacts.LOGS_DIR)


def default(name: str):
  return TrainConfig.__dataclass_fields__[name].default


def define_preflight_flags(flag_values: flags.FlagValues = FLAGS):
  """job.preflight's own flag, beside job.train's (launch.vertex --preflight checks it too)."""
  flags.DEFINE_integer("preflight_steps", 20, "Timed training steps (rounded up to whole "
                       "--steps_per_execution), and as many again fed one in-memory batch.", lower_bound=1,
                       flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """job.train's flags, into `flag_values` (the launchers check a job's flags in a FlagValues of
  their own)."""
  string, integer, floating, boolean, enum = (
      functools.partial(define, flag_values=flag_values) for define in (
          flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_bool, flags.DEFINE_enum))
  d = default
  string("data_dir", None, "Converted shards (local or gs://), with manifest.json.")
  string("model_dir", None, "Where artifacts go (local or gs://). Default: "
         f"$AIP_MODEL_DIR on Vertex AI, else {d('model_dir')}/.")
  string("checkpoint_dir", None, "Stage checkpoints and backups. Default: "
         "$AIP_CHECKPOINT_DIR on Vertex AI, else --model_dir.")
  string("tensorboard_dir", None, "TensorBoard logs. Default: $AIP_TENSORBOARD_LOG_DIR, else "
         "--model_dir/logs.")
  enum("strategy", d("strategy"), STRATEGIES, "tf.distribute strategy.")
  string("expected_accelerator", None, "What this job was given and must see before it "
         "reads any data, as TYPE:COUNT per machine (NVIDIA_L4:1, GPU:2 for any model; none: "
         f"no check). Default: ${accelerators.EXPECTED_ACCELERATOR_ENV}, which the launchers set.")
  string("tpu", d("tpu"), "TPU for --strategy=tpu: local, a name or grpc:// address.")
  integer("cpu_devices", d("cpu_devices"), "Split the CPU into N logical devices (runs "
          "mirrored without GPUs; for tests and debugging).")
  enum("mixed_precision", d("mixed_precision"), MIXED_PRECISION,
       "auto: mixed_float16 on GPU, mixed_bfloat16 on TPU, float32 on CPU.")
  integer("image_size", d("image_size"), "Training image size (square).")
  integer("global_batch_size", d("global_batch_size"), "Batch size over all replicas (a "
          "multiple of their number).")
  enum("backbone", d("backbone"), backbones.NAMES, "The image network, from keras.applications "
       "(docs/training.md: what each costs, and how much of it stage 2 fine-tunes).")
  string("weights", d("weights"), "imagenet, none (random init) or a no-top weights file of "
         "--backbone (local or gs://).")
  integer("stage1_epochs", d("stage1_epochs"), "Epochs training the head on a frozen backbone.")
  integer("stage2_epochs", d("stage2_epochs"), "Epochs fine-tuning the top layers.")
  integer("fine_tune_layers", d("fine_tune_layers"), "Backbone layers unfrozen in stage 2, from "
          "the top (BatchNorm stays frozen). Default: ResNet-50's 50 of 175, the same share of other "
          "backbones, from the start of a block.")
  floating("stage1_lr", d("stage1_lr"), "Adam learning rate in stage 1, at --base_batch_size.")
  floating("stage2_lr", d("stage2_lr"), "Adam learning rate in stage 2, at --base_batch_size.")
  enum("lr_scaling", d("lr_scaling"), LR_SCALING, "How the learning rates "
       "follow --global_batch_size: sqrt (Adam's rule, Malladi et al. 2022), linear, none.")
  integer("base_batch_size", d("base_batch_size"), "The batch the learning rates are for.")
  floating("warmup_epochs", d("warmup_epochs"), "Linear warm-up to the learning rate at the "
           "start of each stage, in epochs (fractions allowed; 0: none).")
  enum("augment", d("augment"), AUGMENT, "seed: the seed's flip, rotation, zoom and contrast; "
       "dermoscopy: quarter turns and both flips, rotation, scale, shift, brightness/contrast/saturation/"
       "hue jitter and cutout, with the strengths of the --aug_* flags (docs/training.md).")
  for name, what in (("rotation", "rotation, a fraction of a full turn either way"), ("zoom", "scale, ± a fraction"),
                     ("shift", "shift, ± a fraction of the side"), ("brightness", "brightness, ± a fraction of 255"),
                     ("contrast", "contrast, × 1 ± this"), ("saturation", "saturation, × 1 ± this"),
                     ("hue", "hue, ± a fraction of a full turn"), ("cutout", "cutout's side, a fraction of "
                                                                     "the image's (0: none)")):
    floating(f"aug_{name}", d(f"aug_{name}"), f"--augment=dermoscopy: {what}.")
  enum("color_constancy", d("color_constancy"), COLOR_CONSTANCY, "shades_of_gray: Shades of Gray (p = 6) colour "
       "constancy as the saved model's first layer, in training, evaluation, prediction and serving alike; such a "
       "model does not load in the seed's inference example (docs/training.md).")
  floating("label_smoothing", d("label_smoothing"), "Label smoothing of the loss (0: none); the class "
           "weights follow the hard label.")
  floating("mixup", d("mixup"), "Mixup: α of the Beta(α, α) share each training image keeps of itself "
           "(timm uses 0.8); 0: off. Mixes the labels too, in the training step (docs/training.md).")
  floating("cutmix", d("cutmix"), "CutMix: α as --mixup's, the share being the image's area left (timm: 1.0); "
           "0: off. With --mixup, each mixed image is one or the other at even odds.")
  floating("mix_probability", d("mix_probability"), "With --mixup or --cutmix: the probability that a "
           "training image is mixed.")
  flags.DEFINE_list("metadata", list(d("metadata")), "Patient fields the model takes beside the image: any of "
                    f"{', '.join(METADATA_FIELDS)} (comma-separated; default none). dx_type is refused: it gives "
                    "the label away.", flag_values=flag_values)
  enum("monitor", d("monitor"), MONITORS, "Metric for the best model and early stopping "
       "(val_f1: Keras's macro F1Score).")
  integer("patience", d("patience"), "EarlyStopping patience, in epochs.")
  boolean("class_weights", d("class_weights"), "Weight the loss by inverse class frequency.")
  enum("jit_compile", d("jit_compile"), JIT_COMPILE, "XLA-compile the training "
       "step, augmentation included. auto: on for TPUs and one GPU; off for several GPUs "
       "or workers (a preflight with and without it tells whether it pays) and on CPUs.")
  integer("steps_per_execution", d("steps_per_execution"), "Training steps per "
          "tf.function call (at most an epoch's).")
  enum("cache", d("cache"), CACHE_MODES, "Where decoded images are cached: memory, "
       "disk (a local file), none; auto: memory when it fits with room to spare, else disk.")
  integer("backup_steps", d("backup_steps"), "Also back up every N training steps (0: at "
          "each epoch's end only). A backup is always saved on SIGTERM.")
  integer("seed", d("seed"), "Random seed (weights, shuffling, augmentation).")
  boolean("deterministic", d("deterministic"), "Repeatable runs: TensorFlow's op determinism "
          "with --seed, so the same flags on the same machine write the same history and "
          "metrics (slower; on one CPU device shown by the tests, on GPUs as TensorFlow documents).")
  boolean("debug", d("debug"), "A small subset (64 train, 32 validation and test images) "
          "for a quick run on one GPU or CPU.")
  boolean("verify_shards", d("verify_shards"), "Check every shard's sha256 against the "
          "manifest before training (in parallel); --noverify_shards skips it for very large "
          "sets, and a damaged shard is then named only when training reads it.")
  boolean("run_eagerly", d("run_eagerly"), "Run the model eagerly (slow; for debugging).")
  boolean("evaluate", d("evaluate"), "Evaluate the best model on the test split at the end.")
  boolean("serving", d("serving"), "At the end, write the serving SavedModel (JPEG bytes in, "
          "calibrated probabilities out), ready to upload to Vertex AI; --noserving skips it.")
  string("export_dir", d("export_dir"), "Where the serving SavedModel goes (default: "
         "--model_dir/serving/1, TF Serving's layout of a base folder and a version; "
         "$AIP_MODEL_DIR/serving/1 on Vertex AI).")
  integer("fold", d("fold"), "Of shards converted with --folds=K: validate (early stopping, best "
          "model, calibration) on fold k and train on the other K-1 (job.cross_validate trains them all). "
          "Default: the validation and train shards as they are (fold 0 of a folded conversion).")
  boolean("overwrite", d("overwrite"), "Clear another run's state in --model_dir (and "
          "--checkpoint_dir) instead of stopping.")


def config_from_flags() -> TrainConfig:
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)}
  values["model_dir"] = FLAGS.model_dir or os.environ.get("AIP_MODEL_DIR") or default("model_dir")
  values["checkpoint_dir"] = FLAGS.checkpoint_dir or os.environ.get("AIP_CHECKPOINT_DIR")
  values["tensorboard_dir"] = FLAGS.tensorboard_dir or os.environ.get("AIP_TENSORBOARD_LOG_DIR")
  values["expected_accelerator"] = (FLAGS.expected_accelerator if FLAGS.expected_accelerator is not None
                                    else os.environ.get(accelerators.EXPECTED_ACCELERATOR_ENV, ""))
  values["metadata"] = tuple(FLAGS.metadata)
  return validated(TrainConfig(**values))


def expected_accelerator(cfg: TrainConfig) -> "accelerators.Expected | None":
  given = "expected_accelerator" in FLAGS and FLAGS.is_parsed() and FLAGS["expected_accelerator"].present
  source = ("--expected_accelerator" if given
            else f"${accelerators.EXPECTED_ACCELERATOR_ENV}")
  return accelerators.parse_expected(cfg.expected_accelerator, source)


def mixing(cfg: TrainConfig) -> dict | None:
  """Mixup/CutMix as they shape a run (job/mixing.py's MixingTrainer settings), or None when both
  are off (the probability then means nothing)."""
  if cfg.mixup == 0 and cfg.cutmix == 0:
    return None
  return {"mixup": cfg.mixup, "cutmix": cfg.cutmix, "probability": cfg.mix_probability}


def metadata_fields(names) -> tuple[str, ...]:
  """--metadata's fields in METADATA_FIELDS order, or a UserError naming what cannot be an input."""
  names = [n.strip() for n in names if n.strip()]
  for name in names:
    if name in METADATA_REFUSED:
      raise cli.UserError(f"--metadata={','.join(names)}: {name} cannot be an input: {METADATA_REFUSED[name]}")
    if name not in METADATA_FIELDS:
      raise cli.UserError(f"--metadata={','.join(names)}: {name} is not a field; expected any of "
                          f"{', '.join(METADATA_FIELDS)}")
  return tuple(f for f in METADATA_FIELDS if f in names)


def validated(cfg: TrainConfig) -> TrainConfig:
  """`cfg`, or a UserError naming the first flag whose value cannot work."""
  if not cfg.data_dir:
    raise cli.UserError("--data_dir is required (the converter's output folder)")
  for name in ("image_size", "global_batch_size", "steps_per_execution", "base_batch_size"):
    if getattr(cfg, name) < 1:
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must be at least 1")
  for name in ("stage1_epochs", "stage2_epochs", "fine_tune_layers", "backup_steps", "cpu_devices",
               "warmup_epochs"):
    if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must not be negative")
  if cfg.fold is not None and cfg.fold < 0:
    raise cli.UserError(f"--fold={cfg.fold} must not be negative")
  if cfg.stage1_epochs == cfg.stage2_epochs == 0:
    raise cli.UserError("--stage1_epochs=0 --stage2_epochs=0: nothing to train (at least one epoch in all)")
  if cfg.image_size < MIN_IMAGE_SIZE:
    raise cli.UserError(f"--image_size={cfg.image_size}: the backbones halve an image five times, so they take "
                        f"{MIN_IMAGE_SIZE} px or more")
  for name in (*(f"aug_{n}" for n in AUGMENT_STRENGTHS), "label_smoothing"):
    if not 0 <= getattr(cfg, name) < 1:
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must be at least 0 and below 1")
  for name in ("mixup", "cutmix"):
    if not 0 <= getattr(cfg, name) < float("inf"):
      raise cli.UserError(f"--{name}={getattr(cfg, name)}: expected α ≥ 0 of Beta(α, α) (0: off)")
  if not 0 < cfg.mix_probability <= 1:
    raise cli.UserError(f"--mix_probability={cfg.mix_probability} must be above 0 and at most 1")
  if cfg.color_constancy not in COLOR_CONSTANCY:
    raise cli.UserError(f"--color_constancy={cfg.color_constancy}: expected one of {', '.join(COLOR_CONSTANCY)}")
  if cfg.augment not in AUGMENT:
    raise cli.UserError(f"--augment={cfg.augment}: expected one of {', '.join(AUGMENT)}")
  for name in ("stage1_lr", "stage2_lr"):
    if not 0 < getattr(cfg, name) < float("inf"):
      raise cli.UserError(f"--{name}={getattr(cfg, name)} must be a positive learning rate")
  expected_accelerator(cfg)  # names the flag or variable when malformed
  if cfg.backbone not in backbones.REGISTRY:
    raise cli.UserError(f"--backbone={cfg.backbone}: expected one of {', '.join(backbones.NAMES)}")
  layers = backbones.get(cfg.backbone).layers
  if cfg.fine_tune_layers is not None and cfg.fine_tune_layers > layers:
    raise cli.UserError(f"--fine_tune_layers={cfg.fine_tune_layers}: the {cfg.backbone} backbone has "
                        f"{layers} layers")
  return dataclasses.replace(cfg, metadata=metadata_fields(cfg.metadata))
