"""What several test files share: running a command as a user would, waiting on it, free ports."""

import contextlib
import fcntl
import os
import pty
import re
import select
import socket
import subprocess
import sys
import sysconfig
import time

import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 300  # the synthetic dataset shared by the whole session (conftest.py)


def run_module(module, *args, env=None, timeout=900, check=True):
  """Runs `python -m module args` from the repository, as a user would."""
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
  if check and result.returncode:
    raise AssertionError(f"{module} exited {result.returncode}\n{result.stdout}\n{result.stderr[-5000:]}")
  return result


def wait_until(condition, process, what, timeout=300):
  """Polls `condition()` while `process` runs (to signal it at the right moment)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    assert process.poll() is None, f"the process ended before {what}"
    time.sleep(0.05)
  raise TimeoutError(f"no {what} within {timeout} s")


def free_ports(count):
  """Ports free on 127.0.0.1 now (held together while chosen, so they differ)."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def copy_tree(src, dst):
  for directory, _, files in tf.io.gfile.walk(src):
    relative = directory[len(src):].lstrip("/")
    tf.io.gfile.makedirs(os.path.join(dst, relative))
    for name in files:
      tf.io.gfile.copy(f"{directory.rstrip('/')}/{name}", os.path.join(dst, relative, name), overwrite=True)


def cached_venv(request, name: str, packages: list[str], share_packages: bool = False) -> str:
  """The Python of a virtual environment with `packages`, made once and kept in pytest's cache
  (for a tool whose requirements clash with the project's). `share_packages` lets it import the
  test environment's packages behind its own: a `.pth` file names this interpreter's
  site-packages (`venv --system-site-packages` would share the base Python's instead, which
  is not this one when the tests run in a virtual environment)."""
  venv = str(request.config.cache.mkdir(name))
  python = os.path.join(venv, "bin", "python")
  with exclusive(f"{venv}.lock"):  # pytest -n 2: the other process may be making it right now
    if not os.path.exists(os.path.join(venv, "ready")):
      subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
      if share_packages:
        own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(own, "test-environment.pth"), "w") as f:
          f.write(sysconfig.get_path("purelib") + "\n")
      subprocess.run([python, "-m", "pip", "install", "--quiet", *packages], check=True, timeout=1200)
      open(os.path.join(venv, "ready"), "w").close()
  return python


@contextlib.contextmanager
def exclusive(lock_path: str):
  """Holds an exclusive lock on `lock_path` (created if missing): one process of the test run at a
  time makes what is shared between them (an environment, a cache outside the checkout)."""
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def in_a_terminal(module, *args, timeout=600):
  """Runs `python -m module args` with a pseudo-terminal as stdout and stderr; returns its output."""
  leader, follower = pty.openpty()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUD_ML_", "AIP_"))}
  process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=follower, stderr=follower, env=env)
  os.close(follower)
  output = b""
  while True:
    ready, _, _ = select.select([leader], [], [], timeout)
    if not ready:
      process.kill()
      raise TimeoutError(f"{module} printed nothing for {timeout} s")
    try:
      chunk = os.read(leader, 65536)
    except OSError:  # the terminal closed: the process ended
      break
    if not chunk:
      break
    output += chunk
  os.close(leader)
  assert process.wait() == 0, output.decode(errors="replace")[-3000:]
  return output.decode(errors="replace")


def python_warnings(stderr: str) -> list[str]:
  """The warnings a command logged from Python: absl's WARNING records (`W1127 12:00:00.000000
  123 file.py:10] …`) and Python warnings (`file.py:10: UserWarning: …`). TensorFlow's C++
  lines (`W0000 00:00:…`, `file.cc:12]`) are not Python's."""
  absl = re.compile(r"^W\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\]")
  python = re.compile(r"^\S+\.py:\d+: \w*Warning: ")
  return [line for line in stderr.splitlines() if absl.match(line) or python.match(line)]


# What TensorFlow prints at start-up before any code of ours can act, whatever
# TF_CPP_MIN_LOG_LEVEL says (README, "A clean log"): absl's notice, once per TensorFlow library
# and process, and, on a machine without a GPU, the CUDA driver's failed start.
TENSORFLOW_STARTUP_LINES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
                            "cuda_platform.cc:52] failed call to cuInit: ")


