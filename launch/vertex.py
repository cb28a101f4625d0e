r"""Submits the training job to Vertex AI as a CustomJob.

  python -m launch.vertex --project=P --region=us-central1 \
      --image_uri=us-docker.pkg.dev/P/ham/trainer:latest \
      --data_dir=gs://B/ham10000/shards --model_dir=gs://B/runs/r1 \
      --machine_type=a2-highgpu-1g --accelerator_type=NVIDIA_TESLA_A100 --accelerator_count=1 \
      [--replica_count=2] [--spot] [--dry_run [--output=job.json]] -- --stage1_epochs=10
  python -m launch.vertex ... --tune --max_trials=20 --parallel_trials=4
  python -m launch.vertex ... --preflight     # job.preflight on the same machines, its report printed
  python -m launch.vertex ... --folds=5       # the 5 folds of a cross-validation, as 5 jobs at once

Everything after `--` goes to `python -m job.train` unchanged. `--model_dir`
becomes the job's base output directory, so Vertex AI sets AIP_MODEL_DIR,
AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR below it (`model/`,
`checkpoints/`, `logs/`) and the job uses them. Paths may be given as gs://
or as Vertex's Cloud Storage FUSE mount (/gcs/BUCKET/...): the same objects.
`--replica_count` counts every machine, the chief included; all pools get the
same machine (MultiWorkerMirroredStrategy needs identical workers), and a
restarted worker restarts the whole job (its collectives cannot resume alone).
`--tune` submits a HyperparameterTuningJob whose trials are this CustomJob
(TUNED_PARAMETERS, maximising the job's --monitor as its HypertuneReporter
reports it). `--dry_run` prints the job as Vertex's REST API JSON and calls
nothing; `--output` writes it to a file, which the REST API takes as it is.
`--folds=K` (shards converted with --folds=K) submits K CustomJobs that run at
once, job k training `job.train --fold=k` into {model_dir}/fold-k as
job.cross_validate would; when they are done, the command it prints (run
anywhere) skips the finished folds and writes the out-of-fold figures, the
ensemble's test figures and its serving export into --model_dir.



  curl -X POST -H "Authorization: Bearer $(gcloud auth print-access-token)" \
      -H "Content-Type: application/json" -d @job.json \
      https://REGION-aiplatform.googleapis.com/v1/projects/P/locations/REGION/customJobs
  (hyperparameterTuningJobs for --tune)
"""

import json
import re
import sys
import time

from absl import flags, logging

from job import accelerators, backbones
from tfrecords import cli

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("project", None, "Google Cloud project.")
  flags.DEFINE_string("region", "us-central1", "Vertex AI region.")
  flags.DEFINE_string("image_uri", None, "The trainer image (see the Dockerfile).")
  flags.DEFINE_string("data_dir", None, "gs:// folder of the converted shards.")
  flags.DEFINE_string("model_dir", None, "gs:// base output directory of the run.")
  flags.DEFINE_string("machine_type", "n1-standard-8", "Machine of every replica, e.g. a2-highgpu-1g; "
                      "TPUs: cloud-tpu (with TPU_V2 or TPU_V3) or ct5lp-hightpu-1t/4t/8t (TPU v5e).")
  flags.DEFINE_string("accelerator_type", None, "e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_H100_80GB, TPU_V3.")
  flags.DEFINE_integer("accelerator_count", 0, "Accelerators per replica (default: 1 GPU; a TPU's "
                       "own count: 8 cores for v2/v3, the machine type's chips for v5e).")
  flags.DEFINE_integer("replica_count", 1, "Machines in all, the chief included.")
  flags.DEFINE_string("timeout", "24h", "The longest the job (each tuning trial) may run, restarts "
                      "included, e.g. 24h, 90m; Vertex AI's own default is 7 days.")
  flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; the job resumes from its backups).")
  flags.DEFINE_string("service_account", None, "Service account the job runs as.")
  flags.DEFINE_string("tensorboard", None, "Vertex AI TensorBoard resource name for the logs.")
  flags.DEFINE_string("display_name", None, "Job name (default: ham10000-resnet50-TIMESTAMP).")
  flags.DEFINE_bool("dry_run", False, "Print the job as REST JSON and submit nothing.")
  flags.DEFINE_string("output", None, "With --dry_run: write the JSON to this file (the request body "
                      "of the REST API's customJobs or hyperparameterTuningJobs create).")
  flags.DEFINE_integer("folds", 0, "Submit the K folds of a cross-validation as K jobs (shards converted with "
                       "--folds=K); 0: one job.", lower_bound=0)
  flags.DEFINE_bool("tune", False, "Submit a HyperparameterTuningJob over TUNED_PARAMETERS instead.")
  flags.DEFINE_list("tune_backbones", [], "With --tune: also search --backbone among these (a categorical "
                    "parameter; fine_tune_layers then stays within the smallest one's layers).")
  flags.DEFINE_integer("max_trials", 20, "With --tune: trials in all.")
  flags.DEFINE_integer("parallel_trials", 4, "With --tune: trials at a time.")
  flags.DEFINE_bool("wait", False, "Follow the job until it ends, printing each state change; exit 1 "
                    "unless it succeeded.")
  flags.DEFINE_integer("poll_seconds", 60, "With --wait: seconds between state checks.")
  flags.DEFINE_bool("preflight", False, "Run job.preflight instead of job.train on the same image and "
                    "machines (a few minutes, with a short timeout), wait for it, and print its report "
                    "(preflight.json, read back from the job's model folder).")


