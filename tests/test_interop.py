"""Interop: TFDS reads the shards; the ISIC 2018 layouts; external sets; challenge submissions
scored by the official scorer."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from helpers import NUM_IMAGES, REPO, cached_venv, copy_tree, run_module
from tfrecords import convert, sources, split as split_lib, synthetic

# The official scorer's newest release for Python 3.11 calls DataFrame.applymap, gone in
# pandas 3: it runs in its own virtual environment with pandas 2, so the project itself is
# tested on the pandas it installs.
SCORER = "isic-challenge-scoring==5.6.0"


@pytest.fixture(scope="module")
def isic_training_dir(tmp_path_factory):
  """The shared synthetic images (seed 1) in the ISIC challenge's training layout."""
  root = str(tmp_path_factory.mktemp("isic_training"))
  return synthetic.write_dataset(root, num_images=NUM_IMAGES, seed=1, layout="isic2018", workers=2)


@pytest.fixture(scope="module")
def isic_test_conversion(tmp_path_factory, shards_dir):
  """A synthetic ISIC 2018 test set, converted as an external set that keeps its JPEGs."""
  images = synthetic.write_dataset(str(tmp_path_factory.mktemp("isic_test")), num_images=NUM_IMAGES, seed=2,
                                   layout="isic2018_test", workers=2)
  out = str(tmp_path_factory.mktemp("external"))
  run_module("tfrecords.convert", f"--source={images}", f"--output_dir={out}", "--external",
             f"--train_data_dir={shards_dir}", "--image_size=0", "--num_eval_shards=2", "--workers=2")
  return images, out


@pytest.fixture(scope="session")
def scorer_python(request):
  """A Python with the official ISIC scorer and pandas 2 (the project's other packages shared)."""
  return cached_venv(request, "isic-challenge-scoring-5.6.0", ["pandas<3", SCORER], share_packages=True)


def test_tfds_reads_every_split_of_a_conversion(shards_dir):
  manifest = json.load(open(os.path.join(shards_dir, "manifest.json")))
  label_map = json.load(open(os.path.join(shards_dir, "label_map.json")))
  split_table = pd.read_csv(os.path.join(shards_dir, "split.csv")).set_index("image_id")
  builder = tfds.builder_from_directory(shards_dir)
  assert {n: s.num_examples for n, s in builder.info.splits.items()} == {
      n: s["num_examples"] for n, s in manifest["splits"].items()}
  assert builder.info.features["image"]["class"]["label"].names == list(label_map)
  for name in manifest["splits"]:
    frame = tfds.as_dataframe(builder.as_dataset(split=f"{name}[:4]"), builder.info)
    assert len(frame) == 4
    for row in frame.to_dict("records"):
      image_id = row["image/source_id"].decode()
      assert split_table.loc[image_id, "split"] == name
      assert split_table.loc[image_id, "lesion_id"] == row["image/lesion_id"].decode()
      assert list(label_map)[row["image/class/label"]] == row["image/class/text"].decode()
      assert row["image/encoded"].dtype == np.uint8 and row["image/encoded"].shape == (450, 600, 3)
      assert row["image/height"] == 450 and row["image/metadata/sex"] in (b"male", b"female", b"unknown")


def test_the_documented_tfds_example_runs_as_written(shards_dir):
  """docs/data.md's TFDS block, run verbatim but for the folder: a dependency it needs that the
  README's install does not bring (jinja2, for tfds.as_dataframe) fails here."""
  page = open(os.path.join(REPO, "docs", "data.md"), encoding="utf-8").read()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "tfds.builder_from_directory" in b]
  assert len(blocks) == 1, "docs/data.md's TFDS example is gone"
  lines = blocks[0].replace('"/data/shards"', repr(shards_dir)).rstrip().splitlines()
  lines[-1] = f"frame = {lines[-1]}"  # the block ends in the expression a notebook would show
  namespace = {}
  exec("\n".join(lines), namespace)
  assert len(namespace["frame"]) == 5
  assert namespace["frame"].current_style.to_html()  # how a notebook renders it


