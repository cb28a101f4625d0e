"""The converter: lesion-aware split, round trip, sources, bad input, resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from helpers import NUM_IMAGES, REPO, run_module, wait_until
from tfrecords import convert, features, fileio, manifest as manifest_lib, sources, split as split_lib, synthetic


def read_shards(pattern):
  """Reads shards the way any TensorFlow program would, with only the contract's keys."""
  spec = {
      "image/encoded": tf.io.FixedLenFeature([], tf.string),
      "image/class/label": tf.io.FixedLenFeature([], tf.int64),
      "image/class/text": tf.io.FixedLenFeature([], tf.string),
      "image/source_id": tf.io.FixedLenFeature([], tf.string),
      "image/lesion_id": tf.io.FixedLenFeature([], tf.string),
      "image/height": tf.io.FixedLenFeature([], tf.int64),
      "image/width": tf.io.FixedLenFeature([], tf.int64),
      "image/metadata/age": tf.io.FixedLenFeature([], tf.float32),
  }
  files = tf.io.gfile.glob(pattern)
  assert files, pattern
  return [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files)]


# --- split -------------------------------------------------------------------------------------

def test_split_keeps_lesions_whole_and_stratifies(source):
  metadata = source.metadata
  split = split_lib.split_by_lesion(metadata, 0.15, 0.15, seed=3)
  assert (split.groupby(metadata["lesion_id"]).nunique() == 1).all()
  shares = split.value_counts(normalize=True)
  assert abs(shares["train"] - 0.70) < 0.04
  assert abs(shares["validation"] - 0.15) < 0.04 and abs(shares["test"] - 0.15) < 0.04
  table = pd.crosstab(metadata["dx"], split, normalize="columns")
  overall = metadata["dx"].value_counts(normalize=True)
  for name in features.SPLITS:
    assert (table[name] > 0).all(), f"a class is missing from {name}"
    # nv dominates every split about as much as it does the whole
    assert abs(table[name]["nv"] - overall["nv"]) < 0.08


def test_split_is_reproducible_and_seeded(source):
  a = split_lib.split_by_lesion(source.metadata, seed=5)
  assert a.equals(split_lib.split_by_lesion(source.metadata, seed=5))
  assert not a.equals(split_lib.split_by_lesion(source.metadata, seed=6))


def test_check_split_rejects_a_lesion_on_two_sides(source):
  metadata = source.metadata
  split = split_lib.split_by_lesion(metadata)
  lesion = metadata["lesion_id"][metadata["lesion_id"].duplicated()].iloc[0]
  rows = metadata.index[metadata["lesion_id"] == lesion]
  split[rows[0]] = "test" if split[rows[1]] != "test" else "train"
  with pytest.raises(AssertionError, match="cross splits"):
    split_lib.check_split(metadata, split)


def test_synthetic_dataset_has_hams_shape(source, synthetic_dir):
  metadata = source.metadata
  assert len(metadata) == NUM_IMAGES
  assert metadata["lesion_id"].nunique() < NUM_IMAGES  # lesions with several photos
  assert metadata["dx"].value_counts().idxmax() == "nv"
  assert set(metadata["dx"]) == set(features.CLASS_NAMES)
  assert metadata["age"].isna().sum() >= 1
  for folder in ("HAM10000_images_part_1", "ham10000_images_part_1", "HAM10000_images_part_2"):
    assert os.path.isdir(os.path.join(synthetic_dir, folder))
  image = tf.io.decode_jpeg(sources.read_bytes(source.images[metadata["image_id"][0]]))
  assert image.shape == (450, 600, 3)


# --- round trip --------------------------------------------------------------------------------

def test_round_trip_every_image_once_with_its_label(source, shards_dir):
  examples = read_shards(os.path.join(shards_dir, "*.tfrecord"))
  ids = [e["image/source_id"].numpy().decode() for e in examples]
  assert sorted(ids) == sorted(source.metadata["image_id"])  # each once, none twice
  truth = source.metadata.set_index("image_id")
  for e, image_id in zip(examples[:40], ids):
    row = truth.loc[image_id]
    assert features.CLASS_NAMES[int(e["image/class/label"])] == row["dx"]
    assert e["image/class/text"].numpy().decode() == row["dx"]
    assert e["image/lesion_id"].numpy().decode() == row["lesion_id"]
    age = float(e["image/metadata/age"])
    assert (np.isnan(age) and np.isnan(row["age"])) or age == row["age"]
    image = tf.io.decode_jpeg(e["image/encoded"])
    assert image.shape == (int(e["image/height"]), int(e["image/width"]), 3) == (450, 600, 3)
    original = tf.io.decode_jpeg(sources.read_bytes(source.images[image_id]))
    assert np.array_equal(image.numpy(), original.numpy())  # bytes kept as they were