# What --tune searches: the two stages' learning rates (at --base_batch_size; the job scales
# them to the global batch) on a log scale, and how deep stage 2 fine-tunes.
TUNED_PARAMETERS = (
    ("stage1_lr", "double", 1e-5, 1e-3, "UNIT_LOG_SCALE"),
    ("stage2_lr", "double", 1e-6, 1e-4, "UNIT_LOG_SCALE"),
    ("fine_tune_layers", "integer", 10, 150, "UNIT_LINEAR_SCALE"),
)
# Every trial: no test evaluation (trials are compared on validation only) and no serving export.
TRIAL_ARGS = ("--noevaluate", "--noserving")


TPU_MACHINE_PREFIXES = ("ct", "cloud-tpu")
# TPU v2 and v3 on Vertex AI: machine type "cloud-tpu", one host of 8 TPU cores.
TPU_V2_V3 = {"TPU_V2": 8, "TPU_V3": 8}
# TPU v5e machine types carry their chip count and topology (a single host each).
TPU_V5E = {"ct5lp-hightpu-1t": (1, "1x1"), "ct5lp-hightpu-4t": (4, "2x2"), "ct5lp-hightpu-8t": (8, "2x4")}


def is_tpu(machine_type: str, accelerator_type: str | None) -> bool:
  return machine_type.startswith(TPU_MACHINE_PREFIXES) or (accelerator_type or "").startswith("TPU")


def gpu_machine_spec(v1, machine_type: str, accelerator_type: str | None, accelerator_count: int):
  """The machine with the GPUs Vertex AI would give it (job/accelerators.py's table: filled in
  where the machine type fixes them, refused where Vertex would refuse them or the GPU would be
  dropped), or none."""
  accelerator_type, accelerator_count = accelerators.gpu_for_machine(machine_type, accelerator_type,
                                                                     accelerator_count)
  machine = v1.MachineSpec(machine_type=machine_type)
  if accelerator_type:
    machine.accelerator_type = v1.AcceleratorType[accelerator_type]
    machine.accelerator_count = accelerator_count
    warning = accelerators.jit_warning(accelerator_type)
    if warning:
      logging.warning("%s", warning)
  return machine


def expected_accelerator(machine) -> str | None:
  """What the job checks it sees (job/accelerators.py's guard): TYPE:COUNT per replica."""
  if not machine.accelerator_count:
    return None
  return f"{machine.accelerator_type.name}:{machine.accelerator_count}"


