"""The patient's age, sex and body site as model inputs (--metadata).

Each field is encoded into a short float vector, in TensorFlow ops that run the
same in the input pipeline, job.predict and the serving export:

  age           [age / 100, 1 if missing]   (missing: NaN or negative; the value is then 0)
  sex           one-hot of male, female, unknown   (anything else: unknown)
  localization  one-hot of SITES                   (a name not in SITE_ALIASES: unknown)

Sites come in two vocabularies: HAM10000's (`back`, `trunk`, `face`, …) and the
ISIC archive's general sites (`anterior torso`, `head/neck`, …), which ISIC 2019
uses for the HAM10000 images it contains. One vocabulary serves both: HAM10000's
names fold onto the ISIC archive's, so the same site is the same input whichever set names
it (a site one set never uses is still an input a model trained on it never learned).

A model with metadata has one input per field, named after it, beside `image`
(job/model.py): its inputs say which fields it takes. `dx_type` is never an
input: how a diagnosis was confirmed (histopathology for most melanomas,
follow-up for naevi) gives the label away.
"""

import numpy as np
import pandas as pd
import tensorflow as tf

from job import config
from tfrecords import cli

FIELDS = config.METADATA_FIELDS
AGE_SCALE = 100.0
SEXES = ("male", "female", "unknown")
UNKNOWN = "unknown"
SITES = ("head/neck", "upper extremity", "lower extremity", "anterior torso", "posterior torso", "lateral torso",
         "torso", "palms/soles", "oral/genital", UNKNOWN)
# Every site name either vocabulary uses → its site in SITES.
SITE_ALIASES = {
    **{site: site for site in SITES},
    "face": "head/neck", "ear": "head/neck", "neck": "head/neck", "scalp": "head/neck",
    "hand": "upper extremity", "foot": "lower extremity", "acral": "palms/soles", "genital": "oral/genital",
    "abdomen": "anterior torso", "chest": "anterior torso", "back": "posterior torso", "trunk": "torso",
    "": UNKNOWN,
}
WIDTHS = {"age": 2, "sex": len(SEXES), "localization": len(SITES)}
MISSING_AGE = -1.0  # what the serving signature takes for "not known" (JSON has no NaN)


def fields_of(model) -> tuple[str, ...]:
  """The fields a model takes (its inputs beside the image); () for an image-only model."""
  names = {tensor.name.split(":")[0] for tensor in model.inputs}
  return tuple(f for f in FIELDS if f in names)


def _normalized(values: tf.Tensor) -> tf.Tensor:
  return tf.strings.lower(tf.strings.strip(values))


def _one_hot_of(values: tf.Tensor, aliases: dict[str, str], vocabulary: tuple[str, ...]) -> tf.Tensor:
  # By comparison with every alias rather than a lookup table: plain ops, which tf.data, a
  # tf.function and the SavedModel run alike, with no table resource to track.
  keys = tf.constant(list(aliases))
  indices = tf.constant([vocabulary.index(v) for v in aliases.values()], tf.int32)
  matches = tf.equal(_normalized(values)[..., None], keys)
  index = tf.where(tf.reduce_any(matches, axis=-1),
                   tf.gather(indices, tf.argmax(tf.cast(matches, tf.int32), axis=-1, output_type=tf.int32)),
                   vocabulary.index(UNKNOWN))
  return tf.one_hot(index, len(vocabulary), dtype=tf.float32)


def encode(fields: tuple[str, ...], raw: dict) -> dict[str, tf.Tensor]:
  """{field: float32 [..., width]} of raw values {"age": float, "sex": str, "localization": str}
  (scalars or batches)."""
  out = {}
  if "age" in fields:
    age = tf.cast(raw["age"], tf.float32)
    missing = tf.math.is_nan(age) | (age < 0)
    out["age"] = tf.stack([tf.where(missing, 0.0, age / AGE_SCALE), tf.cast(missing, tf.float32)], axis=-1)
  if "sex" in fields:
    out["sex"] = _one_hot_of(raw["sex"], {s: s for s in SEXES} | {"": UNKNOWN}, SEXES)
  if "localization" in fields:
    out["localization"] = _one_hot_of(raw["localization"], SITE_ALIASES, SITES)
  return out


def categories(field: str) -> tuple[str, ...]:
  """What the encoding tells apart in a field: age known or missing, each sex, each site."""
  return {"age": ("known", "missing"), "sex": SEXES, "localization": SITES}[field]


