"""Test-time augmentation, ensembles and the paired bootstrap, against numpy by hand (small
models made here: no training run)."""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from job import calibration, ensemble, metrics, model as model_lib, predict, tta
from tfrecords import features

CLASSES = features.CLASS_NAMES


def small_classifier(seed: int, image_size: int) -> keras.Model:
  """Probabilities that depend on where the pixels are (a flip or turn changes them)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((image_size, image_size, 3))
  x = keras.layers.AveragePooling2D(8)(inputs)
  outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(x))
  return keras.Model(inputs, outputs)


def member(seed: int, image_size: int, temperatures: dict[str, float]) -> ensemble.Member:
  calibration_json = {"temperature": temperatures["none"], "melanoma_threshold": None,
                      "tta": {mode: {"temperature": t, "melanoma_threshold": None} for mode, t in temperatures.items()}}
  return ensemble.Member(f"run-{seed}", small_classifier(seed, image_size), image_size, CLASSES, calibration_json)


def by_hand(model: keras.Model, images: np.ndarray, mode: str) -> np.ndarray:
  """The mean of the model's probabilities over the views, each view made by numpy."""
  views = []
  for turns in range(4):
    for image in (images, images[:, :, ::-1]):  # the image, then its mirror (width reversed)
      views.append(np.rot90(image, turns, axes=(1, 2)))  # anticlockwise, as tf.image.rot90
  views = views[:tta.NUM_VIEWS[mode]]
  return np.mean([model.predict_on_batch(model_lib.preprocess(tf.constant(v))) for v in views], axis=0)


def calibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
  logits = np.log(np.clip(probabilities, calibration.EPSILON, 1.0)) / temperature
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def test_the_views_are_the_dihedral_group_and_each_mode_its_first_ones():
  images = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
  views = tta.views(tf.constant(images), "dihedral").numpy().reshape(8, 2, 3, 3, 1)
  distinct = {v.tobytes() for v in views[:, 0]}
  assert len(distinct) == 8  # all eight symmetries of a square, none twice
  assert np.array_equal(views[0], images) and np.array_equal(views[1], images[:, :, ::-1])
  assert np.array_equal(views[2], np.rot90(images, 1, axes=(1, 2)))
  assert np.array_equal(tta.views(tf.constant(images), "flip").numpy().reshape(2, 2, 3, 3, 1), views[:2])


@pytest.mark.parametrize("mode", ["none", "flip", "dihedral"])
def test_tta_is_the_mean_over_views_flipped_and_turned_by_hand(mode):
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  run = member(1, 32, {"none": 1.0, "flip": 1.0, "dihedral": 1.0})
  got = ensemble.Ensemble("one", (run,)).predict({32: tf.constant(images)}, mode)
  expected = by_hand(run.model, images, mode)
  assert np.allclose(got.raw, expected, atol=1e-6) and np.allclose(got.calibrated, expected, atol=1e-6)
  if mode != "none":  # the views matter to this model: the test could tell a missing one
    assert not np.allclose(expected, by_hand(run.model, images, "none"), atol=1e-4)


def test_an_ensemble_is_the_mean_of_its_members_calibrated_probabilities_each_at_its_size():
  original = np.random.default_rng(1).integers(0, 256, (4, 45, 60, 3), dtype=np.uint8)
  members = (member(1, 32, {"none": 1.5, "flip": 0.7, "dihedral": 2.0}),
             member(2, 48, {"none": 0.8, "flip": 1.2, "dihedral": 1.1}))
  resized = {size: tf.stack([features.decode_and_resize(tf.io.encode_jpeg(i), size) for i in original])
             for size in (32, 48)}
  got = ensemble.Ensemble("two", members).predict(resized, "flip")
  each = [calibrated(by_hand(m.model, resized[m.image_size].numpy(), "flip"), m.calibration["tta"]["flip"]["temperature"])
          for m in members]
  assert np.allclose(got.calibrated, np.mean(each, axis=0), atol=1e-6)
  assert np.allclose(got.members, each, atol=1e-6)
  assert np.allclose(got.calibrated.sum(axis=1), 1)
  assert not np.allclose(each[0], each[1], atol=1e-3)  # two different members: a mean to get wrong


