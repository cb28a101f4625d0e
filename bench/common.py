"""What the benchmarks share: a synthetic dataset converted once, and the JSON line."""

import json
import tempfile

from tfrecords import sources, synthetic


def prepare(work_dir: str | None, num_images: int, image_size: int = 0, seed: int = 0,
            num_train_shards: int = 16, folds: int = 0, site_signal: float = 0.0) -> tuple[str, str, sources.Source]:
  """Synthetic 600×450 JPEGs and their shards; returns (images_dir, shards_dir, source)."""
  work_dir = work_dir or tempfile.mkdtemp(prefix="ham10000-bench-")
  return synthetic.write_and_convert(work_dir, num_images, image_size, seed, num_train_shards, folds, site_signal)


def report(figures: dict):
  """The benchmark's last line: one JSON object."""
  print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}), flush=True)