def category_counts(fields: tuple[str, ...], raw: dict) -> dict[str, dict[str, int]]:
  """{field: {category: count}} of a batch of raw values."""
  out = {}
  for field, encoded in encode(fields, raw).items():
    encoded = encoded.numpy()
    if field == "age":
      missing = int(encoded[:, 1].sum())
      out[field] = {"known": len(encoded) - missing, "missing": missing}
    else:
      out[field] = dict(zip(categories(field), encoded.sum(axis=0).astype(int).tolist()))
  return out


def never_known(counts: dict[str, dict[str, int]]) -> list[str]:
  """The fields whose every value is not known (a branch on them would learn nothing)."""
  unknown = {"age": "missing", "sex": UNKNOWN, "localization": UNKNOWN}
  return [f for f, found in counts.items() if sum(found.values()) == found[unknown[f]]]


def untrained(counts: dict[str, dict[str, int]], raw: dict) -> dict[str, dict[str, int]]:
  """{field: {category: images}} of the values in `raw` whose category `counts` (a training
  split's) never had: inputs the model never learned anything for."""
  out = {}
  for field, found in category_counts(tuple(counts), raw).items():
    unseen = {c: n for c, n in found.items() if n and not counts[field].get(c)}
    if unseen:
      out[field] = unseen
  return out


def unknown_value(field: str):
  return float("nan") if field == "age" else ""


def unknown_raw(fields: tuple[str, ...], batch_size) -> dict[str, tf.Tensor]:
  """Raw values that encode as "not known", for a batch (the serving default signature)."""
  return {f: tf.fill([batch_size], tf.constant(unknown_value(f), tf.float32 if f == "age" else tf.string))
          for f in fields}


def unseen_sites(values) -> dict[str, int]:
  """{site name: count} of the names the vocabulary does not know (they are taken as unknown)."""
  names = pd.Series([str(v) for v in values], dtype=object).str.strip().str.lower()
  unseen = names[~names.isin(list(SITE_ALIASES))]
  return {str(k): int(v) for k, v in unseen.value_counts().items()}


# Column names job.predict --metadata_csv takes for each field: ours (HAM10000's), then the
# ISIC archive's (ISIC 2019's metadata CSV, ISIC 2020's train.csv).
CSV_COLUMNS = {"image_id": ("image_id", "image", "image_name", "isic_id"),
               "age": ("age", "age_approx"), "sex": ("sex",),
               "localization": ("localization", "anatom_site_general", "anatom_site_general_challenge")}


def read_csv(path: str, fields: tuple[str, ...]) -> pd.DataFrame:
  """The raw fields of a metadata CSV, indexed by image id; a UserError names the file and what
  it lacks."""
  if not tf.io.gfile.exists(path):
    raise cli.UserError(f"--metadata_csv={path}: no such file")
  try:
    with tf.io.gfile.GFile(path) as f:  # local or gs://
      table = pd.read_csv(f, dtype=str, keep_default_na=False)
  except (tf.errors.OpError, ValueError, pd.errors.ParserError) as e:
    raise cli.UserError(f"--metadata_csv={path}: cannot be read as a CSV ({str(e).splitlines()[0][:200]})") from None
  columns = {}
  for field in ("image_id", *fields):
    found = next((c for c in CSV_COLUMNS[field] if c in table.columns), None)
    if found is None:
      raise cli.UserError(f"--metadata_csv={path}: no {field} column (expected one of "
                          f"{', '.join(CSV_COLUMNS[field])}; it has {', '.join(table.columns)})")
    columns[field] = found
  out = pd.DataFrame({field: table[column] for field, column in columns.items()})
  if "age" in fields:
    age = pd.to_numeric(out["age"].replace("", "nan"), errors="coerce")
    bad = out["age"][age.isna() & ~out["age"].str.strip().str.lower().isin(["", "nan", "unknown"])]
    if len(bad):
      row = bad.index[0] + 2  # the header is line 1
      raise cli.UserError(f"--metadata_csv={path}, line {row}: age {bad.iloc[0]!r} is not a number (leave it "
                          "empty when not known)")
    out["age"] = age.astype(np.float32)
  repeated = out["image_id"][out["image_id"].duplicated()]
  if len(repeated):
    raise cli.UserError(f"--metadata_csv={path}: image {repeated.iloc[0]} has more than one row")
  return out.set_index("image_id")
