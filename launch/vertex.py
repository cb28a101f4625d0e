r"""Submits the training job to Vertex AI as a CustomJob.

  python -m launch.vertex --project=P --region=us-central1 \
      --image_uri=us-docker.pkg.dev/P/ham/trainer:latest \
      --data_dir=gs://B/ham10000/shards --model_dir=gs://B/runs/r1 \
      --machine_type=a2-highgpu-1g --accelerator_type=NVIDIA_TESLA_A100 --accelerator_count=1 \
      [--replica_count=2] [--spot] [--dry_run] -- --stage1_epochs=10 --global_batch_size=64

Everything after `--` goes to `python -m job.train` unchanged. `--model_dir`
becomes the job's base output directory, so Vertex AI sets AIP_MODEL_DIR,
AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR below it and the job uses them.
`--replica_count` counts every machine, the chief included; all pools get the
same machine (MultiWorkerMirroredStrategy needs identical workers).
`--dry_run` prints the CustomJob as Vertex's REST API JSON and calls nothing.
"""

import json
import sys
import time

from absl import flags

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
  flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; the job resumes from its backups).")
  flags.DEFINE_string("service_account", None, "Service account the job runs as.")
  flags.DEFINE_string("tensorboard", None, "Vertex AI TensorBoard resource name for the logs.")
  flags.DEFINE_string("display_name", None, "Job name (default: ham10000-resnet50-TIMESTAMP).")
  flags.DEFINE_bool("dry_run", False, "Print the CustomJob as JSON and submit nothing.")


TPU_MACHINE_PREFIXES = ("ct", "cloud-tpu")
# TPU v2 and v3 on Vertex AI: machine type "cloud-tpu", one host of 8 TPU cores.
TPU_V2_V3 = {"TPU_V2": 8, "TPU_V3": 8}
# TPU v5e machine types carry their chip count and topology (a single host each).
TPU_V5E = {"ct5lp-hightpu-1t": (1, "1x1"), "ct5lp-hightpu-4t": (4, "2x2"), "ct5lp-hightpu-8t": (8, "2x4")}


def is_tpu(machine_type: str, accelerator_type: str | None) -> bool:
  return machine_type.startswith(TPU_MACHINE_PREFIXES) or (accelerator_type or "").startswith("TPU")


def gpu_machine_spec(v1, machine_type: str, accelerator_type: str | None, accelerator_count: int):
  """A machine with `accelerator_count` GPUs (1 if not given) of `accelerator_type`, or none."""
  machine = v1.MachineSpec(machine_type=machine_type)
  if accelerator_type:
    if accelerator_type not in v1.AcceleratorType.__members__:
      raise cli.UserError(f"--accelerator_type={accelerator_type}: not one of Vertex AI's "
                       f"({', '.join(sorted(v1.AcceleratorType.__members__))})")
    machine.accelerator_type = v1.AcceleratorType[accelerator_type]
    machine.accelerator_count = accelerator_count or 1
  return machine


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
                   f"{'|'.join(TPU_V5E)}); TPU v4, v5p and v6e run JAX and PyTorch only")


def trainer_args(data_dir: str, machine_type: str, accelerator_type: str | None, replica_count: int,
                 passthrough: list[str]) -> list[str]:
  args = [f"--data_dir={data_dir}"]
  if is_tpu(machine_type, accelerator_type):
    args += ["--strategy=tpu", "--tpu=local"]
  elif replica_count > 1:
    args += ["--strategy=multi_worker"]
  return args + list(passthrough)


def build_custom_job(*, display_name: str, image_uri: str, data_dir: str, model_dir: str, machine_type: str,
                     accelerator_type: str | None, accelerator_count: int, replica_count: int, spot: bool,
                     service_account: str | None, tensorboard: str | None, passthrough: list[str]):
  """The CustomJob as google.cloud.aiplatform_v1 types (no credentials needed to build it)."""
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  if replica_count < 1:
    raise cli.UserError(f"--replica_count={replica_count}: at least 1 (it counts the chief)")
  if is_tpu(machine_type, accelerator_type):
    machine = tpu_machine_spec(v1, machine_type, accelerator_type, accelerator_count, replica_count)
  else:
    machine = gpu_machine_spec(v1, machine_type, accelerator_type, accelerator_count)
  container = v1.ContainerSpec(image_uri=image_uri, args=trainer_args(
      data_dir, machine_type, accelerator_type, replica_count, passthrough))
  pools = [v1.WorkerPoolSpec(machine_spec=machine, replica_count=1, container_spec=container)]
  if replica_count > 1:  # the same machine again: MultiWorkerMirroredStrategy needs equal workers
    pools.append(v1.WorkerPoolSpec(machine_spec=machine, replica_count=replica_count - 1,
                                   container_spec=container))
  spec = v1.CustomJobSpec(worker_pool_specs=pools,
                          base_output_directory=v1.GcsDestination(output_uri_prefix=model_dir))
  if spot:
    spec.scheduling = v1.Scheduling(strategy=v1.Scheduling.Strategy.SPOT, restart_job_on_worker_restart=True)
  if service_account:
    spec.service_account = service_account
  if tensorboard:
    spec.tensorboard = tensorboard
  return v1.CustomJob(display_name=display_name, job_spec=spec)


def custom_job_json(job) -> dict:
  # The REST API's field names (camelCase), enum names, and only the fields that are set.
  return json.loads(type(job).to_json(job, use_integers_for_enums=False,
                                      always_print_fields_with_no_presence=False))


def main(argv):
  passthrough = argv[1:]
  for name in ("image_uri", "data_dir", "model_dir") + (() if FLAGS.dry_run else ("project",)):
    if not FLAGS[name].value:
      raise cli.UserError(f"--{name} is required")
  for name in ("data_dir", "model_dir"):
    if not FLAGS[name].value.startswith("gs://"):
      raise cli.UserError(f"--{name}={FLAGS[name].value}: Vertex AI jobs read and write gs:// paths")
  job = build_custom_job(
      display_name=FLAGS.display_name or f"ham10000-resnet50-{time.strftime('%Y%m%d-%H%M%S')}",
      image_uri=FLAGS.image_uri, data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir,
      machine_type=FLAGS.machine_type, accelerator_type=FLAGS.accelerator_type,
      accelerator_count=FLAGS.accelerator_count, replica_count=FLAGS.replica_count, spot=FLAGS.spot,
      service_account=FLAGS.service_account, tensorboard=FLAGS.tensorboard, passthrough=passthrough)
  if FLAGS.dry_run:
    print(json.dumps(custom_job_json(job), indent=2))
    return
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  client = v1.JobServiceClient(client_options={"api_endpoint": f"{FLAGS.region}-aiplatform.googleapis.com"})
  created = client.create_custom_job(parent=f"projects/{FLAGS.project}/locations/{FLAGS.region}",
                                     custom_job=job)
  print(created.name)
  print(f"https://console.cloud.google.com/vertex-ai/locations/{FLAGS.region}/training/"
        f"{created.name.rsplit('/', 1)[-1]}?project={FLAGS.project}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main, define_flags)
