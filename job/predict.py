r"""Inference on raw JPEGs, and the serving export.

  python -m job.predict --model_dir=artifacts photo.jpg folder/ "gs://bucket/new/*.jpg"
  python -m job.predict --model_dir=artifacts --output=preds.csv folder/
  python -m job.predict --model_dir=artifacts --export_dir=gs://bucket/serving/1
  python -m job.predict --model_dir=artifacts --format=isic2018 --output=submission.csv \
      ISIC2018_Task3_Test_Input/
  python -m job.predict --model_dir=cv_root --tta=dihedral folder/      # a cross-validation's folds
  python -m job.predict --model_dir=run_a --model_dir=run_b folder/     # two runs as one ensemble

Images of any size are resized to the training size from run_config.json and
preprocessed exactly as in training. Probabilities are temperature-calibrated
(calibration.json) unless --raw; an ensemble's are the mean of its members'
(job/ensemble.py), under --tta the mean over the views first (job/tta.py). `--format=isic2018` writes an ISIC 2018 Task 3
submission (image id without extension, then one probability per class in the
challenge's column order), and writes nothing if any image cannot be read: a
submission without some images is invalid.
"""

import io
import os

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import flags, logging

from job import calibration, ensemble as ensemble_lib, patient_metadata, tta as tta_lib
from tfrecords import cli, features, fileio, sources

# What job.predict reads (features.decode_and_resize with any_format), in a folder as named.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def expand_paths(paths: list[str]) -> tuple[list[str], list[str]]:
  """Files, folders (their images) and globs, local or gs://, in a stable order; and what was
  given but is not read, each with why: only regular files are read (a named pipe would block
  forever), a local file name must be UTF-8 (TensorFlow's file system takes no other), and a
  folder named as an argument must hold images."""
  out, not_read = [], []
  for path in paths:
    if tf.io.gfile.isdir(path):
      images = _images_in(path, not_read)
      if not images:
        not_read.append(f"{path} (a folder without {', '.join(IMAGE_SUFFIXES)} files)")
      out += images
    elif any(c in path for c in "*?["):
      out += [p for p in sorted(tf.io.gfile.glob(path)) if _regular(p, not_read)]
    elif tf.io.gfile.exists(path):
      out += [path] if _regular(path, not_read) else []
    else:
      raise cli.UserError(f"{path}: no such file or folder")
  return out, not_read


