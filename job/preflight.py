r"""A few minutes on the real machine before hours on it.

  python -m job.preflight --data_dir=gs://B/shards --model_dir=gs://B/runs/r1 --global_batch_size=256

It takes job.train's flags and, on the machine it runs on, runs these checks in
order, stopping at the first that fails:

  devices      TensorFlow's build and the devices it sees
  accelerator  what the job was given against what TensorFlow sees (job/accelerators.py)
  data         the shard checksums, then one batch of every split, as training reads them
  storage      a probe object written, read and deleted in --model_dir, the checkpoint
               folder and the TensorBoard folder
  lease        the model_dir's lease taken and released (another job holding it fails here)
  step         the model built with the real strategy, precision, --jit_compile and
               --steps_per_execution, and --preflight_steps steps of stage 2 (the heavier
               stage) at the real global batch: an XLA, NCCL or out-of-memory failure shows here

and measures the compile time (the first execution, fed one batch held in memory), the
input's start-up (the pipeline's first batch waits for its shuffle buffer: up to 10,000
images decoded and cached), images per second after it, the share of step time spent
waiting for input (against the same steps fed the batch held in memory; while the cache
is still filling, the pipeline decodes as it goes, so the share is an upper bound), and,
on GPUs, the peak device memory. It trains no run: the only
file it leaves is its report, preflight.json in --model_dir, which `launch.vertex
--preflight` reads back. A one-screen summary goes to stderr, the report as one JSON
line to stdout; the exit status is non-zero when a check failed, and the report names it.
"""

import json
import sys
import time

import keras
import tensorflow as tf
from absl import flags, logging

from job import accelerators, artifacts, config as config_lib, data, distribute_utils, gpu_startup
from job import model as model_lib, run_state, train
from tfrecords import cli, fileio, manifest as manifest_lib

FLAGS = flags.FLAGS
CHECKS = ("devices", "accelerator", "strategy", "data", "storage", "lease", "step")
EXIT_CHECK_FAILED = 3


def define_flags():
  config_lib.define_flags()
  config_lib.define_preflight_flags()


class Report:
  """The checks run so far and the figures measured."""

  def __init__(self):
    self.checks: list[dict] = []
    self.figures: dict = {"devices": [], "strategy": None, "replicas": None, "precision": None, "xla": None,
                          "compile_seconds": None, "input_startup_seconds": None, "images_per_second": None,
                          "input_wait_share": None, "cache_filling": None, "peak_memory_bytes": None}

  def run(self, name: str, check, *args):
    start = time.perf_counter()
    try:
      detail = check(*args)
    except Exception as e:  # pylint: disable=broad-except  (any failure is the check's outcome)
      message = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
      self.checks.append({"check": name, "ok": False, "seconds": round(time.perf_counter() - start, 2),
                          "detail": message})
      raise CheckFailed(name, message) from e
    self.checks.append({"check": name, "ok": True, "seconds": round(time.perf_counter() - start, 2),
                        "detail": detail if isinstance(detail, (str, dict)) else _describe(detail)})
    return detail

  def as_dict(self) -> dict:
    failed = [c["check"] for c in self.checks if not c["ok"]]
    return {"ok": not failed and len(self.checks) == len(CHECKS), "failed_check": failed[0] if failed else None,
            **self.figures, "checks": self.checks}


def _describe(value) -> str:
  if isinstance(value, tf.distribute.Strategy):
    return f"{distribute_utils.public_name(value)} with {value.num_replicas_in_sync} replica(s)"
  return str(value)


class CheckFailed(Exception):
  def __init__(self, check: str, message: str):
    super().__init__(f"{check}: {message}")
    self.check = check


def check_devices(report: Report) -> str:
  if gpu_startup.nvidia_roots():  # a GPU install: what would abort this process shows in a child first
    started = gpu_startup.start_in_a_fresh_process()
    if started.gpus is None:
      raise RuntimeError(f"TensorFlow's GPU start-up failed: {gpu_startup.diagnose(started)}")
  devices = [f"{d.device_type}:{d.name.rsplit(':', 1)[-1]}" for d in tf.config.list_physical_devices()]
  gpus = accelerators.visible_gpus()
  report.figures["devices"] = devices + [f"GPU name: {name}" for name in gpus]
  return f"{accelerators.build_versions()}; devices: {', '.join(devices)}" + (
      f" ({', '.join(gpus)})" if gpus else "")


def check_accelerator(cfg: config_lib.TrainConfig) -> str:
  expected = config_lib.expected_accelerator(cfg)
  accelerators.guard(expected)
  return "nothing said of the machine (no check)" if expected is None else f"{expected.count} × {expected.accelerator}"


