"""TFDS metadata beside the shards, so TensorFlow Datasets reads a conversion as it is.

  builder = tfds.builder_from_directory("/data/shards")   # or gs://…
  train = builder.as_dataset(split="train")

`tfds.folder_dataset.write_metadata` describes shards TFDS did not write: the
feature connectors mirror the TFRecord keys of tfrecords/features.py (a key
`image/class/label` is the nested feature `image → class → label`), the label
is a `ClassLabel` in label_map.json's order, and the split sizes come from the
manifest. The shards and the job's reader stay as they are.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from tfrecords import features, fileio

DATASET_NAME = "ham10000"
# How TFDS finds the shards: `train-00000-of-00016.tfrecord` (features.shard_name).
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
# What write_metadata puts there: the dataset info, the features, and the ClassLabel's names.
FILES = ("dataset_info.json", "features.json", "image-class-label.labels.txt")
CITATION = """@article{tschandl2018ham10000,
  title={The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common
         pigmented skin lesions},
  author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal={Scientific Data}, volume={5}, pages={180161}, year={2018}}"""


def feature_connectors(class_names) -> tfds.features.FeaturesDict:
  """The FeaturesDict that decodes one example: the image to uint8, the label as a ClassLabel."""
  text = tfds.features.Text
  flat = {
      features.IMAGE_ENCODED: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      features.IMAGE_FORMAT: text(),
      features.IMAGE_HEIGHT: tfds.features.Scalar(tf.int64),
      features.IMAGE_WIDTH: tfds.features.Scalar(tf.int64),
      features.LABEL: tfds.features.ClassLabel(names=list(class_names)),
      features.LABEL_TEXT: text(),
      features.SOURCE_ID: text(),
      features.LESION_ID: text(),
      features.AGE: tfds.features.Scalar(tf.float32),
      features.SEX: text(),
      features.LOCALIZATION: text(),
      features.DX_TYPE: text(),
  }
  # No fold: TFDS cannot default a missing feature, and test examples (and unfolded ones) have none.
  assert set(flat) == set(features.FEATURE_SPEC) - {features.FOLD}, "a TFRecord key without its TFDS feature"
  nested = {}
  for key, connector in flat.items():
    *parents, leaf = key.split("/")
    node = nested
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = connector
  return tfds.features.FeaturesDict(nested)


def write(output_dir: str, manifest: dict, class_names):
  """Writes dataset_info.json and features.json for the splits and shards of `manifest`."""
  template = tfds.core.ShardedFileTemplate(data_dir=output_dir, template=FILENAME_TEMPLATE,
                                           dataset_name=DATASET_NAME, filetype_suffix="tfrecord")
  split_infos = []
  for name, info in manifest["splits"].items():
    shards = info["shards"]
    num_bytes = sum(tf.io.gfile.stat(fileio.join(output_dir, s["name"])).length for s in shards)
    split_infos.append(tfds.core.SplitInfo(name=name, shard_lengths=[s["num_examples"] for s in shards],
                                           num_bytes=num_bytes, filename_template=template.replace(split=name)))
  tfds.folder_dataset.write_metadata(
      data_dir=output_dir, features=feature_connectors(class_names), split_infos=split_infos,
      filename_template=template, check_data=False,
      description="HAM10000 dermatoscopy images, split by lesion (tfrecords.convert; see manifest.json).",
      homepage="https://doi.org/10.7910/DVN/DBW86T", citation=CITATION)