def _images_in(folder: str, not_read: list[str]) -> list[str]:
  if not fileio.is_local(folder):
    return sorted(fileio.join(folder, n) for n in tf.io.gfile.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
  images = []
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if not entry.name.lower().endswith(IMAGE_SUFFIXES):
      continue
    try:
      entry.name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir keeps undecodable bytes as surrogates
      not_read.append(f"{os.path.join(folder, os.fsencode(entry.name).decode('utf-8', 'backslashreplace'))} "
                      "(its name is not UTF-8: rename it)")
      continue
    if _regular(entry.path, not_read):
      images.append(entry.path)
  return images


def _regular(path: str, not_read: list[str]) -> bool:
  if fileio.is_local(path) and not os.path.isfile(path):
    not_read.append(f"{path} (not a regular file)")
    return False
  return True


def image_id(path: str) -> str:
  """What a metadata CSV and an ISIC submission call an image: its file name without extension."""
  return os.path.splitext(os.path.basename(path))[0]


def metadata_of(predictor: ensemble_lib.Ensemble, paths: list[str], metadata_csv: str | None) -> dict | None:
  """The raw patient fields of each path, in order, for a predictor that takes them (else None);
  a UserError names the images the CSV has no row for."""
  fields = predictor.metadata_fields
  if not fields:
    if metadata_csv:
      logging.warning("--metadata_csv=%s is not read: --model_dir=%s takes images only", metadata_csv, predictor.name)
    return None
  if not metadata_csv:
    raise cli.UserError(f"--model_dir={predictor.name} takes the patient's {', '.join(fields)} beside the image: "
                        "give --metadata_csv=FILE (a row per image id: image_id and those columns)")
  table = patient_metadata.read_csv(metadata_csv, fields)
  ids = [image_id(p) for p in paths]
  missing = [i for i in ids if i not in table.index]
  if missing:
    raise cli.UserError(f"--metadata_csv={metadata_csv} has no row for {len(missing)} of {len(ids)} images: "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
  rows = table.loc[ids]
  if "localization" in fields:
    for site, count in patient_metadata.unseen_sites(rows["localization"]).items():
      logging.warning("--metadata_csv=%s: localization %r (%d image(s)) is not a site the model knows (%s): "
                      "taken as unknown", metadata_csv, site, count, ", ".join(patient_metadata.SITES))
  raw = {f: rows[f].to_numpy(np.float32 if f == "age" else object) for f in fields}
  predictor.warn_untrained({f: tf.constant(v.astype(str) if v.dtype == object else v) for f, v in raw.items()},
                           f"--metadata_csv={metadata_csv}")
  return raw


def predict_files(predictor: ensemble_lib.Ensemble, paths: list[str], calibrated: bool = True, tta: str = "none",
                  batch_size: int = 32, metadata: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
  """Label, probability and top 3 per readable image, plus every class probability; and the
  paths that could not be read or decoded as an image (the others are predicted all the same).
  metadata: each path's raw patient fields (`metadata_of`), for a predictor that takes them."""
  sizes = predictor.image_sizes

  def load(index, path, fields):
    contents = tf.io.read_file(path)
    return index, {size: features.decode_and_resize(contents, size, any_format=True, max_pixels=features.MAX_PIXELS)
                   for size in sizes}, fields

  fields = {f: tf.constant(v.astype(str) if v.dtype == object else v) for f, v in (metadata or {}).items()}
  dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths, fields))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  # A file that is not an image fails alone: its index is missing from what comes out.
  dataset = dataset.ignore_errors().batch(tta_lib.images_per_batch(batch_size, tta)).prefetch(tf.data.AUTOTUNE)
  read, probabilities = [], []
  for indices, images, batch_fields in dataset:
    read.extend(indices.numpy().tolist())
    probabilities.append(predictor.predict(images, tta, calibrated, metadata=batch_fields or None).calibrated)
  seen = set(read)
  unreadable = [path + _why_unreadable(path) for index, path in enumerate(paths) if index not in seen]
  paths = [paths[index] for index in read]
  names = np.asarray(predictor.class_names)
  probabilities = np.concatenate(probabilities) if probabilities else np.zeros((0, len(names)))
  order = np.argsort(-probabilities, axis=1)
  table = pd.DataFrame({"path": paths, "label": names[order[:, 0]],
                        "probability": probabilities[np.arange(len(paths)), order[:, 0]],
                        "top3": [" ".join(f"{names[i]}:{p[i]:.3f}" for i in o[:3])
                                 for o, p in zip(order, probabilities)]})
  for index, name in enumerate(names):
    table[f"p_{name}"] = probabilities[:, index]
  return table, unreadable


def _why_unreadable(path: str) -> str:
  """' (why)' where a file that failed is known to be refused, not broken: a pixel bomb."""
  try:
    refused = features.too_many_pixels(*(int(n) for n in features.declared_size(tf.io.read_file(path))))
  except (tf.errors.OpError, ValueError):
    return ""
  return f" ({refused})" if refused else ""


def isic_submission(table: pd.DataFrame, class_names) -> pd.DataFrame:
  """The ISIC 2018 Task 3 submission: `image` (the file name without extension) and the
  probabilities in the columns MEL,NV,BCC,AKIEC,BKL,DF,VASC."""
  if sorted(class_names) != sorted(c.lower() for c in sources.ISIC_CLASSES):
    raise cli.UserError(f"--format=isic2018 needs a run on the seven HAM10000 classes; this run's are "
                        f"{', '.join(class_names)}")
  images = table["path"].map(image_id)
  repeated = images[images.duplicated()]
  if len(repeated):
    raise cli.UserError(f"image {repeated.iloc[0]} is given twice ({', '.join(table['path'][images == repeated.iloc[0]])}); "
                        "a submission has one row per image")
  submission = pd.DataFrame({"image": images})
  for name in sources.ISIC_CLASSES:
    submission[name] = table[f"p_{name.lower()}"].to_numpy(dtype=np.float64)
  return submission


def _to_csv(table: pd.DataFrame) -> str:
  # Floats as Python's repr: the shortest text that reads back as the same float64, so two
  # classes tie in the file only where the model's probabilities tie (the official scorer
  # counts a tied maximum as a wrong answer).
  out = io.StringIO()
  table.to_csv(out, index=False)
  return out.getvalue()


SERVING_INFO_FILE = "serving.json"  # in the export's assets.extra: what it serves
METADATA_SIGNATURE = "with_metadata"  # the export's signature of image bytes plus the patient's fields


def export_serving(predictor: ensemble_lib.Ensemble, export_dir: str, tta: str = "none"):
  """A SavedModel whose serving signature takes JPEG bytes and returns calibrated probabilities:
  the run's, or an ensemble's (the mean of its members' calibrated probabilities, each member
  seeing the image at its own size), under the test-time augmentation `tta`; what
  `predict_files` returns for the same image and flags.

  The input is named `image_bytes`: TF Serving decodes `{"b64": ...}` for any string input,
  and the `_bytes` suffix is what Vertex AI's documentation asks of binary inputs (TF Serving
  uses it to base64-encode outputs).

  A predictor that takes patient metadata keeps that default signature (its fields then taken as
  not known) and adds METADATA_SIGNATURE: `image_bytes` and each field, `age` a float
  (patient_metadata.MISSING_AGE when not known), `sex` and `localization` strings ("" when not
  known; a site the model does not know is taken as unknown)."""
  class_names = tf.constant(predictor.class_names)
  members = [(m.model, m.image_size, float(m.calibration_for(tta)["temperature"])) for m in predictor.members]
  fields = predictor.metadata_fields

  def serve_with_metadata(image_bytes, **metadata):
    # An instance whose header declares too many pixels fails the request before it is decoded.
    images = {size: tf.map_fn(lambda b, size=size: features.decode_and_resize(b, size, max_pixels=features.MAX_PIXELS),
                              image_bytes, fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
              for size in predictor.image_sizes}
    calibrated = []
    for model, image_size, temperature in members:
      probabilities = ensemble_lib.probabilities_of_views(model, images[image_size], tta, metadata)
      raw = tta_lib.mean_over_views_tf(tf.cast(probabilities, tf.float32), tta)
      logits = tf.math.log(tf.clip_by_value(raw, calibration.EPSILON, 1.0))
      calibrated.append(tf.nn.softmax(logits / temperature))
    mean = tf.add_n(calibrated) / len(calibrated)
    return {"probabilities": mean,
            "classes": tf.tile(class_names[None], [tf.shape(mean)[0], 1]),
            "label": tf.gather(class_names, tf.argmax(mean, axis=1))}

  def serve(image_bytes):
    return serve_with_metadata(image_bytes, **patient_metadata.unknown_raw(fields, tf.shape(image_bytes)[0]))

  archive = keras.export.ExportArchive()
  for model, _, _ in members:
    archive.track(model)
  archive.add_endpoint("serving_default", serve,
                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  if fields:
    logging.info("the export takes the patient's %s: its %s signature with them, serving_default (JPEG bytes only) "
                 "as not known", ", ".join(fields), METADATA_SIGNATURE)

    def serve_fields(image_bytes, *values):  # the fields in `fields` order, as the signature names them
      return serve_with_metadata(image_bytes, **dict(zip(fields, values)))

    archive.add_endpoint(METADATA_SIGNATURE, serve_fields, input_signature=[
        tf.TensorSpec([None], tf.string, name="image_bytes"),
        *(tf.TensorSpec([None], tf.float32 if f == "age" else tf.string, name=f) for f in fields)])
  # Into a temporary folder, then into place: a killed export never leaves half a SavedModel
  # where TF Serving and upload_model read (and an older export stays whole until then).
  for left in fileio.remove_temporaries(os.path.dirname(export_dir.rstrip("/"))):
    logging.info("removed %s, left by an earlier export", left)
  with fileio.folder_written_whole(export_dir, last=("saved_model.pb",)) as tmp:
    archive.write_out(tmp, verbose=False)  # verbose prints every tracked variable's spec
    fileio.makedirs(fileio.join(tmp, "assets.extra"))  # TF Serving's folder for files it ignores
    fileio.write_json(fileio.join(tmp, "assets.extra", SERVING_INFO_FILE),
                      {"class_names": list(predictor.class_names), **predictor.describe(tta)})


def define_flags():
  flags.DEFINE_multi_string("model_dir", ["artifacts"], "The training job's --model_dir (local or gs://), or a "
                            "cross-validation's root; several: their ensemble (mean calibrated probabilities).")
  flags.DEFINE_enum("tta", "none", list(tta_lib.MODES), "Test-time augmentation: none, flip (image and mirror) or "
                    "dihedral (the 8 flips and quarter turns); probabilities averaged over the views.")
  flags.DEFINE_bool("raw", False, "Report the model's probabilities as trained, not calibrated.")
  flags.DEFINE_string("output", None, "Also write the predictions to this CSV (local or gs://).")
  flags.DEFINE_enum("format", "table", ["table", "isic2018"], "--output's format: table (path, label, "
                    "probability, top3, p_<class>), or isic2018 (an ISIC 2018 Task 3 submission).")
  flags.DEFINE_string("export_dir", None, "Write a serving SavedModel (JPEG bytes in) here.")
  flags.DEFINE_string("metadata_csv", None, "For a model trained with --metadata: the patients' fields, a row per "
                      "image (image_id: the file name without extension; age, sex, localization, or the ISIC "
                      "archive's age_approx, anatom_site_general), local or gs://.")


def main(argv):
  FLAGS = flags.FLAGS
  predictor = ensemble_lib.load(FLAGS.model_dir)
  if FLAGS.export_dir:
    predictor.uncalibrated_warning("the export serves")
    export_serving(predictor, FLAGS.export_dir, FLAGS.tta)
    logging.info("serving SavedModel written to %s", FLAGS.export_dir)
  paths, not_read = expand_paths(argv[1:])
  if not paths:
    if not_read:
      raise cli.UserError(f"nothing to predict: {', '.join(not_read)}")
    if argv[1:]:
      raise cli.UserError(f"{' '.join(argv[1:])}: no image there (folders give their "
                          f"{', '.join(IMAGE_SUFFIXES)} files; a glob matched nothing)")
    if not FLAGS.export_dir:
      raise cli.UserError("give JPEG files, folders or globs to predict (or --export_dir)")
    return
  if FLAGS.format == "isic2018" and not FLAGS.output:
    raise cli.UserError("--format=isic2018 writes a submission file: give --output=submission.csv")
  if not FLAGS.raw:
    predictor.uncalibrated_warning("these are")
  metadata = metadata_of(predictor, paths, FLAGS.metadata_csv)
  table, unreadable = predict_files(predictor, paths, calibrated=not FLAGS.raw, tta=FLAGS.tta, metadata=metadata)
  unreadable, given = not_read + unreadable, len(not_read) + len(paths)
  if FLAGS.format == "isic2018":
    if unreadable:
      raise cli.UserError(f"{len(unreadable)} of {given} files could not be read as images: "
                          f"{', '.join(unreadable)}; no submission written to {FLAGS.output} (one without "
                          "them is invalid; an older file there, if any, is not this run's)")
    fileio.write_atomic(FLAGS.output, _to_csv(isic_submission(table, predictor.class_names)))
    logging.info("ISIC 2018 submission of %d images written to %s", len(table), FLAGS.output)
  elif FLAGS.output:
    fileio.write_atomic(FLAGS.output, _to_csv(table))
  for row in table.itertuples():
    print(f"{os.path.basename(row.path)}\t{row.label}\t{row.probability:.3f}\t{row.top3}")
  if unreadable:
    raise cli.UserError(f"{len(unreadable)} of {given} files could not be read as images: "
                        f"{', '.join(unreadable)} (the others were predicted)")


if __name__ == "__main__":
  cli.run(main, define_flags)