@pytest.mark.slow
def test_isic_layout_gives_the_kaggle_copys_split_in_any_row_order(isic_training_dir, source, tmp_path):
  shuffled = tmp_path / "shuffled"
  shutil.copytree(isic_training_dir, shuffled, copy_function=os.link)
  for name in (sources.isic_ground_truth_file("Training"), sources.isic_groupings_file("Training")):
    table = pd.read_csv(shuffled / name, dtype=str)
    os.remove(shuffled / name)  # a hard link: write a new file, not through it
    table.sample(frac=1, random_state=3).to_csv(shuffled / name, index=False)
  isic = sources.open_source(str(shuffled))
  assert isic.layout == "isic2018:Training"
  assert isic.metadata["image_id"].tolist() != sorted(isic.metadata["image_id"])  # really shuffled
  kaggle, ours = source.metadata.set_index("image_id"), isic.metadata.set_index("image_id").loc[source.metadata["image_id"]]
  assert (ours[["lesion_id", "dx", "dx_type"]] == kaggle[["lesion_id", "dx", "dx_type"]]).all().all()
  assert ours["age"].isna().all() and (ours["sex"] == "").all() and (ours["localization"] == "").all()

  def split_of(src):
    return pd.Series(split_lib.split_by_lesion(src.metadata).to_numpy(), index=src.metadata["image_id"])

  assert split_of(isic).sort_index().equals(split_of(source).sort_index())

  def shards_of(src):
    settings = convert.Settings(source="x")
    plan = convert.plan_shards(src.metadata, split_lib.split_by_lesion(src.metadata), settings)
    ids = src.metadata["image_id"].to_numpy()
    return {name: [ids[rows].tolist() for rows in shards] for name, shards in plan.items()}

  assert shards_of(isic) == shards_of(source)


def test_isic_layout_bad_input_is_named(isic_training_dir, tmp_path):
  truth_name, groupings_name = sources.isic_ground_truth_file("Training"), sources.isic_groupings_file("Training")

  def broken(edit):
    folder = tmp_path / f"case{len(os.listdir(tmp_path))}"
    shutil.copytree(isic_training_dir, folder, copy_function=os.link)
    for name in (truth_name, groupings_name):
      table = pd.read_csv(folder / name, dtype=str)
      os.remove(folder / name)
      edit(name, table).to_csv(folder / name, index=False)
    return str(folder)

  truth = pd.read_csv(os.path.join(isic_training_dir, truth_name), dtype=str)
  victim = truth["image"][5]
  two_classes = broken(lambda n, t: t.assign(MEL="1.0") if n == truth_name else t)
  with pytest.raises(sources.SourceError, match=rf"{truth_name} row 2: image {truth['image'][0]} is not "
                     r"labelled with exactly one class \(MEL=1.0, .*\d+ such rows"):
    sources.open_source(two_classes)
  ungrouped = broken(lambda n, t: t[t["image"] != victim] if n == groupings_name else t)
  with pytest.raises(sources.SourceError, match=f"row 7: image {victim} has no row in .*{groupings_name}"):
    sources.open_source(ungrouped)
  missing = broken(lambda n, t: t)
  os.remove(os.path.join(missing, sources.isic_input_folder("Training"), f"{victim}.jpg"))
  with pytest.raises(sources.SourceError, match=f"{truth_name} row 7: image {victim} not found"):
    sources.open_source(missing)
  # An image given two lesions: named with its rows.
  twice = broken(lambda n, t: pd.concat([t, t[t["image"] == victim].assign(lesion_id="HAM_9999999")])
                 if n == groupings_name else t)
  with pytest.raises(sources.SourceError, match=f"{groupings_name}: image {victim} is given two lesions"):
    sources.open_source(twice)


def test_the_isic_training_part_needs_its_lesion_groupings(isic_training_dir, tmp_path, caplog):
  """Without them each image would be its own lesion, and photos of one lesion would cross splits."""
  folder = tmp_path / "no_groupings"
  shutil.copytree(isic_training_dir, folder, copy_function=os.link)
  os.remove(folder / sources.isic_groupings_file("Training"))
  with pytest.raises(sources.SourceError, match=f"{sources.isic_groupings_file('Training')} not found"):
    sources.open_source(str(folder))
  # As an external set (not split), the documented fallback holds, with a warning.
  external = sources.open_source(str(folder), external=True)
  assert (external.metadata["lesion_id"] == external.metadata["image_id"]).all()
  assert "each image counts as its own lesion" in caplog.text


