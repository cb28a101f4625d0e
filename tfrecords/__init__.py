"""HAM10000 → lesion-aware, sharded TFRecords, and what every package shares.

  convert.py    the conversion, start to end (`python -m tfrecords.convert`)
  sources.py    finding HAM10000: kagglehub, a folder, the zip archives, gs://; the
                Kaggle copy's layout and the ISIC 2018 challenge's
  split.py      the 70/15/15 split by lesion, stratified by diagnosis
  features.py   the TFRecord contract: feature keys, encoding and parsing
  manifest.py   the shards' manifest: classes, splits, shards and checksums
  tfds_metadata.py  TFDS metadata beside the shards (tfds.builder_from_directory)
  synthetic.py  a HAM10000-shaped synthetic dataset for offline runs and tests

Shared by every package (which is why they live here, the bottom layer):
  fileio.py     the storage layer: atomic writes to local disk, gs:// and ram://
  cli.py        how every command starts: flags, --help, user errors as one line
  logs.py       log records at their true severity on Vertex AI
  progress.py   progress bars in a terminal, log lines elsewhere

Importing it sets TensorFlow's C++ log level (below) before TensorFlow loads.
"""

import os

# TensorFlow's C++ runtime logs INFO and WARNING lines straight to stderr. In a healthy run they
# are notices that need no action (tf.distribute's input prefetch cancelled at an epoch's end,
# its MultiDeviceIterator's generator dataset left unoptimised), so every entry point keeps its
# errors only, set here because each package imports this one before TensorFlow loads (the
# converter's worker processes inherit it). A user's own TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
