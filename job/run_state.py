"""Which run a --model_dir holds (its fingerprint), and which job holds it now (its lease).

A model_dir holds one run. Each stage's marker, the backups and the best
model's record carry the fingerprint of the settings that shaped that stage and
the ones before it. A command whose settings differ stops before it builds the
model or writes anything, and names each differing setting; `--overwrite`
clears that other run's state instead. The same command resumes; settings that
do not change what is learned (epoch counts, patience, strategy, precision,
XLA, cache, steps per execution, backups, export) may change between restarts.

Two jobs at once into one model_dir would mix their artifacts, so the chief
holds a lease on it while it runs (`Lease`): `.lease.json`, created only if
absent (locally an exclusive create; on gs:// an object created with a
generation precondition, through the GCS client, which TensorFlow's filesystem
cannot do; elsewhere, such as ram://, a plain write: best effort, and logged as
such). A heartbeat renews it; a lease past its expiry (a killed job) is taken
over, as is one whose process on this host has ended (a job killed and started
again on the same machine), and the same Vertex AI job restarting (same
CLOUD_ML_JOB_ID and fingerprint) takes its own lease over at once. Non-chief
workers take none.
"""

import json
import os
import socket
import threading
import time
import uuid

import tensorflow as tf
from absl import logging

from job import artifacts, backbones, config as config_lib
from tfrecords import cli, fileio

# What shapes stage 1, and stage 2 on top of it. --jit_compile too: the augmentation's stateless
# draws differ compiled and not, so a run resumed with the other setting draws another stream.
STAGE1_SETTINGS = ("backbone", "image_size", "weights", "seed", "global_batch_size", "stage1_lr", "stage2_lr",
                   "lr_scaling", "base_batch_size", "warmup_epochs", "class_weights", "monitor", "debug",
                   "jit_compile", "fold", "augmentation", "label_smoothing", "mixing", "metadata",
                   "color_constancy")
STAGE2_SETTINGS = STAGE1_SETTINGS + ("fine_tune_layers",)
# Settings that records written before they were fingerprinted do not hold: not a difference.
ADDED_LATER = ("jit_compile",)
# Settings that such records held implicitly: the value they were written with.
IMPLIED_BEFORE = {"backbone": backbones.DEFAULT, "augmentation": "seed", "label_smoothing": 0.0, "mixing": None,
                  "metadata": [], "color_constancy": "none"}


def fingerprint(cfg: config_lib.TrainConfig, manifest_sha256: str, stage: int) -> dict:
  """The settings that shaped `stage` (and the stages before it), with the shards' manifest;
  the layers stage 2 fine-tunes as a count, the backbone's default resolved."""
  names = STAGE1_SETTINGS if stage == 1 else STAGE2_SETTINGS
  derived = {"augmentation": augmentation, "mixing": config_lib.mixing,
             "metadata": lambda cfg: list(cfg.metadata)}  # as JSON keeps it
  values = {name: derived[name](cfg) if name in derived else getattr(cfg, name) for name in names}
  if "fine_tune_layers" in values and values["fine_tune_layers"] is None:
    values["fine_tune_layers"] = backbones.get(cfg.backbone).fine_tune_layers
  return {"manifest_sha256": manifest_sha256, **values}


def augmentation(cfg: config_lib.TrainConfig):
  """The augmentation as it shapes a run: "seed", or the dermoscopy preset with its strengths
  (those mean nothing to the seed's)."""
  if cfg.augment == "seed":
    return "seed"
  return {"preset": cfg.augment, **{name: getattr(cfg, f"aug_{name}") for name in config_lib.AUGMENT_STRENGTHS}}


def differences(recorded: dict, current: dict) -> list[str]:
  """'name: old → new' for each setting the two fingerprints disagree on."""
  recorded = {**IMPLIED_BEFORE, **recorded}
  return [f"{name}: {recorded.get(name)!r} → {current.get(name)!r}" for name in current
          if recorded.get(name) != current.get(name) and (name in recorded or name not in ADDED_LATER)]