def test_shards_split_and_manifest_agree(source, shards_dir):
  manifest = json.load(open(os.path.join(shards_dir, "manifest.json")))
  label_map = json.load(open(os.path.join(shards_dir, "label_map.json")))
  assert list(label_map) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
  assert list(label_map.values()) == list(range(7))
  split_csv = pd.read_csv(os.path.join(shards_dir, "split.csv"))
  assert (split_csv.groupby("lesion_id")["split"].nunique() == 1).all()
  assert len(manifest["splits"]["train"]["shards"]) == 16
  for name in features.SPLITS:
    info = manifest["splits"][name]
    examples = read_shards(os.path.join(shards_dir, f"{name}-*-of-*.tfrecord"))
    assert len(examples) == info["num_examples"] == (split_csv["split"] == name).sum()
    ids = {e["image/source_id"].numpy().decode() for e in examples}
    assert ids == set(split_csv["image_id"][split_csv["split"] == name])
    for index, shard in enumerate(info["shards"]):  # listed in order, each named by the contract
      assert shard["name"] == features.shard_name(name, index, len(info["shards"]))
      assert fileio.sha256_of(os.path.join(shards_dir, shard["name"])) == shard["sha256"]
  lesions = [set(split_csv["lesion_id"][split_csv["split"] == n]) for n in features.SPLITS]
  assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])


def test_resize_at_conversion_records_size(source, tmp_path):
  settings = convert.Settings(source=source.description, image_size=64, num_train_shards=2,
                              num_eval_shards=1)
  manifest = convert.convert(source, str(tmp_path), settings, workers=1)
  assert manifest["image_size"] == 64
  example = read_shards(str(tmp_path / "test-*.tfrecord"))[0]
  assert tf.io.decode_jpeg(example["image/encoded"]).shape == (64, 64, 3)
  assert int(example["image/height"]) == int(example["image/width"]) == 64


# --- folds (--folds) ---------------------------------------------------------------------------

NUM_FOLDS = 3


@pytest.fixture(scope="module")
def folded_dir(source, tmp_path_factory):
  """shards_dir's conversion with --folds=3."""
  out = str(tmp_path_factory.mktemp("folded"))
  convert.convert(source, out, convert.Settings(source=source.description, folds=NUM_FOLDS), workers=2)
  return out


def folds_of_shards(pattern) -> dict[str, int]:
  """image_id → the fold its example records (features.NO_FOLD where it has none)."""
  keys = [features.SOURCE_ID, features.FOLD]
  return {example[features.SOURCE_ID].numpy().decode(): int(example[features.FOLD])
          for example in map(lambda r: features.parse_example(r, keys),
                             tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)))}


def test_assign_folds_by_lesion_stratified_and_independent_of_row_order(source):
  metadata = source.metadata
  split = split_lib.split_by_lesion(metadata, seed=3)
  fold = split_lib.assign_folds(metadata, split, 4, seed=3)
  assert fold.dtype == np.int64 and fold.name == "fold"
  assert ((fold == -1) == (split == "test")).all() and set(fold[fold >= 0]) == {0, 1, 2, 3}
  assert (fold.groupby(metadata["lesion_id"]).nunique() == 1).all()
  table = pd.crosstab(metadata["dx"][fold >= 0], fold[fold >= 0], normalize="columns")
  overall = metadata["dx"][fold >= 0].value_counts(normalize=True)
  assert (table > 0).all().all()  # every class in every fold
  assert (table.sub(overall, axis=0).abs() < 0.06).all().all()
  shuffled = metadata.sample(frac=1, random_state=0).reset_index(drop=True)
  again = split_lib.assign_folds(shuffled, split_lib.split_by_lesion(shuffled, seed=3), 4, seed=3)
  by_image = lambda frame, values: pd.Series(values.to_numpy(), index=frame["image_id"]).sort_index()
  assert by_image(shuffled, again).equals(by_image(metadata, fold))
  assert not fold.equals(split_lib.assign_folds(metadata, split, 4, seed=4))
  folded = split_lib.split_of_folds(split, fold)
  assert (folded[split == "test"] == "test").all() and (folded[fold == 0] == "validation").all()
  assert (folded[fold > 0] == "train").all()


