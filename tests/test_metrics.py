"""Each metric against small cases worked out by hand."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from job import calibration, metrics
from tfrecords import features

CLASSES = features.CLASS_NAMES
MEL, NV = CLASSES.index("mel"), CLASSES.index("nv")


def one_hot_probabilities(predicted, confidence):
  """Rows whose argmax is `predicted` with that confidence, the rest spread evenly."""
  p = np.full((len(predicted), 7), 0.0)
  for row, (cls, c) in enumerate(zip(predicted, confidence)):
    p[row] = (1 - c) / 6
    p[row, cls] = c
  return p


def test_ece_of_an_overconfident_bin():
  labels = np.array([0, 1, 2, 3])
  probabilities = one_hot_probabilities([0, 1, 2, 0], [0.9] * 4)  # 3 of 4 right at 0.9
  assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(0.15)


def test_brier_score():
  assert metrics.brier_score(np.array([0]), np.eye(7)[[0]]) == 0
  uniform = np.full((1, 7), 1 / 7)
  assert metrics.brier_score(np.array([0]), uniform) == pytest.approx((6 / 7) ** 2 + 6 / 49)


def test_headline_and_baselines_agree_with_scikit_learn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 200)
  probabilities = rng.dirichlet(np.ones(7), 200)
  result = metrics.headline(labels, probabilities)
  predictions = probabilities.argmax(axis=1)
  assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predictions))
  assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, predictions, average="macro"))
  assert result["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities, multi_class="ovr"))
  base = metrics.baselines(labels, CLASSES)
  assert base["always_nv_accuracy"] == pytest.approx((labels == NV).mean())
  assert base["always_nv_balanced_accuracy"] == pytest.approx(1 / 7)


def test_melanoma_threshold_is_chosen_for_specificity_then_applied():
  non_mel = np.linspace(0, 0.9, 10)  # ten benign lesions
  mel = np.array([0.95, 0.85, 0.5])
  scores = np.concatenate([non_mel, mel])
  labels = np.array([NV] * 10 + [MEL] * 3)
  probabilities = np.zeros((13, 7))
  probabilities[:, MEL] = scores
  probabilities[:, NV] = 1 - scores
  threshold = metrics.melanoma_threshold(labels, probabilities, MEL, specificity=0.90)
  assert threshold == pytest.approx(0.85)  # the 0.9 benign is the one false positive allowed
  point = metrics.melanoma_operating_point(labels, probabilities, MEL, threshold)
  assert point["sensitivity"] == pytest.approx(2 / 3) and point["specificity"] == pytest.approx(0.9)


def test_bootstrap_resamples_whole_lesions_and_is_seeded():
  labels = np.array([0] * 10 + [1] * 10)
  probabilities = one_hot_probabilities([0] * 10 + [0] * 10, [0.9] * 20)  # lesion A right, B wrong
  lesions = np.array(["A"] * 10 + ["B"] * 10)
  result = metrics.lesion_bootstrap(labels, probabilities, lesions, replicates=200, seed=1)
  # Drawing whole lesions, accuracy can only be 0, 1/2 or 1; drawing images would give others.
  assert result["accuracy"]["low"] in (0.0, 0.5, 1.0) and result["accuracy"]["high"] in (0.0, 0.5, 1.0)
  assert result["accuracy"]["low"] < result["accuracy"]["high"]
  assert result == metrics.lesion_bootstrap(labels, probabilities, lesions, replicates=200, seed=1)
  assert result["unit"] == "lesion"


def test_the_bootstrap_says_when_it_resamples_images():
  assert metrics.bootstrap_unit(["HAM_1", "HAM_1", "HAM_2"], ["ISIC_1", "ISIC_2", "ISIC_3"]) == "lesion"
  # A set without lesion groupings: each image its own lesion (tfrecords/sources.py).
  assert metrics.bootstrap_unit(["ISIC_1", "ISIC_2"], ["ISIC_1", "ISIC_2"]) == "image"


def test_subgroups_count_and_score_each_group():
  labels = np.array([0, 1, 0, 1])
  probabilities = one_hot_probabilities([0, 1, 1, 1], [0.8] * 4)
  metadata = pd.DataFrame({"sex": ["male", "male", "female", ""], "age": [20.0, 50.0, np.nan, 80.0],
                           "localization": ["back", "back", "face", "face"]})
  groups = metrics.subgroups(labels, probabilities, metadata)
  assert groups["sex"]["male"] == {"num_images": 2, "balanced_accuracy": 1.0, "classes_present": 2}
  assert groups["sex"]["unknown"]["num_images"] == 1
  assert set(groups["age_band"]) == {"<30", "45-59", "75+", "unknown"}
  assert groups["localization"]["face"]["balanced_accuracy"] == pytest.approx(0.5)


def test_temperature_scaling_lowers_nll_on_an_overconfident_model():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 500)
  predicted = np.where(rng.random(500) < 0.7, labels, (labels + 1) % 7)  # 70% right
  probabilities = one_hot_probabilities(predicted, [0.99] * 500)  # but 99% sure
  temperature = calibration.fit_temperature(labels, probabilities)
  assert temperature > 1
  calibrated = calibration.apply_temperature(probabilities, temperature)
  assert (calibration.negative_log_likelihood(labels, calibrated)
          < calibration.negative_log_likelihood(labels, probabilities))
  assert (calibrated.argmax(axis=1) == probabilities.argmax(axis=1)).all()  # argmax unchanged
  assert metrics.expected_calibration_error(labels, calibrated) < metrics.expected_calibration_error(
      labels, probabilities)


def test_scikit_learns_brier_and_log_loss_keep_the_figures_and_the_temperature():
  """The hand-written Brier score, NLL (clipped at 1e-12) and the temperature fitted with them,
  as they were before scikit-learn computed them, on probabilities with exact zeros."""
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 7, 400)
  probabilities = rng.dirichlet(np.full(7, 0.3), 400)
  probabilities[:5] = np.eye(7)[(labels[:5] + 1) % 7]  # confident mistakes: p(true) = 0
  one_hot = np.eye(7)[labels]
  assert metrics.brier_score(labels, probabilities) == pytest.approx(
      np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)), rel=1e-12)

  def hand_nll(p):
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1))))

  assert calibration.negative_log_likelihood(labels, probabilities) == pytest.approx(
      hand_nll(probabilities), rel=1e-9)
  from scipy import optimize
  hand = optimize.minimize_scalar(
      lambda log_t: hand_nll(calibration.apply_temperature(probabilities, np.exp(log_t))),
      bounds=(np.log(0.05), np.log(20.0)), method="bounded")
  assert calibration.fit_temperature(labels, probabilities) == pytest.approx(np.exp(hand.x), rel=1e-4)


def test_the_melanoma_threshold_is_the_lowest_that_meets_the_specificity():
  """With roc_curve's default drop_intermediate=True, 0.8 is dropped and 0.9 chosen: one
  false positive among 12 other lesions (specificity 0.917) is allowed at 0.8."""
  is_mel = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1], bool)
  p_mel = np.array([0.1, 0.6, 0.7, 0.4, 0.2, 0.5, 0.4, 0.5, 0.9, 0.6, 0.1, 0.1, 0.0, 0.6, 0.8, 0.5, 0.4, 0.9])
  labels = np.where(is_mel, MEL, 0)
  probabilities = np.zeros((len(labels), 7))
  probabilities[:, MEL], probabilities[:, 0] = p_mel, 1 - p_mel
  assert metrics.melanoma_threshold(labels, probabilities, MEL, specificity=0.90) == 0.8


def test_aucs_are_those_of_the_calibrated_probabilities_with_the_raw_beside_them():
  """Temperature scaling keeps each image's argmax but can reorder images within a class:
  here it does (T = 4), and the reported AUCs are the calibrated ones."""
  from job import evaluate
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 3, (60, 7))
  labels = rng.integers(0, 7, 60)
  raw = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
  test = pd.DataFrame({"label": [classes[i] for i in labels], "lesion_id": [f"L{i}" for i in range(60)],
                       "age": 50.0, "sex": "female", "localization": "back",
                       "image_id": [f"I{i}" for i in range(60)],
                       **{f"p_{c}_raw": raw[:, i] for i, c in enumerate(classes)}})
  calibration_json = {"temperature": 4.0, "fitted_on": "validation",
                      "melanoma_threshold": {"value": 0.3, "target_specificity": 0.9}}
  test = evaluate.with_calibrated(test, classes, 4.0)
  figures = evaluate.compute_metrics(test, classes, calibration_json)
  calibrated = calibration.apply_temperature(raw, 4.0)
  assert np.array_equal(calibrated.argmax(1), raw.argmax(1))
  assert figures["macro_roc_auc"] == pytest.approx(metrics.macro_auc(labels, calibrated))
  assert figures["macro_roc_auc_raw"] == pytest.approx(metrics.macro_auc(labels, raw))
  assert figures["macro_roc_auc"] != pytest.approx(figures["macro_roc_auc_raw"], abs=1e-4)  # really reordered
  for i, c in enumerate(classes):
    assert figures["per_class"][c]["roc_auc_raw"] == pytest.approx(metrics.per_class_auc(labels, raw)[i])
  assert figures["balanced_accuracy"] == pytest.approx(metrics.headline(labels, raw)["balanced_accuracy"])


def test_training_curves_mark_each_epoch_and_tick_whole_epochs(monkeypatch):
  from job import plots
  drawn = []
  monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure))
  history = pd.DataFrame({"epoch": [0, 1], "stage": [1, 2], "loss": [1.2, 0.9], "val_loss": [1.3, 1.0],
                          "accuracy": [0.5, 0.6], "val_accuracy": [0.4, 0.5], "f1": [0.3, 0.4], "val_f1": [0.2, 0.3]})
  plots.training_curves(history, "val_f1", "unused.png")
  for ax in drawn[0].axes:
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    curves = [line for line in ax.get_lines() if line.get_label() in ("train", "validation")]
    assert len(curves) == 2 and all(line.get_marker() == "o" for line in curves)


def test_a_class_absent_from_the_split_is_skipped_by_every_macro_figure():
  labels = np.array([0, 0, 1, 1, 5, 5])  # no bkl, df, mel or vasc in this split
  predictions = np.array([0, 1, 1, 1, 5, 2])
  probabilities = np.eye(7)[predictions] * 0.9 + 0.1 / 7
  figures = metrics.headline(labels, probabilities)
  present = [0, 1, 5]
  assert figures["macro_f1"] == pytest.approx(skm.f1_score(labels, predictions, labels=present, average="macro"))
  assert figures["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1.0, 0.5]))