def tpu_machine_spec(v1, machine_type: str, accelerator_type: str | None, accelerator_count: int,
                     replica_count: int):
  """The MachineSpec of a TPU that TensorFlow runs on in Vertex AI: v2, v3 (8 cores) or v5e."""
  if replica_count > 1:
    raise cli.UserError(f"--replica_count={replica_count}: TPUs run as one machine here (multi-host TPU "
                     "slices are not supported by this job; each replica would train alone into the "
                     "same --model_dir). Use --replica_count=1 with a larger TPU machine.")
  if machine_type in TPU_V5E:
    chips, topology = TPU_V5E[machine_type]
    if accelerator_type not in (None, "TPU_V5_LITEPOD") or accelerator_count not in (0, chips):
      raise cli.UserError(f"--machine_type={machine_type} has {chips} TPU v5e chips: leave out "
                       "--accelerator_type and --accelerator_count (or give TPU_V5_LITEPOD and "
                       f"{chips})")
    return v1.MachineSpec(machine_type=machine_type, accelerator_type=v1.AcceleratorType.TPU_V5_LITEPOD,
                          accelerator_count=chips, tpu_topology=topology)
  if accelerator_type in TPU_V2_V3:
    cores = TPU_V2_V3[accelerator_type]
    if machine_type != "cloud-tpu" or accelerator_count not in (0, cores):
      raise cli.UserError(f"--accelerator_type={accelerator_type}: Vertex AI runs it as "
                       f"--machine_type=cloud-tpu with {cores} cores (--accelerator_count={cores})")
    return v1.MachineSpec(machine_type=machine_type, accelerator_type=v1.AcceleratorType[accelerator_type],
                          accelerator_count=cores)
  given = f"--machine_type={machine_type}" + (f" --accelerator_type={accelerator_type}" if accelerator_type else "")
  raise cli.UserError(f"{given}: TensorFlow "
                   "trains on Vertex AI's TPU v2 and v3 (--machine_type=cloud-tpu "
                   "--accelerator_type=TPU_V2|TPU_V3) and v5e (--machine_type="
                   f"{'|'.join(TPU_V5E)}); Vertex AI custom training does not offer TPU v4 and v5p, and "
                   "TensorFlow does not run on v6e")


def trainer_args(data_dir: str, machine_type: str, accelerator_type: str | None, replica_count: int,
                 passthrough: list[str]) -> list[str]:
  args = [f"--data_dir={data_dir}"]
  if is_tpu(machine_type, accelerator_type):
    args += ["--strategy=tpu", "--tpu=local"]
  elif replica_count > 1:
    args += ["--strategy=multi_worker"]
  return args + list(passthrough)


def timeout_seconds(value: str) -> int:
  """'24h', '90m' or '600s' in seconds, within Vertex AI's 7 days."""
  match = re.fullmatch(r"(\d+(?:\.\d+)?)([hms])", value.strip())
  seconds = round(float(match.group(1)) * {"h": 3600, "m": 60, "s": 1}[match.group(2)]) if match else 0
  if not 0 < seconds <= 7 * 24 * 3600:
    raise cli.UserError(f"--timeout={value}: a duration such as 24h, 90m or 600s, at most 168h (Vertex AI's "
                        "limit)")
  return seconds


def parse_trainer_flags(passthrough: list[str], preflight: bool = False) -> flags.FlagValues:
  """The flags after `--` as job.train (or job.preflight) parses them, refusing before anything is
  submitted what it would refuse: a name it does not define (a typo) or a value outside a flag's
  choices. The flags come from job/config.py, which loads no TensorFlow."""
  from job import config as config_lib  # pylint: disable=g-import-not-at-top
  trainer = flags.FlagValues()
  config_lib.define_flags(trainer)
  flags.DEFINE_bool("traceback", False, "", flag_values=trainer)  # tfrecords/cli.py's, every command's
  if preflight:
    config_lib.define_preflight_flags(trainer)
  try:
    trainer(["job.train", *passthrough])
  except (flags.Error, ValueError) as e:  # absl raises ValueError for some malformed values
    raise cli.UserError(f"after --: {str(e).splitlines()[0]} (see python -m job.train --help)") from None
  config_lib.metadata_fields(trainer.metadata)  # a list flag takes any name: dx_type and typos are refused here
  return trainer