def test_assign_folds_refuses_too_few_lesions_and_check_folds_names_what_is_wrong(source):
  metadata = source.metadata
  split = split_lib.split_by_lesion(metadata)
  with pytest.raises(convert.cli.UserError, match=r"lesions outside the test split are too few .*--folds=500"):
    split_lib.assign_folds(metadata, split, 500)
  with pytest.raises(convert.cli.UserError, match=r"--folds=1 must be at least 2"):
    split_lib.assign_folds(metadata, split, 1)
  fold = split_lib.assign_folds(metadata, split, NUM_FOLDS)
  lesion = metadata["lesion_id"][metadata["lesion_id"].duplicated() & (fold >= 0)].iloc[0]
  rows = metadata.index[metadata["lesion_id"] == lesion]
  crossed = fold.copy()
  crossed[rows[0]] = (fold[rows[1]] + 1) % NUM_FOLDS
  with pytest.raises(AssertionError, match="cross folds"):
    split_lib.check_folds(metadata, split, crossed, NUM_FOLDS)
  emptied = fold.copy()
  emptied[(metadata["dx"] == "df") & (fold == 2)] = 1
  with pytest.raises(convert.cli.UserError, match="fold 2 has no image of class df"):
    split_lib.check_folds(metadata, split, emptied, NUM_FOLDS)


def test_folded_conversion_keeps_the_test_split_and_records_folds(folded_dir, shards_dir):
  manifest = json.load(open(os.path.join(folded_dir, "manifest.json")))
  unfolded = json.load(open(os.path.join(shards_dir, "manifest.json")))
  assert manifest["splits"]["test"] == unfolded["splits"]["test"]  # the same shards, byte for byte
  assert manifest["settings"]["folds"] == NUM_FOLDS and manifest["folds"]["count"] == NUM_FOLDS
  table = pd.read_csv(os.path.join(folded_dir, "split.csv"), dtype={"fold": "Int64"}).set_index("image_id")
  before = pd.read_csv(os.path.join(shards_dir, "split.csv")).set_index("image_id")
  assert set(table.index[table["split"] == "test"]) == set(before.index[before["split"] == "test"])
  assert table["fold"][table["split"] == "test"].isna().all()
  assert (table["fold"][table["split"] == "validation"] == 0).all()
  assert set(table["fold"][table["split"] == "train"]) == set(range(1, NUM_FOLDS))
  assert (table.groupby("lesion_id")["fold"].nunique(dropna=False) == 1).all()  # folds lesion-disjoint
  written = {split: folds_of_shards(os.path.join(folded_dir, f"{split}-*.tfrecord")) for split in features.SPLITS}
  assert set(written["validation"].values()) == {0}
  assert set(written["test"].values()) == {features.NO_FOLD}
  for split in ("train", "validation"):
    assert written[split] == table["fold"][table["split"] == split].astype(int).to_dict()
  for info in manifest["folds"]["per_fold"]:
    rows = table[table["fold"] == info["fold"]]
    assert info["num_examples"] == len(rows) and info["num_lesions"] == rows["lesion_id"].nunique()
    assert info["class_counts"] == {dx: int((rows["dx"] == dx).sum()) for dx in features.CLASS_NAMES}
    assert all(info["class_counts"].values())  # every class in every fold
  assert manifest["folds"]["per_fold"][0]["num_examples"] == manifest["splits"]["validation"]["num_examples"]
  raw = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(
      tf.io.gfile.glob(os.path.join(folded_dir, "test-*.tfrecord"))))).numpy())
  assert features.FOLD not in raw.features.feature


def test_fold_split_info_sums_the_chosen_folds(folded_dir, shards_dir):
  manifest = manifest_lib.read(folded_dir)
  assert manifest_lib.num_folds(manifest) == NUM_FOLDS
  per_fold = manifest["folds"]["per_fold"]
  shards = [os.path.join(folded_dir, s["name"]) for split in ("train", "validation")
            for s in manifest["splits"][split]["shards"]]
  validation = manifest_lib.fold_split_info(folded_dir, manifest, 1, "validation")
  train = manifest_lib.fold_split_info(folded_dir, manifest, 1, "train")
  assert (validation.name, validation.folds, train.name, train.folds) == (
      "fold-1 validation", (1,), "fold-1 train", (0, 2))
  assert sorted(validation.files) == sorted(train.files) == sorted(shards)
  assert validation.num_examples == per_fold[1]["num_examples"]
  assert train.num_examples == per_fold[0]["num_examples"] + per_fold[2]["num_examples"]
  assert validation.class_counts == [per_fold[1]["class_counts"][dx] for dx in manifest_lib.class_names(manifest)]
  assert [a + b for a, b in zip(train.class_counts, validation.class_counts)] == [
      manifest["splits"]["train"]["class_counts"][dx] + manifest["splits"]["validation"]["class_counts"][dx]
      for dx in manifest_lib.class_names(manifest)]
  assert manifest_lib.split_info(folded_dir, manifest, "test").folds is None
  with pytest.raises(convert.cli.UserError, match=r"--fold=3 is outside 0\.\.2"):
    manifest_lib.fold_split_info(folded_dir, manifest, 3, "train")
  unfolded = manifest_lib.read(shards_dir)
  assert manifest_lib.num_folds(unfolded) == 0
  with pytest.raises(convert.cli.UserError, match=r"converted without --folds; convert again with --folds=K"):
    manifest_lib.fold_split_info(shards_dir, unfolded, 0, "validation")


