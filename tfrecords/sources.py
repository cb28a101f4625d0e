"""Finding HAM10000: kagglehub, a local folder, the zip archives, or gs://.

Every source becomes the same thing: the metadata table, validated, and where
each `image_id`'s JPEG lives. Images are keyed by `image_id` because the Kaggle
copy holds every image twice (`HAM10000_images_part_1/` and a lowercase twin).

Two layouts are read. The Kaggle copy: `HAM10000_metadata.csv` and the image
folders (or their zip archives). The ISIC 2018 challenge's (Task 3):
`ISIC2018_Task3_{Part}_Input/` (or its zip), `…_GroundTruth.csv` (one-hot class
columns; also inside a zip) and, for the training part only,
`…_LesionGroupings.csv`. That layout has no age, sex or localization: they are
stored as the contract's missing values (NaN, ""). Its `diagnosis_confirm_type`
is stored as `dx_type` in HAM10000's words (DIAGNOSIS_CONFIRM_TYPES). The
training part must come with its groupings (a conversion splits it by lesion); a
part without them (Validation, Test, any --external set) makes each image its own
lesion, with a warning.
Zip archives on gs:// are copied to a local temporary folder once (zipfile
reads local files only).
"""

import atexit
import dataclasses
import functools
import hashlib
import io
import os
import posixpath
import re
import shutil
import tempfile
import zipfile
import zlib

import pandas as pd
import tensorflow as tf
from absl import logging

from tfrecords import cli, features, fileio

METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
KAGGLE_HANDLE = "kmader/skin-cancer-mnist-ham10000"
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
IMAGE_ZIPS = tuple(f"{folder}.zip" for folder in IMAGE_FOLDERS)

# The ISIC 2018 challenge layout (Task 3). Its one-hot columns, in the ground truth's order;
# the lowercase names are HAM10000's dx codes.
ISIC_PREFIX = "ISIC2018_Task3_"
ISIC_PARTS = ("Training", "Validation", "Test")
ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_GROUND_TRUTH = re.compile(r"ISIC2018_Task3_(Training|Validation|Test)_GroundTruth\.csv$")
ISIC_GROUPINGS = re.compile(r"ISIC2018_Task3_(Training|Validation|Test)_LesionGroupings\.csv$")
# The LesionGroupings file's `diagnosis_confirm_type` → HAM10000's `dx_type`: the same four
# ways of confirming a diagnosis, in the words of Tschandl et al. (2018) and of the metadata CSV.
DIAGNOSIS_CONFIRM_TYPES = {
    "histopathology": "histo",
    "serial imaging showing no change": "follow_up",
    "single image expert consensus": "consensus",
    "confocal microscopy with consensus dermoscopy": "confocal",
}


def isic_input_folder(part: str) -> str:
  return f"{ISIC_PREFIX}{part}_Input"


def isic_ground_truth_file(part: str) -> str:
  return f"{ISIC_PREFIX}{part}_GroundTruth.csv"


def isic_groupings_file(part: str) -> str:
  return f"{ISIC_PREFIX}{part}_LesionGroupings.csv"


class SourceError(cli.UserError):
  """The source data is unusable; the message names the file, row or image."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """Where one JPEG lives: a path (local, gs://, ram://) or a member of a zip archive."""
  path: str
  member: str | None = None

  def __str__(self):
    return f"{self.path}!{self.member}" if self.member else self.path


@dataclasses.dataclass
class Source:
  description: str  # what the manifest records, e.g. "kaggle:kmader/...:versions/2"
  metadata: pd.DataFrame  # REQUIRED_COLUMNS, one row per image_id, in CSV order
  images: dict[str, ImageRef]  # image_id -> where its JPEG is
  metadata_path: str
  layout: str = "kaggle"  # or "isic2018:Training", "isic2018:Test", ...


def _gcs_listing(paths: list[str]) -> dict[str, str]:
  """'size crc32c' of every object under the paths' common folder, from the GCS client's
  listing: one request a thousand objects, where TensorFlow's filesystem needs one a file."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = posixpath.dirname(os.path.commonprefix(paths))[len("gs://"):].partition("/")
  return {f"gs://{bucket}/{blob.name}": f"{blob.size} {blob.crc32c}"
          for blob in storage.Client().list_blobs(bucket, prefix=prefix)}


def _image_size(ref: ImageRef) -> str:
  if ref.member is not None:  # from the archive's central directory: nothing is decompressed
    info = _open_zip(ref.path).getinfo(ref.member)
    return f"{info.file_size} {info.CRC}"
  if "://" not in ref.path:
    return str(os.path.getsize(ref.path))
  return str(tf.io.gfile.stat(ref.path).length)  # ram:// and other filesystems


def _local_record(path: str) -> str:
  """Size and CRC-32 of a local file's content (HAM10000's 2.6 GB take seconds): modification
  times would raise false alarms after a copy or a fresh download."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return f"{os.path.getsize(path)} crc32:{crc:08x}"


