"""--metadata: the patient's age, sex and site as inputs beside the image, from the encoding to a
run that trains, evaluates, predicts from a CSV and serves with and without the fields."""

import csv
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import helpers
from job import config as config_lib, ensemble, model as model_lib, patient_metadata, predict, run_state
from tfrecords import cli

ALL = patient_metadata.FIELDS


def _encoded(**raw):
  return {k: v.numpy() for k, v in patient_metadata.encode(ALL, {k: tf.constant(v) for k, v in raw.items()}).items()}


def test_ages_are_scaled_with_a_missing_flag_and_unknown_names_fall_to_unknown():
  encoded = _encoded(age=[50.0, float("nan"), -1.0, 0.0], sex=["male", " Female", "", "other"],
                     localization=["back", "posterior torso", "moon", ""])
  np.testing.assert_allclose(encoded["age"], [[0.5, 0], [0, 1], [0, 1], [0, 0]])  # age 0 is an age, not missing
  assert [patient_metadata.SEXES[i] for i in encoded["sex"].argmax(1)] == ["male", "female", "unknown", "unknown"]
  assert (encoded["sex"].sum(1) == 1).all() and (encoded["localization"].sum(1) == 1).all()
  sites = [patient_metadata.SITES[i] for i in encoded["localization"].argmax(1)]
  assert sites == ["posterior torso", "posterior torso", "unknown", "unknown"]
  assert patient_metadata.unseen_sites(["back", "moon", "Moon ", "head/neck"]) == {"moon": 2}


def test_hams_site_names_and_the_isic_archives_are_one_vocabulary():
  from tfrecords import synthetic
  ham = [s for s in synthetic.LOCALIZATIONS if s != "unknown"]
  assert not patient_metadata.unseen_sites(ham)  # every HAM10000 site has its general site
  isic = ["anterior torso", "posterior torso", "lateral torso", "head/neck", "upper extremity", "lower extremity",
          "palms/soles", "oral/genital", "torso"]
  encoded = _encoded(age=[0.0] * 18, sex=[""] * 18, localization=isic + ["chest", "back", "ear", "scalp", "hand",
                                                                         "foot", "acral", "genital", "trunk"])
  indices = encoded["localization"].argmax(1)
  assert len(set(indices[:9])) == 9 and patient_metadata.SITES.index("unknown") not in indices
  np.testing.assert_array_equal(indices[9:], indices[[0, 1, 3, 3, 4, 5, 6, 7, 8]])


def test_dx_type_and_unknown_fields_are_refused_by_name_and_the_fields_are_ordered():
  with pytest.raises(cli.UserError, match="--metadata=age,dx_type: dx_type cannot be an input: how the diagnosis"):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", metadata=("age", "dx_type")))
  with pytest.raises(cli.UserError, match="--metadata=site: site is not a field; expected any of age, sex, loc"):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", metadata=("site",)))
  cfg = config_lib.validated(config_lib.TrainConfig(data_dir="d", metadata=("localization", "age")))
  assert cfg.metadata == ("age", "localization")
  # A run is not resumed with other fields; a record from before --metadata took images only.
  plain = run_state.fingerprint(config_lib.TrainConfig(data_dir="d"), "sha", 1)
  assert run_state.differences({k: v for k, v in plain.items() if k != "metadata"}, plain) == []
  assert run_state.differences(plain, run_state.fingerprint(cfg, "sha", 1)) == [
      "metadata: [] → ['age', 'localization']"]


def test_a_split_is_counted_as_the_encoding_sees_it_and_a_field_never_known_is_named(shards_dir):
  from job import data
  from tfrecords import manifest as manifest_lib
  info = manifest_lib.split_info(shards_dir, manifest_lib.read(shards_dir), "train")
  counts = data.metadata_counts(info, ALL)
  assert all(sum(found.values()) == info.num_examples for found in counts.values())
  assert counts["age"]["missing"] < counts["age"]["known"] and counts["localization"]["lateral torso"] == 0
  assert patient_metadata.never_known(counts) == []
  assert patient_metadata.never_known({"age": {"known": 0, "missing": 5}, "sex": {"male": 1, "unknown": 4}}) == ["age"]
  found = patient_metadata.untrained(counts, {f: tf.constant(v) for f, v in (
      ("age", [30.0, 40.0]), ("sex", ["male", "female"]), ("localization", ["lateral torso", "back"]))})
  assert found == {"localization": {"lateral torso": 1}}


def _raw(n):
  rng = np.random.default_rng(0)
  return {"age": tf.constant(rng.choice([35.0, 70.0, float("nan")], n), tf.float32),
          "sex": tf.constant(rng.choice(["male", "female"], n)),
          "localization": tf.constant(rng.choice(["back", "face", "foot"], n))}


