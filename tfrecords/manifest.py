"""The shards' manifest: what a finished conversion holds, read and written in one place.

`manifest.json` sits beside the shards and is written last, so a folder without
it is an unfinished conversion. It gives the classes in index order
(`label_map`), and per split the shards with their example counts and sha256
checksums, and the class counts; with --folds, per fold the example, lesion and
class counts (`folds`). The converter (tfrecords/convert.py) writes
it; the training job, the evaluation and the benchmarks read it through here,
and take the classes from it rather than from a constant.
"""

import concurrent.futures
import dataclasses
import hashlib
import json

import tensorflow as tf

from tfrecords import cli, fileio

MANIFEST_FILE = "manifest.json"
LABEL_MAP_FILE = "label_map.json"  # {"akiec": 0, ...}: keys in index order
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """One split's shards (full paths), example count and class counts (in class index order).
  `folds`: the folds to keep of those shards' examples (features.FOLD), None for all of them."""
  name: str
  files: list[str]
  num_examples: int
  class_counts: list[int]
  folds: tuple[int, ...] | None = None


def read(data_dir: str) -> dict:
  """The manifest of the conversion in `data_dir`; a clear error when there is none, or it is
  not one."""
  path = fileio.join(data_dir, MANIFEST_FILE)
  if not tf.io.gfile.exists(path):
    raise cli.UserError(f"--data_dir={data_dir}: no {MANIFEST_FILE} (not a finished conversion; run "
                        "python -m tfrecords.convert)")
  try:
    manifest = fileio.read_json(path)
  except json.JSONDecodeError as e:
    raise cli.UserError(f"{path}: not valid JSON ({e}); convert again with --overwrite") from None
  missing = [key for key in ("splits", "label_map") if key not in (manifest if isinstance(manifest, dict) else {})]
  if missing:
    raise cli.UserError(f"{path}: not a manifest written by tfrecords.convert (no "
                        f"{' or '.join(missing)}); convert again with --overwrite")
  check_label_map(data_dir, manifest)
  return manifest


def check_label_map(data_dir: str, manifest: dict):
  """The manifest's classes agree with themselves, with label_map.json beside it and with the
  classes its splits count: a label_map edited by hand would otherwise train a head of the
  wrong size, and the images of a dropped class would get all-zero targets."""
  path = fileio.join(data_dir, MANIFEST_FILE)
  classes = manifest["label_map"]
  if sorted(classes.values()) != list(range(len(classes))):
    raise cli.UserError(f"{path}: label_map {classes} does not number its classes 0..{len(classes) - 1}; "
                        "convert again with --overwrite")
  beside = fileio.join(data_dir, LABEL_MAP_FILE)
  if tf.io.gfile.exists(beside) and fileio.read_json(beside) != classes:
    raise cli.UserError(f"{path}: its label_map {classes} differs from {beside} "
                        f"{fileio.read_json(beside)}; one was edited: convert again with --overwrite")
  for split, info in manifest["splits"].items():
    outside = sorted(name for name, count in info.get("class_counts", {}).items() if count and name not in classes)
    if outside:
      raise cli.UserError(f"{path}: the {split} split holds {', '.join(outside)} images, which its label_map "
                          f"{classes} lacks; convert again with --overwrite")


def write(output_dir: str, manifest: dict):
  fileio.write_json(fileio.join(output_dir, MANIFEST_FILE), manifest)


def class_names(manifest: dict) -> tuple[str, ...]:
  """The classes in index order: class i is `class_names(manifest)[i]`."""
  return tuple(sorted(manifest["label_map"], key=manifest["label_map"].get))


def label_map(names) -> dict[str, int]:
  """`label_map.json`'s content: keys in index order, so `list(label_map)[i]` is class i."""
  return {name: index for index, name in enumerate(names)}


def check_shards(data_dir: str, manifest: dict, splits, checksums: bool = True, workers: int = 8):
  """Stops, naming every file, where a shard the manifest lists is missing or (checksums) its
  sha256 differs from the one the converter recorded: cut short or with a byte changed.
  Shards are read in parallel; a manifest without a checksum for a shard skips it."""
  shards = [(fileio.join(data_dir, s["name"]), s.get("sha256")) for split in splits
            for s in manifest["splits"][split]["shards"]]

  def problem(shard):
    path, expected = shard
    if not tf.io.gfile.exists(path):
      return f"{path} is missing"
    if checksums and expected and fileio.sha256_of(path) != expected:
      return f"{path} is damaged (its sha256 differs from {MANIFEST_FILE}'s)"
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(shards)))) as pool:
    problems = [p for p in pool.map(problem, shards) if p]
  if problems:
    raise cli.UserError(f"--data_dir={data_dir}: {'; '.join(problems)}. Convert again (with --overwrite)"
                        " or restore the files")


def split_checksums(manifest: dict) -> dict[str, str]:
  """Per split, one sha256 of its shards' names and checksums: the same split of the same
  conversion whatever else the manifest holds (a validation split removed, say)."""
  return {split: hashlib.sha256("\n".join(f"{s['name']} {s.get('sha256')}" for s in info["shards"]).encode()
                                ).hexdigest() for split, info in manifest["splits"].items()}


def split_info(data_dir: str, manifest: dict, split: str) -> SplitInfo:
  if split not in manifest["splits"]:
    raise cli.UserError(f"--data_dir={data_dir} has no {split} split (it has "
                        f"{', '.join(manifest['splits'])})")
  info = manifest["splits"][split]
  files = [fileio.join(data_dir, shard["name"]) for shard in info["shards"]]
  counts = [info["class_counts"].get(name, 0) for name in class_names(manifest)]
  return SplitInfo(split, files, info["num_examples"], counts)


def num_folds(manifest: dict) -> int:
  """The folds of a conversion made with --folds; 0 without."""
  return int(manifest.get("folds", {}).get("count", 0))


FOLD_ROLES = ("train", "validation")


def fold_split_info(data_dir: str, manifest: dict, fold: int, role: str) -> SplitInfo:
  """Cross-validation's split for `fold`: "validation" is that fold, "train" every other. Every
  fold is in the train or the validation shards, so both are listed; a reader keeps the examples
  whose features.FOLD is in `folds`."""
  if role not in FOLD_ROLES:
    raise ValueError(f"role {role!r} is not one of {FOLD_ROLES}")
  count = num_folds(manifest)
  if not count:
    raise cli.UserError(f"--data_dir={data_dir} was converted without --folds; convert again with --folds=K")
  if not 0 <= fold < count:
    raise cli.UserError(f"--fold={fold} is outside 0..{count - 1}: --data_dir={data_dir} holds {count} folds")
  chosen = (fold,) if role == "validation" else tuple(k for k in range(count) if k != fold)
  per_fold = {info["fold"]: info for info in manifest["folds"]["per_fold"]}
  files = [path for split in FOLD_ROLES for path in split_info(data_dir, manifest, split).files]
  counts = [sum(per_fold[k]["class_counts"].get(name, 0) for k in chosen) for name in class_names(manifest)]
  return SplitInfo(f"fold-{fold} {role}", files, sum(per_fold[k]["num_examples"] for k in chosen), counts,
                   chosen)