FINGERPRINT_VERSION = 2  # 1: local files by size only; 2: by size and content


def image_records(source: "Source") -> dict[str, str]:
  """image_id → what its file is: size and CRC (of the content for local files, from the
  listing for gs:// and zip archives; size alone on other filesystems)."""
  ids = sorted(source.images)
  gcs = [source.images[i].path for i in ids if source.images[i].path.startswith("gs://")
         and source.images[i].member is None]
  listing = _gcs_listing(gcs) if gcs else {}
  records = {}
  for i in ids:
    ref = source.images[i]
    local = ref.member is None and "://" not in ref.path
    try:
      records[i] = listing.get(ref.path) or (_local_record(ref.path) if local else _image_size(ref))
    except OSError as e:  # a broken symlink, a link to itself, a file without read permission
      raise SourceError(f"image {i}: {ref} cannot be read ({e.strerror or e})") from None
  return records


def _digest(records: dict[str, str]) -> str:
  return hashlib.sha256("\n".join(f"{i} {r}" for i, r in sorted(records.items())).encode()).hexdigest()


def _as_version_1(records: dict[str, str]) -> dict[str, str]:
  """Records as version 1 took them: local files by their size alone."""
  return {i: r.split(" crc32:")[0] for i, r in records.items()}


def fingerprint(source: "Source") -> tuple[dict, dict[str, str]]:
  """What the source holds: its metadata rows and its images' records (image_records), as a
  summary that a conversion's manifest records, and the per-image records that its plan keeps
  to name the images that changed. A conversion will not resume, or call itself done, over a
  changed source."""
  records = image_records(source)
  return {"version": FINGERPRINT_VERSION, "rows": int(len(source.metadata)), "images": len(records),
          "metadata_sha256": hashlib.sha256(source.metadata.to_csv(index=False).encode()).hexdigest(),
          "images_sha256": _digest(records), "images_sha256_v1": _digest(_as_version_1(records))}, records


def fingerprint_changes(recorded: dict | None, current: dict, recorded_images: dict | None = None,
                        current_images: dict | None = None) -> str:
  """What changed between two fingerprints, in words ('' when nothing did). A version-1
  fingerprint (an older converter's) is compared by what it recorded: sizes of local files."""
  if recorded is None:
    return "it records no source fingerprint (written by an older version)"
  version_1 = recorded.get("version", 1) == 1
  changes = []
  if recorded["metadata_sha256"] != current["metadata_sha256"]:
    changes.append(f"metadata rows {recorded['rows']} → {current['rows']}"
                   + ("" if recorded["rows"] != current["rows"] else ", their content differs"))
  if recorded["images_sha256"] != current["images_sha256_v1" if version_1 else "images_sha256"]:
    change = f"images {recorded['images']} → {current['images']}"
    if recorded_images is not None and current_images is not None:
      now = _as_version_1(current_images) if version_1 else current_images
      differing = sorted(i for i in set(recorded_images) | set(now) if recorded_images.get(i) != now.get(i))
      change += f", these differ: {', '.join(differing[:5])}" + (f" and {len(differing) - 5} more"
                                                                  if len(differing) > 5 else "")
    elif recorded["images"] == current["images"]:
      change += ", their files differ"
    changes.append(change)
  return "; ".join(changes)


