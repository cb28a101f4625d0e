r"""Converts HAM10000 into lesion-aware, sharded TFRecords.

  python -m tfrecords.convert --source=kaggle --output_dir=gs://bucket/ham10000
  python -m tfrecords.convert --source=/data/ham10000 --output_dir=/data/shards --image_size=256
  python -m tfrecords.convert --source=/data/isic2018_test --output_dir=/data/isic_test \
      --external --train_data_dir=/data/shards

`--source` is the Kaggle copy's layout or the ISIC 2018 challenge's (sources.py).
`--external` converts a labelled set that is not split (an outside test set)
into one split named `external`; `--train_data_dir` makes sure it shares no
image with the conversion the model was trained on.

`--folds=K` deals the lesions outside the test split into K folds for
cross-validation (split.py): validation holds fold 0, train the others, each
of their examples records its fold (features.FOLD), and the test split is the
one the same conversion without --folds writes, shard for shard.

The output folder receives, in this order: `plan.json` (the settings) and
`split.csv` (image_id, lesion_id, dx, split, and fold with --folds); the shards, each written under a
temporary name and moved into place; `label_map.json`; the TFDS metadata
(tfds_metadata.py); `manifest.json` last.
A folder without `manifest.json` is an unfinished conversion: rerunning the
same command finishes it, skipping the shards already in place.
"""

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import flags, logging

from tfrecords import (cli, features, fileio, manifest as manifest_lib, progress, sources,
                       split as split_lib, tfds_metadata)

JPEG_MAGIC = b"\xff\xd8\xff"
PLAN_FILE = "plan.json"
SPLIT_FILE = "split.csv"

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
  """What defines a conversion: a rerun with equal settings resumes it."""
  source: str
  kaggle_version: int = 2
  image_size: int = 0
  jpeg_quality: int = 95
  num_train_shards: int = 16
  num_eval_shards: int = 4
  val_fraction: float = 0.15
  test_fraction: float = 0.15
  seed: int = 0
  external: bool = False
  folds: int = 0  # last, with a default: 0 (no folds) is left out of the records (settings_record)


_DEFAULT = Settings(source="kaggle")


def settings_record(settings: Settings) -> dict:
  """The settings as plan.json and the manifest record them: without `folds` when there are none,
  so an unfolded conversion's files (and its staging folder's name) are what they were before
  --folds existed."""
  record = dataclasses.asdict(settings)
  if not record["folds"]:
    del record["folds"]
  return record


MAX_IMAGE_SIZE = 4096  # HAM10000's images are 600×450: larger only upsamples, at great cost
class ImageTooLarge(ValueError):
  """A source image over features.MAX_PIXELS (refused before it is decoded)."""


class ConversionError(cli.UserError):
  """The conversion cannot go on; the message says why and what to do."""