def check_passthrough(trainer: flags.FlagValues, launcher_sets: list[str]):
  """Flags the launcher sets itself may not come again after `--` (absl keeps a flag's last
  value: a --model_dir there would send every artifact to the container's disk, lost with it),
  and the folders a job writes must be Cloud Storage."""
  twice = [name for name in launcher_sets if trainer[name].present]
  if twice:
    raise cli.UserError(f"after --: {', '.join(f'--{n}' for n in twice)} the launcher sets itself (from its own "
                        "--data_dir and --model_dir, and the machine it chose); give them to launch.vertex, not "
                        "after --")
  for name in ("checkpoint_dir", "tensorboard_dir"):
    if trainer[name].present:
      gcs_path(f"{name} (after --)", trainer[name].value)


def build_custom_job(*, display_name: str, image_uri: str, data_dir: str, model_dir: str, machine_type: str,
                     accelerator_type: str | None, accelerator_count: int, replica_count: int, spot: bool,
                     service_account: str | None, tensorboard: str | None, passthrough: list[str],
                     preflight: bool = False, timeout: str = "24h", fold_args: list[str] = ()):
  """The CustomJob as google.cloud.aiplatform_v1 types (no credentials needed to build it).
  preflight: the same job running job.preflight, bounded by PREFLIGHT_TIMEOUT."""
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  trainer = parse_trainer_flags(passthrough, preflight)
  check_passthrough(trainer, ["data_dir", "model_dir"] + (
      ["strategy", "tpu"] if is_tpu(machine_type, accelerator_type) else ["strategy"] if replica_count > 1 else []))
  seconds = timeout_seconds(timeout)  # checked even where the preflight's own bound applies
  if replica_count < 1:
    raise cli.UserError(f"--replica_count={replica_count}: at least 1 (it counts the chief)")
  if is_tpu(machine_type, accelerator_type):
    machine = tpu_machine_spec(v1, machine_type, accelerator_type, accelerator_count, replica_count)
  else:
    machine = gpu_machine_spec(v1, machine_type, accelerator_type, accelerator_count)
  container = v1.ContainerSpec(image_uri=image_uri, args=trainer_args(
      data_dir, machine_type, accelerator_type, replica_count, passthrough) + list(fold_args))
  if preflight:  # the image's entrypoint is job.train: the command replaces it
    container.command = ["python", "-m", "job.preflight"]
  expected = expected_accelerator(machine)
  if expected:
    container.env = [v1.EnvVar(name=accelerators.EXPECTED_ACCELERATOR_ENV, value=expected)]
  pools = [v1.WorkerPoolSpec(machine_spec=machine, replica_count=1, container_spec=container)]
  if replica_count > 1:  # the same machine again: MultiWorkerMirroredStrategy needs equal workers
    pools.append(v1.WorkerPoolSpec(machine_spec=machine, replica_count=replica_count - 1,
                                   container_spec=container))
  spec = v1.CustomJobSpec(worker_pool_specs=pools,
                          base_output_directory=v1.GcsDestination(output_uri_prefix=model_dir))
  # An explicit bound, so that a hung job cannot run (and bill) for Vertex's default of 7 days.
  spec.scheduling = v1.Scheduling(timeout=PREFLIGHT_TIMEOUT if preflight else f"{seconds}s")
  # Several machines: one restarted worker cannot rejoin the others' collectives, so the
  # whole job restarts (and resumes from its backups).
  spec.scheduling.restart_job_on_worker_restart = replica_count > 1
  if spot:
    spec.scheduling.strategy = v1.Scheduling.Strategy.SPOT
  if tensorboard and not service_account:
    raise cli.UserError(f"--tensorboard={tensorboard} needs --service_account: Vertex AI writes to a "
                        "TensorBoard only as a service account that may")
  if service_account:
    spec.service_account = service_account
  if tensorboard:
    spec.tensorboard = tensorboard
  return v1.CustomJob(display_name=display_name, job_spec=spec)