@functools.lru_cache(maxsize=8)
def _open_zip(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise SourceError(f"{path}: not a readable zip archive ({e}); it may be cut short: download it "
                      "again, or extract it beside it") from None


@functools.lru_cache(maxsize=None)
def _local_archive(path: str) -> str:
  """A zip archive on local disk: itself, or (gs://) a copy made once and removed at exit.
  The copy's path is what ImageRefs hold, so the converter's worker processes read it too."""
  if fileio.is_local(path):
    return path
  directory = tempfile.mkdtemp(prefix="ham10000-archive-")
  atexit.register(shutil.rmtree, directory, True)
  logging.info("copying %s to local disk (zip archives are read from local files)", path)
  return fileio.copy_to_local(path, directory)


def read_bytes(ref: ImageRef) -> bytes:
  if ref.member is not None:
    return _open_zip(ref.path).read(ref.member)
  with tf.io.gfile.GFile(ref.path, "rb") as f:
    return f.read()


def open_source(source: str, kaggle_version: int = 2, external: bool = False) -> Source:
  """Resolves `--source` (kaggle, a folder, or a gs:// prefix) to metadata and images.
  `external`: a labelled set that is not split (picks the ISIC layout's non-training part)."""
  if source == "kaggle":
    import kagglehub  # pylint: disable=g-import-not-at-top
    handle = f"{KAGGLE_HANDLE}/versions/{kaggle_version}"
    # Served from KAGGLEHUB_CACHE when it holds this version, else downloaded.
    folder = kagglehub.dataset_download(handle)
    return _open_folder(folder, f"kaggle:{handle}", external)
  if not tf.io.gfile.exists(source):
    raise SourceError(f"--source={source}: no such folder")
  if not tf.io.gfile.isdir(source):
    raise SourceError(f"--source={source}: not a folder")
  return _open_folder(source, source, external)


def _is_image(name: str) -> bool:
  return name.lower().endswith((".jpg", ".jpeg"))


def _is_table(name: str) -> bool:
  return name == METADATA_FILE or bool(ISIC_GROUND_TRUTH.match(name) or ISIC_GROUPINGS.match(name))


def _walk(folder: str) -> list[tuple[str, ImageRef]]:
  """(file name, where it is) of every file under `folder`, in a stable order."""
  entries = []
  for directory, _, files in sorted(tf.io.gfile.walk(folder)):
    for name in sorted(files):
      path = posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)
      entries.append((name, ImageRef(path)))
  return entries


def _archive_members(entries) -> list[tuple[str, ImageRef]]:
  """The images and tables inside the layout's zip archives (gs:// ones copied locally)."""
  members = []
  for name, ref in entries:
    if name in IMAGE_ZIPS or (name.startswith(ISIC_PREFIX) and name.endswith(".zip")):
      archive = _local_archive(ref.path)
      for member in _open_zip(archive).namelist():
        base = posixpath.basename(member)
        if _is_image(base) or _is_table(base):
          members.append((base, ImageRef(archive, member)))
  return members


def _open_folder(folder: str, description: str, external: bool = False) -> Source:
  entries = _walk(folder)
  if not (any(_is_image(n) for n, _ in entries) and any(_is_table(n) for n, _ in entries)):
    entries += _archive_members(entries)  # the archives' content, where the files are not
  tables = {}
  for name, ref in entries:
    tables.setdefault(name, ref)
  if METADATA_FILE in tables:
    metadata, table, layout = read_metadata(tables[METADATA_FILE]), tables[METADATA_FILE], "kaggle"
  else:
    part = _isic_part(tables, description, external)
    if part is None:
      raise SourceError(f"{description}: no {METADATA_FILE} and no {ISIC_PREFIX}*_GroundTruth.csv found "
                        "(an empty or wrong --source?)")
    table = tables[isic_ground_truth_file(part)]
    groupings = tables.get(isic_groupings_file(part))
    if groupings is None:
      if part == "Training" and not external:
        # A separate download; without it photos of one lesion would land in different splits.
        raise SourceError(f"{description}: {isic_groupings_file(part)} not found beside {table}: the training "
                          "part needs its lesion groupings (a separate download from the challenge site), or "
                          "photos of one lesion land in different splits")
      logging.warning("%s: no %s: each image counts as its own lesion", description, isic_groupings_file(part))
    metadata = read_isic_ground_truth(table, groupings)
    layout = f"isic2018:{part}"
  jpegs = _images_by_id(entries)
  if not jpegs:
    raise SourceError(f"{description}: no JPEG images found beside {table}")
  missing = [i for i in metadata["image_id"] if i not in jpegs]
  if missing:
    row = metadata.index[metadata["image_id"] == missing[0]][0]
    shown = repr(missing[0]) if missing[0] != missing[0].strip() else missing[0]  # stray spaces, visible
    names = {name for name, _ in entries}
    zipped = [z for z in IMAGE_ZIPS if z in names and not any(ref.member is not None for _, ref in entries)]
    hint = (f"; {', '.join(zipped)} is still zipped beside extracted images (a download half extracted): "
            "extract it too" if zipped else "")
    raise SourceError(f"{table} row {row + 2}: image {shown} not found under "
                      f"{folder} ({len(missing)} images missing in all){hint}")
  images = {i: jpegs[i] for i in metadata["image_id"]}
  return Source(description, metadata, images, str(table), layout)


