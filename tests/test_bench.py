"""The benchmarks run and print their figures (smoke size). Their goals are measured, not asserted."""

import json
import os

import pytest

from helpers import run_module

pytestmark = pytest.mark.slow  # each test trains, or starts a server


def last_json_line(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bench"))


def test_bench_pipeline(work_dir):
  figures = last_json_line(run_module("bench.pipeline", f"--work_dir={work_dir}", "--num_images=300",
                                      "--image_size=32", "--cached_epochs=1"))
  for key in ("seed_img_s", "first_epoch_img_s", "cached_img_s", "first_epoch_vs_seed", "cached_vs_seed"):
    assert figures[key] > 0, key
  assert figures["cached_vs_seed"] == pytest.approx(figures["cached_img_s"] / figures["seed_img_s"], rel=0.01)


def test_bench_convert(work_dir):
  figures = last_json_line(run_module("bench.convert", f"--work_dir={work_dir}", "--num_images=300"))
  assert figures["one_worker_img_s"] > 0 and figures["two_workers_img_s"] > 0
  assert figures["speedup_2_vs_1"] == pytest.approx(
      figures["two_workers_img_s"] / figures["one_worker_img_s"], rel=0.01)


def test_bench_train(work_dir):
  figures = last_json_line(run_module("bench.train", f"--work_dir={work_dir}", "--num_images=300",
                                      "--image_size=32", "--batch_size=16", "--epochs=1", "--rounds=1",
                                      "--novariants"))
  assert figures["job_img_s"] > 0 and figures["bound_img_s"] > 0 and figures["job_vs_bound"] > 0
  assert figures["deterministic_vs_float32"] > 0


def test_bench_gpu_smoke(work_dir):
  figures = last_json_line(run_module("bench.gpu", "--smoke", f"--work_dir={work_dir}", "--epochs=1"))
  row = figures["results"][0]
  assert row["job_img_s"] > 0 and 0 <= row["input_wait_share"] <= 1


def test_bench_lr_scaling(work_dir):
  figures = last_json_line(run_module("bench.lr_scaling", f"--work_dir={work_dir}", "--num_images=300",
                                      "--image_size=32", "--small_batch=8", "--large_batch=32", "--seeds=1",
                                      "--stage1_epochs=1", "--stage2_epochs=0"))
  assert [(r["global_batch_size"], r["lr_scaling"]) for r in figures["results"]] == [
      (8, "none"), (32, "none"), (32, "sqrt")]
  for row in figures["results"]:
    assert 0 <= row["val_balanced_accuracy_mean"] <= 1 and len(row["val_balanced_accuracy"]) == 1


def test_bench_cross_validation(work_dir):
  figures = last_json_line(run_module("bench.cross_validation", f"--work_dir={work_dir}", "--num_images=300",
                                      "--image_size=32", "--members=2", "--folds=3", "--rounds=1",
                                      "--cached_epochs=1"))
  shards = os.path.join(work_dir, "shards_300_0_32_16")
  assert figures["test_images"] == json.load(open(os.path.join(shards, "manifest.json")))["splits"]["test"][
      "num_examples"]
  assert (figures["members"], figures["folds"]) == (2, 3)
  assert os.path.isdir(shards + "_folds3")
  for key in ("flip_vs_none", "dihedral_vs_none", "ensemble_vs_one", "folded_vs_today_first_epoch",
              "folded_vs_today_cached"):
    assert figures[key] > 0, key


def test_bench_backbones(work_dir):
  figures = last_json_line(run_module("bench.backbones", f"--work_dir={work_dir}", "--num_images=300",
                                      "--image_size=32", "--backbones=efficientnet_b0", "--steps=2", "--epochs=1",
                                      "--rounds=1"))
  assert set(figures) == {"bench", "image_size", "batch_size", "efficientnet_b0_step_vs_resnet50"}
  assert figures["efficientnet_b0_step_vs_resnet50"] > 0