# What each fold's job adds to the trainer's flags: the fold and its folder (as job.cross_validate
# names them), and no test figures or export of its own (the folds' ensemble gets those).
FOLD_ARGS = ("--fold={fold}", "--model_dir={model_dir}/fold-{fold}", "--noevaluate", "--noserving")


def build_fold_jobs(num_folds: int, *, display_name: str, model_dir: str, passthrough: list[str], **job) -> list:
  """The CustomJobs of a cross-validation's folds: job k trains fold k into {model_dir}/fold-k
  (its checkpoints and logs below it, as Vertex AI's base output directory)."""
  if num_folds == 1:
    raise cli.UserError("--folds=1: a cross-validation has two folds or more (the shards' --folds)")
  trainer = parse_trainer_flags(passthrough)
  given = [f"--{name}" for name in ("fold", "evaluate", "serving", "export_dir") if trainer[name].present]
  if given:
    raise cli.UserError(f"after --: {', '.join(given)} with --folds: each fold's job sets its fold, and the folds' "
                        "ensemble is evaluated and exported by the command printed once they are done")
  return [build_custom_job(display_name=f"{display_name}-fold-{fold}", model_dir=f"{model_dir}/fold-{fold}",
                           passthrough=list(passthrough), fold_args=[a.format(fold=fold, model_dir=model_dir)
                                                                     for a in FOLD_ARGS], **job)
          for fold in range(num_folds)]


def finishing_command(data_dir: str, model_dir: str, passthrough: list[str]) -> str:
  """What finishes a cross-validation whose folds ran as Vertex AI jobs: job.cross_validate on
  the same flags finds every fold finished, trains none, and writes what follows."""
  return " ".join(["python -m job.cross_validate", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                   *passthrough])


def monitor_of(passthrough: list[str]) -> str:
  """The --monitor the trainer gets, as job.train's absl parses it (`-monitor=x`, `--monitor x`)."""
  return parse_trainer_flags(passthrough).monitor


def build_tuning_job(custom_job, *, monitor: str, max_trials: int, parallel_trials: int,
                     tune_backbones: tuple[str, ...] = ()):
  """The HyperparameterTuningJob whose every trial runs `custom_job`'s spec with TUNED_PARAMETERS
  (and --backbone among `tune_backbones`, if any) appended to the trainer's arguments; the metric
  is what the job's HypertuneReporter reports."""
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  if max_trials < 1:
    raise cli.UserError(f"--max_trials={max_trials} must be at least 1")
  if not 1 <= parallel_trials <= max_trials:
    raise cli.UserError(f"--parallel_trials={parallel_trials} must be between 1 and --max_trials={max_trials}")
  trial_spec = type(custom_job.job_spec).deserialize(type(custom_job.job_spec).serialize(custom_job.job_spec))
  for pool in trial_spec.worker_pool_specs:
    conflicting = [a for a in pool.container_spec.args if a.split("=")[0] in ("--evaluate", "--serving")
                   and a.split("=", 1)[-1].lower() not in ("false", "0")]
    if conflicting:
      raise cli.UserError(f"{' '.join(conflicting)}: tuning trials never evaluate the test split (a trial "
                          "is chosen on validation alone) nor export a serving model; evaluate and export the "
                          "chosen trial afterwards (--tune --wait prints the commands)")
    # Last, so that they win over anything before them (absl keeps a flag's last value).
    pool.container_spec.args = [*pool.container_spec.args, *TRIAL_ARGS]
  study = v1.StudySpec
  parameters = []
  backbones.check_names(tune_backbones, "--tune_backbones")
  fewest_layers = min((backbones.get(name).layers for name in tune_backbones), default=None)
  for name, kind, low, high, scale in TUNED_PARAMETERS:
    if name == "fine_tune_layers" and fewest_layers is not None:
      high = min(high, fewest_layers)  # every trial's backbone has that many
    parameter = study.ParameterSpec(parameter_id=name, scale_type=study.ParameterSpec.ScaleType[scale])
    if kind == "double":
      parameter.double_value_spec = study.ParameterSpec.DoubleValueSpec(min_value=low, max_value=high)
    else:
      parameter.integer_value_spec = study.ParameterSpec.IntegerValueSpec(min_value=low, max_value=high)
    parameters.append(parameter)
  if tune_backbones:
    parameters.append(study.ParameterSpec(
        parameter_id="backbone",
        categorical_value_spec=study.ParameterSpec.CategoricalValueSpec(values=list(dict.fromkeys(tune_backbones)))))
  goal = study.MetricSpec.GoalType.MINIMIZE if monitor.endswith("loss") else study.MetricSpec.GoalType.MAXIMIZE
  study_spec = study(metrics=[study.MetricSpec(metric_id=monitor, goal=goal)], parameters=parameters,
                     # The job keeps its best epoch's model: a trial is worth its best epoch.
                     measurement_selection_type=study.MeasurementSelectionType.BEST_MEASUREMENT)
  return v1.HyperparameterTuningJob(display_name=custom_job.display_name, study_spec=study_spec,
                                    max_trial_count=max_trials, parallel_trial_count=parallel_trials,
                                    trial_job_spec=trial_spec)


