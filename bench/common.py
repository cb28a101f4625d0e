"""What the benchmarks share: a synthetic dataset converted once, and the JSON line."""

import json
import os
import tempfile

from tfrecords import convert, sources, synthetic


def prepare(work_dir: str | None, num_images: int, image_size: int = 0, seed: int = 0,
            num_train_shards: int = 16) -> tuple[str, str, sources.Source]:
  """Synthetic 600×450 JPEGs and their shards; returns (images_dir, shards_dir, source)."""
  work_dir = work_dir or tempfile.mkdtemp(prefix="ham10000-bench-")
  images_dir = os.path.join(work_dir, f"images_{num_images}_{seed}")
  if not os.path.exists(os.path.join(images_dir, synthetic.METADATA_FILE)):
    synthetic.write_dataset(images_dir, num_images=num_images, seed=seed, layout="folder",
                            workers=os.cpu_count() or 1)
  source = sources.open_source(images_dir)
  shards_dir = os.path.join(work_dir, f"shards_{num_images}_{seed}_{image_size}_{num_train_shards}")
  settings = convert.Settings(source=images_dir, image_size=image_size, seed=seed,
                              num_train_shards=num_train_shards)
  convert.convert(source, shards_dir, settings, workers=os.cpu_count() or 1)
  return images_dir, shards_dir, source


def report(figures: dict):
  """The benchmark's last line: one JSON object."""
  print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}), flush=True)
