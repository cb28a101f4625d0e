"""Every command starts the same way: its flags under --help, user errors as one line."""

import io
import re
import json
import os

import pytest

from helpers import in_a_terminal, run_module


@pytest.mark.parametrize("module, own_flags", [
    ("tfrecords.convert", ["--source", "--output_dir", "--num_train_shards", "--traceback"]),
    ("job.train", ["--data_dir", "--global_batch_size", "--jit_compile", "--stage2_lr"]),
    ("job.evaluate", ["--data_dir", "--model_dir", "--split", "--output_dir"]),
    ("job.predict", ["--model_dir", "--raw", "--export_dir", "--format"]),
    ("job.demo", ["--work_dir", "--num_images"]),
    ("launch.vertex", ["--machine_type", "--replica_count", "--dry_run", "--tune", "--wait", "--output"]),
    ("launch.upload_model", ["--artifact_uri", "--serving_image", "--dry_run"]),
])
def test_help_lists_the_commands_own_flags(module, own_flags):
  result = run_module(module, "--help", check=False)  # absl ends --help with exit status 1
  for flag in own_flags:
    assert f"  {flag}:" in result.stdout or f"  --[no]{flag[2:]}:" in result.stdout, (flag, result.stdout[:2000])


def _one_line_error(result) -> str:
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  return last


@pytest.mark.slow
def test_bad_data_dir_and_manifest_end_in_one_line_naming_the_path(tmp_path):
  data_dir = tmp_path / "shards"
  data_dir.mkdir()
  args = [f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}"]
  assert "no manifest.json" in _one_line_error(run_module("job.train", *args, check=False))
  (data_dir / "manifest.json").write_text("{not json")
  line = _one_line_error(run_module("job.train", *args, check=False))
  assert str(data_dir / "manifest.json") in line and "not valid JSON" in line
  (data_dir / "manifest.json").write_text("{}")
  line = _one_line_error(run_module("job.train", *args, check=False))
  assert "not a manifest written by tfrecords.convert" in line
  assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
  result = run_module("job.train", *args, "--traceback", check=False)
  assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_bad_flag_values_are_named():
  line = _one_line_error(run_module("job.train", "--data_dir=/x", "--global_batch_size=0", check=False))
  assert "--global_batch_size=0" in line
  assert "--data_dir" in _one_line_error(run_module("job.train", check=False))


@pytest.mark.slow
def test_a_model_dir_without_a_run_is_named(tmp_path):
  for module, extra in (("job.predict", ["x.jpg"]), ("job.evaluate", [f"--data_dir={tmp_path}"])):
    line = _one_line_error(run_module(module, f"--model_dir={tmp_path}", *extra, check=False))
    assert f"--model_dir={tmp_path}: no run_config.json" in line