def test_an_unfolded_conversion_records_no_fold(shards_dir):
  manifest = json.load(open(os.path.join(shards_dir, "manifest.json")))
  assert "folds" not in manifest and "folds" not in manifest["settings"]
  assert "folds" not in json.load(open(os.path.join(shards_dir, "plan.json")))["settings"]
  assert list(pd.read_csv(os.path.join(shards_dir, "split.csv")).columns) == ["image_id", "lesion_id", "dx", "split"]
  for record in tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(shards_dir, "validation-*.tfrecord"))):
    assert features.FOLD not in tf.train.Example.FromString(record.numpy()).features.feature


def test_a_folded_conversion_resumes_with_its_folds(source, folded_dir, tmp_path):
  out = tmp_path / "resumed"
  shutil.copytree(folded_dir, out)
  finished = json.load(open(out / "manifest.json"))
  os.remove(out / "manifest.json")
  os.remove(out / "validation-00001-of-00004.tfrecord")
  manifest = convert.convert(source, str(out), convert.Settings(source=source.description, folds=NUM_FOLDS))
  assert manifest["splits"] == finished["splits"] and manifest["folds"] == finished["folds"]


# --- sources -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_kaggle_source_through_kagglehub_cache(tmp_path, monkeypatch):
  cache = tmp_path / "kagglehub"
  synthetic.write_dataset(str(cache), num_images=300, seed=2, layout="kagglehub_cache", workers=1)
  monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
  source = sources.open_source("kaggle", kaggle_version=2)
  assert source.description == "kaggle:kmader/skin-cancer-mnist-ham10000/versions/2"
  assert len(source.images) == 300  # each image once although the folders hold it twice
  assert all("HAM10000_images_part" in ref.path for ref in source.images.values())


@pytest.mark.slow
def test_zip_archives_source(tmp_path):
  root = synthetic.write_dataset(str(tmp_path / "zips"), num_images=300, seed=4, layout="zips", workers=1)
  assert sorted(f for f in os.listdir(root) if f.endswith(".zip")) == list(sources.IMAGE_ZIPS)
  source = sources.open_source(root)
  assert len(source.images) == 300 and all(ref.member for ref in source.images.values())
  settings = convert.Settings(source=root, num_train_shards=2, num_eval_shards=1)
  manifest = convert.convert(source, str(tmp_path / "out"), settings, workers=2)
  assert manifest["num_examples"] == 300


def test_non_local_output_on_ram_filesystem(source):
  out = "ram://shards-test"
  settings = convert.Settings(source=source.description, num_train_shards=3, num_eval_shards=1)
  manifest = convert.convert(source, out, settings, workers=2)
  assert tf.io.gfile.exists(out + "/manifest.json")
  assert len(read_shards(out + "/*.tfrecord")) == manifest["num_examples"] == NUM_IMAGES


# --- bad input ---------------------------------------------------------------------------------

def _edit_csv(root, edit):
  path = root / "HAM10000_metadata.csv"
  table = pd.read_csv(path)
  edit(table).to_csv(path, index=False)
  return table