def warnings_and_errors(stderr: str) -> list[str]:
  """Every warning or error line of a log: TensorFlow's C++ ones (`W0000 00:00:…`), absl's and
  Python's, `WARNING:` ones; less TENSORFLOW_STARTUP_LINES."""
  line_kinds = re.compile(r"^([WEF]\d{4} \d\d:\d\d:\d\d\.\d+ |WARNING|ERROR|\S+\.py:\d+: \w*Warning: )")
  return [line for line in stderr.splitlines()
          if line_kinds.match(line) and not any(known in line for known in TENSORFLOW_STARTUP_LINES)]


def copy_with_a_damaged_shard(shards_dir, destination, split: str):
  """A copy of a conversion with one byte changed in the middle of the first shard of `split`;
  returns (the copy's folder, the damaged shard)."""
  import shutil
  import pathlib
  shutil.copytree(shards_dir, destination)
  shard = sorted(pathlib.Path(destination).glob(f"{split}-*.tfrecord"))[0]
  content = bytearray(shard.read_bytes())
  content[len(content) // 2] ^= 0xFF
  shard.write_bytes(bytes(content))
  return pathlib.Path(destination), shard


def container_command_for(machine_type: str, python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
  """What Vertex AI would run for a job the launcher built: the image's entrypoint (run by
  `python`), the container's args, and its environment."""
  from launch import vertex
  job = vertex.rest_json(vertex.build_custom_job(
      display_name="x", image_uri="x", data_dir="gs://no-such-bucket/shards", model_dir="gs://b/r",
      machine_type=machine_type, accelerator_type=None, accelerator_count=0, replica_count=1, spot=False,
      service_account=None, tensorboard=None, passthrough=["--stage1_epochs=1"]))
  container = job["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
  env = {e["name"]: e["value"] for e in container.get("env", [])}
  return [python, "-m", "job.train", *container["args"]], env


def synthetic_image_paths(synthetic_dir: str, count: int) -> list[str]:
  """The first `count` JPEGs of the synthetic dataset's metadata, wherever its two folders hold them."""
  import pandas as pd
  metadata = pd.read_csv(os.path.join(synthetic_dir, "HAM10000_metadata.csv"))
  paths = [os.path.join(synthetic_dir, folder, f"{image_id}.jpg") for image_id in metadata["image_id"][:count]
           for folder in ("HAM10000_images_part_1", "HAM10000_images_part_2")
           if os.path.exists(os.path.join(synthetic_dir, folder, f"{image_id}.jpg"))]
  assert len(paths) == count, paths
  return paths


def run_seed_inference_example(model_dir: str, image_path: str, work_dir) -> tuple[str, float]:
  """The seed's inference example, its two placeholders filled and nothing else changed, run in a
  fresh Python: returns the (label, probability) it prints."""
  import ast
  script = open(os.path.join(REPO, "tests", "seed_inference_example.py")).read()
  path = os.path.join(work_dir, "example.py")
  with open(path, "w") as f:
    f.write(script.replace("{model_dir}", model_dir).replace("{image_path}", image_path))
  result = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300, cwd=work_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  label, probability = ast.literal_eval(result.stdout.strip().splitlines()[-1])
  return label, probability


TWO_REPLICAS = """
import json, tensorflow as tf
from job import config as config_lib, distribute_utils, mixing, model as model_lib
distribute_utils.use_logical_cpu_devices(2)
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
  drawer = {build}
step = tf.function(lambda: {draw})
print(json.dumps([t.numpy().tolist() for t in strategy.experimental_local_results(strategy.run(step))]))
"""


def draws_on_two_replicas(build: str, draw: str) -> list:
  """What `draw` (an expression of `drawer`, built by the expression `build` in the strategy's
  scope) returns on each replica of a MirroredStrategy over two CPU devices, in a fresh Python
  (logical devices are set before TensorFlow starts)."""
  import json
  script = TWO_REPLICAS.replace("{build}", build).replace("{draw}", draw)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])