@pytest.mark.slow
def test_damaged_shards_are_named_before_training(shards_dir, tmp_path):
  import shutil
  data_dir = tmp_path / "damaged"
  shutil.copytree(shards_dir, data_dir)
  flipped, cut = data_dir / "train-00003-of-00016.tfrecord", data_dir / "validation-00001-of-00004.tfrecord"
  content = bytearray(flipped.read_bytes())
  content[len(content) // 2] ^= 0xFF
  flipped.write_bytes(bytes(content))
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  # --debug reads 64 images and might never reach either: the check before training does.
  args = [f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}", "--debug", "--weights=none"]
  line = _one_line_error(run_module("job.train", *args, check=False))
  assert f"{flipped} is damaged" in line and f"{cut} is damaged" in line
  os.remove(data_dir / "test-00000-of-00004.tfrecord")
  assert "test-00000-of-00004.tfrecord is missing" in _one_line_error(
      run_module("job.train", *args, check=False))
  assert not (tmp_path / "run" / "run_config.json").exists()


def _without_vertex(environ):
  return {k: v for k, v in environ.items() if not k.startswith(("CLOUD_ML_", "AIP_"))}


@pytest.mark.parametrize("vertex", [False, True])
def test_logs_go_to_stdout_as_json_with_their_severity_on_vertex_only(vertex, synthetic_dir, shards_dir,
                                                                        monkeypatch):
  """A rerun of the session's conversion (it has nothing to do, and says so at INFO)."""
  monkeypatch.setattr(os, "environ", _without_vertex(os.environ))
  env = {"CLOUD_ML_JOB_ID": "123", "AIP_MODEL_DIR": "gs://b/model"} if vertex else {}
  result = run_module("tfrecords.convert", f"--source={synthetic_dir}", f"--output_dir={shards_dir}",
                      env=env)
  out, err = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
  assert out[-1] == os.path.join(shards_dir, "manifest.json")  # what the command prints stays plain
  if vertex:
    records = [json.loads(line) for line in out[:-1]]
    assert {r["severity"] for r in records} == {"INFO"}
    assert any("nothing to do" in r["message"] for r in records)
    assert not [line for line in err if line.startswith(("I", "W")) and "]" in line[:40]]  # no absl lines
  else:
    assert out == out[-1:]
    assert any(line.startswith("I") and "nothing to do" in line for line in err)


def test_cloud_logging_routes_warnings_and_errors(monkeypatch):
  import logging
  import warnings
  from absl import logging as absl_logging
  from tfrecords import logs
  root = logging.getLogger()
  monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
  monkeypatch.setattr(logging, "_warnings_showwarning", None)
  out, err = io.StringIO(), io.StringIO()
  # INFO as a command runs (absl's flags parsed); a training run earlier in this process (the
  # shared trained_run fixture) leaves absl's logger at another level.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logs.use_cloud_logging(out, err)
  try:
    absl_logging.info("one %d", 1)
    with warnings.catch_warnings():
      warnings.simplefilter("always")
      warnings.warn("deprecated thing")
    absl_logging.error("broken")
  finally:
    logging.captureWarnings(False)
    absl_logging.set_verbosity(verbosity)
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [(r["severity"], r["logger"]) for r in records] == [("INFO", "absl"), ("WARNING", "py.warnings")]
  assert records[0]["message"] == "one 1" and "UserWarning: deprecated thing" in records[1]["message"]
  assert [json.loads(line)["severity"] for line in err.getvalue().splitlines()] == ["ERROR"]
  assert logs.on_vertex({"CLOUD_ML_PROJECT_ID": "p"}) and not logs.on_vertex({"HOME": "/root"})


@pytest.mark.slow
def test_a_terminal_shows_progress_bars_and_a_pipe_one_line_per_shard(synthetic_dir, tmp_path):
  args = [f"--source={synthetic_dir}", "--image_size=32", "--num_train_shards=2", "--num_eval_shards=1",
          "--workers=2"]
  shown = in_a_terminal("tfrecords.convert", *args, f"--output_dir={tmp_path / 'tty'}")
  bar = re.findall(r"converting: +100%\|.*\| 300/300 \[\d\d:\d\d<00:00, +[\d.]+ ?images/s\]", shown)
  assert bar, shown[-2000:]
  assert "train-00000-of-00002.tfrecord: " not in shown  # the bar replaces the per-shard lines
  piped = run_module("tfrecords.convert", *args, f"--output_dir={tmp_path / 'pipe'}")
  assert "converting:" not in piped.stderr and "\r" not in piped.stderr
  assert len(re.findall(r"-of-0000\d\.tfrecord: \d+ examples", piped.stderr)) == 4


def test_a_read_only_filesystem_mid_run_ends_in_one_line():
  """What a volume remounted read-only shows each writer (TensorBoard's event files: TensorFlow's
  error; the job's own files: Python's): one line, not a traceback."""
  import tensorflow as tf
  from tfrecords import cli
  for error in (tf.errors.FailedPreconditionError(None, None, "/run/logs/train/events.out: Read-only file system"),
                OSError(30, "Read-only file system", "/run/h.csv")):
    line = cli.one_line(error)
    assert line.startswith("a read-only filesystem refused a write (") and "Read-only file system" in line, line
  assert cli.one_line(RuntimeError("a bug")) is None  # its traceback shows
