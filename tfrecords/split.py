"""Train/validation/test split by lesion, stratified by diagnosis.

HAM10000 holds 10,015 images of 7,470 lesions: a split by image puts photos of
one lesion on both sides and inflates every metric. Whole lesions go to one
split, and the class mix of each split follows the whole (scikit-learn's
StratifiedGroupKFold over equal folds, the folds then dealt to the splits).

With --folds=K (cross-validation) the test split stays as it is, and the other
lesions are dealt again into K folds the same way: fold 0 is the validation
split, folds 1..K-1 the train split.
"""


import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from tfrecords import cli, features


def _fold_counts(val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
  """The fewest equal folds (≤ 100) that deal the fractions exactly: 15/15 → 3, 3 of 20."""
  for n in range(2, 101):
    k_val, k_test = val_fraction * n, test_fraction * n
    if abs(k_val - round(k_val)) < 1e-6 and abs(k_test - round(k_test)) < 1e-6:
      return n, round(k_val), round(k_test)
  n = 100
  return n, max(1, round(val_fraction * n)), max(1, round(test_fraction * n))


def lesion_folds(metadata: pd.DataFrame, num_folds: int, seed: int, too_few: str) -> np.ndarray:
  """The fold of every row: StratifiedGroupKFold by lesion, stratified by dx; `too_few` is the
  error when there are not enough lesions for the folds."""
  folds = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  # Folded in image_id order, so the folds depend on the images, not on the table's row order
  # (the Kaggle CSV and the ISIC challenge's ground truth list the same images differently).
  order = np.argsort(metadata["image_id"].to_numpy(dtype=str), kind="stable")
  ordered = metadata.iloc[order]
  fold_of_row = np.empty(len(metadata), dtype=np.int64)
  try:
    for fold, (_, rows) in enumerate(folds.split(ordered, ordered["dx"], ordered["lesion_id"])):
      fold_of_row[order[rows]] = fold
  except ValueError:  # scikit-learn's words for too few lesions: "n_splits=20 greater than …"
    raise cli.UserError(too_few) from None
  return fold_of_row


def split_by_lesion(metadata: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15,
                    seed: int = 0) -> pd.Series:
  """Returns the split name of every row of `metadata` (columns lesion_id, dx)."""
  if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
    raise cli.UserError(f"--val_fraction={val_fraction} and --test_fraction={test_fraction} must be "
                     "in (0, 1) and leave a train split")
  lesion_dx = metadata.groupby("lesion_id")["dx"].nunique()
  mixed = lesion_dx[lesion_dx > 1]
  if len(mixed):
    raise cli.UserError(f"lesion {mixed.index[0]} has images with different dx values; "
                     "a lesion must have a single diagnosis")

  n_folds, k_val, k_test = _fold_counts(val_fraction, test_fraction)
  fold_of_row = lesion_folds(metadata, n_folds, seed, too_few=(
      f"{metadata['lesion_id'].nunique()} lesions are too few to split "
      f"{100 * (1 - val_fraction - test_fraction):.0f}/{100 * val_fraction:.0f}/"
      f"{100 * test_fraction:.0f} by lesion ({n_folds} folds needed); use a larger source, "
      "or --external for a set that is not split"))
  split = np.where(fold_of_row < k_test, "test",
                   np.where(fold_of_row < k_test + k_val, "validation", "train"))
  split = pd.Series(split, index=metadata.index, name="split")
  check_split(metadata, split)
  return split


def assign_folds(metadata: pd.DataFrame, split: pd.Series, num_folds: int, seed: int = 0) -> pd.Series:
  """The fold (0..num_folds-1) of every row outside the test split, by lesion and stratified by
  dx; -1 for test rows. The test split is left as `split` has it."""
  if num_folds < 2:
    raise cli.UserError(f"--folds={num_folds} must be at least 2")
  outside_test = (split != "test").to_numpy()
  pool = metadata[outside_test]
  fold_of_row = lesion_folds(pool, num_folds, seed, too_few=(
      f"{pool['lesion_id'].nunique()} lesions outside the test split are too few to "
      f"deal into --folds={num_folds} folds by lesion; use fewer --folds or a larger source"))
  fold = np.full(len(metadata), -1, dtype=np.int64)
  fold[outside_test] = fold_of_row
  fold = pd.Series(fold, index=metadata.index, name="fold")
  check_folds(metadata, split, fold, num_folds)
  return fold


def split_of_folds(split: pd.Series, fold: pd.Series) -> pd.Series:
  """`split` with its train and validation rows dealt by fold: fold 0 validation, the rest train."""
  folded = np.where(fold.to_numpy() == 0, "validation", "train")
  return pd.Series(np.where(split.to_numpy() == "test", "test", folded), index=split.index, name="split")


def check_folds(metadata: pd.DataFrame, split: pd.Series, fold: pd.Series, num_folds: int | None = None):
  """Raises unless test rows have no fold (-1), no lesion crosses folds and every class outside
  the test split is in every fold."""
  if ((fold < 0) != (split == "test")).any():
    raise AssertionError("test rows must have fold -1, the others a fold")
  inside = fold >= 0
  folds_per_lesion = fold[inside].groupby(metadata["lesion_id"][inside]).nunique()
  shared = folds_per_lesion[folds_per_lesion > 1]
  if len(shared):
    raise AssertionError(f"{len(shared)} lesions cross folds, e.g. {shared.index[0]}")
  counts = pd.crosstab(metadata["dx"][inside], fold[inside])
  for k in range(int(fold.max()) + 1 if num_folds is None else num_folds):
    column = counts[k] if k in counts.columns else pd.Series(0, index=counts.index)
    missing = [dx for dx in features.CLASS_NAMES if dx in counts.index and column.get(dx, 0) == 0]
    if missing:
      raise cli.UserError(f"fold {k} has no image of class {', '.join(missing)}: too few lesions of that "
                          "class outside the test split for this many --folds; use fewer --folds, more "
                          "data or another --seed")


def check_split(metadata: pd.DataFrame, split: pd.Series):
  """Raises unless no lesion crosses splits and every class is in every split."""
  splits_per_lesion = split.groupby(metadata["lesion_id"]).nunique()
  shared = splits_per_lesion[splits_per_lesion > 1]
  if len(shared):
    raise AssertionError(f"{len(shared)} lesions cross splits, e.g. {shared.index[0]}")
  counts = pd.crosstab(metadata["dx"], split)
  for name in features.SPLITS:
    missing = [dx for dx in features.CLASS_NAMES
               if dx in counts.index and counts.get(name, pd.Series(dtype=int)).get(dx, 0) == 0]
    if missing:
      raise cli.UserError(f"the {name} split has no image of class {', '.join(missing)}: too few "
                       "lesions of that class for this split; use more data or another --seed")