def test_external_conversion_is_one_unsplit_split_that_tfds_reads(isic_test_conversion):
  _, out = isic_test_conversion
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert list(manifest["splits"]) == ["external"] and manifest["layout"] == "isic2018:Test"
  external = manifest["splits"]["external"]
  assert external["num_examples"] == external["num_lesions"] == NUM_IMAGES  # each image its own lesion
  assert tfds.builder_from_directory(out).info.splits["external"].num_examples == NUM_IMAGES


def test_external_conversion_refuses_images_the_model_trained_on(synthetic_dir, shards_dir, tmp_path):
  out = tmp_path / "external"
  result = run_module("tfrecords.convert", f"--source={synthetic_dir}", f"--output_dir={out}", "--external",
                      f"--train_data_dir={shards_dir}", check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: --train_data_dir={shards_dir} holds {NUM_IMAGES} of the {NUM_IMAGES} images of --source=")
  assert not out.exists()  # refused before anything is written


def test_external_evaluation_and_submission_agree_with_the_official_scorer(
    trained_run, isic_test_conversion, scorer_python, tmp_path):
  images, external_dir = isic_test_conversion
  model_dir = tmp_path / "run"
  copy_tree(trained_run[1], str(model_dir))
  before = {name: (model_dir / name).read_bytes() for name in ("calibration.json", "metrics.json")}
  run_module("job.evaluate", f"--model_dir={model_dir}", f"--data_dir={external_dir}", "--split=external")
  evaluation = model_dir / "evaluation" / "external"
  assert {"metrics.json", "predictions.csv", "confusion_matrix.png", "reliability_diagram.png"} <= set(
      os.listdir(evaluation))
  assert {name: (model_dir / name).read_bytes() for name in before} == before  # nothing refitted or replaced
  metrics = json.load(open(evaluation / "metrics.json"))
  assert metrics["split"] == "external" and metrics["num_images"] == NUM_IMAGES
  assert metrics["subgroups_balanced_accuracy"]["sex"] == {"available": False, "note": "the data records no sex"}

  submission = tmp_path / "submission.csv"
  run_module("job.predict", f"--model_dir={model_dir}", "--format=isic2018", f"--output={submission}",
             os.path.join(images, sources.isic_input_folder("Test")))
  table = pd.read_csv(submission)
  assert table.columns.tolist() == ["image", *sources.ISIC_CLASSES]
  assert table["image"].tolist() == sorted(pd.read_csv(os.path.join(
      images, sources.isic_ground_truth_file("Test")))["image"])
  probabilities = table[list(sources.ISIC_CLASSES)].to_numpy()
  assert ((probabilities >= 0) & (probabilities <= 1)).all() and np.allclose(probabilities.sum(axis=1), 1)
  top_two = np.sort(probabilities, axis=1)[:, -2:]
  assert (top_two[:, 1] > top_two[:, 0]).all()  # no tied maximum: the scorer counts one as wrong

  truth = os.path.join(images, sources.isic_ground_truth_file("Test"))
  scored = subprocess.run([scorer_python, "-m", "isic_challenge_scoring", "-o", "json", "classification",
                           truth, str(submission)], capture_output=True, text=True, check=True)
  score = json.loads(scored.stdout)
  assert score["overall"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-9)


def test_no_submission_is_written_when_an_image_cannot_be_read(trained_run, isic_test_conversion, tmp_path):
  images, _ = isic_test_conversion
  folder = tmp_path / "images"
  folder.mkdir()
  good = sorted(os.listdir(os.path.join(images, sources.isic_input_folder("Test"))))[0]
  os.link(os.path.join(images, sources.isic_input_folder("Test"), good), folder / good)
  (folder / "ISIC_9999999.jpg").write_text("cut short")
  submission = tmp_path / "submission.csv"
  result = run_module("job.predict", f"--model_dir={trained_run[1]}", "--format=isic2018",
                      f"--output={submission}", str(folder), check=False)
  assert result.returncode == 1 and not submission.exists()
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: 1 of 2 files could not be read as images: {folder / 'ISIC_9999999.jpg'}; no submission "
      f"written to {submission} (one without them is invalid; an older file there, if any, is not this run's)")