# A preflight compiles and times a few steps: on a machine that works it is done in minutes.
PREFLIGHT_TIMEOUT = "1800s"
PREFLIGHT_REPORT = "model/preflight.json"  # below the base output directory: AIP_MODEL_DIR's report


def read_preflight_report(model_dir: str, client=None) -> dict | None:
  """The preflight's report from the job's base output directory (gs://), or None if it wrote none."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  client = client or storage.Client()
  bucket, _, prefix = model_dir[len("gs://"):].partition("/")
  blob = client.bucket(bucket).blob(f"{prefix.rstrip('/')}/{PREFLIGHT_REPORT}".lstrip("/"))
  if not blob.exists():
    return None
  return json.loads(blob.download_as_text())


def print_preflight_report(report: dict | None, model_dir: str):
  """The report as one JSON line on stdout, its verdict on stderr; a UserError unless it passed."""
  if report is None:
    raise cli.UserError(f"the preflight wrote no report to {model_dir}/{PREFLIGHT_REPORT}: it stopped before "
                        "it could (see the job's logs)")
  print(json.dumps(report), flush=True)
  for check in report["checks"]:
    detail = check["detail"] if isinstance(check["detail"], str) else json.dumps(check["detail"])
    print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['check']:<11} {detail[:300]}", file=sys.stderr)
  if not report["ok"]:
    raise cli.UserError(f"the preflight failed at its {report['failed_check']} check")
  print(f"preflight passed: {report['strategy']} × {report['replicas']}, {report['precision']}, XLA "
        f"{'on' if report['xla'] else 'off'}: first step {report['compile_seconds']} s, "
        f"{report['images_per_second']} images/s, waiting for input {100 * report['input_wait_share']:.0f}%",
        file=sys.stderr, flush=True)


FINAL_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
                "JOB_STATE_PARTIALLY_SUCCEEDED")


def console_link(name: str, region: str, project: str, tuning: bool) -> str:
  kind = "training/hyperparameter-tuning-jobs" if tuning else "training"
  return (f"https://console.cloud.google.com/vertex-ai/locations/{region}/{kind}/"
          f"{name.rsplit('/', 1)[-1]}?project={project}")


def submit(client, job, project: str, region: str, wait: bool = False, poll_seconds: float = 60,
           sleep=time.sleep):
  """Creates the job (a CustomJob or HyperparameterTuningJob) with `client` (an aiplatform_v1
  JobServiceClient); with `wait`, follows it to its end. Returns the last state of the job."""
  tuning = type(job).__name__ == "HyperparameterTuningJob"
  parent = f"projects/{project}/locations/{region}"
  if tuning:
    created = client.create_hyperparameter_tuning_job(parent=parent, hyperparameter_tuning_job=job)
  else:
    created = client.create_custom_job(parent=parent, custom_job=job)
  print(created.name)
  print(console_link(created.name, region, project, tuning), file=sys.stderr, flush=True)
  if not wait:
    return created
  return follow(client, created, project, region, poll_seconds, sleep)


def follow(client, created, project: str, region: str, poll_seconds: float = 60, sleep=time.sleep):
  """Polls a submitted job until it ends, printing each state change; its last state, or a
  UserError naming how it ended."""
  tuning = type(created).__name__ == "HyperparameterTuningJob"
  get = client.get_hyperparameter_tuning_job if tuning else client.get_custom_job
  current, state = created, None
  while True:
    if current.state.name != state:
      state = current.state.name
      print(f"{time.strftime('%H:%M:%S')} {state}", file=sys.stderr, flush=True)
    if state in FINAL_STATES:
      break
    sleep(poll_seconds)
    current = get(name=created.name)
  if state != "JOB_STATE_SUCCEEDED":
    reason = f": {current.error.message}" if current.error.message else ""
    raise cli.UserError(f"{created.name} ended {state}{reason} (logs: "
                        f"{console_link(created.name, region, project, tuning)})")
  return current


def best_trial(job) -> tuple[str, float] | None:
  """(trial id, value) of the succeeded trial with the best final value of the study's metric."""
  metric = job.study_spec.metrics[0]
  maximize = metric.goal != type(metric).GoalType.MINIMIZE
  scored = []
  for trial in job.trials:
    values = [m.value for m in trial.final_measurement.metrics if m.metric_id == metric.metric_id]
    if values and trial.state.name == "SUCCEEDED":
      scored.append((values[0], trial.id))
  if not scored:
    return None
  value, trial_id = max(scored) if maximize else min(scored)
  return trial_id, value


