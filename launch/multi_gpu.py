r"""Runs the training job on every GPU of this machine (MirroredStrategy, NCCL all-reduce).

  python -m launch.multi_gpu -- --data_dir=gs://B/shards --model_dir=gs://B/runs/r1 --global_batch_size=256

Everything after `--` goes to `python -m job.train`. `--global_batch_size` is
over all GPUs: scale it (and perhaps the learning rates) with the GPU count.
"""

import os
import sys

from tfrecords import cli


def command(argv: list[str], num_gpus: int) -> list[str]:
  if num_gpus == 0:
    raise cli.UserError("no GPU visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
  if any(a.startswith("--strategy") for a in argv):
    raise cli.UserError("launch.multi_gpu sets --strategy=mirrored itself")
  return [sys.executable, "-m", "job.train", "--strategy=mirrored", *argv]


def main(argv):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices("GPU")
  args = command(argv[1:], len(gpus))
  print(f"{len(gpus)} GPUs: {' '.join(args[1:])}", flush=True)
  os.execv(args[0], args)  # the job gets this process, and its signals (preemption) directly


if __name__ == "__main__":
  cli.run(main)