def test_the_model_takes_each_field_and_the_wrapper_feeds_it_as_the_inner_model_takes_it(tmp_path):
  inner = model_lib.build_inner_model("none", num_classes=3, metadata=("age", "localization"))
  assert patient_metadata.fields_of(inner) == ("age", "localization")
  assert patient_metadata.fields_of(model_lib.build_inner_model("none", num_classes=3)) == ()
  inner.save(tmp_path / "m.keras")
  loaded = tf.keras.models.load_model(tmp_path / "m.keras")
  assert patient_metadata.fields_of(loaded) == ("age", "localization")
  wrapper = model_lib.build_training_model(inner, 32, augment=False)
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
  encoded = patient_metadata.encode(inner_fields := ("age", "localization"), _raw(6))
  through_wrapper = wrapper.predict({"image_uint8": images, **encoded}, verbose=0)
  direct = loaded(model_lib.inner_inputs(loaded, model_lib.preprocess(images), encoded), training=False).numpy()
  np.testing.assert_allclose(through_wrapper, direct, atol=1e-5)
  # The fields move the prediction: the same images at other sites.
  moved = dict(encoded, localization=tf.roll(encoded["localization"], 1, axis=1))
  assert not np.allclose(direct, loaded(model_lib.inner_inputs(loaded, model_lib.preprocess(images), moved),
                                        training=False).numpy())
  assert inner_fields == patient_metadata.fields_of(loaded)


def test_mixing_blends_each_images_fields_by_its_labels_share(monkeypatch):
  cfg = config_lib.TrainConfig(data_dir="d", mixup=0.4, cutmix=1.0, metadata=("age", "sex"))
  inner = model_lib.build_inner_model("none", num_classes=3, metadata=cfg.metadata)
  wrapper = model_lib.build_training_model(inner, 32, augment=False, mixing=config_lib.mixing(cfg))
  keras_step = next(c for c in type(wrapper).__mro__[1:] if "train_step" in vars(c))  # what super() calls
  seen = []
  monkeypatch.setattr(keras_step, "train_step", lambda self, data: seen.append(data) or {})
  n = 8
  images = np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  labels = np.eye(3, dtype=np.float32)[np.arange(n) % 3]
  fields = {k: v.numpy() for k, v in patient_metadata.encode(cfg.metadata, _raw(n)).items()}
  wrapper.train_step(({"image_uint8": tf.constant(images), **fields}, tf.constant(labels)))
  (mixed, mixed_labels), = seen
  assert mixed["image_uint8"].dtype == tf.uint8
  own = labels.argmax(1)
  share = mixed_labels.numpy()[np.arange(n), own]
  distinct = own != own[::-1]  # where partners share a class the label cannot tell the share
  for name, values in fields.items():
    expected = share[:, None] * values + (1 - share[:, None]) * values[::-1]
    np.testing.assert_allclose(mixed[name].numpy()[distinct], expected[distinct], atol=1e-6)
  assert (share[distinct] < 1).sum() >= 4  # mixed at all


@pytest.fixture(scope="module")
def metadata_run(shards_dir, trained_run, tmp_path_factory):
  """bench.metadata_study on the shared shards: a ResNet-50 with all three fields (one stage),
  through job.train's own path, compared by job.compare with the suite's image-only run. With
  colour constancy, which the seed's example cannot load either: the serving and prediction
  checks below then show that it is applied alike in both."""
  work_dir = str(tmp_path_factory.mktemp("metadata_study"))
  result = helpers.run_module("bench.metadata_study", f"--data_dir={shards_dir}", f"--work_dir={work_dir}", "--debug",
                              f"--baseline_dir={trained_run[1]}", "--stage1_epochs=1", "--stage2_epochs=0",
                              "--color_constancy=shades_of_gray")
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  _, run_dir = figures["runs"]
  return json.load(open(os.path.join(run_dir, "metrics.json"))), run_dir, figures


def _metadata_csv(synthetic_dir, path, ids, **overrides):
  """The dataset's own metadata CSV for `ids`, with some values replaced ({image_id: {field: value}})."""
  table = pd.read_csv(os.path.join(synthetic_dir, "HAM10000_metadata.csv"), dtype=str, keep_default_na=False)
  table = table[table["image_id"].isin(ids)].copy()
  for image, values in overrides.items():
    for field, value in values.items():
      table.loc[table["image_id"] == image, field] = value
  table.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
  return table.set_index("image_id")