def define_flags():
  flags.DEFINE_string("source", _DEFAULT.source, "kaggle (kagglehub), a local folder (images or the two "
                      "zip archives beside HAM10000_metadata.csv) or a gs:// prefix.")
  flags.DEFINE_integer("kaggle_version", _DEFAULT.kaggle_version, "Version of kmader/skin-cancer-mnist-ham10000 on Kaggle.")
  flags.DEFINE_string("output_dir", None, "Where the shards go: a local folder or gs://.", required=True)
  flags.DEFINE_integer("image_size", _DEFAULT.image_size, "0 keeps the original JPEGs; N resizes to N×N with "
                       "tf.image.resize (as the seed's inference does) and re-encodes.")
  flags.DEFINE_integer("jpeg_quality", _DEFAULT.jpeg_quality, "JPEG quality when --image_size re-encodes.")
  flags.DEFINE_integer("num_train_shards", _DEFAULT.num_train_shards, "Train shards (≥ the number of workers that will read them).")
  flags.DEFINE_integer("num_eval_shards", _DEFAULT.num_eval_shards, "Shards for each of validation and test.")
  flags.DEFINE_float("val_fraction", _DEFAULT.val_fraction, "Share of lesions for validation.")
  flags.DEFINE_float("test_fraction", _DEFAULT.test_fraction, "Share of lesions for test.")
  flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed of the split and of the order within shards.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes that encode shards.")
  flags.DEFINE_bool("skip_bad_images", False, "Skip (and list in the manifest) images that fail to "
                    "decode, instead of stopping with an error.")
  flags.DEFINE_bool("overwrite", False, "Replace a different conversion already in --output_dir.")
  flags.DEFINE_bool("external", _DEFAULT.external, "A labelled set not to split (an outside test set such "
                    "as ISIC 2018's Validation or Test): one split named `external`, --num_eval_shards "
                    "shards.")
  flags.DEFINE_integer("folds", _DEFAULT.folds, "K ≥ 2: deal the lesions outside the test split into K "
                       "folds by lesion, stratified by diagnosis, for cross-validation (validation holds "
                       "fold 0, train folds 1..K-1; the test split is the one without --folds). 0: no folds.")
  flags.DEFINE_string("train_data_dir", None, "With --external: the conversion the model trains on; "
                      "images it holds are refused.")


def split_names(settings: Settings) -> tuple[str, ...]:
  return (features.EXTERNAL,) if settings.external else features.SPLITS


@dataclasses.dataclass(frozen=True)
class ShardTask:
  output_dir: str
  name: str
  rows: tuple  # (metadata row dict, ImageRef) pairs
  image_size: int
  jpeg_quality: int
  skip_bad_images: bool


def _encode_image(jpeg: bytes, image_size: int, quality: int, max_pixels: int = features.MAX_PIXELS):
  """Decodes (so a corrupt image fails here) and optionally resizes as the seed does. The
  shards hold JPEG (`image/format` says so, and TFDS relies on it): another format kept at
  its size (a PNG named .jpg) is re-encoded."""
  # The header says the size: a decompression bomb is refused before it is decoded.
  refused = features.too_many_pixels(*(int(n) for n in features.declared_size(jpeg)), max_pixels=max_pixels)
  if refused:
    raise ImageTooLarge(refused)
  if not image_size:
    image = tf.io.decode_jpeg(jpeg, channels=3)
    if not jpeg.startswith(JPEG_MAGIC):
      jpeg = tf.io.encode_jpeg(image, quality=quality).numpy()
  else:
    image = features.decode_and_resize(jpeg, image_size)
    jpeg = tf.io.encode_jpeg(image, quality=quality).numpy()
  return jpeg, int(image.shape[0]), int(image.shape[1])


def write_shard(task: ShardTask) -> dict:
  """Writes one shard under a temporary name, then moves it into place; returns its stats."""
  final = fileio.join(task.output_dir, task.name)
  class_counts = dict.fromkeys(features.CLASS_NAMES, 0)
  skipped, image_ids, lesion_ids, classes, folds = [], [], [], [], []
  with fileio.local_copy_then_upload(final) as tmp, _full_disk_named(final):
    with tf.io.TFRecordWriter(tmp) as writer:
      for row, ref in task.rows:
        try:
          jpeg, height, width = _encode_image(sources.read_bytes(ref), task.image_size,
                                              task.jpeg_quality)
        except (tf.errors.InvalidArgumentError, OSError, KeyError, zipfile.BadZipFile, ImageTooLarge) as e:
          if not task.skip_bad_images:
            raise ConversionError(f"image {row['image_id']} ({ref}) cannot be decoded: "
                                  f"{_plain(str(e))}. Replace it, or rerun with "
                                  "--skip_bad_images to leave it out.") from None
          skipped.append({"image_id": row["image_id"], "path": str(ref)})
          continue
        writer.write(features.encode_example(jpeg=jpeg, height=height, width=width, row=row))
        class_counts[row["dx"]] += 1
        image_ids.append(str(row["image_id"]))
        lesion_ids.append(str(row["lesion_id"]))
        classes.append(row["dx"])
        folds.append(int(row.get("fold", features.NO_FOLD)))
    sha256 = fileio.sha256_of(tmp)
  return {"name": task.name, "num_examples": sum(class_counts.values()), "class_counts": class_counts,
          "sha256": sha256, "skipped": skipped, "image_ids": image_ids, "lesion_ids": lesion_ids,
          "classes": classes, "folds": folds}


