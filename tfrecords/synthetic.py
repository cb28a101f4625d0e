r"""A synthetic, HAM10000-shaped dataset for offline runs and tests.

HAM10000 itself cannot be fetched offline, so this writes a stand-in with the
same shape: the Kaggle folders (`HAM10000_images_part_1/`, `_part_2/` and their
lowercase twins), `HAM10000_metadata.csv` with the real columns, 600×450 JPEGs
with skin-like texture (so decoding costs about what a real image costs),
lesions photographed 1-6 times, HAM10000's class imbalance (with a floor so
every class lands in every split at small N), a few missing ages, and a visual
class signal (colour, size, border) that a CNN can learn.

The ISIC 2018 challenge layouts hold the same images as the challenge ships
them: `isic2018` the training part (input folder, one-hot ground truth, lesion
groupings), `isic2018_zips` the same with the input folder and the ground
truth zipped, `isic2018_test` a test part (no groupings; image ids from the
real test set's first, ISIC_0034524, so they never meet the training ids).

  python -m tfrecords.synthetic --output_dir=/tmp/ham_synth --num_images=600
  python -m tfrecords.synthetic --output_dir=/tmp/cache --layout=kagglehub_cache
  python -m tfrecords.synthetic --output_dir=/tmp/isic_test --layout=isic2018_test
  python -m tfrecords.synthetic --output_dir=/tmp/ham_sites --site_signal=0.5   # sites that carry the class
"""

import csv
import io
import multiprocessing
import os
import shutil
import zipfile
from dataclasses import dataclass

import numpy as np
from absl import flags, logging
from PIL import Image, ImageDraw, ImageFilter

from tfrecords import cli, sources  # sources: the layout's names, which the converter reads

WIDTH, HEIGHT = 600, 450

# Image counts in HAM10000 (Tschandl et al., 2018) and the share of lesions
# photographed 1..6 times (7,470 lesions for 10,015 images).
HAM10000_CLASS_COUNTS = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
PHOTOS_PER_LESION_SHARE = (0.74, 0.19, 0.053, 0.013, 0.003, 0.001)
MIN_IMAGES_PER_CLASS = 30
MIN_NUM_IMAGES = 10 * MIN_IMAGES_PER_CLASS  # so that every class lands in every split
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face",
                 "chest", "foot", "neck", "scalp", "hand", "ear", "unknown")

# The class signal: a mean lesion colour (RGB), a radius range and how ragged
# the border is. Lesion-to-lesion jitter keeps neighbouring classes overlapping.
@dataclass(frozen=True)
class _Look:
  rgb: tuple[int, int, int]
  radius: tuple[int, int]
  blobs: int


CLASS_LOOKS = {
    "akiec": _Look((196, 112, 96), (60, 110), 3),
    "bcc": _Look((214, 160, 178), (50, 100), 2),
    "bkl": _Look((150, 112, 66), (80, 150), 4),
    "df": _Look((176, 132, 120), (40, 70), 1),
    "mel": _Look((58, 38, 48), (90, 170), 7),
    "nv": _Look((118, 78, 54), (50, 120), 1),
    "vasc": _Look((170, 30, 64), (30, 70), 5),
}

FLAGS = flags.FLAGS
LAYOUTS = ["kaggle", "folder", "zips", "kagglehub_cache", "isic2018", "isic2018_zips", "isic2018_test"]
FIRST_IMAGE_NUMBER = {"Training": 24306, "Test": 34524}  # the real sets' first ISIC_ ids


def define_flags():
  flags.DEFINE_string("output_dir", None, "Where to write the dataset.", required=True)
  flags.DEFINE_integer("num_images", 600, f"Number of images (≥ {MIN_NUM_IMAGES}, so that every class lands in "
                       "every split).", lower_bound=MIN_NUM_IMAGES)
  flags.DEFINE_integer("seed", 0, "Random seed: the same seed writes the same dataset.")
  flags.DEFINE_enum("layout", "kaggle", LAYOUTS,
                    "kaggle: the Kaggle copy's folders with lowercase twins; folder: the two "
                    "image folders and the CSV; zips: the two zip archives and the CSV; "
                    "kagglehub_cache: the kaggle layout inside a KAGGLEHUB_CACHE folder; "
                    "isic2018, isic2018_zips, isic2018_test: the ISIC 2018 challenge's.")
  flags.DEFINE_integer("kaggle_version", 2, "Dataset version for --layout=kagglehub_cache.")
  flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the written images.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes that render images.")
  flags.DEFINE_float("site_signal", 0.0, "The share of lesions photographed at their class's own site, so "
                     "that the label depends partly on the localization (for --metadata runs); 0: the site is "
                     "random, as the default dataset's.")