def records(cfg: config_lib.TrainConfig) -> list[tuple[str, int, dict | None]]:
  """(path, stage, recorded fingerprint) of every record of a run in the model_dir."""
  checkpoints = fileio.join(cfg.checkpoint_root, artifacts.CHECKPOINTS_DIR)
  backups = fileio.join(cfg.checkpoint_root, artifacts.BACKUP_DIR)
  found = []
  for stage in (1, 2):
    for path in (fileio.join(checkpoints, f"stage{stage}.json"),
                 fileio.join(backups, f"stage{stage}", "training_metadata.json")):
      if tf.io.gfile.exists(path):
        found.append((path, stage, fileio.read_json(path).get("fingerprint")))
  best = artifacts.path(cfg.model_dir, artifacts.BEST_MODEL_STATE_FILE)
  if tf.io.gfile.exists(best):
    state = fileio.read_json(best)
    found.append((best, state.get("stage", 1), state.get("fingerprint")))
  return found


def check(cfg: config_lib.TrainConfig, manifest_sha256: str, overwrite: bool, chief: bool):
  """Stops, naming the differences, when the model_dir holds another run (clears it under
  --overwrite, on the chief; the other workers then ignore its records, which differ)."""
  conflicts = {}
  for path, stage, recorded in records(cfg):
    current = fingerprint(cfg, manifest_sha256, stage)
    changed = ["(no fingerprint: written by an older version)"] if recorded is None else differences(
        recorded, current)
    if changed:
      conflicts.setdefault(tuple(changed), []).append(path)
  if not conflicts:
    return
  changed = sorted({line for lines in conflicts for line in lines})
  recorded_run = artifacts.path(cfg.model_dir, artifacts.RUN_CONFIG_FILE)
  if tf.io.gfile.exists(recorded_run):  # the shards by their folders, not by two checksums
    recorded_data = fileio.read_json(recorded_run).get("flags", {}).get("data_dir")
    changed = [f"the shards: --data_dir={recorded_data} → {cfg.data_dir}" if line.startswith("manifest_sha256:")
               and recorded_data else line for line in changed]
  if overwrite:
    if chief:
      logging.warning("--overwrite: clearing the other run in %s (%s)", cfg.model_dir, "; ".join(changed))
      clear(cfg)
    return
  paths = sorted(path for found in conflicts.values() for path in found)
  raise cli.UserError(f"--model_dir={cfg.model_dir} holds another run ({'; '.join(changed)}; recorded in "
                      f"{paths[0]}{' and others' if len(paths) > 1 else ''}). Give a new --model_dir, "
                      "or --overwrite to clear that run")


def clear(cfg: config_lib.TrainConfig):
  """Removes a run's state and artifacts: checkpoints, backups (under --checkpoint_dir too),
  TensorBoard logs and every artifact file."""
  for path in (fileio.join(cfg.checkpoint_root, artifacts.CHECKPOINTS_DIR),
               fileio.join(cfg.checkpoint_root, artifacts.BACKUP_DIR), cfg.logs_dir,
               *(artifacts.path(cfg.model_dir, name) for name in artifacts.RUN_FILES)):
    fileio.remove_if_exists(path)


LEASE_FILE = ".lease.json"
LEASE_SECONDS = 300.0  # a job silent this long (killed) no longer holds the model_dir


class _LocalStore:
  """The lease file on local disk: exclusive create, atomic replace.

  Every store's create and replace return the token of what they wrote (None when refused):
  a write's token is the one to hold, whoever writes next."""

  def __init__(self, path):
    self.path = path

  def create(self, text):
    """Exclusive and whole: the record is written to a file of its own, then linked into place
    (link fails where the lease exists), so no job ever sees a lease created but not yet written."""
    tmp, token = self._written(text)
    try:
      os.link(tmp, self.path)
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)
    return token

  def _written(self, text):
    tmp = f"{self.path}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    return tmp, os.stat(tmp).st_mtime_ns  # the link and the rename keep the file, and its mtime

  def read(self):
    try:
      with open(self.path) as f:
        return f.read(), os.stat(self.path).st_mtime_ns
    except FileNotFoundError:
      return None, None

  def replace(self, text, token):
    if self.read()[1] != token:
      return None
    tmp, new_token = self._written(text)
    os.replace(tmp, self.path)
    return new_token

  def delete(self, token):
    if self.read()[1] == token:
      os.remove(self.path)


class _GcsStore:
  """The lease as a gs:// object, created and replaced with generation preconditions."""

  def __init__(self, path):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    bucket, _, name = path[len("gs://"):].partition("/")
    self.blob = storage.Client().bucket(bucket).blob(name)
    self.exists = exceptions.PreconditionFailed
    self.conflict = (exceptions.PreconditionFailed, exceptions.NotFound)

  def create(self, text):
    try:
      self.blob.upload_from_string(text, if_generation_match=0)
      return self.blob.generation  # set from the upload's response
    except self.exists:
      return None

  def read(self):
    try:
      self.blob.reload()
      generation = self.blob.generation  # before the download, which may reset it from headers
      return self.blob.download_as_text(if_generation_match=generation), generation
    except self.conflict:
      return None, None

  def replace(self, text, token):
    try:
      self.blob.upload_from_string(text, if_generation_match=token)
      return self.blob.generation
    except self.conflict:
      return None

  def delete(self, token):
    try:
      self.blob.delete(if_generation_match=token)
    except self.conflict:
      pass