def _plain(message: str) -> str:
  """An error's last line without TensorFlow's internals ({{function_node …}}, [Op:…])."""
  line = message.strip().splitlines()[-1] if message.strip() else ""
  line = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", line)
  return line[:200]


@contextlib.contextmanager
def _full_disk_named(path: str):
  """A full disk as a ConversionError that names the shard (TensorFlow's and Python's errors
  differ, and TensorFlow's do not survive the trip back from a worker process)."""
  try:
    yield
  except (tf.errors.ResourceExhaustedError, OSError) as e:
    if not cli.is_disk_full(e):
      raise
    raise ConversionError(f"no space left on the device of {path}: free some space, or give another "
                          "--output_dir (rerunning the same command resumes)") from None


def stats_of_existing_shard(path: str) -> dict:
  """Counts of a shard a previous run finished (its name means it was complete)."""
  class_counts = dict.fromkeys(features.CLASS_NAMES, 0)
  image_ids, lesion_ids, classes, folds = [], [], [], []
  for record in tf.data.TFRecordDataset(path):
    example = features.parse_example(record, [features.LABEL, features.SOURCE_ID, features.LESION_ID,
                                              features.FOLD])
    classes.append(features.CLASS_NAMES[int(example[features.LABEL])])
    class_counts[classes[-1]] += 1
    image_ids.append(example[features.SOURCE_ID].numpy().decode())
    lesion_ids.append(example[features.LESION_ID].numpy().decode())
    folds.append(int(example[features.FOLD]))
  return {"name": os.path.basename(path), "num_examples": sum(class_counts.values()),
          "class_counts": class_counts, "sha256": fileio.sha256_of(path), "skipped": [],
          "image_ids": image_ids, "lesion_ids": lesion_ids, "classes": classes, "folds": folds}


def shard_tasks(source: sources.Source, split: pd.Series, settings: Settings, output_dir: str,
                skip_bad_images: bool = False, fold: pd.Series | None = None,
                unfolded_split: pd.Series | None = None) -> list[ShardTask]:
  """One task per shard of the plan, for `write_shard`. `fold` (--folds): each row's fold, which
  its example records outside the test split; `unfolded_split`: see plan_shards."""
  records = source.metadata.to_dict("records")
  if fold is not None:
    for record, k in zip(records, fold.to_numpy()):
      if k >= 0:
        record["fold"] = int(k)
  tasks = []
  for name, shards in plan_shards(source.metadata, split, settings, unfolded_split).items():
    for index, rows in enumerate(shards):
      pairs = tuple((records[i], source.images[records[i]["image_id"]]) for i in rows)
      tasks.append(ShardTask(output_dir, features.shard_name(name, index, len(shards)), pairs,
                             settings.image_size, settings.jpeg_quality, skip_bad_images))
  return tasks


def plan_shards(metadata: pd.DataFrame, split: pd.Series, settings: Settings,
                unfolded_split: pd.Series | None = None) -> dict[str, list[list[int]]]:
  """Row indices per shard, per split: rows in image_id order (so the table's own order does not
  matter), shuffled by the seed, then dealt round-robin. `unfolded_split` (--folds: the split
  before folding) makes the test shards those of the same conversion without --folds."""
  rng = np.random.default_rng(settings.seed)
  by_image = np.argsort(metadata["image_id"].to_numpy(dtype=str), kind="stable")
  plan = {}
  for name in split_names(settings):
    count = settings.num_train_shards if name == "train" else settings.num_eval_shards
    if name == "test" and unfolded_split is not None:
      # The draws the unfolded conversion makes before test's: its train and validation shuffles.
      rng = np.random.default_rng(settings.seed)
      for before in ("train", "validation"):
        rng.permutation(int((unfolded_split == before).sum()))
    rows = rng.permutation(by_image[split.to_numpy()[by_image] == name])
    plan[name] = [rows[i::count].tolist() for i in range(count)]
  return plan


