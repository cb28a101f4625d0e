r"""Converter throughput with 1 and with 2 worker processes, start-up excluded.

  python -m bench.convert [--num_images=600]

Both runs write the same shards with tfrecords.convert.write_shard through a
process pool that has already imported TensorFlow (a warm-up shard each), so
the figure is encoding throughput, not interpreter start-up.
"""

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time

from absl import flags

from bench import common
from tfrecords import cli, convert, split as split_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num_images", 600, "Synthetic images.")
  flags.DEFINE_integer("image_size", 0, "The converter's --image_size (0 keeps the JPEGs).")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def tasks_for(source, output_dir, image_size):
  settings = convert.Settings(source=source.description, image_size=image_size, num_train_shards=16)
  tasks = convert.shard_tasks(source, split_lib.split_by_lesion(source.metadata), settings, output_dir)
  return sorted(tasks, key=lambda t: -len(t.rows))


def images_per_second(tasks, workers: int) -> float:
  with multiprocessing.get_context("spawn").Pool(workers, convert.init_worker) as pool:
    warm_up = [dataclasses.replace(t, name=f"warmup-{i}.tfrecord", rows=t.rows[:1])
               for i, t in enumerate(tasks[:workers])]
    list(pool.map(convert.write_shard, warm_up, chunksize=1))  # imports done, caches warm
    start = time.perf_counter()
    list(pool.imap_unordered(convert.write_shard, tasks))
    elapsed = time.perf_counter() - start
  return sum(len(t.rows) for t in tasks) / elapsed


def main(argv):
  del argv
  _, _, source = common.prepare(FLAGS.work_dir, FLAGS.num_images)
  figures = {}
  for workers in (1, 2):
    output_dir = tempfile.mkdtemp(prefix="bench-convert-")
    figures[workers] = images_per_second(tasks_for(source, output_dir, FLAGS.image_size), workers)
    shutil.rmtree(output_dir)
  common.report({"bench": "convert", "images": len(source.metadata), "image_size": FLAGS.image_size,
                 "cores": os.cpu_count(), "one_worker_img_s": figures[1], "two_workers_img_s": figures[2],
                 "speedup_2_vs_1": figures[2] / figures[1]})


if __name__ == "__main__":
  cli.run(main, define_flags)
