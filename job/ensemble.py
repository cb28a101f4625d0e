"""Trained runs as one predictor: a run, several runs, or a cross-validation's folds.

Everything that uses a model (job.evaluate, job.predict, the serving export,
job.compare) takes an `Ensemble`; a single run is an ensemble of one, and then
every figure is exactly the run's own.

An ensemble's probabilities are the arithmetic mean of its members' calibrated
probabilities, each member calibrated with its own temperature for the
test-time augmentation in use (calibration.json holds one per mode). The mean
of probabilities, not of logits or log-probabilities: it is what the ISIC
winners average, it stays a probability whatever the members' temperatures,
and a member that is confidently wrong moves it by at most 1/M. The mean is
not recalibrated: the out-of-fold predictions come from one fold model each,
so a temperature fitted on them would calibrate single models, not their mean
(the ensemble's test figures report its calibration error as it is); its
melanoma threshold is chosen on them (job/cross_validate.py).

Members trained at different image sizes each get the image resized from the
original to their own size (features.decode_and_resize), as in training.
"""

import dataclasses
import functools
import re

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from job import artifacts, calibration, model as model_lib, patient_metadata, tta as tta_lib
from tfrecords import cli, fileio

CROSS_VALIDATION_FILE = "cross_validation.json"  # in a cross-validation's root: its folds, written last
FOLD_DIR = "fold-{}"


def _probabilities(model: keras.Model, images: tf.Tensor, encoded: dict | None = None) -> tf.Tensor:
  return model(model_lib.inner_inputs(model, model_lib.preprocess(images), encoded), training=False)


def encoded_views(fields: tuple[str, ...], raw_metadata: dict, mode: str) -> dict[str, tf.Tensor]:
  """The batch's fields encoded, repeated for every view of tta.views (view-major)."""
  return {f: tf.tile(v, [tta_lib.NUM_VIEWS[mode], 1]) for f, v in patient_metadata.encode(fields, raw_metadata).items()}


def probabilities_of_views(model: keras.Model, images: tf.Tensor, mode: str, raw_metadata: dict | None = None):
  """The model's probabilities of every view of the batch (tta.views), each view with its image's
  metadata; graph ops (the serving export calls it)."""
  fields = patient_metadata.fields_of(model)
  return _probabilities(model, tta_lib.views(images, mode), encoded_views(fields, raw_metadata, mode) if fields else None)


@dataclasses.dataclass(frozen=True)
class Member:
  """One run: its best model, training image size, classes and calibration.json (None before
  the run is calibrated)."""
  model_dir: str
  model: keras.Model
  image_size: int
  class_names: tuple[str, ...]
  calibration: dict | None
  metadata_counts: dict | None = None  # --metadata: the train split's categories (run_config.json)

  def calibration_for(self, mode: str) -> dict:
    """{"temperature", "melanoma_threshold"} of the TTA mode (temperature 1 before calibration)."""
    if self.calibration is None:
      return {"temperature": 1.0, "melanoma_threshold": None}
    fitted = self.calibration.get("tta", {}).get(mode)
    if fitted:
      return fitted
    if mode == "none":  # a calibration.json from before test-time augmentation
      return {"temperature": self.calibration["temperature"],
              "melanoma_threshold": self.calibration.get("melanoma_threshold")}
    raise cli.UserError(f"--model_dir={self.model_dir}: its {artifacts.CALIBRATION_FILE} has no temperature "
                        f"for --tta={mode} (written by a version without test-time augmentation); use "
                        "--tta=none, or train the run again")

  @property
  def metadata_fields(self) -> tuple[str, ...]:
    """The patient fields the model takes beside the image (() for an image-only model)."""
    return patient_metadata.fields_of(self.model)

  @functools.cached_property
  def _forward(self):
    # One trace per member for every batch size: the views of each TTA mode and a last, smaller
    # batch would each retrace predict_on_batch's function (reduce_retracing still traced once
    # per new size, and TensorFlow warned of it).
    # A partial, not a lambda: TensorFlow counts traces per code object, so members' lambdas,
    # each traced once, would add up to its "excessive retracing" warning in a 5-fold ensemble.
    signature = [tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)]  # as tta.views gives
    if self.metadata_fields:
      signature.append({f: tf.TensorSpec([None, patient_metadata.WIDTHS[f]], tf.float32) for f in self.metadata_fields})
    return tf.function(functools.partial(_probabilities, self.model), input_signature=signature)

  def raw_views(self, images: tf.Tensor, mode: str, metadata: dict | None = None) -> np.ndarray:
    """The model's own probabilities of every view of the batch: [V·B, classes] (tta.views).
    metadata: the batch's raw fields {"age", "sex", "localization"}, for a model that takes them."""
    inputs = [tf.cast(tta_lib.views(images, mode), tf.float32)]
    if self.metadata_fields:
      if metadata is None:
        raise cli.UserError(f"--model_dir={self.model_dir} takes the patient's {', '.join(self.metadata_fields)} "
                            "beside the image, and none were given")
      inputs.append(encoded_views(self.metadata_fields, metadata, mode))
    return self._forward(*inputs).numpy().astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Per image, the ensemble's mean calibrated probabilities and mean raw ones, and each
  member's calibrated ones (members × images × classes)."""
  calibrated: np.ndarray
  raw: np.ndarray
  members: np.ndarray


