"""gs:// end to end against a real local server: convert, train, evaluate and predict.

The emulator and its TLS proxy (tests/gcs_emulator.py) run on 127.0.0.1; every
step runs as the user runs it, as a subprocess with the environment that points
TensorFlow at them. What lands in the bucket is checked with the
google-cloud-storage client, independently of TensorFlow.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from helpers import NUM_IMAGES, run_module
from gcs_emulator import GcsEmulator
from tfrecords import features, synthetic

TRAIN_FLAGS = ["--weights=none", "--image_size=32", "--global_batch_size=16", "--stage1_epochs=1",
               "--stage2_epochs=1", "--debug", "--strategy=one_device"]

pytestmark = pytest.mark.slow  # each test trains, or starts a server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  emulator = GcsEmulator(str(tmp_path_factory.mktemp("gcs")))
  yield emulator
  emulator.stop()


@pytest.fixture(scope="module")
def bucket(gcs, monkeypatch_module):
  monkeypatch_module.setenv("STORAGE_EMULATOR_HOST", gcs.env["STORAGE_EMULATOR_HOST"])
  client = storage.Client(project="test", credentials=AnonymousCredentials())
  return client.bucket(gcs.bucket)


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


@pytest.fixture(scope="module")
def raw_on_gcs(synthetic_dir, bucket, gcs):
  """The synthetic HAM10000 folder uploaded under gs://bucket/raw."""
  files = [os.path.join(synthetic_dir, "HAM10000_metadata.csv")]
  for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
    files += [os.path.join(synthetic_dir, part, name) for name in os.listdir(os.path.join(synthetic_dir, part))]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda f: bucket.blob("raw/" + os.path.relpath(f, synthetic_dir)).upload_from_filename(f),
                  files))
  return gcs.url("raw")


@pytest.fixture(scope="module")
def shards_on_gcs(raw_on_gcs, gcs):
  output = gcs.url("shards")
  run_module("tfrecords.convert", f"--source={raw_on_gcs}", f"--output_dir={output}", "--workers=2",
             "--num_train_shards=2", "--num_eval_shards=1", env=gcs.env)
  return output


@pytest.fixture(scope="module")
def trained_on_gcs(shards_on_gcs, gcs):
  model_dir = gcs.url("runs", "one")
  run_module("job.train", f"--data_dir={shards_on_gcs}", f"--model_dir={model_dir}", *TRAIN_FLAGS, env=gcs.env)
  return model_dir


def names(bucket, prefix):
  return {blob.name[len(prefix):] for blob in bucket.list_blobs(prefix=prefix)}


def test_converter_writes_shards_and_manifest_to_gcs(shards_on_gcs, bucket):
  written = names(bucket, "shards/")
  manifest = json.loads(bucket.blob("shards/manifest.json").download_as_bytes())
  shards = [shard["name"] for split in manifest["splits"].values() for shard in split["shards"]]
  assert len(shards) == 4 and set(shards) <= written
  assert {"label_map.json", "plan.json", "split.csv"} <= written
  assert not [name for name in written if "tmp" in name]  # no temporary files left behind
  assert json.loads(bucket.blob("shards/label_map.json").download_as_bytes()) == features.LABEL_MAP


def test_training_writes_every_artifact_to_gcs(trained_on_gcs, bucket):
  written = names(bucket, "runs/one/")
  for name in ("best_model.keras", "best_model.json", "label_map.json", "history.csv", "run_config.json",
               "metrics.json", "predictions.csv", "calibration.json", "confusion_matrix.png",
               "checkpoints/stage1.json", "checkpoints/stage2.weights.h5", "serving/1/saved_model.pb"):
    assert name in written, name
  assert any(name.startswith("logs/") and "tfevents" in name for name in written)
  history = pd.read_csv(bucket.blob("runs/one/history.csv").open("r"))
  assert history["stage"].tolist() == [1, 2]


def test_evaluate_and_predict_read_from_gcs(trained_on_gcs, shards_on_gcs, raw_on_gcs, gcs, bucket):
  manifest = json.loads(bucket.blob("shards/manifest.json").download_as_bytes())
  run_module("job.evaluate", f"--model_dir={trained_on_gcs}", f"--data_dir={shards_on_gcs}", env=gcs.env)
  metrics = json.loads(bucket.blob("runs/one/metrics.json").download_as_bytes())
  # The job evaluated a --debug subset; the evaluate command rewrites it with the whole test split.
  assert metrics["num_images"] == manifest["splits"]["test"]["num_examples"]
  image = next(name for name in names(bucket, "raw/HAM10000_images_part_1/"))
  output = gcs.url("predictions", "one.csv")
  result = run_module("job.predict", f"--model_dir={trained_on_gcs}", f"--output={output}",
                      f"{raw_on_gcs}/HAM10000_images_part_1/{image}", env=gcs.env)
  label = result.stdout.strip().splitlines()[-1].split("\t")[1]
  assert label in features.CLASS_NAMES
  table = pd.read_csv(bucket.blob("predictions/one.csv").open("r"))
  assert table["label"].tolist() == [label]


def test_unwritable_model_dir_fails_before_training(shards_on_gcs, gcs):
  result = run_module("job.train", f"--data_dir={shards_on_gcs}", "--model_dir=gs://no-such-bucket/run",
                      *TRAIN_FLAGS, env=gcs.env, check=False, timeout=300)
  assert result.returncode != 0
  assert "--model_dir=gs://no-such-bucket/run is not writable" in result.stderr
  assert "Epoch 1/" not in result.stdout + result.stderr