def _existing_state(output_dir: str, settings: Settings, overwrite: bool, source_fingerprint: dict,
                    source_images: dict) -> str:
  """What the folder holds, for this conversion: "empty", "unfinished" (this conversion, to
  resume), "finished" (this conversion of this very source), or "other" (to replace, which
  needs --overwrite)."""
  plan_path = fileio.join(output_dir, PLAN_FILE)
  existing = [name.rstrip("/") for name in tf.io.gfile.listdir(output_dir)]
  shard_files = [n for n in existing if n.endswith(".tfrecord")]
  if tf.io.gfile.exists(plan_path):
    plan = fileio.read_json(plan_path)
    # A setting added since that plan was written has its default there.
    previous = {**{f.name: f.default for f in dataclasses.fields(Settings)
                   if f.default is not dataclasses.MISSING}, **(plan.get("settings") or {})}
    changed_source = sources.fingerprint_changes(plan.get("source_fingerprint"), source_fingerprint,
                                                 plan.get("source_images"), source_images)
    if previous == dataclasses.asdict(settings) and not changed_source:
      return "finished" if manifest_lib.MANIFEST_FILE in existing else "unfinished"
    if overwrite:
      return "other"
    if previous == dataclasses.asdict(settings):
      state = "finished" if manifest_lib.MANIFEST_FILE in existing else "began"
      raise ConversionError(f"{output_dir}: the source changed since this conversion {state} "
                            f"({changed_source}); its shards would mix two sources. Pass --overwrite to "
                            "convert it again, or give another --output_dir")
    changed = {k: (previous.get(k), v) for k, v in dataclasses.asdict(settings).items()
               if previous.get(k) != v}
    raise ConversionError(f"{output_dir} holds another conversion (settings differ: {changed}); "
                          "choose another --output_dir or pass --overwrite")
  if shard_files or manifest_lib.MANIFEST_FILE in existing:
    if overwrite:
      return "other"
    raise ConversionError(f"{output_dir} already holds TFRecords not written by this settings plan; "
                          "choose another --output_dir or pass --overwrite")
  return "empty"


def staging_dir(output_dir: str, settings: Settings) -> str:
  """Where --overwrite writes the new conversion until it is finished: beside the old one, named
  by its settings, so that a rerun of the same command resumes it."""
  key = json.dumps(settings_record(settings), sort_keys=True)
  return f"{output_dir.rstrip('/')}.overwrite-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _replace(output_dir: str, staging: str):
  """Puts the finished conversion in `staging` in place of the old one in `output_dir`.

  The old manifest goes first, so the folder reads as unfinished from then on; the new plan
  comes in before its shards (a rerun interrupted here resumes in place), the new manifest
  last. On gs://, where a folder cannot be swapped at once, manifest.json is the commit point."""
  ours = [PLAN_FILE, SPLIT_FILE, manifest_lib.LABEL_MAP_FILE, *tfds_metadata.FILES]
  fileio.remove_if_exists(fileio.join(output_dir, manifest_lib.MANIFEST_FILE))
  for name in tf.io.gfile.listdir(output_dir):
    name = name.rstrip("/")
    if name in ours or name.endswith(".tfrecord"):
      fileio.remove_if_exists(fileio.join(output_dir, name))
  new = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(staging))
  order = ([n for n in new if n == PLAN_FILE] + [n for n in new if n not in (PLAN_FILE, manifest_lib.MANIFEST_FILE)]
           + [manifest_lib.MANIFEST_FILE])
  for name in order:
    tf.io.gfile.rename(fileio.join(staging, name), fileio.join(output_dir, name), overwrite=True)
  fileio.remove_if_exists(staging)


