"""Which run a --model_dir holds: the fingerprint of the settings that shaped it.

A model_dir holds one run. Each stage's marker, the backups and the best
model's record carry the fingerprint of the settings that shaped that stage and
the ones before it. A command whose settings differ stops before it builds the
model or writes anything, and names each differing setting; `--overwrite`
clears that other run's state instead. The same command resumes; settings that
do not change what is learned (epoch counts, patience, strategy, precision,
XLA, cache, steps per execution, backups, export) may change between restarts.
"""

import tensorflow as tf
from absl import logging

from job import artifacts, config as config_lib
from tfrecords import cli, fileio

# What shapes stage 1, and stage 2 on top of it.
STAGE1_SETTINGS = ("image_size", "weights", "seed", "global_batch_size", "stage1_lr", "stage2_lr",
                   "lr_scaling", "base_batch_size", "warmup_epochs", "class_weights", "monitor", "debug")
STAGE2_SETTINGS = STAGE1_SETTINGS + ("fine_tune_layers",)


def fingerprint(cfg: config_lib.TrainConfig, manifest_sha256: str, stage: int) -> dict:
  """The settings that shaped `stage` (and the stages before it), with the shards' manifest."""
  names = STAGE1_SETTINGS if stage == 1 else STAGE2_SETTINGS
  return {"manifest_sha256": manifest_sha256, **{name: getattr(cfg, name) for name in names}}


def differences(recorded: dict, current: dict) -> list[str]:
  """'name: old → new' for each setting the two fingerprints disagree on."""
  return [f"{name}: {recorded.get(name)!r} → {current.get(name)!r}"
          for name in current if recorded.get(name) != current.get(name)]


def records(cfg: config_lib.TrainConfig) -> list[tuple[str, int, dict | None]]:
  """(path, stage, recorded fingerprint) of every record of a run in the model_dir."""
  checkpoints = fileio.join(cfg.checkpoint_root, artifacts.CHECKPOINTS_DIR)
  backups = fileio.join(cfg.checkpoint_root, artifacts.BACKUP_DIR)
  found = []
  for stage in (1, 2):
    for path in (fileio.join(checkpoints, f"stage{stage}.json"),
                 fileio.join(backups, f"stage{stage}", "training_metadata.json")):
      if tf.io.gfile.exists(path):
        found.append((path, stage, fileio.read_json(path).get("fingerprint")))
  best = artifacts.path(cfg.model_dir, artifacts.BEST_MODEL_STATE_FILE)
  if tf.io.gfile.exists(best):
    state = fileio.read_json(best)
    found.append((best, state.get("stage", 1), state.get("fingerprint")))
  return found


def check(cfg: config_lib.TrainConfig, manifest_sha256: str, overwrite: bool, chief: bool):
  """Stops, naming the differences, when the model_dir holds another run (clears it under
  --overwrite, on the chief; the other workers then ignore its records, which differ)."""
  conflicts = {}
  for path, stage, recorded in records(cfg):
    current = fingerprint(cfg, manifest_sha256, stage)
    changed = ["(no fingerprint: written by an older version)"] if recorded is None else differences(
        recorded, current)
    if changed:
      conflicts.setdefault(tuple(changed), []).append(path)
  if not conflicts:
    return
  changed = sorted({line for lines in conflicts for line in lines})
  if overwrite:
    if chief:
      logging.warning("--overwrite: clearing the other run in %s (%s)", cfg.model_dir, "; ".join(changed))
      clear(cfg)
    return
  paths = sorted(path for found in conflicts.values() for path in found)
  raise cli.UserError(f"--model_dir={cfg.model_dir} holds another run ({'; '.join(changed)}; recorded in "
                      f"{paths[0]}{' and others' if len(paths) > 1 else ''}). Give a new --model_dir, "
                      "or --overwrite to clear that run")


def clear(cfg: config_lib.TrainConfig):
  """Removes a run's state and artifacts: checkpoints, backups (under --checkpoint_dir too),
  TensorBoard logs and every artifact file."""
  for path in (fileio.join(cfg.checkpoint_root, artifacts.CHECKPOINTS_DIR),
               fileio.join(cfg.checkpoint_root, artifacts.BACKUP_DIR), cfg.logs_dir,
               *(artifacts.path(cfg.model_dir, name) for name in artifacts.RUN_FILES)):
    fileio.remove_if_exists(path)
