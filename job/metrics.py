"""The figures a dermatology reader expects, from predicted probabilities.

Everything comes from scikit-learn where it has the metric; the reliability
bins (ECE) and the lesion bootstrap are the two written here. Inputs are numpy
arrays: `labels` (class indices), `probabilities` (N × classes), `lesion_ids`
(for the bootstrap), and the run's `class_names` in index order. Figures that
need a class the run does not have (melanoma's operating point, the always-`nv`
baseline) are left out, and the result says so.
"""

import warnings

import numpy as np
import pandas as pd
from sklearn import metrics as skm

MELANOMA, NEVUS = "mel", "nv"
AGE_BANDS = (0, 30, 45, 60, 75, 200)


def class_index(class_names, name: str) -> int | None:
  return list(class_names).index(name) if name in class_names else None


def headline(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
  """Accuracy, and balanced accuracy, macro F1 and macro AUC averaged over the classes present
  in `labels` (a class absent from a split has no recall: the official ISIC scorer skips it,
  and so do the F1 and the AUC, rather than count it as 0)."""
  predictions = probabilities.argmax(axis=1)
  classes = sorted(set(labels.tolist()))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a resample can miss a class; the metric copes
    return {
        "accuracy": skm.accuracy_score(labels, predictions),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predictions),
        "macro_f1": skm.f1_score(labels, predictions, labels=classes, average="macro", zero_division=0),
        "macro_roc_auc": macro_auc(labels, probabilities),
    }


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """One-vs-rest ROC AUC averaged over the classes present (with both outcomes)."""
  values = [v for v in per_class_auc(labels, probabilities) if v is not None]
  return float(np.mean(values)) if values else float("nan")


def per_class_auc(labels: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
  """One-vs-rest ROC AUC of each class, None where the class is absent (or alone)."""
  out = []
  for index in range(probabilities.shape[1]):
    positive = labels == index
    out.append(float(skm.roc_auc_score(positive, probabilities[:, index]))
               if 0 < positive.sum() < len(labels) else None)
  return out


def reliability_bins(labels, probabilities, bins: int = 15) -> list[dict]:
  """Equal-width bins of confidence (the top probability): each bin's count, accuracy and
  mean confidence. The ECE and the reliability diagram are both read from these."""
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  edges = np.linspace(0, 1, bins + 1)
  which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
  return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
           "accuracy": float(correct[which == b].mean()) if (which == b).any() else None,
           "confidence": float(confidence[which == b].mean()) if (which == b).any() else None}
          for b in range(bins)]


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
  """ECE: |accuracy − confidence| per equal-width confidence bin, weighted by the bin's share."""
  return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"])
                   for b in reliability_bins(labels, probabilities, bins) if b["count"]) / len(labels))


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """Multi-class Brier score: mean over images of Σ_k (p_k − y_k)² (scikit-learn's)."""
  # A float32 softmax sums to 1 only to ~1e-7, and scikit-learn warns past ~1e-8.
  normalised = probabilities / probabilities.sum(axis=1, keepdims=True)
  return float(skm.brier_score_loss(labels, normalised, labels=list(range(probabilities.shape[1]))))


def melanoma_threshold(labels: np.ndarray, probabilities: np.ndarray, mel: int,
                       specificity: float = 0.90) -> float:
  """The lowest p(mel) threshold whose specificity on these images is at least `specificity`
  (so sensitivity is as high as that allows). Chosen on validation, applied to test."""
  is_mel = labels == mel
  if is_mel.all() or not is_mel.any():
    return 0.5
  # Every threshold: the default drop_intermediate=True can drop the lowest one that meets the
  # specificity, and so choose a higher threshold, less sensitive than the data allow.
  fpr, _, thresholds = skm.roc_curve(is_mel, probabilities[:, mel], drop_intermediate=False)
  allowed = thresholds[fpr <= 1 - specificity + 1e-9]  # 1 - 0.9 is 0.0999… in floating point
  return float(min(allowed.min(), 1.0))


def melanoma_operating_point(labels, probabilities, mel: int, threshold: float) -> dict:
  is_mel = labels == mel
  flagged = probabilities[:, mel] >= threshold
  return {
      "threshold": threshold,
      "sensitivity": float(flagged[is_mel].mean()) if is_mel.any() else None,
      "specificity": float((~flagged[~is_mel]).mean()) if (~is_mel).any() else None,
      "num_melanoma": int(is_mel.sum()),
  }