def check_strategy(cfg: config_lib.TrainConfig, report: Report):
  strategy, policy, xla = train.set_up_devices(cfg)
  report.figures.update(strategy=distribute_utils.public_name(strategy), replicas=strategy.num_replicas_in_sync,
                        precision=policy, xla=xla)
  return strategy


def check_data(cfg: config_lib.TrainConfig) -> dict:
  manifest = train.preflight(cfg)  # the manifest, every split there, the shard checksums
  shapes = {}
  for split in train.splits_read(cfg):
    info = manifest_lib.split_info(cfg.data_dir, manifest, split)
    images, _, _ = next(iter(data.prediction_dataset(info, cfg.image_size, cfg.global_batch_size)))
    shapes[split] = list(images.shape)
  return {"manifest": manifest, "first_batches": shapes}


def check_storage(cfg: config_lib.TrainConfig) -> str:
  """Writes, reads back and deletes a probe object in each folder the job writes to; folders
  made for it are removed again (a preflight leaves only its report)."""
  folders = {"--model_dir": cfg.model_dir,
             "--checkpoint_dir": fileio.join(cfg.checkpoint_root, artifacts.CHECKPOINTS_DIR),
             "--tensorboard_dir": cfg.logs_dir}
  for flag, folder in folders.items():
    made = fileio.is_local(folder) and not tf.io.gfile.exists(folder)
    fileio.check_writable(folder, flag)
    if made and folder != cfg.model_dir and not tf.io.gfile.listdir(folder):
      tf.io.gfile.rmtree(folder)
  return ", ".join(sorted(set(folders.values())))


def check_lease(cfg: config_lib.TrainConfig, manifest_sha256: str) -> str:
  """The model_dir's lease taken and released, and, as job.train checks next, no other run in the
  folder (with --overwrite the job would clear it: the preflight clears nothing)."""
  lease = run_state.Lease(cfg.model_dir, run_state.fingerprint(cfg, manifest_sha256, stage=2)).acquire()
  lease.release()
  if not cfg.overwrite:
    run_state.check(cfg, manifest_sha256, overwrite=False, chief=True)
  return f"taken and released ({lease.path})" + (", no other run there" if not cfg.overwrite else
                                                  "; --overwrite: the job will clear any other run there")


class StepTimer(keras.callbacks.Callback):
  """The first execution's time (what it waited for included) and each epoch's."""

  def on_train_begin(self, logs=None):
    self.first_step, self.epochs = None, []

  def on_epoch_begin(self, epoch, logs=None):
    self.start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    if self.first_step is None:
      self.first_step = time.perf_counter() - self.start

  def on_epoch_end(self, epoch, logs=None):
    self.epochs.append(time.perf_counter() - self.start)


def timed_fit(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> StepTimer:
  """Two epochs of `steps` (one iterator throughout): the first pays for compiling."""
  timer = StepTimer()
  model.fit(dataset, epochs=2, steps_per_epoch=steps, callbacks=[timer], verbose=0, shuffle=False)
  return timer


def cache_still_filling(cache: str, num_examples: int, steps: int, global_batch_size: int) -> bool:
  """Whether the train split's cache is still being filled while the preflight times its second
  epoch: by then the pipeline has read the shuffle buffer and one epoch of `steps` batches."""
  read_before = data.shuffle_buffer(num_examples) + steps * global_batch_size
  return cache != "none" and read_before < num_examples


def check_step(cfg: config_lib.TrainConfig, strategy, report: Report, manifest: dict, steps: int) -> str:
  class_names = manifest_lib.class_names(manifest)
  info = manifest_lib.split_info(cfg.data_dir, manifest, "train")
  inner, wrapper = train.build_models(cfg, strategy, len(class_names))
  model_lib.set_trainable_for_stage(inner, stage=2, fine_tune_layers=cfg.fine_tune_layers)
  train.compile_model(wrapper, strategy, cfg, cfg.stage2_lr, report.figures["xla"],
                      steps_per_execution=cfg.steps_per_execution,
                      class_weights=data.class_weights(info.class_counts) if cfg.class_weights else None)
  executions = -(-steps // cfg.steps_per_execution)  # the job's own executions, whole
  steps = executions * cfg.steps_per_execution
  cache = data.choose_cache(cfg.cache, info.num_examples, cfg.image_size)
  pipeline = data.train_dataset(info, cfg.image_size, cfg.global_batch_size, seed=cfg.seed, cache=cache,
                                num_workers=max(1, distribute_utils.cluster_size_from_tf_config()),
                                metadata=cfg.metadata)
  # First the compiled step alone, fed one batch of the pipeline's shapes held in memory: its first
  # execution is the compile time, its second epoch the step time with no input to wait for ...
  held = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), pipeline.element_spec)
  bound = timed_fit(wrapper, tf.data.Dataset.from_tensors(held).repeat(), steps)
  # ... then the pipeline: its first step waits for the shuffle buffer (data.shuffle_buffer images
  # decoded and cached), which is the input's start-up, not compiling.
  job = timed_fit(wrapper, pipeline, steps)
  report.figures["compile_seconds"] = round(bound.first_step, 2)
  report.figures["input_startup_seconds"] = round(max(0.0, job.first_step - bound.epochs[1] / executions), 2)
  report.figures["images_per_second"] = round(steps * cfg.global_batch_size / job.epochs[1], 2)
  report.figures["input_wait_share"] = round(max(0.0, 1.0 - bound.epochs[1] / job.epochs[1]), 3)
  report.figures["cache_filling"] = cache_still_filling(cache, info.num_examples, steps, cfg.global_batch_size)
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    report.figures["peak_memory_bytes"] = max(tf.config.experimental.get_memory_info(g.name)["peak"] for g in gpus)
  return (f"stage 2 at global batch {cfg.global_batch_size}, {cfg.steps_per_execution} step(s) per execution: "
          f"the first execution took {bound.first_step:.1f} s (compiling), the pipeline's first batch "
          f"{report.figures['input_startup_seconds']:.1f} s more (its shuffle buffer), then {2 * steps} steps "
          f"from memory and {2 * steps} from the pipeline")


