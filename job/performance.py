"""Mixed precision: which Keras dtype policy a run uses."""

import keras
import tensorflow as tf

from job.config import JIT_COMPILE, MIXED_PRECISION  # the choices, defined with the flags


def policy_name(mode: str, strategy_name: str) -> str:
  """auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs, float32 elsewhere.

  On CPU float32 stays the default: mixed_bfloat16 is faster only on CPUs with
  bf16 instructions (AVX512-BF16/AMX), and mixed_float16 is several times slower.
  """
  if mode == "auto":
    if strategy_name == "tpu":
      return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
  return {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16", "off": "float32"}[mode]


def set_policy(name: str):
  # Keras 3 wraps the optimizer in a LossScaleOptimizer itself under mixed_float16.
  keras.mixed_precision.set_global_policy(name)


def use_xla(mode: str, strategy_name: str, run_eagerly: bool = False) -> bool:
  """Whether the training step is XLA-compiled. The job decides `auto`, not Keras:
  Keras's own "auto" turns XLA off under any tf.distribute strategy, and the job
  always runs inside one.

  auto: on for TPUs (they run nothing else) and for one GPU, where XLA fuses the
  element-wise ops around each convolution (measure with bench.gpu); off for several
  GPUs or workers (mirrored, multi_worker) unless --jit_compile=on: TensorFlow supports
  XLA there, but nothing here has shown it on real GPUs, and a preflight with and
  without it on the user's machine tells (job.preflight); off on CPUs, where it
  measured 6× slower (bench.train), and on logical CPU devices it fails.
  """
  if run_eagerly:
    return False
  if mode == "auto":
    single_gpu = strategy_name == "one_device" and bool(tf.config.list_physical_devices("GPU"))
    return strategy_name == "tpu" or single_gpu
  return mode == "on"
