"""The project's storage layer: file writes that work the same on local disk, gs:// and ram://.

Both packages use it (the converter and the job alike), which is why it lives in
tfrecords/, the bottom layer.

Libraries such as h5py and the csv module write local files only, and a
reader must never see a half-written file. Everything that writes an artifact
goes through `local_copy_then_upload` or `write_atomic`: write a local
temporary file, then move it (local) or copy it (remote, where an object
appears only when its upload completes) into place.
"""

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Callable

import tensorflow as tf

from tfrecords import cli


_UMASK = os.umask(0)
os.umask(_UMASK)


def is_local(path: str) -> bool:
  return "://" not in str(path)


def join(base: str, *parts: str) -> str:
  # os.path.join keeps "gs://bucket/a" intact, and gfile accepts "/" everywhere.
  return os.path.join(str(base), *parts)


_BUCKETS_FOUND: set[str] = set()


def makedirs(path: str):
  """tf.io.gfile.makedirs, but failing at once where the gs:// bucket is missing.

  TensorFlow's GCS filesystem retries creating a folder in a missing bucket
  forever (tensorflow/hub#272, still so in TF 2.21): a typo in a bucket name
  would hang the job instead of failing it. Each bucket is looked up once per
  process, not before every upload."""
  if path.startswith("gs://"):
    bucket = "gs://" + path[len("gs://"):].split("/", 1)[0]
    if bucket not in _BUCKETS_FOUND:
      if not tf.io.gfile.exists(bucket):
        raise FileNotFoundError(f"{path}: bucket {bucket} does not exist (or these credentials cannot see it)")
      _BUCKETS_FOUND.add(bucket)
  tf.io.gfile.makedirs(path)


# Checks every write of this process runs first, each raising to forbid it (job/run_state.py's
# lease, once lost, forbids any further write into the model_dir).
_WRITE_GUARDS: list[Callable[[str | None], None]] = []


def add_write_guard(guard: Callable[[str | None], None]):
  _WRITE_GUARDS.append(guard)


def remove_write_guard(guard: Callable[[str | None], None]):
  if guard in _WRITE_GUARDS:
    _WRITE_GUARDS.remove(guard)


def check_write(path: str | None):
  """Raises if a write guard forbids writing `path` (for writers that do not go through here);
  None: a check between writes, on what the guards already know (cheap enough for every step)."""
  for guard in list(_WRITE_GUARDS):
    guard(path)


@contextlib.contextmanager
def local_copy_then_upload(path: str, suffix: str = ""):
  """Yields a local temporary path; on success it becomes `path`, atomically."""
  check_write(path)
  directory = os.path.dirname(path) if is_local(path) else None
  if directory:
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(path)[1], dir=directory,
                             prefix=f".{os.path.basename(path)}.tmp-")
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an artifact is as readable as any file
  try:
    try:
      yield tmp
    except (OSError, tf.errors.ResourceExhaustedError) as e:
      if cli.is_disk_full(e):  # Python's and h5py's errors name no file: say which
        _release_a_full_write(tmp)
        raise cli.UserError(f"no space left on the device of {path}: free some space and rerun (what was "
                            "there before is kept)") from None
      raise
    if directory is not None:
      os.replace(tmp, path)
    else:
      makedirs(os.path.dirname(path))
      if path.startswith("ram://") and tf.io.gfile.exists(path):
        # TensorFlow's ram:// filesystem (TF 2.21) appends to an existing file rather
        # than replacing it. GCS replaces an object whole, so only ram:// needs this.
        tf.io.gfile.remove(path)
      tf.io.gfile.copy(tmp, path, overwrite=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def folder_written_whole(path: str, last: tuple[str, ...] = ()):
  """Yields a local temporary folder; on success its content becomes the folder `path`. Locally
  by renames (an older `path` stays whole until the new one replaces it); elsewhere by an upload
  of its files, those named in `last` after the rest (a reader that waits for them, as TF
  Serving waits for saved_model.pb, never sees half a folder). A killed write leaves only a
  `.NAME.tmp-*` folder, which remove_temporaries clears."""
  check_write(path)
  parent = os.path.dirname(path.rstrip("/")) if is_local(path) else None
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path.rstrip('/'))}.tmp-")
  try:
    yield tmp
    if parent is not None:
      old = None
      if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path.rstrip('/'))}.tmp-old-")
        os.rename(path, os.path.join(old, "replaced"))
      os.rename(tmp, path)
      if old:
        shutil.rmtree(old)
    else:
      remove_if_exists(path)
      files = sorted((os.path.relpath(os.path.join(d, n), tmp) for d, _, names in os.walk(tmp) for n in names),
                     key=lambda relative: os.path.basename(relative) in last)
      for relative in files:
        makedirs(join(path, os.path.dirname(relative)))
        tf.io.gfile.copy(os.path.join(tmp, relative), join(path, relative), overwrite=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def _release_a_full_write(tmp: str):
  """Frees the space a write that filled the disk took, before anything else touches the file. A
  Keras .h5 save that failed for want of space leaves HDF5 holding the file open with data still
  to flush; at the interpreter's exit HDF5 flushes it again, fails, and the process dies with a
  segmentation fault after the job's one-line error. Emptied, the file gives that flush room."""
  try:
    os.truncate(tmp, 0)
  except OSError:
    pass
  gc.collect()  # h5py's handles of the file go now, their flush with room to succeed


def remove_temporaries(folder: str) -> list[str]:
  """Removes what local_copy_then_upload and folder_written_whole leave when their process is
  killed mid-write (`.NAME.tmp-*`, local folders only: elsewhere the temporary is local)."""
  if not is_local(folder) or not os.path.isdir(folder):
    return []
  left = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".") and ".tmp-" in n]
  for path in left:
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return left


def write_atomic(path: str, data: bytes | str):
  mode = "wb" if isinstance(data, bytes) else "w"
  with local_copy_then_upload(path) as tmp:
    with open(tmp, mode) as f:
      f.write(data)


def write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: str):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def copy_to_local(path: str, directory: str | None = None) -> str:
  """A local copy of `path` (h5py and zipfile open local files only); local paths pass through."""
  if is_local(path):
    return path
  directory = directory or tempfile.mkdtemp(prefix="ham10000-")
  local = os.path.join(directory, f"{uuid.uuid4().hex}-{os.path.basename(path)}")
  tf.io.gfile.copy(path, local, overwrite=True)
  return local


def check_writable(folder: str, flag: str):
  """Makes `folder` if needed; stops at once, naming the flag, where a probe object cannot be
  written there, read back as written, and deleted (a read-only filesystem, no permission, a
  file in the way)."""
  probe = join(folder, ".write_probe")
  try:
    makedirs(folder)
    write_atomic(probe, "ok")
    with tf.io.gfile.GFile(probe) as f:
      read_back = f.read()
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise cli.UserError(f"{flag}={folder} is not writable: {str(e).splitlines()[0][:200]}") from e
  if read_back != "ok":
    raise cli.UserError(f"{flag}={folder}: a probe object read back differs from what was written")


def remove_if_exists(path: str):
  if tf.io.gfile.exists(path):
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)