def convert(source: sources.Source, output_dir: str, settings: Settings, workers: int = 1,
            skip_bad_images: bool = False, overwrite: bool = False,
            fingerprint: tuple[dict, dict] | None = None) -> dict:
  """Runs (or finishes) a conversion and returns its manifest. `fingerprint`: the source's,
  when already taken (sources.fingerprint reads every local image)."""
  _validate_folds(settings)
  fold = unfolded_split = None
  if settings.external:
    split = pd.Series(features.EXTERNAL, index=source.metadata.index, name="split")
  else:
    split = split_lib.split_by_lesion(source.metadata, settings.val_fraction, settings.test_fraction,
                                      settings.seed)
    if settings.folds:
      unfolded_split = split
      fold = split_lib.assign_folds(source.metadata, split, settings.folds, settings.seed)
      split = split_lib.split_of_folds(split, fold)
      split_lib.check_split(source.metadata, split)
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise ConversionError(f"--output_dir={output_dir} is a file, not a folder")
  fileio.check_writable(output_dir, "--output_dir")  # made here if need be
  source_fingerprint, source_images = fingerprint or sources.fingerprint(source)
  state = _existing_state(output_dir, settings, overwrite, source_fingerprint, source_images)
  if state == "finished":
    logging.info("%s already holds this conversion of this source (manifest.json present): nothing to do",
                 output_dir)
    return manifest_lib.read(output_dir)
  if state == "other":  # --overwrite: the old conversion stays whole until the new one is done
    staging = staging_dir(output_dir, settings)
    if (tf.io.gfile.exists(fileio.join(staging, PLAN_FILE)) and sources.fingerprint_changes(
        fileio.read_json(fileio.join(staging, PLAN_FILE)).get("source_fingerprint"), source_fingerprint)):
      fileio.remove_if_exists(staging)  # our own scratch, of a source that has changed since
    logging.info("--overwrite: converting into %s, then replacing %s", staging, output_dir)
    manifest = convert(source, staging, settings, workers, skip_bad_images,
                       fingerprint=(source_fingerprint, source_images))
    _replace(output_dir, staging)
    return manifest

  # The plan first: a rerun compares its settings and source, a reader audits the split.
  split_table = source.metadata[["image_id", "lesion_id", "dx"]].assign(split=split)
  if fold is not None:  # empty for test rows
    split_table = split_table.assign(fold=fold.where(fold >= 0).astype("Int64"))
  fileio.write_json(fileio.join(output_dir, PLAN_FILE),
                    {"format_version": manifest_lib.FORMAT_VERSION, "settings": settings_record(settings),
                     "source_fingerprint": source_fingerprint,
                     "source_images": source_images})  # to name the images that change
  fileio.write_atomic(fileio.join(output_dir, SPLIT_FILE), split_table.to_csv(index=False))

  tasks, done = [], {}
  for task in shard_tasks(source, split, settings, output_dir, skip_bad_images, fold, unfolded_split):
    path = fileio.join(output_dir, task.name)
    if tf.io.gfile.exists(path):  # finished by an earlier run (shards appear whole, when done)
      done[task.name] = stats_of_existing_shard(path)
    else:
      tasks.append(task)
  if done:
    logging.info("resuming: %d shards already in place, %d to write", len(done), len(tasks))

  if not fileio.is_local(output_dir) and output_dir.startswith("ram://"):
    workers = 1  # ram:// lives in this process's memory only
  start, images = time.perf_counter(), 0
  total = sum(len(t.rows) for t in tasks)
  _remove_temporaries(output_dir)  # left by a run that was killed
  bar = progress.bar(total, "images", "converting") if tasks else None
  try:
    for stats in _run(tasks, workers):
      done[stats["name"]] = stats
      written = len(next(t.rows for t in tasks if t.name == stats["name"]))
      images += written
      elapsed = time.perf_counter() - start
      if bar:
        bar.update(written)
      else:
        logging.info("%s: %d examples (%d/%d images, %.1f images/s)", stats["name"],
                     stats["num_examples"], images, total, images / max(elapsed, 1e-9))
  except BaseException:
    _remove_temporaries(output_dir)  # other workers' shards in progress, stopped mid-write
    raise
  finally:
    if bar:
      bar.close()

  check_written(done, settings.folds)
  manifest = _manifest(source, settings, split, done, source_fingerprint)
  check_nothing_emptied(source, settings, split, manifest, fold)
  fileio.write_json(fileio.join(output_dir, manifest_lib.LABEL_MAP_FILE), features.LABEL_MAP)
  if not output_dir.startswith("ram://"):  # TFDS reads local and gs:// folders, not TensorFlow's ram://
    tfds_metadata.write(output_dir, manifest, features.CLASS_NAMES)
  manifest_lib.write(output_dir, manifest)  # last: marks completion
  fileio.remove_if_exists(staging_dir(output_dir, settings))  # left by an interrupted swap
  if total:
    elapsed = time.perf_counter() - start
    logging.info("converted %d images in %.1f s (%.1f images/s, %d workers)", total, elapsed,
                 total / elapsed, workers)
  return manifest