class _BestEffortStore:
  """Filesystems without an exclusive create (ram://, …): check, then write."""

  def __init__(self, path):
    self.path = path

  def create(self, text):
    if tf.io.gfile.exists(self.path):
      return None
    fileio.write_atomic(self.path, text)
    return text

  def read(self):
    if not tf.io.gfile.exists(self.path):
      return None, None
    with tf.io.gfile.GFile(self.path) as f:
      text = f.read()
    return text, text

  def replace(self, text, token):
    if self.read()[1] != token:
      return None
    fileio.write_atomic(self.path, text)
    return text

  def delete(self, token):
    if self.read()[1] == token:
      tf.io.gfile.remove(self.path)


def _store(path: str):
  if fileio.is_local(path):
    return _LocalStore(path)
  if path.startswith("gs://"):
    return _GcsStore(path)
  logging.info("%s: this filesystem has no exclusive create; the model_dir's lease is best effort", path)
  return _BestEffortStore(path)


def process_alive(pid) -> bool:
  """Whether process `pid` of this host still runs (a job killed here leaves its lease, and its
  disk cache, behind)."""
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, TypeError, ValueError):
    return False
  except PermissionError:
    return True
  return True


class ModelDirInUse(cli.UserError):
  """Another job holds the model_dir."""


class LeaseLost(cli.UserError):
  """This job no longer holds its model_dir: it writes nothing more there."""


