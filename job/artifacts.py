"""A run's artifacts in --model_dir: their names, and reading them back.

The training job writes them, the evaluation adds its figures and pictures,
and prediction, the serving export and users' scripts (the seed's inference
example among them) read them. Every artifact's name is spelled here once.
"""

import keras
import tensorflow as tf

from tfrecords import cli, fileio, manifest

BEST_MODEL_FILE = "best_model.keras"  # the inner model, float32: what the seed's example loads
BEST_MODEL_STATE_FILE = "best_model.json"  # the monitor's best value so far, across stages and restarts
LABEL_MAP_FILE = manifest.LABEL_MAP_FILE  # the classes in index order, as in the shards' folder
HISTORY_FILE = "history.csv"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CALIBRATION_FILE = "calibration.json"
PREFLIGHT_FILE = "preflight.json"  # job.preflight's report: the only file a preflight leaves
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"
TRAINING_CURVES_PLOT = "training_curves.png"
RELIABILITY_PLOT = "reliability_diagram.png"
SERVING_DIR = "serving"  # TF Serving's model base path: the SavedModel is in serving/{SERVING_VERSION}/
SERVING_VERSION = "1"  # TF Serving serves <base>/<integer version>/saved_model.pb
EVALUATION_DIR = "evaluation"  # evaluation/{split}/: a split other than test (job.evaluate --split)
# The files of one run, which --overwrite clears with its checkpoints, backups and logs.
RUN_FILES = (BEST_MODEL_FILE, BEST_MODEL_STATE_FILE, LABEL_MAP_FILE, HISTORY_FILE, RUN_CONFIG_FILE,
             METRICS_FILE, PREDICTIONS_FILE, CALIBRATION_FILE, CONFUSION_MATRIX_PLOT,
             TRAINING_CURVES_PLOT, RELIABILITY_PLOT, SERVING_DIR, EVALUATION_DIR)
CHECKPOINTS_DIR = "checkpoints"  # finished stages' markers and weights
BACKUP_DIR = "backup"  # the running stage's BackupAndRestore
LOGS_DIR = "logs"  # TensorBoard


def path(model_dir: str, *parts: str) -> str:
  return fileio.join(model_dir, *parts)


def evaluation_dir(model_dir: str, split: str) -> str:
  """Where job.evaluate writes a split's figures: the test split beside the model (where the
  training job puts them), any other in evaluation/{split}/."""
  return model_dir if split == "test" else path(model_dir, EVALUATION_DIR, split)


def read_run_config(model_dir: str) -> dict:
  config_path = path(model_dir, RUN_CONFIG_FILE)
  if not tf.io.gfile.exists(config_path):
    raise cli.UserError(f"--model_dir={model_dir}: no {RUN_CONFIG_FILE} (not the folder of a training "
                        "run; give the --model_dir that python -m job.train wrote)")
  return fileio.read_json(config_path)


def read_calibration(model_dir: str) -> dict | None:
  """calibration.json, or None for a run that has not been evaluated yet."""
  calibration_path = path(model_dir, CALIBRATION_FILE)
  return fileio.read_json(calibration_path) if tf.io.gfile.exists(calibration_path) else None


def write_label_map(model_dir: str, class_names):
  fileio.write_json(path(model_dir, LABEL_MAP_FILE), manifest.label_map(class_names))


def class_names(model_dir: str) -> tuple[str, ...]:
  """The run's classes in index order, from its label_map.json."""
  label_map_path = path(model_dir, LABEL_MAP_FILE)
  if not tf.io.gfile.exists(label_map_path):
    raise cli.UserError(f"--model_dir={model_dir}: no {LABEL_MAP_FILE}")
  label_map = fileio.read_json(label_map_path)
  return tuple(sorted(label_map, key=label_map.get))


def load_best_model(model_dir: str) -> keras.Model:
  model_path = path(model_dir, BEST_MODEL_FILE)
  if not tf.io.gfile.exists(model_path):
    raise cli.UserError(f"--model_dir={model_dir}: no {BEST_MODEL_FILE} (training has not finished an "
                        "epoch there)")
  try:
    return keras.saving.load_model(fileio.copy_to_local(model_path), safe_mode=True)
  except (ValueError, OSError, KeyError) as e:  # zipfile's BadZipFile is an OSError
    # Keras's words for a truncated file ("File not found: ...") name the wrong cause.
    raise cli.UserError(f"{model_path} is not a readable Keras model ({type(e).__name__}); it may be cut short: "
                        "rerun the training command to write it again") from None