def _remove_temporaries(output_dir):
  for path in tf.io.gfile.glob(fileio.join(output_dir, ".*.tfrecord.tmp-*")):
    fileio.remove_if_exists(path)


def init_worker():
  # One thread per process: the processes are the parallelism.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _run(tasks, workers):
  if workers <= 1 or len(tasks) <= 1:
    yield from map(write_shard, tasks)
    return
  # spawn, not fork: TensorFlow's runtime does not survive a fork.
  with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), init_worker) as pool:
    # Largest shards first so the last worker is not left with a long tail.
    ordered = sorted(tasks, key=lambda t: -len(t.rows))
    yield from pool.imap_unordered(write_shard, ordered)


def _folds_allowed(split: str, num_folds: int) -> range:
  """The folds an example of `split` may record: validation holds fold 0, train the others."""
  if not num_folds or split not in ("train", "validation"):
    return range(features.NO_FOLD, features.NO_FOLD + 1)
  return range(0, 1) if split == "validation" else range(1, num_folds)


def check_written(done: dict, num_folds: int = 0):
  """Over the shards as written (resumed ones included), not only the plan: each image once,
  no lesion in two splits, and (--folds) each example's fold one its split holds, and no lesion
  in two folds."""
  split_of_lesion, fold_of_lesion, seen = {}, {}, set()
  for name, stats in sorted(done.items()):
    split = name.split("-", 1)[0]
    allowed = _folds_allowed(split, num_folds)
    folds = stats.get("folds") or [features.NO_FOLD] * len(stats["image_ids"])
    for image_id, lesion_id, fold in zip(stats["image_ids"], stats["lesion_ids"], folds):
      if image_id in seen:
        raise ConversionError(f"image {image_id} is in two shards ({name} among them)")
      seen.add(image_id)
      if split_of_lesion.setdefault(lesion_id, split) != split:
        raise ConversionError(f"lesion {lesion_id} is in the {split_of_lesion[lesion_id]} and {split} "
                              f"splits ({name} among its shards)")
      if fold not in allowed:
        raise ConversionError(f"image {image_id} in {name} records fold {fold}, which the {split} split "
                              f"of {f'--folds={num_folds}' if num_folds else 'a conversion without --folds'} "
                              "does not hold")
      if fold_of_lesion.setdefault(lesion_id, fold) != fold:
        raise ConversionError(f"lesion {lesion_id} is in folds {fold_of_lesion[lesion_id]} and {fold} "
                              f"({name} among its shards)")