def print_best_trial(job, model_dir: str, data_dir: str):
  """The chosen trial, where it wrote, and what to run on it next."""
  best = best_trial(job)
  if best is None:
    raise cli.UserError(f"{job.name}: no trial succeeded with a final {job.study_spec.metrics[0].metric_id}")
  trial_id, value = best
  trial_model = f"{model_dir.rstrip('/')}/{trial_id}/model"
  print(f"best trial {trial_id}: {job.study_spec.metrics[0].metric_id}={value:.4f} (validation); its model: "
        f"{trial_model}\n"
        f"  evaluate it on the test split, once:  python -m job.evaluate --model_dir={trial_model} "
        f"--data_dir={data_dir}\n"
        f"  export and upload it:  python -m job.predict --model_dir={trial_model} --export_dir={trial_model}/serving/1"
        f" && python -m launch.upload_model --artifact_uri={trial_model}/serving --project=PROJECT", flush=True)


def gcs_path(flag: str, value: str) -> str:
  """`value` as a gs:// URI: Vertex mounts gs://BUCKET/… at /gcs/BUCKET/… (Cloud Storage FUSE)."""
  if value.startswith("/gcs/") and len(value) > len("/gcs/"):
    value = "gs://" + value[len("/gcs/"):]
  if not value.startswith("gs://") or not value[len("gs://"):].split("/", 1)[0]:
    raise cli.UserError(f"--{flag}={value}: Vertex AI jobs read and write Cloud Storage: give gs://BUCKET/… "
                        "(or /gcs/BUCKET/…)")
  return value


def api_endpoint(region: str) -> str:
  return f"{region}-aiplatform.googleapis.com"


def print_dry_run(message, output: str | None):
  """The message as REST JSON: printed, or written to `output` (whose path is printed)."""
  text = json.dumps(rest_json(message), indent=2)
  if output:
    # Imported here: the storage layer loads TensorFlow, which a launcher otherwise never needs
    # (and whose start-up lines would be all a dry run prints on stderr).
    from tfrecords import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_atomic(output, text + "\n")
    print(output)
  else:
    print(text)


def rest_json(job) -> dict:
  # The REST API's field names (camelCase), enum names, and only the fields that are set.
  return json.loads(type(job).to_json(job, use_integers_for_enums=False,
                                      always_print_fields_with_no_presence=False))