def run_checks(cfg: config_lib.TrainConfig, steps: int) -> dict:
  """The checks, in order, up to the first that fails; the report (also written to the model_dir
  when the storage check has shown that it can be, and the lease check that it is this job's)."""
  report = Report()
  try:
    report.run("devices", check_devices, report)
    report.run("accelerator", check_accelerator, cfg)
    # Before anything else touches the runtime: MultiWorkerMirroredStrategy must come first.
    strategy = report.run("strategy", check_strategy, cfg, report)
    checked = report.run("data", check_data, cfg)
    manifest = checked.pop("manifest")
    report.run("storage", check_storage, cfg)
    manifest_sha256 = fileio.sha256_of(fileio.join(cfg.data_dir, manifest_lib.MANIFEST_FILE))
    report.run("lease", check_lease, cfg, manifest_sha256)
    report.run("step", check_step, cfg, strategy, report, manifest, steps)
  except CheckFailed as failed:
    logging.info("preflight stopped at %s", failed)
  result = report.as_dict()
  # For launch.vertex --preflight to read back, whichever check failed; but never where it cannot
  # be written, nor into a folder that is another job's or another run's (the lease check).
  if result["failed_check"] not in ("storage", "lease"):
    try:
      fileio.write_json(artifacts.path(cfg.model_dir, artifacts.PREFLIGHT_FILE), result)
    except (tf.errors.OpError, OSError) as e:
      logging.warning("preflight: the report could not be written to --model_dir=%s: %s", cfg.model_dir,
                      str(e).splitlines()[0][:200])
  return result


def summary(report: dict) -> str:
  lines = [f"preflight {'passed' if report['ok'] else 'FAILED at ' + str(report['failed_check'])}:"]
  for check in report["checks"]:
    detail = check["detail"] if isinstance(check["detail"], str) else json.dumps(check["detail"])
    lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['check']:<11} {check['seconds']:>7.1f} s  {detail}")
  figures = report
  if figures["images_per_second"] is not None:
    lines.append(f"  {figures['strategy']} × {figures['replicas']}, {figures['precision']}, XLA "
                 f"{'on' if figures['xla'] else 'off'}: compiling {figures['compile_seconds']} s, input start-up "
                 f"{figures['input_startup_seconds']} s, "
                 f"{figures['images_per_second']} images/s, waiting for input "
                 f"{100 * figures['input_wait_share']:.0f}% of the time"
                 + (" (cache still filling: an upper bound)" if figures["cache_filling"] else "")
                 + (f", peak device memory {figures['peak_memory_bytes'] / 2**30:.2f} GiB"
                    if figures["peak_memory_bytes"] else ""))
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = config_lib.config_from_flags()
  report = run_checks(cfg, FLAGS.preflight_steps)
  print(summary(report), file=sys.stderr, flush=True)
  print(json.dumps(report), flush=True)
  if not report["ok"]:
    sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
  cli.run(main, define_flags)
