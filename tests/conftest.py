"""Shared fixtures: one synthetic dataset and one conversion for the whole session."""

import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 300


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


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  from tfrecords import synthetic
  root = tmp_path_factory.mktemp("ham10000")
  return synthetic.write_dataset(str(root), num_images=NUM_IMAGES, seed=1, layout="kaggle", workers=2)


@pytest.fixture(scope="session")
def source(synthetic_dir):
  from tfrecords import sources
  return sources.open_source(synthetic_dir)


@pytest.fixture(scope="session")
def shards_dir(source, tmp_path_factory):
  from tfrecords import convert
  out = str(tmp_path_factory.mktemp("shards"))
  settings = convert.Settings(source=source.description)
  convert.convert(source, out, settings, workers=2)
  return out