def test_a_stray_copy_of_an_image_is_never_read_and_differing_twins_are_named(small_copy):
  part_1 = small_copy / "HAM10000_images_part_1"
  image_id = sorted(part_1.iterdir())[0].stem
  real = (part_1 / f"{image_id}.jpg").read_bytes()
  # A folder of resized copies beside the layout's, sorting before it: today its copy wins.
  (small_copy / "HAM10000_images_224").mkdir()
  (small_copy / "HAM10000_images_224" / f"{image_id}.jpg").write_bytes(real[: len(real) // 2])
  (small_copy / "HAM10000_images_224" / "ISIC_9999999.jpg").write_bytes(real)  # not in the metadata: ignored
  source = sources.open_source(str(small_copy))
  assert sources.read_bytes(source.images[image_id]) == real
  # The Kaggle copy's lowercase twin folder: an identical twin is fine, a different file is not.
  (small_copy / "ham10000_images_part_1").mkdir()
  (small_copy / "ham10000_images_part_1" / f"{image_id}.jpg").write_bytes(real)
  assert sources.read_bytes(sources.open_source(str(small_copy)).images[image_id]) == real
  (small_copy / "ham10000_images_part_1" / f"{image_id}.jpg").write_bytes(real + b"\0" * 10)
  with pytest.raises(sources.SourceError, match=f"image {image_id} is in the source twice") as twice:
    sources.open_source(str(small_copy))
  assert str(part_1 / f"{image_id}.jpg") in str(twice.value)
  assert str(small_copy / "ham10000_images_part_1" / f"{image_id}.jpg") in str(twice.value)


@pytest.mark.parametrize("setting, value, named", [("jpeg_quality", 500, "--jpeg_quality=500"),
                                                    ("jpeg_quality", 0, "--jpeg_quality=0"),
                                                    ("seed", -1, "--seed=-1"),
                                                    ("image_size", 100_000, "--image_size=100000"),
                                                    ("folds", 1, "--folds=1"), ("folds", -2, "--folds=-2")])
def test_settings_that_cannot_work_are_named(setting, value, named):
  with pytest.raises(convert.cli.UserError, match=re.escape(named)):
    convert.validate(convert.Settings(source="x", **{setting: value}))
  convert.validate(convert.Settings(source="x"))


def test_folds_with_an_external_set_are_refused():
  with pytest.raises(convert.cli.UserError, match=r"--folds=3 cannot go with --external"):
    convert.validate(convert.Settings(source="x", folds=3, external=True))
  convert.validate(convert.Settings(source="x", folds=3))


def _unreadable(root, image_ids):
  for image_id in image_ids:
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
      if (root / part / f"{image_id}.jpg").exists():
        (root / part / f"{image_id}.jpg").write_bytes(b"not a jpeg")


def test_skipping_may_not_empty_the_conversion_nor_a_class_of_a_split(small_copy, tmp_path):
  metadata = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  source = sources.open_source(str(small_copy))
  settings = convert.Settings(source=str(small_copy), num_train_shards=2, num_eval_shards=1)
  # Every df image unreadable: df is in every split of the plan, and would be in none.
  _unreadable(small_copy, metadata["image_id"][metadata["dx"] == "df"])
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError, match=r"every df image of the \w+ split \(\d+\) was skipped"):
    convert.convert(source, str(out), settings, workers=1, skip_bad_images=True)
  assert not (out / "manifest.json").exists()  # not called finished
  _unreadable(small_copy, metadata["image_id"])
  with pytest.raises(convert.ConversionError, match=r"no image of .* could be converted \(300 skipped"):
    convert.convert(source, str(tmp_path / "out2"), settings, workers=1, skip_bad_images=True)
  assert not (tmp_path / "out2" / "manifest.json").exists()


def test_num_lesions_counts_what_was_written(small_copy, tmp_path):
  metadata = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  single = metadata.groupby("lesion_id").filter(lambda rows: len(rows) == 1 and rows["dx"].iloc[0] == "nv")
  _unreadable(small_copy, single["image_id"][:1])
  source = sources.open_source(str(small_copy))
  settings = convert.Settings(source=str(small_copy), num_train_shards=2, num_eval_shards=1)
  manifest = convert.convert(source, str(tmp_path / "out"), settings, workers=1, skip_bad_images=True)
  split_table = pd.read_csv(tmp_path / "out" / "split.csv")
  name = split_table.set_index("image_id").at[single["image_id"].iloc[0], "split"]
  planned = split_table["lesion_id"][split_table["split"] == name].nunique()
  assert manifest["splits"][name]["num_lesions"] == planned - 1


def test_an_image_replaced_by_another_of_the_same_size_is_named(small_copy, tmp_path):
  settings = convert.Settings(source=str(small_copy), num_train_shards=2, num_eval_shards=1)
  out = str(tmp_path / "out")
  convert.convert(sources.open_source(str(small_copy)), out, settings, workers=1)
  victim = sorted((small_copy / "HAM10000_images_part_2").iterdir())[3]
  content = bytearray(victim.read_bytes())
  content[len(content) // 2] ^= 0xFF  # same size, another image
  victim.write_bytes(bytes(content))
  with pytest.raises(convert.ConversionError, match=rf"the source changed .*these differ: {victim.stem}\)"):
    convert.convert(sources.open_source(str(small_copy)), out, settings, workers=1)
  # A conversion made by an older version recorded sizes only: compared by sizes, it is still done.
  plan_path, manifest_path = os.path.join(out, "plan.json"), os.path.join(out, "manifest.json")
  plan = json.load(open(plan_path))
  recorded, images = plan["source_fingerprint"], plan.pop("source_images")
  old = {k: recorded[k] for k in ("rows", "images", "metadata_sha256")}
  old["images_sha256"] = recorded["images_sha256_v1"]
  json.dump({**plan, "source_fingerprint": old}, open(plan_path, "w"))
  assert convert.convert(sources.open_source(str(small_copy)), out, settings, workers=1)["num_examples"] == 300
  assert images[victim.stem].split(" crc32:")[0] == str(victim.stat().st_size)


def test_missing_image_is_named(small_copy):
  table = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  victim = table["image_id"][7]
  os.remove(small_copy / "HAM10000_images_part_1" / f"{victim}.jpg")
  with pytest.raises(sources.SourceError, match=f"row 9: image {victim} not found"):
    sources.open_source(str(small_copy))


def test_unknown_dx_duplicate_id_and_missing_column_are_named(small_copy):
  path = small_copy / "HAM10000_metadata.csv"
  table = pd.read_csv(path)
  bad = table.copy()
  bad.loc[4, "dx"] = "melanoma"
  bad.to_csv(path, index=False)
  with pytest.raises(sources.SourceError, match="row 6: unknown dx 'melanoma'"):
    sources.open_source(str(small_copy))
  bad = table.copy()
  bad.loc[10, "image_id"] = bad.loc[3, "image_id"]
  bad.to_csv(path, index=False)
  with pytest.raises(sources.SourceError, match=f"row 12: duplicate image_id {table['image_id'][3]} .first at row 5"):
    sources.open_source(str(small_copy))
  table.drop(columns=["lesion_id"]).to_csv(path, index=False)
  with pytest.raises(sources.SourceError, match="missing column.*lesion_id"):
    sources.open_source(str(small_copy))


def test_empty_source(tmp_path):
  with pytest.raises(sources.SourceError, match="no HAM10000_metadata.csv"):
    sources.open_source(str(tmp_path))
  with pytest.raises(sources.SourceError, match="no such folder"):
    sources.open_source(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_corrupt_jpeg_stops_with_its_id_then_skip_lists_it(small_copy, tmp_path):
  table = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  victim = table["image_id"][0]
  folder = "HAM10000_images_part_1"
  path = small_copy / folder / f"{victim}.jpg"
  path.write_bytes(path.read_bytes()[:3000])  # truncated
  out = tmp_path / "out"
  result = run_module("tfrecords.convert", f"--source={small_copy}", f"--output_dir={out}", "--workers=2",
                      "--num_train_shards=4", "--num_eval_shards=2", check=False)
  assert result.returncode != 0
  assert victim in result.stderr and "--skip_bad_images" in result.stderr
  assert not (out / "manifest.json").exists()
  assert not [f for f in os.listdir(out) if ".tmp-" in f]  # no half-written shard left behind
  run_module("tfrecords.convert", f"--source={small_copy}", f"--output_dir={out}", "--workers=2",
             "--num_train_shards=4", "--num_eval_shards=2", "--skip_bad_images")
  manifest = json.load(open(out / "manifest.json"))
  assert [s["image_id"] for s in manifest["skipped_images"]] == [victim]
  assert manifest["num_examples"] == len(table) - 1


def test_different_conversion_in_output_dir_needs_overwrite(source, shards_dir, tmp_path):
  out = str(tmp_path / "o")
  convert.convert(source, out, convert.Settings(source=source.description, num_train_shards=2,
                                                num_eval_shards=1))
  other = convert.Settings(source=source.description, num_train_shards=2, num_eval_shards=1, seed=9)
  with pytest.raises(convert.ConversionError, match="another conversion.*seed"):
    convert.convert(source, out, other)
  assert json.load(open(os.path.join(out, "plan.json")))["settings"]["seed"] == 0  # untouched
  manifest = convert.convert(source, out, other, overwrite=True)
  assert manifest["settings"]["seed"] == 9


@pytest.mark.slow
def test_killed_conversion_leaves_no_manifest_and_rerun_finishes(synthetic_dir, shards_dir, tmp_path):
  out = tmp_path / "killed"
  args = [sys.executable, "-m", "tfrecords.convert", f"--source={synthetic_dir}", f"--output_dir={out}",
          "--workers=1"]
  process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_until(lambda: out.exists() and any(f.endswith(".tfrecord") for f in os.listdir(out)), process,
             "a first shard", timeout=120)
  process.send_signal(signal.SIGKILL)
  process.wait()
  written = [f for f in os.listdir(out) if f.endswith(".tfrecord")]
  assert written and len(written) < 24, "kill it mid-way"
  assert not (out / "manifest.json").exists()
  run_module("tfrecords.convert", f"--source={synthetic_dir}", f"--output_dir={out}", "--workers=2")
  resumed = json.load(open(out / "manifest.json"))
  clean = json.load(open(os.path.join(shards_dir, "manifest.json")))
  assert resumed["splits"] == clean["splits"]  # same shards, byte for byte
  assert not [f for f in os.listdir(out) if ".tmp-" in f]


@pytest.mark.slow
def test_sigterm_stops_the_converters_workers_with_it(synthetic_dir, tmp_path):
  out = tmp_path / "stopped"
  process = subprocess.Popen([sys.executable, "-m", "tfrecords.convert", f"--source={synthetic_dir}",
                              f"--output_dir={out}", "--workers=2", "--num_train_shards=32", "--image_size=128"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_until(lambda: out.exists() and any(f.endswith(".tfrecord") for f in os.listdir(out)), process,
             "a first shard", timeout=120)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 128 + signal.SIGTERM
  written = sorted(f for f in os.listdir(out) if f.endswith(".tfrecord"))
  time.sleep(3)  # orphaned workers would go on writing shards
  assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == written
  assert len(written) < 40 and not (out / "manifest.json").exists()


def test_a_lesion_with_two_diagnoses_is_named_with_its_rows(small_copy):
  table = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  lesion = table["lesion_id"][table["lesion_id"].duplicated()].iloc[0]
  rows = table.index[table["lesion_id"] == lesion]
  table.loc[rows[-1], "dx"] = "vasc" if table.loc[rows[0], "dx"] != "vasc" else "df"
  table.to_csv(small_copy / "HAM10000_metadata.csv", index=False)
  result = run_module("tfrecords.convert", f"--source={small_copy}", f"--output_dir={small_copy / 'out'}",
                      check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert f"lesion {lesion} has two diagnoses" in line
  assert f"row {rows[-1] + 2}: {table.loc[rows[-1], 'dx']}" in line and f"row {rows[0] + 2}: " in line


def test_an_output_dir_that_is_a_file_is_named(source, tmp_path):
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(convert.ConversionError, match=r"--output_dir=.*/file is a file, not a folder"):
    convert.convert(source, str(tmp_path / "file"), convert.Settings(source=source.description))


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_leaves_no_half_written_shard(synthetic_dir, tmp_path):
  full = tmp_path / "full"
  full.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)],
                    capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    result = run_module("tfrecords.convert", f"--source={synthetic_dir}", f"--output_dir={full}",
                        "--workers=2", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on the device of {full}/") and "rerunning" in line
    assert not [f for f in os.listdir(full) if ".tmp-" in f] and not (full / "manifest.json").exists()
  finally:
    subprocess.run(["umount", str(full)], check=False)


def test_a_png_kept_at_its_size_is_stored_as_jpeg(small_copy, tmp_path):
  table = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  victim = table["image_id"][2]
  path = small_copy / "HAM10000_images_part_1" / f"{victim}.jpg"
  pixels = tf.io.decode_jpeg(path.read_bytes())
  path.write_bytes(tf.io.encode_png(pixels).numpy())  # PNG bytes under a .jpg name
  out = tmp_path / "kept"
  manifest = convert.convert(sources.open_source(str(small_copy)), str(out),
                             convert.Settings(source=str(small_copy), num_train_shards=2, num_eval_shards=1))
  assert manifest["num_examples"] == len(table)
  stored = {e["image/source_id"].numpy().decode(): e["image/encoded"].numpy()
            for e in read_shards(str(out / "*.tfrecord"))}
  assert stored[victim].startswith(convert.JPEG_MAGIC)
  assert np.abs(tf.io.decode_jpeg(stored[victim]).numpy().astype(int) - pixels.numpy()).mean() < 3
  untouched = table["image_id"][3]
  assert stored[untouched] == (small_copy / "HAM10000_images_part_1" / f"{untouched}.jpg").read_bytes() or \
      stored[untouched] == (small_copy / "HAM10000_images_part_2" / f"{untouched}.jpg").read_bytes()


@pytest.mark.slow
def test_a_changed_source_is_never_resumed_nor_called_done(small_copy, tmp_path):
  out = tmp_path / "out"
  args = [f"--source={small_copy}", f"--output_dir={out}", "--num_train_shards=4", "--num_eval_shards=2",
          "--workers=1"]
  run_module("tfrecords.convert", *args)
  table = pd.read_csv(small_copy / "HAM10000_metadata.csv")
  table.drop(index=5).to_csv(small_copy / "HAM10000_metadata.csv", index=False)  # the user removes a row
  result = run_module("tfrecords.convert", *args, check=False)
  line = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "the source changed since this conversion finished" in line
  assert f"metadata rows {len(table)} → {len(table) - 1}" in line and "--overwrite" in line
  # Killed mid-way (no manifest, a shard gone), then an image edited: not resumed either.
  os.remove(out / "manifest.json")
  os.remove(out / "train-00001-of-00004.tfrecord")
  table.to_csv(small_copy / "HAM10000_metadata.csv", index=False)
  image = small_copy / "HAM10000_images_part_1" / f"{table['image_id'][0]}.jpg"
  image.write_bytes(image.read_bytes() + b"\0")
  line = run_module("tfrecords.convert", *args, check=False).stderr.strip().splitlines()[-1]
  assert "the source changed since this conversion began" in line and f"these differ: {table['image_id'][0]}" in line
  run_module("tfrecords.convert", *args, "--overwrite")
  manifest = json.load(open(out / "manifest.json"))
  assert manifest["num_examples"] == len(table)
  assert manifest["source_fingerprint"]["images"] == len(table)


def test_the_lesion_check_runs_over_the_shards_written():
  shard = lambda images, lesions: {"image_ids": images, "lesion_ids": lesions}
  convert.check_written({"train-00000-of-00001.tfrecord": shard(["a", "b"], ["L1", "L1"]),
                         "test-00000-of-00001.tfrecord": shard(["c"], ["L2"])})
  with pytest.raises(convert.ConversionError, match="lesion L1 is in the test and train splits"):
    convert.check_written({"train-00000-of-00001.tfrecord": shard(["a"], ["L1"]),
                           "test-00000-of-00001.tfrecord": shard(["c"], ["L1"])})
  with pytest.raises(convert.ConversionError, match="image a is in two shards"):
    convert.check_written({"train-00000-of-00002.tfrecord": shard(["a"], ["L1"]),
                           "train-00001-of-00002.tfrecord": shard(["a"], ["L1"])})
  folded = lambda images, lesions, folds: {**shard(images, lesions), "folds": folds}
  convert.check_written({"train-00000-of-00001.tfrecord": folded(["a", "b"], ["L1", "L2"], [1, 2]),
                         "validation-00000-of-00001.tfrecord": folded(["c"], ["L3"], [0]),
                         "test-00000-of-00001.tfrecord": folded(["d"], ["L4"], [-1])}, num_folds=3)
  with pytest.raises(convert.ConversionError, match="lesion L1 is in folds 1 and 2"):
    convert.check_written({"train-00000-of-00001.tfrecord": folded(["a", "b"], ["L1", "L1"], [1, 2])}, num_folds=3)
  with pytest.raises(convert.ConversionError, match="image c in validation-00000-of-00001.tfrecord records fold 1"):
    convert.check_written({"validation-00000-of-00001.tfrecord": folded(["c"], ["L3"], [1])}, num_folds=3)


@pytest.mark.slow
def test_overwrite_keeps_the_old_conversion_until_the_new_one_is_finished(small_copy, tmp_path):
  out = tmp_path / "out"
  args = [f"--source={small_copy}", f"--output_dir={out}", "--num_eval_shards=1", "--workers=1"]
  run_module("tfrecords.convert", *args, "--num_train_shards=2")
  old_manifest = (out / "manifest.json").read_bytes()
  victim = small_copy / "HAM10000_images_part_2" / sorted(os.listdir(small_copy / "HAM10000_images_part_2"))[0]
  good = victim.read_bytes()
  victim.write_bytes(b"\0" * len(good))  # not an image (the same size): the new conversion fails on it
  new = [*args, "--num_train_shards=3", "--overwrite"]
  result = run_module("tfrecords.convert", *new, check=False)
  assert result.returncode == 1 and "cannot be decoded" in result.stderr
  assert (out / "manifest.json").read_bytes() == old_manifest  # the old conversion, whole
  assert sorted(f for f in os.listdir(out) if f.startswith("train-")) == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  # The same source again (a restored image would be a changed source, never resumed), the bad
  # image now skipped: the staged shards written before the failure are kept.
  result = run_module("tfrecords.convert", *new, "--skip_bad_images")
  assert "resuming:" in result.stderr
  manifest = json.load(open(out / "manifest.json"))
  assert manifest["num_examples"] == NUM_IMAGES - 1
  assert manifest["settings"]["num_train_shards"] == 3
  assert sorted(f for f in os.listdir(out) if f.startswith("train-")) == [
      f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  assert [f for f in os.listdir(tmp_path) if ".overwrite-" in f] == []
  assert sum(len(read_shards(str(out / f"{s}-*.tfrecord"))) for s in features.SPLITS) == manifest["num_examples"]