@pytest.mark.slow
def test_a_metadata_run_evaluates_predicts_from_a_csv_and_serves_with_and_without_the_fields(
    metadata_run, synthetic_dir, tmp_path):
  metrics, run_dir, figures = metadata_run
  # The study compared its run with the image-only one on the same test images.
  image_only = json.load(open(os.path.join(figures["runs"][0], "run_config.json")))
  run_config = json.load(open(os.path.join(run_dir, "run_config.json")))
  assert image_only["fingerprint"]["metadata"] == [] and run_config["flags"]["debug"]
  assert -1 <= figures["metadata_vs_image_only"]["balanced_accuracy"]["difference"] <= 1
  assert run_config["fingerprint"]["metadata"] == ["age", "sex", "localization"]
  assert run_config["fingerprint"]["color_constancy"] == "shades_of_gray"
  assert metrics["predictor"]["metadata"] == [["age", "sex", "localization"]]
  assert {"sex", "age_band", "localization"} <= set(metrics["subgroups_balanced_accuracy"])
  paths = helpers.synthetic_image_paths(synthetic_dir, 3)
  ids = [predict.image_id(p) for p in paths]
  # A name no vocabulary knows, and a site HAM10000 never names (no HAM10000 name folds onto it).
  table = _metadata_csv(synthetic_dir, tmp_path / "meta.csv", ids,
                        **{ids[0]: {"localization": "moon"}, ids[1]: {"localization": "lateral torso"}})
  result = helpers.run_module("job.predict", f"--model_dir={run_dir}", f"--metadata_csv={tmp_path / 'meta.csv'}",
                              f"--output={tmp_path / 'p.csv'}", *paths)
  assert "localization 'moon' (1 image(s)) is not a site the model knows" in result.stderr
  assert run_config["metadata_counts"]["localization"]["lateral torso"] == 0
  assert (f"localization lateral torso (1 image(s)), which the train split of --model_dir={run_dir} never had"
          in result.stderr)
  predicted = pd.read_csv(tmp_path / "p.csv")
  columns = [c for c in predicted if c.startswith("p_")]
  export = tf.saved_model.load(os.path.join(run_dir, "serving", "1"))
  image_bytes = tf.constant([open(p, "rb").read() for p in paths])
  ages = table.loc[ids, "age"].replace("", "-1").astype(np.float32).to_numpy()
  served = export.signatures[predict.METADATA_SIGNATURE](
      image_bytes=image_bytes, age=tf.constant(ages), sex=tf.constant(table.loc[ids, "sex"].to_numpy().astype(str)),
      localization=tf.constant(["moon", "lateral torso", table.loc[ids[2], "localization"]]))["probabilities"].numpy()
  np.testing.assert_allclose(served, predicted[columns].to_numpy(), atol=1e-5)
  # The default signature takes JPEG bytes only: the fields are then not known, as a CSV row
  # that leaves them empty says.
  predictor = ensemble.load([run_dir])
  unknown = {"age": np.full(3, np.nan, np.float32), "sex": np.full(3, "", object), "localization": np.full(3, "", object)}
  as_unknown, _ = predict.predict_files(predictor, paths, metadata=unknown)
  by_default = export.signatures["serving_default"](image_bytes=image_bytes)["probabilities"].numpy()
  np.testing.assert_allclose(by_default, as_unknown[columns].to_numpy(), atol=1e-5)
  assert not np.allclose(by_default, served, atol=1e-4), "the fields changed nothing"


@pytest.mark.slow
def test_a_metadata_run_names_what_a_prediction_lacks(metadata_run, synthetic_dir, tmp_path):
  _, run_dir, _ = metadata_run
  predictor = ensemble.load([run_dir])
  paths = helpers.synthetic_image_paths(synthetic_dir, 3)
  with pytest.raises(cli.UserError, match="takes the patient's age, sex, localization beside the image: give "
                                          "--metadata_csv"):
    predict.metadata_of(predictor, paths, None)
  _metadata_csv(synthetic_dir, tmp_path / "two.csv", [predict.image_id(p) for p in paths[:2]])
  with pytest.raises(cli.UserError, match=f"two.csv has no row for 1 of 3 images: {predict.image_id(paths[2])}$"):
    predict.metadata_of(predictor, paths, str(tmp_path / "two.csv"))
  _metadata_csv(synthetic_dir, tmp_path / "bad.csv", [predict.image_id(p) for p in paths],
                **{predict.image_id(paths[1]): {"age": "forty"}})
  with pytest.raises(cli.UserError, match="bad.csv, line [234]: age 'forty' is not a number"):
    predict.metadata_of(predictor, paths, str(tmp_path / "bad.csv"))