def main(argv):
  passthrough = argv[1:]
  for name in ("image_uri", "data_dir", "model_dir") + (() if FLAGS.dry_run else ("project",)):
    if not FLAGS[name].value:
      raise cli.UserError(f"--{name} is required")
  if FLAGS.output and not FLAGS.dry_run:
    raise cli.UserError("--output writes the job's JSON instead of submitting it: add --dry_run")
  data_dir, model_dir = gcs_path("data_dir", FLAGS.data_dir), gcs_path("model_dir", FLAGS.model_dir)
  display_name = FLAGS.display_name or (f"ham10000-resnet50-{'preflight-' if FLAGS.preflight else ''}"
                                        f"{time.strftime('%Y%m%d-%H%M%S')}")
  job_settings = dict(image_uri=FLAGS.image_uri, data_dir=data_dir, machine_type=FLAGS.machine_type,
                      accelerator_type=FLAGS.accelerator_type, accelerator_count=FLAGS.accelerator_count,
                      replica_count=FLAGS.replica_count, spot=FLAGS.spot, service_account=FLAGS.service_account,
                      tensorboard=FLAGS.tensorboard, timeout=FLAGS.timeout)
  if FLAGS.folds:
    if FLAGS.tune or FLAGS.preflight:
      raise cli.UserError(f"--folds={FLAGS.folds} submits the folds' training jobs; give it without "
                          f"{'--tune' if FLAGS.tune else '--preflight'}")
    submit_folds(build_fold_jobs(FLAGS.folds, display_name=display_name, model_dir=model_dir,
                                 passthrough=passthrough, **job_settings), data_dir, model_dir, passthrough)
    return
  job = build_custom_job(display_name=display_name, model_dir=model_dir, passthrough=passthrough,
                         preflight=FLAGS.preflight, **job_settings)
  if FLAGS.preflight and FLAGS.tune:
    raise cli.UserError("--preflight checks one machine shape before a run; give it without --tune")
  if FLAGS.tune:
    job = build_tuning_job(job, monitor=monitor_of(passthrough), max_trials=FLAGS.max_trials,
                           parallel_trials=FLAGS.parallel_trials, tune_backbones=tuple(FLAGS.tune_backbones))
  elif FLAGS.tune_backbones:
    raise cli.UserError("--tune_backbones searches backbones in a tuning job: give it with --tune")
  if FLAGS.dry_run:
    print_dry_run(job, FLAGS.output)
    return
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  client = v1.JobServiceClient(client_options={"api_endpoint": api_endpoint(FLAGS.region)})
  if not FLAGS.preflight:
    done = submit(client, job, FLAGS.project, FLAGS.region, wait=FLAGS.wait, poll_seconds=FLAGS.poll_seconds)
    if FLAGS.tune and FLAGS.wait:
      print_best_trial(done, model_dir, data_dir)
    return
  try:
    submit(client, job, FLAGS.project, FLAGS.region, wait=True, poll_seconds=FLAGS.poll_seconds)
  finally:  # a failed check ends the job FAILED: its report says which
    print_preflight_report(read_preflight_report(model_dir), model_dir)


def submit_folds(jobs: list, data_dir: str, model_dir: str, passthrough: list[str]):
  """Prints (--dry_run) or submits the folds' jobs, all before following any (--wait), then
  the command that finishes the cross-validation."""
  if FLAGS.dry_run:
    if FLAGS.output:  # one request body per job, as the REST API takes them
      stem, dot, suffix = FLAGS.output.rpartition(".")
      for fold, job in enumerate(jobs):
        print_dry_run(job, f"{stem}-fold-{fold}{dot}{suffix}" if dot else f"{FLAGS.output}-fold-{fold}")
    else:
      print(json.dumps([rest_json(job) for job in jobs], indent=2))
  else:
    from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
    client = v1.JobServiceClient(client_options={"api_endpoint": api_endpoint(FLAGS.region)})
    created = [submit(client, job, FLAGS.project, FLAGS.region) for job in jobs]
    if FLAGS.wait:
      for job in created:
        follow(client, job, FLAGS.project, FLAGS.region, FLAGS.poll_seconds)
  print(f"when the {len(jobs)} jobs have succeeded, finish the cross-validation (it trains no fold again):\n  "
        + finishing_command(data_dir, model_dir, passthrough), file=sys.stderr, flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