@dataclasses.dataclass(frozen=True)
class Ensemble:
  name: str  # what the user named: a model_dir, or several
  members: tuple[Member, ...]
  cross_validation: dict | None = None  # a cross-validation root's cross_validation.json

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.members[0].class_names

  @property
  def image_sizes(self) -> tuple[int, ...]:
    return tuple(sorted({m.image_size for m in self.members}))

  @property
  def model_dirs(self) -> list[str]:
    return [m.model_dir for m in self.members]

  def melanoma_threshold(self, mode: str) -> dict | None:
    """The threshold chosen on validation (one run) or on the out-of-fold predictions (a
    cross-validation); None for runs put together here, which share no validation split."""
    if self.cross_validation:
      return self.cross_validation["melanoma_threshold"].get(mode)
    if len(self.members) == 1:
      return self.members[0].calibration_for(mode)["melanoma_threshold"]
    return None

  def uncalibrated_warning(self, what: str):
    for member in self.members:
      if member.calibration is None:
        logging.warning("--model_dir=%s has no %s (the training job writes it when it finishes): %s the model's "
                        "own probabilities, not calibrated ones", member.model_dir, artifacts.CALIBRATION_FILE, what)

  @property
  def metadata_fields(self) -> tuple[str, ...]:
    """The patient fields any member takes."""
    taken = {f for m in self.members for f in m.metadata_fields}
    return tuple(f for f in patient_metadata.FIELDS if f in taken)

  def warn_untrained(self, raw: dict, where: str):
    """Warns of the values in `raw` (a table's fields) that some member's train split never had."""
    for member in self.members:
      if not member.metadata_counts:
        continue
      for field, found in patient_metadata.untrained(member.metadata_counts, raw).items():
        logging.warning("%s: %s %s, which the train split of --model_dir=%s never had: the model learned nothing "
                        "for it, so these predictions rest on an untrained input", where, field,
                        ", ".join(f"{c} ({n} image(s))" for c, n in found.items()), member.model_dir)

  def predict(self, images: dict[int, tf.Tensor], mode: str = "none", calibrated: bool = True,
              metadata: dict | None = None) -> Prediction:
    """Probabilities of one batch; `images`: the batch at each of image_sizes (uint8); `metadata`:
    its raw fields, for members that take them."""
    raws, calibrateds = [], []
    for member in self.members:
      raw = tta_lib.mean_over_views(member.raw_views(images[member.image_size], mode, metadata), mode)
      temperature = member.calibration_for(mode)["temperature"] if calibrated else 1.0
      raws.append(raw)
      calibrateds.append(calibration.apply_temperature(raw, temperature))
    stacked = np.stack(calibrateds)
    return Prediction(stacked.mean(axis=0), np.mean(raws, axis=0), stacked)

  def describe(self, mode: str) -> dict:
    """What metrics.json and the export record of the predictor."""
    return {"model_dirs": self.model_dirs, "num_members": len(self.members),
            "backbones": [m.model.name.removeprefix("ham10000_") for m in self.members], "image_sizes": list(self.image_sizes),
            "metadata": [list(m.metadata_fields) for m in self.members],
            "tta": mode, "tta_views": tta_lib.NUM_VIEWS[mode],
            "combination": "single run" if len(self.members) == 1 else "mean of the members' calibrated probabilities",
            "temperatures": [m.calibration_for(mode)["temperature"] for m in self.members]}


def load_member(model_dir: str) -> Member:
  # The run config first: a folder that holds no run is told so, not that its model is missing.
  run_config = artifacts.read_run_config(model_dir)
  return Member(model_dir, artifacts.load_best_model(model_dir), run_config["image_size"],
                artifacts.class_names(model_dir), artifacts.read_calibration(model_dir),
                run_config.get("metadata_counts"))


def fold_dirs(root: str) -> list[str]:
  """The fold-<k> folders under a cross-validation root, in fold order."""
  if not tf.io.gfile.isdir(root):
    return []
  found = [(int(m.group(1)), name.rstrip("/")) for name in tf.io.gfile.listdir(root)
           if (m := re.fullmatch(r"fold-(\d+)/?", name))]
  return [fileio.join(root, name) for _, name in sorted(found)]


def is_cross_validation(model_dir: str) -> bool:
  return tf.io.gfile.exists(fileio.join(model_dir, CROSS_VALIDATION_FILE))


def member_dirs(model_dir: str) -> tuple[list[str], dict | None]:
  """A run's folder, or a finished cross-validation's members and its record."""
  if is_cross_validation(model_dir):
    record = fileio.read_json(fileio.join(model_dir, CROSS_VALIDATION_FILE))
    return [fileio.join(model_dir, FOLD_DIR.format(k)) for k in range(record["folds"])], record
  if not tf.io.gfile.exists(artifacts.path(model_dir, artifacts.RUN_CONFIG_FILE)) and fold_dirs(model_dir):
    raise cli.UserError(f"--model_dir={model_dir}: a cross-validation that has not finished (no "
                        f"{CROSS_VALIDATION_FILE}); rerun python -m job.cross_validate with --model_dir={model_dir} "
                        "to finish it")
  return [model_dir], None


def load(model_dirs: list[str]) -> Ensemble:
  """The runs named (each a run's folder or a cross-validation root) as one ensemble; the
  members must share their classes, in the same order."""
  if not model_dirs:
    raise cli.UserError("give --model_dir (a run's folder or a cross-validation's root)")
  dirs, record = [], None
  for model_dir in model_dirs:
    found, record = member_dirs(model_dir)
    dirs += found
  repeated = sorted({d for d in dirs if dirs.count(d) > 1})
  if repeated:
    raise cli.UserError(f"--model_dir: {repeated[0]} is given twice; an ensemble holds each run once")
  members = tuple(load_member(d) for d in dirs)
  for member in members[1:]:
    if member.class_names != members[0].class_names:
      raise cli.UserError(f"--model_dir={member.model_dir} predicts the classes {list(member.class_names)}, "
                          f"--model_dir={members[0].model_dir} {list(members[0].class_names)}: an ensemble's "
                          "members must share their classes, in the same order")
  return Ensemble(",".join(model_dirs), members, record if len(model_dirs) == 1 else None)
