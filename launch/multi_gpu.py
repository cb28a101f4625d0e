r"""Runs the training job on every GPU of this machine (MirroredStrategy, NCCL all-reduce).

  python -m launch.multi_gpu -- --data_dir=gs://B/shards --model_dir=gs://B/runs/r1 --global_batch_size=256

Everything after `--` goes to `python -m job.train`. `--global_batch_size` is
over all GPUs: scale it (and perhaps the learning rates) with the GPU count.
The GPUs are counted from the NVIDIA driver, without TensorFlow, and the job is
told how many it must see (job/accelerators.py): if TensorFlow cannot use them
all, it stops before reading any data and says why.
"""

import os
import sys

from job import accelerators
from tfrecords import cli


def command(argv: list[str], num_gpus: int) -> list[str]:
  if num_gpus == 0:
    raise cli.UserError("no GPU visible to the NVIDIA driver (/proc/driver/nvidia/gpus is empty or "
                        "missing: check nvidia-smi)")
  if any(a.startswith("--strategy") for a in argv):
    raise cli.UserError("launch.multi_gpu sets --strategy=mirrored itself")
  return [sys.executable, "-m", "job.train", "--strategy=mirrored", *argv]


def environment(num_gpus: int) -> dict[str, str]:
  """The job's environment: what it must see. CUDA_VISIBLE_DEVICES narrows what the driver shows."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    num_gpus = min(num_gpus, len([d for d in visible.split(",") if d.strip()]))
  return {**os.environ, accelerators.EXPECTED_ACCELERATOR_ENV: f"GPU:{num_gpus}"}


def main(argv):
  num_gpus = accelerators.count_gpus_without_tensorflow()
  args = command(argv[1:], num_gpus)
  print(f"{num_gpus} GPUs: {' '.join(args[1:])}", flush=True)
  # The job gets this process, and its signals (preemption) directly.
  os.execve(args[0], args, environment(num_gpus))


if __name__ == "__main__":
  cli.run(main)