def check_nothing_emptied(source, settings, split, manifest: dict, fold: pd.Series | None = None):
  """Skipped images (--skip_bad_images) may not empty the conversion, nor take every image of a
  class out of a split (or fold) that was planned with it: the split promises every class in
  every split and fold (an --external set, which is not split, may lack a class, but not be
  empty). Checked on the manifest before it is written."""
  if not manifest["num_examples"]:
    raise ConversionError(f"no image of {source.description} could be converted ({len(source.metadata)} "
                          "skipped as unreadable): nothing was finished; see the skipped images' errors above")
  if settings.external:
    return
  for name in split_names(settings):
    planned = source.metadata["dx"][split == name].value_counts()
    for dx, count in planned.items():
      if not manifest["splits"][name]["class_counts"][dx]:
        raise ConversionError(f"every {dx} image of the {name} split ({count}) was skipped as unreadable: "
                              f"the split would have no {dx}; fix or replace those images (the converter "
                              "logged each), then rerun")
  if fold is None:
    return
  for info in manifest["folds"]["per_fold"]:
    planned = source.metadata["dx"][fold == info["fold"]].value_counts()
    for dx, count in planned.items():
      if not info["class_counts"][dx]:
        raise ConversionError(f"every {dx} image of fold {info['fold']} ({count}) was skipped as unreadable: "
                              f"the fold would have no {dx}; fix or replace those images (the converter "
                              "logged each), then rerun")


def _manifest(source, settings, split, done, source_fingerprint):
  splits = {}
  for name in split_names(settings):
    shards = sorted((s for s in done.values() if s["name"].startswith(name + "-")), key=lambda s: s["name"])
    class_counts = {dx: sum(s["class_counts"][dx] for s in shards) for dx in features.CLASS_NAMES}
    splits[name] = {
        "num_examples": sum(s["num_examples"] for s in shards),
        "num_lesions": len({lesion for s in shards for lesion in s["lesion_ids"]}),  # as written
        "class_counts": class_counts,
        "shards": [{k: s[k] for k in ("name", "num_examples", "sha256")} for s in shards],
    }
  return {
      "format_version": manifest_lib.FORMAT_VERSION,
      "source": source.description,
      "layout": source.layout,
      "source_version": settings.kaggle_version if settings.source == "kaggle" else None,
      "metadata_file": source.metadata_path,
      "source_fingerprint": source_fingerprint,
      "settings": settings_record(settings),
      "image_size": settings.image_size,
      "label_map": features.LABEL_MAP,
      "num_examples": sum(s["num_examples"] for s in splits.values()),
      "splits": splits,
      **({"folds": _folds_manifest(settings.folds, done)} if settings.folds else {}),
      "skipped_images": [item for s in done.values() for item in s["skipped"]],
  }


def _folds_manifest(num_folds: int, done: dict) -> dict:
  """Per fold, as written (the way the splits are counted): examples, lesions, class counts."""
  per_fold = [{"fold": k, "num_examples": 0, "lesions": set(), "class_counts": dict.fromkeys(features.CLASS_NAMES, 0)}
              for k in range(num_folds)]
  for stats in done.values():
    for lesion_id, dx, fold in zip(stats["lesion_ids"], stats["classes"], stats["folds"]):
      if fold >= 0:
        per_fold[fold]["num_examples"] += 1
        per_fold[fold]["lesions"].add(lesion_id)
        per_fold[fold]["class_counts"][dx] += 1
  return {"count": num_folds,
          "per_fold": [{"fold": f["fold"], "num_examples": f["num_examples"], "num_lesions": len(f["lesions"]),
                        "class_counts": f["class_counts"]} for f in per_fold]}


def settings_from_flags() -> Settings:
  return Settings(source=FLAGS.source, kaggle_version=FLAGS.kaggle_version, image_size=FLAGS.image_size,
                  jpeg_quality=FLAGS.jpeg_quality, num_train_shards=FLAGS.num_train_shards,
                  num_eval_shards=FLAGS.num_eval_shards, val_fraction=FLAGS.val_fraction,
                  test_fraction=FLAGS.test_fraction, seed=FLAGS.seed, external=FLAGS.external,
                  folds=FLAGS.folds)