# The folders a layout keeps its images in (the Kaggle copy also has lowercase twins of both).
LAYOUT_FOLDERS = tuple(f.lower() for f in IMAGE_FOLDERS) + tuple(isic_input_folder(p).lower() for p in ISIC_PARTS)


def _in_layout_folder(ref: ImageRef) -> bool:
  where = ref.member if ref.member is not None else ref.path
  return posixpath.basename(posixpath.dirname(where.replace(os.sep, "/"))).lower() in LAYOUT_FOLDERS


def _images_by_id(entries) -> dict[str, ImageRef]:
  """image_id → its JPEG. The layout's folders are read first, and an image found there is the
  image: a copy elsewhere under --source (a folder of resized copies, say) is never read. Two
  files for one id within the layout (the Kaggle copy's lowercase twins) must be the same file:
  sizes that differ stop the conversion, naming both."""
  images = [(name, ref) for name, ref in entries if _is_image(name)]
  jpegs = {}
  # Layout folders first; within them, `HAM10000_images_part_1` sorts before its lowercase twin.
  for name, ref in sorted(images, key=lambda entry: not _in_layout_folder(entry[1])):
    image_id = os.path.splitext(name)[0]
    first = jpegs.setdefault(image_id, ref)
    # Sizes where they are cheap to read (local files, zip members); a gs:// stat is a request each.
    cheap = all(r.member is not None or "://" not in r.path for r in (first, ref))
    if (first is not ref and _in_layout_folder(ref) and cheap
        and _image_size(first).split()[0] != _image_size(ref).split()[0]):
      raise SourceError(f"image {image_id} is in the source twice, as two different files: {first} and {ref}; "
                        "remove the wrong one")
  return jpegs


def _isic_part(tables: dict, description: str, external: bool) -> str | None:
  """Which ISIC 2018 part a folder holds: the one there is; else Training for a conversion
  that splits, the one non-training part for an external set."""
  parts = [p for p in ISIC_PARTS if isic_ground_truth_file(p) in tables]
  if len(parts) <= 1:
    return parts[0] if parts else None
  wanted = [p for p in parts if (p != "Training") == external]
  if len(wanted) == 1:
    return wanted[0]
  raise SourceError(f"--source={description} holds the ground truth of several ISIC 2018 parts "
                    f"({', '.join(parts)}): give a folder that holds one")


def _read_csv(ref: ImageRef, dtype: dict) -> pd.DataFrame:
  data = read_bytes(ref)
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    row = data[:e.start].count(b"\n") + 1  # the file's line, 1 = header
    raise SourceError(f"{ref} row {row}: not UTF-8 text (byte {data[e.start]:#04x}); re-save the file as "
                      "UTF-8") from None
  try:
    return pd.read_csv(io.BytesIO(data), dtype=dtype)
  except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    raise SourceError(f"{ref}: not a readable CSV ({e})") from e


