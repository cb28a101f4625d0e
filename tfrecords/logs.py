"""Where log records go: unchanged locally; at their true severity on Vertex AI.

Cloud Logging files whatever a Vertex AI container writes to stderr as ERROR,
and absl writes every record there, so a healthy job's log would be a wall of
red. On Vertex AI (its CLOUD_ML_* or AIP_* variables are set) every command
(cli.run) sends its records as JSON lines, one per record, with the `severity`
field Cloud Logging reads: INFO and WARNING to stdout, ERROR and above to
stderr. JSON rather than plain lines because the severity then survives as it
is (plain stdout lines all become INFO, warnings included), and a multi-line
record (a classification report, a traceback) stays one entry. Python
warnings are captured into the same logging. TensorFlow's C++ lines bypass
Python: the trainer image quiets them with TF_CPP_MIN_LOG_LEVEL (Dockerfile).
"""

import datetime
import json
import logging
import os
import sys

from absl import logging as absl_logging


def on_vertex(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  return any(name.startswith(("CLOUD_ML_", "AIP_")) for name in environ)


class CloudLoggingFormatter(logging.Formatter):
  """One JSON object per record, with the fields Cloud Logging's agent maps to its own."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
      message += "\n" + self.formatException(record.exc_info)
    message = message.rstrip("\n")  # a captured warning ends in one
    return json.dumps({
        "severity": record.levelname,  # Python's names are Cloud Logging's (WARNING, ERROR, ...)
        "message": message,
        "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
        "logging.googleapis.com/sourceLocation": {"file": record.pathname, "line": record.lineno,
                                                  "function": record.funcName},
        "logger": record.name,
    }, ensure_ascii=False)


class _Below(logging.Filter):
  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record):
    return record.levelno < self.level


def use_cloud_logging(stdout=None, stderr=None):
  """Replaces absl's stderr handler with the two JSON streams (module docstring)."""
  root = logging.getLogger()
  root.removeHandler(absl_logging.get_absl_handler())
  formatter = CloudLoggingFormatter()
  below_error = logging.StreamHandler(stdout or sys.stdout)
  below_error.addFilter(_Below(logging.ERROR))
  errors = logging.StreamHandler(stderr or sys.stderr)
  errors.setLevel(logging.ERROR)
  for handler in (below_error, errors):
    handler.setFormatter(formatter)
    root.addHandler(handler)
  root.setLevel(min(root.level or logging.INFO, logging.INFO))
  logging.captureWarnings(True)


def configure():
  """Called by cli.run once the flags are parsed."""
  if on_vertex():
    use_cloud_logging()