def subgroups(labels, probabilities, metadata: pd.DataFrame) -> dict:
  """Balanced accuracy and counts per sex, age band and localization; a grouping the data does
  not record for any image (the ISIC challenge layout has none of the three) says so."""
  predictions = probabilities.argmax(axis=1)
  age = metadata["age"].to_numpy(dtype=float)
  bands = pd.cut(age, AGE_BANDS, right=False, labels=["<30", "30-44", "45-59", "60-74", "75+"])
  groups = {
      "sex": metadata["sex"].replace("", "unknown").to_numpy(),
      "age_band": np.where(np.isnan(age), "unknown", np.asarray(bands.astype(str))),
      "localization": metadata["localization"].replace("", "unknown").to_numpy(),
  }
  out = {}
  for name, values in groups.items():
    if (values == "unknown").all():
      out[name] = {"available": False, "note": f"the data records no {name.replace('_band', '')}"}
      continue
    out[name] = {}
    for value in sorted(set(values)):
      rows = values == value
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = skm.balanced_accuracy_score(labels[rows], predictions[rows])
      out[name][str(value)] = {"num_images": int(rows.sum()), "balanced_accuracy": float(balanced),
                               "classes_present": int(len(set(labels[rows])))}
  return out


def bootstrap_unit(lesion_ids, image_ids) -> str:
  """What a lesion bootstrap resamples: lesions, or images where a set without lesion groupings
  made each image its own lesion (an ISIC Validation or Test set, an external set)."""
  return "image" if np.array_equal(np.asarray(lesion_ids), np.asarray(image_ids)) else "lesion"


def lesion_bootstrap(labels, probabilities, lesion_ids, replicates: int = 1000, seed: int = 0,
                     unit: str = "lesion") -> dict:
  """95% percentile intervals of the headline metrics, resampling lesions (not images):
  photos of one lesion are not independent, and resampling them apart narrows the CI.
  `unit` says what the ids are (bootstrap_unit)."""
  rng = np.random.default_rng(seed)
  lesions, rows_of = np.unique(lesion_ids, return_inverse=True)
  members = [np.flatnonzero(rows_of == i) for i in range(len(lesions))]
  samples = {k: [] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")}
  for _ in range(replicates):
    rows = np.concatenate([members[i] for i in rng.integers(0, len(lesions), len(lesions))])
    for key, value in headline(labels[rows], probabilities[rows]).items():
      samples[key].append(value)
  return {key: {"low": float(np.nanpercentile(v, 2.5)), "high": float(np.nanpercentile(v, 97.5))}
          for key, v in samples.items()} | {"replicates": replicates, "unit": unit, "seed": seed}


def baselines(labels: np.ndarray, class_names) -> dict:
  """The always-`nv` figures (HAM10000's majority class), or why there are none."""
  nv = class_index(class_names, NEVUS)
  if nv is None:
    return {"always_nv_accuracy": None, "always_nv_balanced_accuracy": None,
            "note": f"no {NEVUS} class in this run"}
  always_nv = np.full_like(labels, nv)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a split without nv: balanced accuracy still defined
    return {"always_nv_accuracy": float(skm.accuracy_score(labels, always_nv)),
            "always_nv_balanced_accuracy": float(skm.balanced_accuracy_score(labels, always_nv))}


def per_class_report(labels, probabilities, class_names) -> dict:
  report = skm.classification_report(labels, probabilities.argmax(axis=1),
                                     labels=list(range(len(class_names))),
                                     target_names=list(class_names), output_dict=True, zero_division=0)
  aucs = per_class_auc(labels, probabilities)
  return {name: {**report[name], "roc_auc": auc} for name, auc in zip(class_names, aucs)}


PAIRED = ("balanced_accuracy", "macro_roc_auc", "macro_f1", "melanoma_sensitivity")


def _paired_figures(labels, probabilities, mel: int | None, threshold: float | None) -> list[float]:
  figures = headline(labels, probabilities)
  sensitivity = np.nan
  if mel is not None and threshold is not None and (labels == mel).any():
    sensitivity = float((probabilities[labels == mel, mel] >= threshold).mean())
  return [figures["balanced_accuracy"], figures["macro_roc_auc"], figures["macro_f1"], sensitivity]


def paired_bootstrap(labels, probabilities_by_run: list[np.ndarray], lesion_ids, thresholds: list[float | None],
                     mel: int | None, replicates: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The PAIRED figures of every run on the same images, and on the same lesion resamples:
  (runs × figures) on all the images, and (replicates × runs × figures). Each replicate draws
  lesions once and scores every run on them, so a difference between two runs varies with the
  runs alone, not with which images a replicate happened to hold."""
  rng = np.random.default_rng(seed)
  lesions, rows_of = np.unique(lesion_ids, return_inverse=True)
  members = [np.flatnonzero(rows_of == i) for i in range(len(lesions))]
  point = np.array([_paired_figures(labels, p, mel, t) for p, t in zip(probabilities_by_run, thresholds)])
  samples = np.empty((replicates, len(probabilities_by_run), len(PAIRED)))
  for r in range(replicates):
    rows = np.concatenate([members[i] for i in rng.integers(0, len(lesions), len(lesions))])
    samples[r] = [_paired_figures(labels[rows], p[rows], mel, t) for p, t in zip(probabilities_by_run, thresholds)]
  return point, samples