def _require_columns(table: pd.DataFrame, ref, columns):
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise SourceError(f"{ref}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
  if table.empty:
    raise SourceError(f"{ref}: no rows")


def read_metadata(ref: ImageRef | str) -> pd.DataFrame:
  """Reads and validates HAM10000_metadata.csv; errors name the file and row (1 = header)."""
  ref = ref if isinstance(ref, ImageRef) else ImageRef(ref)
  metadata = _read_csv(ref, {"lesion_id": str, "image_id": str, "dx": str})
  _require_columns(metadata, ref, REQUIRED_COLUMNS)
  return _validated(metadata, ref)


def read_isic_ground_truth(ref: ImageRef, groupings: ImageRef | None) -> pd.DataFrame:
  """The ISIC 2018 ground truth (and lesion groupings, when given) as HAM10000 metadata rows."""
  truth = _read_csv(ref, {"image": str})
  _require_columns(truth, ref, ("image",) + ISIC_CLASSES)
  values = truth[list(ISIC_CLASSES)].apply(pd.to_numeric, errors="coerce")
  one_hot = values.isin([0, 1]).all(axis=1) & (values.sum(axis=1) == 1)
  if not one_hot.all():
    row = truth.index[~one_hot][0]
    found = ", ".join(f"{c}={truth.at[row, c]}" for c in ISIC_CLASSES)
    raise SourceError(f"{ref} row {row + 2}: image {truth.at[row, 'image']} is not labelled with exactly one "
                      f"class ({found}); each row needs one 1 and six 0s ({int((~one_hot).sum())} such rows)")
  metadata = pd.DataFrame({
      "lesion_id": truth["image"],  # without groupings, each image is its own lesion
      "image_id": truth["image"],
      "dx": [ISIC_CLASSES[i].lower() for i in values.to_numpy().argmax(axis=1)],
      "dx_type": "", "age": float("nan"), "sex": "", "localization": ""})
  if groupings is not None:
    table = _read_csv(groupings, {"image": str, "lesion_id": str, "diagnosis_confirm_type": str})
    _require_columns(table, groupings, ("image", "lesion_id", "diagnosis_confirm_type"))
    lesions = table.groupby("image")["lesion_id"].nunique()
    if (lesions > 1).any():
      image = lesions.index[lesions > 1][0]
      rows = ", ".join(str(r + 2) for r in table.index[table["image"] == image])
      raise SourceError(f"{groupings}: image {image} is given two lesions (rows {rows}); an image shows one lesion")
    table = table.drop_duplicates("image").set_index("image")
    ungrouped = ~metadata["image_id"].isin(table.index)
    if ungrouped.any():
      row = metadata.index[ungrouped][0]
      raise SourceError(f"{ref} row {row + 2}: image {metadata.at[row, 'image_id']} has no row in {groupings} "
                        f"(its lesion is unknown; {int(ungrouped.sum())} such images in all)")
    metadata["lesion_id"] = metadata["image_id"].map(table["lesion_id"])
    confirm = metadata["image_id"].map(table["diagnosis_confirm_type"]).fillna("").str.strip()
    metadata["dx_type"] = confirm.map(lambda t: DIAGNOSIS_CONFIRM_TYPES.get(t.lower(), t))
  return _validated(metadata, ref)


def _validated(metadata: pd.DataFrame, ref) -> pd.DataFrame:
  """The checks every layout's table passes; row numbers count the file's lines (1 = header)."""
  path = str(ref)
  for column in ("lesion_id", "image_id", "dx"):
    blank = metadata[column].isna() | (metadata[column].astype(str).str.strip() == "")
    if blank.any():
      raise SourceError(f"{path} row {metadata.index[blank][0] + 2}: empty {column}")
  duplicate = metadata["image_id"].duplicated(keep="first")
  if duplicate.any():
    row = metadata.index[duplicate][0]
    first = metadata.index[metadata["image_id"] == metadata.at[row, "image_id"]][0]
    raise SourceError(f"{path} row {row + 2}: duplicate image_id {metadata.at[row, 'image_id']} "
                      f"(first at row {first + 2})")
  unknown = ~metadata["dx"].isin(features.CLASS_NAMES)
  if unknown.any():
    row = metadata.index[unknown][0]
    raise SourceError(f"{path} row {row + 2}: unknown dx {metadata.at[row, 'dx']!r}; "
                      f"expected one of {', '.join(features.CLASS_NAMES)}")
  diagnoses = metadata.groupby("lesion_id")["dx"].nunique()
  if (diagnoses > 1).any():
    lesion = diagnoses.index[diagnoses > 1][0]
    rows = metadata.index[metadata["lesion_id"] == lesion]
    found = ", ".join(f"row {row + 2}: {metadata.at[row, 'dx']}" for row in rows)
    raise SourceError(f"{path}: lesion {lesion} has two diagnoses ({found}); a lesion has one "
                      f"diagnosis: correct its rows ({int((diagnoses > 1).sum())} such lesions in all)")
  metadata["age"] = pd.to_numeric(metadata["age"], errors="coerce")
  for column in ("sex", "localization", "dx_type"):
    metadata[column] = metadata[column].fillna("").astype(str)
  return metadata[list(REQUIRED_COLUMNS)].reset_index(drop=True)