def check_not_in_training(source: sources.Source, train_data_dir: str):
  """Stops where an external set shares images with the conversion a model trains on."""
  manifest_lib.read(train_data_dir)  # a finished conversion, or a clear error
  if not tf.io.gfile.exists(fileio.join(train_data_dir, SPLIT_FILE)):
    raise ConversionError(f"--train_data_dir={train_data_dir} has no {SPLIT_FILE}: give the folder of the "
                          "conversion the model trains on, as tfrecords.convert wrote it")
  with tf.io.gfile.GFile(fileio.join(train_data_dir, SPLIT_FILE)) as f:
    trained = set(pd.read_csv(f, dtype={"image_id": str})["image_id"])
  shared = [i for i in source.metadata["image_id"] if i in trained]
  if shared:
    raise ConversionError(f"--train_data_dir={train_data_dir} holds {len(shared)} of the "
                          f"{len(source.metadata)} images of --source={source.description} (e.g. "
                          f"{', '.join(shared[:5])}): an external set must be new to the model")


def validate(settings: Settings):
  """A UserError naming the first setting that cannot work, before anything is read or written."""
  if not 0 <= settings.image_size <= MAX_IMAGE_SIZE:
    raise cli.UserError(f"--image_size={settings.image_size} must be 0 (keep the original) or a size up to "
                        f"{MAX_IMAGE_SIZE}")
  if not 1 <= settings.jpeg_quality <= 100:
    raise cli.UserError(f"--jpeg_quality={settings.jpeg_quality} must be between 1 and 100")
  if settings.seed < 0:
    raise cli.UserError(f"--seed={settings.seed} must not be negative")
  _validate_folds(settings)


def _validate_folds(settings: Settings):
  if settings.folds < 0 or settings.folds == 1:
    raise cli.UserError(f"--folds={settings.folds} must be 0 (no folds) or at least 2")
  if settings.folds and settings.external:
    raise cli.UserError(f"--folds={settings.folds} cannot go with --external: an external set is not split")


def _stop_on_sigterm(signum, frame):
  del signum, frame
  # Out through the `with Pool` block, which terminates the worker processes (the default
  # action would end this process alone, and its workers would go on writing shards).
  sys.exit(128 + signal.SIGTERM)


def main(argv):
  del argv
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  settings = settings_from_flags()
  for flag in ("num_train_shards", "num_eval_shards", "workers"):
    if FLAGS[flag].value < 1:
      raise cli.UserError(f"--{flag}={FLAGS[flag].value} must be at least 1")
  validate(settings)
  if FLAGS.train_data_dir and not settings.external:
    raise cli.UserError("--train_data_dir is for --external conversions")
  source = sources.open_source(settings.source, settings.kaggle_version, settings.external)
  if FLAGS.train_data_dir:
    check_not_in_training(source, FLAGS.train_data_dir)
  manifest = convert(source, FLAGS.output_dir, settings, FLAGS.workers, FLAGS.skip_bad_images,
                     FLAGS.overwrite)
  for name, info in manifest["splits"].items():
    logging.info("%-10s %5d images, %4d lesions, %d shards", name, info["num_examples"],
                 info["num_lesions"], len(info["shards"]))
  for info in manifest.get("folds", {}).get("per_fold", []):
    logging.info("fold %-5d %5d images, %4d lesions", info["fold"], info["num_examples"], info["num_lesions"])
  if manifest["skipped_images"]:
    logging.warning("skipped %d images that failed to decode (listed in manifest.json)",
                    len(manifest["skipped_images"]))
  print(fileio.join(FLAGS.output_dir, manifest_lib.MANIFEST_FILE))


if __name__ == "__main__":
  cli.run(main, define_flags)