def test_members_must_share_their_classes_and_are_named(tmp_path, monkeypatch):
  a = member(1, 32, {"none": 1.0})
  b = ensemble.Member("run-b", a.model, 32, tuple(reversed(CLASSES)), a.calibration)
  monkeypatch.setattr(ensemble, "load_member", {"run-a": a, "run-b": b}.get)
  monkeypatch.setattr(ensemble, "member_dirs", lambda d: ([d], None))
  with pytest.raises(ensemble.cli.UserError, match=r"--model_dir=run-b predicts the classes \['vasc'.*share their classes"):
    ensemble.load(["run-a", "run-b"])
  with pytest.raises(ensemble.cli.UserError, match="run-a is given twice"):
    ensemble.load(["run-a", "run-a"])


def test_the_ensemble_export_serves_what_predict_returns(tmp_path):
  Image = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(2)
  paths = []
  for i in range(3):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(out, "JPEG")
    paths.append(str(tmp_path / f"lesion{i}.jpg"))
    open(paths[-1], "wb").write(out.getvalue())
  predictor = ensemble.Ensemble("two", (member(1, 32, {"none": 1.0, "flip": 0.6, "dihedral": 1.4}),
                                        member(2, 48, {"none": 1.0, "flip": 1.3, "dihedral": 0.9})))
  predict.export_serving(predictor, str(tmp_path / "serving"), "dihedral")
  serve = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"]
  served = serve(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))["probabilities"].numpy()
  table, unreadable = predict.predict_files(predictor, paths, tta="dihedral")
  assert unreadable == []
  assert np.abs(served - table[[f"p_{c}" for c in CLASSES]].to_numpy()).max() < 1e-5
  info = ensemble.fileio.read_json(os.path.join(tmp_path, "serving", "assets.extra", predict.SERVING_INFO_FILE))
  assert info["tta"] == "dihedral" and info["num_members"] == 2 and info["temperatures"] == [1.4, 0.9]


def test_the_paired_bootstrap_of_a_run_with_itself_is_zero_and_it_detects_a_weaker_run():
  rng = np.random.default_rng(3)
  lesions = np.repeat(np.arange(150), 2)
  labels = np.repeat(rng.integers(0, 7, 150), 2)
  good = np.full((300, 7), 0.02)
  good[np.arange(300), np.where(rng.random(300) < 0.8, labels, (labels + 1) % 7)] = 0.88
  weak = np.full((300, 7), 0.02)
  weak[np.arange(300), np.where(rng.random(300) < 0.4, labels, (labels + 1) % 7)] = 0.88
  point, samples = metrics.paired_bootstrap(labels, [good, good, weak], lesions, [0.5, 0.5, 0.5],
                                            features.CLASS_NAMES.index("mel"), replicates=200)
  itself = samples[:, 1] - samples[:, 0]
  assert np.array_equal(point[1], point[0]) and np.all(itself[~np.isnan(itself)] == 0)
  worse = samples[:, 2, 0] - samples[:, 0, 0]  # balanced accuracy
  assert point[2, 0] < point[0, 0] and np.percentile(worse, 97.5) < 0
  # Paired: the difference's interval is narrower than either run's own.
  assert np.ptp(np.percentile(worse, [2.5, 97.5])) < np.ptp(np.percentile(samples[:, 0, 0], [2.5, 97.5])) + \
      np.ptp(np.percentile(samples[:, 2, 0], [2.5, 97.5]))


def test_a_five_fold_ensemble_traces_each_member_once_and_warns_of_no_retracing(caplog):
  members = tuple(member(seed, 16, {"none": 1.0, "flip": 1.0, "dihedral": 1.0}) for seed in range(6))
  predictor = ensemble.Ensemble("six", members)
  with caplog.at_level("WARNING", logger="tensorflow"):
    for batch in (8, 8, 3):  # a last, smaller batch
      for mode in tta.MODES:
        predictor.predict({16: tf.zeros([batch, 16, 16, 3], tf.uint8)}, mode)
  assert [m._forward.experimental_get_tracing_count() for m in members] == [1] * 6
  assert not [r for r in caplog.records if "retracing" in r.getMessage()]
