"""How every command starts: flags, then `main`, with user errors as one line.

The project's entry points (`tfrecords.convert`, `job.train`, `job.evaluate`,
`job.predict`, `job.demo`, `launch.*`) all start through `run`, which lives
here, beside the storage layer (tfrecords/fileio.py), because every package may
import `tfrecords` and `tfrecords` imports no other package of the project:

  def define_flags(): ...        # the command's own flags, defined once
  def main(argv): ...
  if __name__ == "__main__":
    cli.run(main, define_flags)

A `UserError` (or a missing or unreadable file) ends the command with one line
on stderr that names the flag or path and what to do, and exit status 1;
`--traceback` shows the full traceback instead. The command's flags are listed
by `--help` (absl shows only a main module's own flags there otherwise).
"""

import errno
import sys
from typing import Callable

from absl import app, flags

from tfrecords import logs

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 1


class UserError(ValueError):
  """Bad input the user can fix: a flag, a file or a folder. The message names it."""


# Errors that are the user's to fix. A missing or unreadable file names its path.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_disk_full(error: BaseException) -> bool:
  """Python's OSError and TensorFlow's ResourceExhaustedError alike."""
  return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def is_read_only(error: BaseException) -> bool:
  """A write refused by a read-only filesystem (a volume remounted read-only mid-run), whichever
  writer met it: Python's, h5py's, or TensorFlow's (the TensorBoard callback's event files)."""
  return getattr(error, "errno", None) == errno.EROFS or "Read-only file system" in str(error)


def one_line(error: Exception) -> str | None:
  """What a command prints of an error the user can act on, or None for a bug (its traceback)."""
  if not (isinstance(error, USER_ERRORS) or is_disk_full(error) or is_read_only(error)):
    return None
  message = str(error).strip() or type(error).__name__
  if isinstance(error, UserError):
    return message
  if is_disk_full(error):
    return f"no space left on device ({message.splitlines()[0][:300]}): free some space and rerun"
  if is_read_only(error):
    return (f"a read-only filesystem refused a write ({message.splitlines()[0][:300]}): make the folder "
            "writable again and rerun (a training run resumes where it stopped)")
  return message


def define_common_flags():
  if "traceback" not in FLAGS:
    flags.DEFINE_bool("traceback", False, "On an error, show the full traceback, not one line.")


def _list_in_help(names: list[str]):
  """Makes these flags key flags of the main module, so that `--help` lists them."""
  for name in names:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def _drop_tensorflows_test_hook():
  """`import tensorflow` imports its distribute test utilities (tensorflow/python/distribute/
  combinations.py), which register an absl init callback that lists the physical GPUs, and so
  starts TensorFlow's GPU runtime, as soon as app.run has parsed the flags: for their test
  harness only. The job starts the runtime itself, after job/accelerators.py's guard has tried
  it in a child process (a missing cuDNN sub-library aborts the process that starts it)."""
  callbacks = getattr(app, "_init_callbacks", None)  # absl-py 2.x
  for callback in list(callbacks or ()):
    if getattr(callback, "__module__", "") == "tensorflow.python.distribute.combinations":
      callbacks.remove(callback)


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None] | None = None):
  """Defines the command's flags and runs `main` through absl, user errors as one line."""
  _drop_tensorflows_test_hook()
  before = set(FLAGS)
  if define_flags:
    define_flags()
  define_common_flags()
  _list_in_help([name for name in FLAGS if name not in before])

  def guarded_main(argv):
    logs.configure()  # on Vertex AI, records at their true severity (tfrecords/logs.py)
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      line = None if FLAGS.traceback else one_line(e)
      if line is None:
        raise
      print(f"error: {line}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(guarded_main)
