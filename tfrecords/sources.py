"""Finding HAM10000: kagglehub, a local folder, the two zip archives, or gs://.

Every source becomes the same thing: the metadata table, validated, and where
each `image_id`'s JPEG lives. Images are keyed by `image_id` because the Kaggle
copy holds every image twice (`HAM10000_images_part_1/` and a lowercase twin).
"""

import dataclasses
import functools
import hashlib
import io
import os
import posixpath
import zipfile

import pandas as pd
import tensorflow as tf

from tfrecords import cli, features

METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
KAGGLE_HANDLE = "kmader/skin-cancer-mnist-ham10000"
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
IMAGE_ZIPS = tuple(f"{folder}.zip" for folder in IMAGE_FOLDERS)


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


def fingerprint(source: "Source") -> dict:
  """What the source holds, cheap to take: its metadata rows and its images with their sizes
  (and CRCs, where the listing gives them: gs:// and zip archives). A conversion records it,
  and will not resume, or call itself done, over a changed source."""
  ids = sorted(source.images)
  gcs = [source.images[i].path for i in ids if source.images[i].path.startswith("gs://")
         and source.images[i].member is None]
  listing = _gcs_listing(gcs) if gcs else {}
  sizes = [listing.get(source.images[i].path) or _image_size(source.images[i]) for i in ids]
  listing = "\n".join(f"{i} {size}" for i, size in zip(ids, sizes))
  return {"rows": int(len(source.metadata)), "images": len(ids),
          "metadata_sha256": hashlib.sha256(source.metadata.to_csv(index=False).encode()).hexdigest(),
          "images_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def fingerprint_changes(recorded: dict | None, current: dict) -> str:
  """What changed between two fingerprints, in words ('' when nothing did)."""
  if recorded is None:
    return "it records no source fingerprint (written by an older version)"
  changes = []
  if recorded["metadata_sha256"] != current["metadata_sha256"]:
    changes.append(f"metadata rows {recorded['rows']} → {current['rows']}"
                   + ("" if recorded["rows"] != current["rows"] else ", their content differs"))
  if recorded["images_sha256"] != current["images_sha256"]:
    changes.append(f"images {recorded['images']} → {current['images']}"
                   + ("" if recorded["images"] != current["images"] else ", their files differ"))
  return "; ".join(changes)


@functools.lru_cache(maxsize=8)
def _open_zip(path: str) -> zipfile.ZipFile:
  return zipfile.ZipFile(path)


def read_image_bytes(ref: ImageRef) -> bytes:
  if ref.member is not None:
    return _open_zip(ref.path).read(ref.member)
  with tf.io.gfile.GFile(ref.path, "rb") as f:
    return f.read()


def open_source(source: str, kaggle_version: int = 2) -> Source:
  """Resolves `--source` (kaggle, a folder, or a gs:// prefix) to metadata and images."""
  if source == "kaggle":
    import kagglehub  # pylint: disable=g-import-not-at-top
    handle = f"{KAGGLE_HANDLE}/versions/{kaggle_version}"
    # Served from KAGGLEHUB_CACHE when it holds this version, else downloaded.
    folder = kagglehub.dataset_download(handle)
    return _open_folder(folder, f"kaggle:{handle}")
  if not tf.io.gfile.exists(source):
    raise SourceError(f"--source={source}: no such folder")
  if not tf.io.gfile.isdir(source):
    raise SourceError(f"--source={source}: not a folder")
  return _open_folder(source, source)


def _open_folder(folder: str, description: str) -> Source:
  metadata_paths, jpegs, zips = [], {}, []
  for directory, _, files in sorted(tf.io.gfile.walk(folder)):
    for name in sorted(files):
      path = posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)
      if name == METADATA_FILE:
        metadata_paths.append(path)
      elif name.lower().endswith((".jpg", ".jpeg")):
        # First seen wins: `HAM10000_images_part_1` sorts before its lowercase twin.
        jpegs.setdefault(os.path.splitext(name)[0], ImageRef(path))
      elif name in IMAGE_ZIPS:
        zips.append(path)
  if not metadata_paths:
    raise SourceError(f"{description}: no {METADATA_FILE} found (an empty or wrong --source?)")
  if not jpegs:
    for archive in zips:
      if "://" in archive:
        raise SourceError(f"{archive}: zip archives are read from local disk only; extract them first")
      for member in _open_zip(archive).namelist():
        name = posixpath.basename(member)
        if name.lower().endswith((".jpg", ".jpeg")):
          jpegs.setdefault(os.path.splitext(name)[0], ImageRef(archive, member))
  if not jpegs:
    raise SourceError(f"{description}: no JPEG images found beside {metadata_paths[0]}")
  metadata = read_metadata(metadata_paths[0])
  missing = [i for i in metadata["image_id"] if i not in jpegs]
  if missing:
    row = metadata.index[metadata["image_id"] == missing[0]][0]
    raise SourceError(f"{metadata_paths[0]} row {row + 2}: image {missing[0]} not found under "
                      f"{folder} ({len(missing)} images missing in all)")
  images = {i: jpegs[i] for i in metadata["image_id"]}
  return Source(description, metadata, images, metadata_paths[0])


def read_metadata(path: str) -> pd.DataFrame:
  """Reads and validates HAM10000_metadata.csv; errors name the file and row (1 = header)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    try:
      metadata = pd.read_csv(io.BytesIO(f.read()), dtype={"lesion_id": str, "image_id": str, "dx": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
      raise SourceError(f"{path}: not a readable CSV ({e})") from e
  missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
  if missing:
    raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; "
                      f"expected {', '.join(REQUIRED_COLUMNS)}")
  if metadata.empty:
    raise SourceError(f"{path}: no rows")
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