def class_image_counts(num_images: int) -> dict[str, int]:
  """HAM10000's class shares with a floor, scaled to `num_images`."""
  if num_images < MIN_NUM_IMAGES:
    raise cli.UserError(f"--num_images={num_images}: need at least {MIN_NUM_IMAGES} so that every class lands "
                        "in every split")
  total = sum(HAM10000_CLASS_COUNTS.values())
  counts = {dx: max(MIN_IMAGES_PER_CLASS, round(num_images * n / total))
            for dx, n in HAM10000_CLASS_COUNTS.items()}
  counts["nv"] += num_images - sum(counts.values())  # nv absorbs the rounding and the floor
  return counts


# --site_signal: the site a lesion of each class is photographed at, when its site carries the
# class (each in another of the ISIC archive's general sites, job/patient_metadata.py).
CLASS_SITES = {"akiec": "face", "bcc": "chest", "bkl": "trunk", "df": "lower extremity", "mel": "back",
               "nv": "upper extremity", "vasc": "acral"}


def make_metadata(num_images: int, seed: int, first_image: int = FIRST_IMAGE_NUMBER["Training"],
                  site_signal: float = 0.0) -> list[dict]:
  """Rows of HAM10000_metadata.csv, plus the private `_look` seed of each lesion. site_signal: the
  share of lesions whose site is their class's own (CLASS_SITES), the rest drawn at random, so
  that the label depends partly on the site (0: the site says nothing of the class)."""
  rng = np.random.default_rng(seed)
  rows = []
  lesion_number = 0
  for dx, count in class_image_counts(num_images).items():
    remaining = count
    while remaining:
      photos = min(remaining, 1 + rng.choice(len(PHOTOS_PER_LESION_SHARE), p=PHOTOS_PER_LESION_SHARE))
      remaining -= photos
      lesion_number += 1
      lesion = {
          "lesion_id": f"HAM_{lesion_number:07d}",
          "dx": dx,
          "dx_type": "follow_up" if dx == "nv" and rng.random() < 0.55 else
                     str(rng.choice(["histo", "consensus", "confocal"], p=[0.8, 0.15, 0.05])),
          "age": float(rng.integers(1, 18) * 5),
          "sex": str(rng.choice(["male", "female", "unknown"], p=[0.54, 0.455, 0.005])),
          "localization": str(rng.choice(LOCALIZATIONS)),
          "_look": int(rng.integers(2**31)),
      }
      if site_signal and rng.random() < site_signal:  # drawn only then: site_signal 0 writes what it always did
        lesion["localization"] = CLASS_SITES[dx]
      rows.extend(dict(lesion, _photo=p) for p in range(photos))
  order = rng.permutation(len(rows))
  rows = [rows[i] for i in order]
  for number, row in enumerate(rows):
    row["image_id"] = f"ISIC_{first_image + number:07d}"
  # HAM10000 misses 57 of 10,015 ages; keep at least two missing at any size.
  for i in rng.choice(len(rows), size=max(2, len(rows) * 57 // 10015), replace=False):
    rows[i]["age"] = float("nan")
  return rows


def render_image(row: dict, jpeg_quality: int = 95) -> bytes:
  """One 600×450 dermatoscopy-like JPEG: textured skin and a class-coloured lesion."""
  look = CLASS_LOOKS[row["dx"]]
  lesion_rng = np.random.default_rng(row["_look"])  # shared by the photos of one lesion
  photo_rng = np.random.default_rng([row["_look"], row["_photo"]])

  skin = np.array([222, 178, 150]) + lesion_rng.normal(0, 12, 3)
  coarse = Image.fromarray(lesion_rng.normal(0, 1, (12, 16, 3)).astype(np.float32)[..., 0])
  shade = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BICUBIC))[..., None] * 10
  grain = photo_rng.normal(0, 9, (HEIGHT, WIDTH, 3))
  base = np.clip(skin + shade + grain, 0, 255).astype(np.uint8)
  image = Image.fromarray(base)

  mask = Image.new("L", (WIDTH, HEIGHT), 0)
  draw = ImageDraw.Draw(mask)
  radius = lesion_rng.uniform(*look.radius) * photo_rng.uniform(0.9, 1.1)
  cx = WIDTH / 2 + photo_rng.normal(0, 30)
  cy = HEIGHT / 2 + photo_rng.normal(0, 25)
  for _ in range(look.blobs):
    r = radius * lesion_rng.uniform(0.55, 1.0)
    dx, dy = lesion_rng.normal(0, radius * 0.35, 2) if look.blobs > 1 else (0.0, 0.0)
    aspect = lesion_rng.uniform(0.7, 1.3)
    draw.ellipse((cx + dx - r * aspect, cy + dy - r / aspect, cx + dx + r * aspect, cy + dy + r / aspect), fill=255)
  mask = mask.filter(ImageFilter.GaussianBlur(4))

  colour = np.array(look.rgb) + lesion_rng.normal(0, 14, 3) + photo_rng.normal(0, 4, 3)
  texture = photo_rng.normal(0, 14, (HEIGHT, WIDTH, 1)) * np.array([1.0, 0.9, 0.8])
  lesion = Image.fromarray(np.clip(colour + texture, 0, 255).astype(np.uint8))
  image = Image.composite(lesion, image, mask)

  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=jpeg_quality)
  return buffer.getvalue()