class Lease:
  """The chief's hold on a model_dir while it runs; see the module docstring.

  The heartbeat renews it every fifth of its time, retrying a failed renewal (a network
  error, a 5xx) with backoff. It is lost when another job takes it over, or when no renewal
  has succeeded for its whole time (others may then take it): from then on every write of
  this process through tfrecords.fileio, and the callbacks' checks, stop the job in one line
  before anything more is written (`check`)."""

  def __init__(self, model_dir: str, fingerprint: dict, seconds: float = LEASE_SECONDS):
    self.model_dir, self.seconds = model_dir, seconds
    self.path = fileio.join(model_dir, LEASE_FILE)
    self.job_id = os.environ.get("CLOUD_ML_JOB_ID")
    self.fingerprint = json.dumps(fingerprint, sort_keys=True)
    self.holder = f"{socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
    self._token, self._stop = None, threading.Event()
    self._store = self._thread = None
    self.lost: str | None = None  # why, once lost

  def _record(self) -> str:
    return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "job_id": self.job_id, "fingerprint": self.fingerprint,
                       "expires": time.time() + self.seconds})

  def acquire(self) -> "Lease":
    self._store = _store(self.path)
    try:
      if fileio.is_local(self.model_dir):  # object stores need no folder
        os.makedirs(self.model_dir, exist_ok=True)
      self._token = self._store.create(self._record())
    except Exception as e:  # pylint: disable=broad-except  (permissions, a missing bucket: any store's)
      raise cli.UserError(f"--model_dir={self.model_dir} is not writable: {str(e).splitlines()[0][:200]}") from e
    if self._token is None:
      text, token = self._store.read()
      current = {} if text is None else self._parse(text)
      same_job = self.job_id is not None and current.get("job_id") == self.job_id and (
          current.get("fingerprint") == self.fingerprint)
      expired = current.get("expires", 0) < time.time()
      dead = current.get("host") == socket.gethostname() and not process_alive(current.get("pid"))
      if text is None:  # released in the meantime
        self._token = self._store.create(self._record())
      elif same_job or expired or dead:
        self._token = self._store.replace(self._record(), token)
      if self._token is None:
        expires = time.localtime(current.get("expires", 0))
        until = time.strftime("%H:%M:%S" if expires[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", expires)
        raise ModelDirInUse(f"--model_dir={self.model_dir} is in use by another job ({current.get('holder')}"
                            f"{', Vertex AI job ' + current['job_id'] if current.get('job_id') else ''}; "
                            f"its lease runs to {until} unless renewed). Wait for it to end, or give "
                            "another --model_dir")
      logging.info("took over the lease on %s from %s (%s)", self.model_dir, current.get("holder"),
                   "the same Vertex AI job, restarted" if same_job else
                   "its process on this host has ended" if dead else "it had expired")
    # The heartbeat's renewal and a write's look at the lease, one at a time. Reentrant: on a
    # filesystem without exclusive create the renewal itself is a write through fileio, whose
    # guard (self.check) takes the lock again in the same thread.
    self._lock = threading.RLock()
    fileio.add_write_guard(self.check)
    self._thread = threading.Thread(target=self._heartbeat, name="model-dir-lease", daemon=True)
    self._thread.start()
    return self

  def _parse(self, text: str) -> dict:
    """A lease record, or a one-line error naming the file: not JSON, not an object, or a field
    of the wrong kind (an edited or foreign file)."""
    try:
      record, parsed = json.loads(text), True
    except json.JSONDecodeError:
      record, parsed = None, False
    if not isinstance(record, dict) or not isinstance(record.get("expires", 0), (int, float)) or isinstance(
        record.get("expires"), bool) or not isinstance(record.get("pid", 0), (int, type(None))):
      what = "empty" if not text.strip() else "not a lease record" if parsed else "not JSON"
      raise cli.UserError(f"{self.path} is not a lease this job wrote ({what}): if no job is running into "
                          "--model_dir, delete it and rerun")
    return record

  def _holder(self, text: str | None) -> str | None:
    try:
      record = json.loads(text) if text else None
    except json.JSONDecodeError:
      return None
    return record.get("holder") if isinstance(record, dict) else None

  def _still_ours(self) -> bool:
    """Whether the lease is this job's: the token it last wrote, or a record of its own that was
    touched or edited since (then adopted). Another holder's record means a takeover."""
    text, token = self._store.read()
    if token == self._token:
      return True
    if self._holder(text) == self.holder:
      self._token = token
      return True
    self._lose(f"it was taken over by {self._holder(text) or 'another job'}")
    return False

  def _heartbeat(self):
    renewed = time.time()
    while not self._stop.wait(self.seconds / 5):
      delay = 1.0
      while True:
        try:
          with self._lock:
            # The token the write itself returns: one read back after it could be another
            # job's, written in between, and adopting it would hide the takeover.
            token = self._store.replace(self._record(), self._token)
            if token is not None:
              self._token, renewed = token, time.time()
            else:
              text, token = self._store.read()
              if token == self._token or self._holder(text) != self.holder:
                self._lose(f"it was taken over by {self._holder(text) or 'another job'}")
                return
              self._token = token  # our own record, touched or edited: renew it now
              continue
          break
        except Exception as e:  # pylint: disable=broad-except  (transient: the network, a 5xx)
          if time.time() - renewed >= self.seconds:
            self._lose(f"it could not be renewed for {self.seconds:g} s, its whole term ({str(e)[:200]})")
            return
          logging.warning("renewing the lease on %s failed (%s); retrying in %.0f s", self.model_dir,
                          str(e).splitlines()[0][:200] if str(e) else type(e).__name__, delay)
          if self._stop.wait(delay):
            return
          delay = min(2 * delay, self.seconds / 10)

  def _lose(self, why: str):
    self.lost = why
    logging.error("the lease on %s is lost: %s; this job writes nothing more there", self.model_dir, why)

  def check(self, path: str | None = None):
    """Raises LeaseLost once the lease is lost (a write guard: `path` is what was to be written).
    Before a write it looks at the lease itself: a job that took it over (its term edited into
    the past, say) is seen now, not at the next renewal."""
    if (path is not None and path != self.path and not self.lost and self._thread is not None
        and not self._stop.is_set()):  # the lease's own renewal has just looked at it
      try:
        with self._lock:
          self._still_ours()
      except Exception:  # pylint: disable=broad-except  (transient: the heartbeat's retries decide)
        pass
    if self.lost:
      target = f" (it was about to write {path})" if path else ""
      raise LeaseLost(f"--model_dir={self.model_dir}: this job no longer holds its lease: {self.lost}; it "
                      f"stopped before writing anything more{target}")

  def release(self):
    fileio.remove_write_guard(self.check)
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    if self._token is not None and not self.lost:
      try:
        self._store.delete(self._token)
      except Exception as e:  # pylint: disable=broad-except  (the job's own error matters more)
        logging.warning("releasing the lease on %s failed: %s", self.model_dir, str(e)[:200])
      self._token = None
