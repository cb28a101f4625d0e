"""Benchmarks: each `python -m bench.NAME` ends with one JSON line of its figures."""

import tfrecords  # noqa: F401  pylint: disable=unused-import  (TensorFlow's C++ log level, before TensorFlow loads)
