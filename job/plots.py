"""The three pictures: confusion matrix, training curves, reliability diagram."""

import io

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pandas as pd

from tfrecords import fileio


def _save(figure, path):
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(figure)
  fileio.write_atomic(path, buffer.getvalue())


def confusion_matrix(counts: np.ndarray, names: list[str], path: str):
  """Counts, and rows normalised to recall (the diagonal is per-class sensitivity)."""
  rows = counts.sum(axis=1, keepdims=True)
  normalised = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
  figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
  for ax, matrix, title, fmt in ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=f"Confusion matrix ({title})")
    for i in range(len(names)):
      for j in range(len(names)):
        color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
        ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", color=color, fontsize=8)
  _save(figure, path)


def training_curves(history: pd.DataFrame, monitor: str, path: str):
  metric = monitor.removeprefix("val_")
  panels = [m for m in dict.fromkeys(["loss", "accuracy", metric]) if m in history]
  figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  stage2 = history["epoch"][history["stage"] == 2]
  for ax, name in zip(axes[0], panels):
    ax.plot(history["epoch"], history[name], marker="o", label="train")  # a marker per epoch
    if f"val_{name}" in history:
      ax.plot(history["epoch"], history[f"val_{name}"], marker="o", label="validation")
    if len(stage2):
      ax.axvline(stage2.min() - 0.5, color="gray", linestyle="--", label="stage 2 begins")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # whole epochs, never 0.2, 0.4…
    ax.set(xlabel="epoch", title=name)
    ax.legend()
  _save(figure, path)


def reliability_diagram(bins_before: list[dict], bins_after: list[dict], path: str):
  figure, ax = plt.subplots(figsize=(5.5, 5))
  ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
  for bins, label in ((bins_before, "as trained"), (bins_after, "temperature-scaled")):
    used = [b for b in bins if b["count"]]
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", label=label)
  ax.set(xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
         title="Reliability diagram (test split)")
  ax.legend()
  _save(figure, path)