def test_converter_fails_fast_on_a_missing_bucket(raw_on_gcs, gcs):
  result = run_module("tfrecords.convert", f"--source={raw_on_gcs}", "--output_dir=gs://no-such-bucket/shards",
                      "--workers=1", env=gcs.env, check=False, timeout=300)
  assert result.returncode != 0 and "bucket gs://no-such-bucket does not exist" in result.stderr


def test_the_model_dir_lease_on_gcs_is_exclusive(bucket, gcs):
  """Through the GCS client's generation preconditions (the emulator honours them only with
  tests/gcs_emulator.py's fix: without it a second job would take the lease too)."""
  from job import run_state
  model_dir = gcs.url("leased")
  first = run_state.Lease(model_dir, {"run": 1}, seconds=60).acquire()
  assert bucket.get_blob("leased/.lease.json") is not None
  with pytest.raises(run_state.ModelDirInUse, match=f"--model_dir={model_dir} is in use by another job"):
    run_state.Lease(model_dir, {"run": 1}).acquire()
  first.release()
  assert bucket.get_blob("leased/.lease.json") is None
  second = run_state.Lease(model_dir, {"run": 1}).acquire()
  second.release()


def test_a_lease_replaced_on_gcs_mid_run_is_lost_and_forbids_further_writes(bucket, gcs):
  """Another job's lease object written over ours (a new generation): the heartbeat's
  precondition fails, and this job writes nothing more."""
  from job import callbacks as callbacks_lib, run_state
  from tfrecords import fileio
  model_dir = gcs.url("replaced")
  lease = run_state.Lease(model_dir, {"run": 1}, seconds=1.0).acquire()  # renewed every 0.2 s
  try:
    time.sleep(0.5)
    assert lease.lost is None  # renewals go through
    bucket.blob("replaced/.lease.json").upload_from_string(json.dumps({"holder": "vm-3 pid 9", "expires": 0}))
    deadline = time.time() + 10
    while lease.lost is None and time.time() < deadline:
      time.sleep(0.05)
    assert lease.lost == "it was taken over by vm-3 pid 9"
    with pytest.raises(run_state.LeaseLost, match=f"--model_dir={model_dir}: this job no longer holds its lease"):
      callbacks_lib.CheckWritesAllowed(model_dir).on_epoch_end(0)
    with pytest.raises(run_state.LeaseLost):
      fileio.write_json(f"{model_dir}/history.json", {})
  finally:
    lease.release()
  assert json.loads(bucket.blob("replaced/.lease.json").download_as_text())["holder"] == "vm-3 pid 9"  # theirs, kept
  assert names(bucket, "replaced/") == {".lease.json"}


def test_tfds_reads_the_shards_on_gcs(shards_on_gcs, gcs, bucket):
  assert {"dataset_info.json", "features.json"} <= names(bucket, "shards/")
  manifest = json.loads(bucket.blob("shards/manifest.json").download_as_bytes())
  script = ("import json, sys, tensorflow_datasets as tfds\n"
            "builder = tfds.builder_from_directory(sys.argv[1])\n"
            "example = next(iter(builder.as_dataset(split='test')))\n"
            "print(json.dumps({'splits': {n: s.num_examples for n, s in builder.info.splits.items()},\n"
            "                  'shape': example['image']['encoded'].shape.as_list(),\n"
            "                  'id': example['image']['source_id'].numpy().decode()}))\n")
  result = subprocess.run([sys.executable, "-c", script, shards_on_gcs], capture_output=True, text=True,
                          env={**os.environ, **gcs.env}, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  read = json.loads(result.stdout.strip().splitlines()[-1])
  assert read["splits"] == {name: split["num_examples"] for name, split in manifest["splits"].items()}
  assert read["shape"] == [450, 600, 3]
  split = pd.read_csv(bucket.blob("shards/split.csv").open("r")).set_index("image_id")["split"]
  assert split[read["id"]] == "test"


def test_isic_zip_archives_on_gcs_convert_to_the_kaggle_copys_split(shards_on_gcs, gcs, bucket, tmp_path):
  """The ISIC challenge's zips, read from gs:// (copied locally once), split as the Kaggle copy
  of the same images is."""
  root = synthetic.write_dataset(str(tmp_path / "isic"), num_images=NUM_IMAGES, seed=1, layout="isic2018_zips",
                                 workers=2)
  for name in os.listdir(root):
    bucket.blob(f"isic/{name}").upload_from_filename(os.path.join(root, name))
  output = gcs.url("isic_shards")
  run_module("tfrecords.convert", f"--source={gcs.url('isic')}", f"--output_dir={output}", "--workers=2",
             "--num_train_shards=2", "--num_eval_shards=1", env=gcs.env)
  manifest = json.loads(bucket.blob("isic_shards/manifest.json").download_as_bytes())
  assert manifest["layout"] == "isic2018:Training"

  def split_of(prefix):
    return pd.read_csv(bucket.blob(f"{prefix}/split.csv").open("r")).set_index("image_id").sort_index()

  assert split_of("isic_shards").equals(split_of("shards"))


def test_launch_vertex_reads_the_preflight_report_back_from_the_bucket(bucket, gcs):
  """job.preflight on Vertex AI writes AIP_MODEL_DIR/preflight.json; the launcher finds it below
  the base output directory it gave the job."""
  from launch import vertex
  client = storage.Client(project="test", credentials=AnonymousCredentials())
  assert vertex.read_preflight_report(gcs.url("preflight-run"), client) is None
  report = {"ok": True, "failed_check": None, "checks": []}
  bucket.blob("preflight-run/model/preflight.json").upload_from_string(json.dumps(report))
  assert vertex.read_preflight_report(gcs.url("preflight-run"), client) == report