def _render_to_file(args):
  row, path, jpeg_quality = args
  with open(path, "wb") as f:
    f.write(render_image(row, jpeg_quality))


def write_metadata(rows: list[dict], path: str):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sources.REQUIRED_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "age": "" if np.isnan(row["age"]) else row["age"]})


def kagglehub_cache_dataset_dir(cache_dir: str, version: int) -> str:
  """Where kagglehub keeps a versioned dataset inside KAGGLEHUB_CACHE."""
  return os.path.join(cache_dir, "datasets", *sources.KAGGLE_HANDLE.split("/"), "versions", str(version))


def write_dataset(output_dir: str, num_images: int = 600, seed: int = 0, layout: str = "kaggle",
                  kaggle_version: int = 2, jpeg_quality: int = 95, workers: int = 1, site_signal: float = 0.0) -> str:
  """Writes the dataset and returns the folder that holds the metadata CSV."""
  if not 0 <= site_signal <= 1:
    raise cli.UserError(f"--site_signal={site_signal} must be between 0 and 1")
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: one of {', '.join(LAYOUTS)}")
  if layout.startswith("isic2018"):
    if site_signal:
      raise cli.UserError("--site_signal: the ISIC 2018 layouts carry no sites")
    return write_isic_dataset(output_dir, num_images, seed, layout, jpeg_quality, workers)
  root = output_dir
  if layout == "kagglehub_cache":
    root = kagglehub_cache_dataset_dir(output_dir, kaggle_version)
  rows = make_metadata(num_images, seed, site_signal=site_signal)
  half = (len(rows) + 1) // 2
  _render(rows, [os.path.join(root, sources.IMAGE_FOLDERS[n >= half]) for n in range(len(rows))],
          jpeg_quality, workers)
  write_metadata(rows, os.path.join(root, sources.METADATA_FILE))

  if layout in ("kaggle", "kagglehub_cache"):
    # The Kaggle copy holds each image folder twice, once in lowercase.
    for folder in sources.IMAGE_FOLDERS:
      shutil.copytree(os.path.join(root, folder), os.path.join(root, folder.lower()),
                      copy_function=_link_or_copy, dirs_exist_ok=True)
  elif layout == "zips":
    for folder in sources.IMAGE_FOLDERS:
      with zipfile.ZipFile(os.path.join(root, folder + ".zip"), "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(os.listdir(os.path.join(root, folder))):
          archive.write(os.path.join(root, folder, name), name)
      shutil.rmtree(os.path.join(root, folder))
  if layout == "kagglehub_cache":
    # kagglehub treats a dataset as cached once its completion marker exists.
    marker = os.path.join(output_dir, "datasets", *sources.KAGGLE_HANDLE.split("/"), f"{kaggle_version}.complete")
    open(marker, "w").close()
  return root


def _render(rows: list[dict], folders: list[str], jpeg_quality: int, workers: int):
  """Renders row i into folders[i]/{image_id}.jpg, in parallel."""
  for folder in set(folders):
    os.makedirs(folder, exist_ok=True)
  jobs = [(row, os.path.join(folder, row["image_id"] + ".jpg"), jpeg_quality)
          for row, folder in zip(rows, folders)]
  with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
    for done, _ in enumerate(pool.imap_unordered(_render_to_file, jobs, chunksize=8), 1):
      if done % 200 == 0 or done == len(jobs):
        logging.info("rendered %d/%d images", done, len(jobs))


def write_isic_dataset(output_dir: str, num_images: int = 600, seed: int = 0, layout: str = "isic2018",
                       jpeg_quality: int = 95, workers: int = 1) -> str:
  """The ISIC 2018 Task 3 layout (module docstring); the same seed gives the same images as
  the Kaggle layouts (for the training part)."""
  part = "Test" if layout == "isic2018_test" else "Training"
  rows = make_metadata(num_images, seed, FIRST_IMAGE_NUMBER[part])
  inputs = os.path.join(output_dir, sources.isic_input_folder(part))
  _render(rows, [inputs] * len(rows), jpeg_quality, workers)
  # The challenge's ground truth is sorted by image, with one-hot floats.
  truth = os.path.join(output_dir, sources.isic_ground_truth_file(part))
  with open(truth, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("image",) + sources.ISIC_CLASSES)
    for row in sorted(rows, key=lambda r: r["image_id"]):
      writer.writerow([row["image_id"]] + [f"{float(c.lower() == row['dx']):.1f}" for c in sources.ISIC_CLASSES])
  if part == "Training":
    words = {dx_type: words for words, dx_type in sources.DIAGNOSIS_CONFIRM_TYPES.items()}
    with open(os.path.join(output_dir, sources.isic_groupings_file(part)), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(("image", "lesion_id", "diagnosis_confirm_type"))
      for row in sorted(rows, key=lambda r: r["image_id"]):
        writer.writerow((row["image_id"], row["lesion_id"], words[row["dx_type"]]))
  if layout == "isic2018_zips":  # as the challenge site serves them: a folder inside each zip
    for path, is_folder in ((inputs, True), (truth, False)):
      stem = os.path.splitext(path)[0] if not is_folder else path
      with zipfile.ZipFile(stem + ".zip", "w", zipfile.ZIP_STORED) as archive:
        folder = os.path.basename(stem)
        names = sorted(os.listdir(path)) if is_folder else [os.path.basename(path)]
        for name in names:
          archive.write(os.path.join(path, name) if is_folder else path, f"{folder}/{name}")
      shutil.rmtree(path) if is_folder else os.remove(path)
  return output_dir


def write_and_convert(work_dir: str, num_images: int, image_size: int = 0, seed: int = 0,
                      num_train_shards: int = 16, folds: int = 0, site_signal: float = 0.0):
  """A synthetic dataset and its shards under `work_dir`, each made once per setting.

  Returns (images_dir, shards_dir, source); the demo and the benchmarks start here."""
  from tfrecords import convert  # pylint: disable=g-import-not-at-top
  workers = os.cpu_count() or 1
  sites = f"_sites{site_signal:g}" if site_signal else ""
  images_dir = os.path.join(work_dir, f"images_{num_images}_{seed}{sites}")
  if not os.path.exists(os.path.join(images_dir, sources.METADATA_FILE)):
    write_dataset(images_dir, num_images=num_images, seed=seed, workers=workers, site_signal=site_signal)
  source = sources.open_source(images_dir)
  shards_dir = os.path.join(work_dir, f"shards_{num_images}_{seed}{sites}_{image_size}_{num_train_shards}"
                            + (f"_folds{folds}" if folds else ""))
  settings = convert.Settings(source=images_dir, image_size=image_size, seed=seed,
                              num_train_shards=num_train_shards, folds=folds)
  convert.convert(source, shards_dir, settings, workers=workers)
  return images_dir, shards_dir, source


def _link_or_copy(src, dst):
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def main(argv):
  del argv
  root = write_dataset(FLAGS.output_dir, FLAGS.num_images, FLAGS.seed, FLAGS.layout,
                       FLAGS.kaggle_version, FLAGS.jpeg_quality, FLAGS.workers, FLAGS.site_signal)
  logging.info("Synthetic HAM10000 (%d images, layout %s) in %s", FLAGS.num_images, FLAGS.layout, root)
  print(root)


if __name__ == "__main__":
  cli.run(main, define_flags)
