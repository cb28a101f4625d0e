"""Choosing the tf.distribute strategy, in one place.

`auto` picks from what the process sees: a TF_CONFIG cluster with several
tasks (Vertex AI sets it) → MultiWorkerMirroredStrategy; a TPU → TPUStrategy;
several GPUs → MirroredStrategy; else one device.
"""

import json
import os
import tempfile

import tensorflow as tf
from absl import logging

from job import config as config_lib, keras_compat

STRATEGIES = config_lib.STRATEGIES


def cluster_size_from_tf_config() -> int:
  config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  return sum(len(tasks) for role, tasks in config.get("cluster", {}).items() if role != "evaluator")


def _tpu_visible() -> bool:
  return bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")
              or tf.config.list_logical_devices("TPU") or os.path.exists("/dev/accel0"))


def resolve_strategy_name(name: str) -> str:
  if name != "auto":
    return name
  if cluster_size_from_tf_config() > 1:
    return "multi_worker"
  if _tpu_visible():
    return "tpu"
  if len(tf.config.list_physical_devices("GPU")) > 1:
    return "mirrored"
  return "one_device"


def use_logical_cpu_devices(count: int):
  """Splits the CPU into `count` logical devices (to run `mirrored` without GPUs)."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def get_strategy(name: str = "auto", tpu: str = "") -> tf.distribute.Strategy:
  """The strategy for `--strategy` (and `--tpu` for TPUs: local, a name or a grpc:// address)."""
  name = resolve_strategy_name(name)
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  elif name == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    # NCCL all-reduce between GPUs; the default on CPU devices.
    cross_device_ops = tf.distribute.NcclAllReduce() if len(gpus) > 1 else None
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
  elif name == "multi_worker":
    keras_compat.apply()  # keras-team/keras#20585: fit fails across workers without it
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.NCCL if has_gpu
        else tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  elif name == "tpu":
    strategy = _tpu_strategy(tpu or "local")
  else:
    raise ValueError(f"--strategy={name}: expected one of {', '.join(STRATEGIES)}")
  logging.info("strategy %s with %d replicas", public_name(strategy), strategy.num_replicas_in_sync)
  return strategy


def public_name(strategy: tf.distribute.Strategy) -> str:
  """The name users know: MultiWorkerMirroredStrategy's class calls itself CollectiveAllReduceStrategy."""
  for name in ("MultiWorkerMirroredStrategy", "MirroredStrategy", "OneDeviceStrategy", "TPUStrategy"):
    if type(strategy) is getattr(tf.distribute, name):
      return name
  return type(strategy).__name__


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":  # a TPU node reached over the network; a TPU VM's chips are local
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (tf.errors.OpError, ValueError) as e:
    raise RuntimeError(f"--strategy=tpu --tpu={tpu}: no TPU found ({str(e).splitlines()[0][:200]}). "
                       "Run on a TPU VM with TensorFlow's TPU build (Dockerfile --build-arg "
                       "VARIANT=tpu).") from e
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "task_type", None):
    return True
  if resolver.task_type == "chief":
    return True
  # Without a chief task, worker 0 is the chief (Keras's convention).
  has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
  return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def writable_dir(path: str, strategy: tf.distribute.Strategy) -> str:
  """`path` for the chief; a temporary folder for the other workers (they must write somewhere)."""
  if is_chief(strategy):
    return path
  return tempfile.mkdtemp(prefix=f"worker-{strategy.cluster_resolver.task_id}-")
