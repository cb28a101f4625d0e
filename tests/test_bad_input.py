"""Bad input, third pass: each case ends in one line that names the file, flag or image, run in
process where it can be (a fresh Python that imports TensorFlow costs ~10 s)."""

import glob
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from helpers import REPO, copy_with_a_damaged_shard, wait_until
from job import artifacts, config as config_lib, evaluate, model as model_lib, train
from tfrecords import cli, convert, sources, split as split_lib


def test_a_truncated_zip_archive_is_named(small_copy, tmp_path):
  root = tmp_path / "zips"
  root.mkdir()
  shutil.copy(small_copy / "HAM10000_metadata.csv", root)
  for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
    shutil.make_archive(str(root / part), "zip", small_copy, part)
  archive = root / "HAM10000_images_part_1.zip"
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
  with pytest.raises(sources.SourceError, match=rf"{archive}: not a readable zip archive .* cut short"):
    sources.open_source(str(root))


def test_a_zip_member_with_a_bad_crc_is_skippable(small_copy, tmp_path):
  root = tmp_path / "zips"
  root.mkdir()
  shutil.copy(small_copy / "HAM10000_metadata.csv", root)
  for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
    with zipfile.ZipFile(root / f"{part}.zip", "w", zipfile.ZIP_STORED) as archive:
      for image in sorted((small_copy / part).iterdir()):
        archive.write(image, f"{part}/{image.name}")
  first = sorted((small_copy / "HAM10000_images_part_1").iterdir())[0]
  data = bytearray((root / "HAM10000_images_part_1.zip").read_bytes())
  at = data.find(first.read_bytes()[100:140])  # inside the first member's stored bytes
  data[at] ^= 0xFF
  (root / "HAM10000_images_part_1.zip").write_bytes(bytes(data))
  source = sources.open_source(str(root))
  settings = convert.Settings(source=str(root), num_train_shards=2, num_eval_shards=1)
  with pytest.raises(convert.ConversionError, match=rf"image {first.stem} .* cannot be decoded: Bad CRC-32"):
    convert.convert(source, str(tmp_path / "out"), settings, workers=1)
  manifest = convert.convert(source, str(tmp_path / "out2"), settings, workers=1, skip_bad_images=True)
  assert manifest["num_examples"] == len(source.metadata) - 1


def test_an_image_that_links_to_itself_is_named(small_copy):
  image = sorted((small_copy / "HAM10000_images_part_2").iterdir())[0]
  image.unlink()
  image.symlink_to(image)
  with pytest.raises(sources.SourceError, match=rf"image {image.stem}: {image} cannot be read"):
    sources.fingerprint(sources.open_source(str(small_copy)))


def test_a_source_too_small_to_split_says_so():
  metadata = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(6)], "image_id": [f"I{i}" for i in range(6)],
                           "dx": ["nv", "mel"] * 3})
  with pytest.raises(cli.UserError, match=r"6 lesions are too few to split 70/15/15 by lesion"):
    split_lib.split_by_lesion(metadata)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(small_copy):
  jpeg = sorted((small_copy / "HAM10000_images_part_1").iterdir())[0].read_bytes()
  with pytest.raises(convert.ImageTooLarge, match=r"600×450 pixels, more than the 269,999 allowed"):
    convert._encode_image(jpeg, 0, 95, max_pixels=600 * 450 - 1)  # pylint: disable=protected-access


def test_train_data_dir_without_its_split_table_is_named(shards_dir, tmp_path, source):
  data_dir = tmp_path / "shards"
  shutil.copytree(shards_dir, data_dir)
  os.remove(data_dir / "split.csv")
  with pytest.raises(convert.ConversionError, match=rf"--train_data_dir={data_dir} has no split.csv"):
    convert.check_not_in_training(source, str(data_dir))


@pytest.mark.parametrize("changes, named", [
    ({"image_size": 16}, "--image_size=16: the backbones halve an image five times, so they take 32 px or more"),
    ({"stage1_epochs": 0, "stage2_epochs": 0}, "--stage1_epochs=0 --stage2_epochs=0: nothing to train"),
])
def test_training_settings_that_cannot_work_are_named(changes, named):
  with pytest.raises(cli.UserError, match=named):
    config_lib.validated(config_lib.TrainConfig(data_dir="d", **changes))


def test_weights_that_are_not_a_weights_file_are_named(tmp_path):
  weights = tmp_path / "resnet50.h5"
  weights.write_text("not hdf5")
  with pytest.raises(cli.UserError, match=rf"--weights={weights} is not a ResNet50 no-top weights file \(--backbone=resnet50\)"):
    model_lib.build_backbone(str(weights))


def test_a_model_dir_that_is_a_file_and_an_empty_train_split_are_named(shards_dir, tmp_path):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(cli.UserError, match=rf"--model_dir={tmp_path / 'a_file'} is a file"):
    train.preflight(config_lib.TrainConfig(data_dir=shards_dir, model_dir=str(tmp_path / "a_file")))
  data_dir = tmp_path / "shards"
  shutil.copytree(shards_dir, data_dir)
  manifest = json.load(open(data_dir / "manifest.json"))
  manifest["splits"]["train"].update(num_examples=0, shards=[],
                                     class_counts={c: 0 for c in manifest["splits"]["train"]["class_counts"]})
  json.dump(manifest, open(data_dir / "manifest.json", "w"))
  with pytest.raises(cli.UserError, match=rf"--data_dir={data_dir}: the train split holds no images"):
    train.preflight(config_lib.TrainConfig(data_dir=str(data_dir), model_dir=str(tmp_path / "run")))


@pytest.mark.slow
def test_evaluation_names_a_damaged_test_shard_and_a_truncated_model(trained_run, shards_dir, tmp_path):
  data_dir, shard = copy_with_a_damaged_shard(shards_dir, tmp_path / "shards", "test")
  model_dir = tmp_path / "run"
  shutil.copytree(trained_run[1], model_dir)
  with pytest.raises(cli.UserError, match=rf"{shard} is damaged"):
    evaluate.evaluate(str(model_dir), str(data_dir), "test", output_dir=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  best = model_dir / "best_model.keras"
  best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
  with pytest.raises(cli.UserError, match=rf"{best} is not a readable Keras model .* cut short"):
    artifacts.load_best_model(str(model_dir))


@pytest.mark.slow
def test_evaluating_the_test_split_of_another_conversion_is_refused(trained_run, source, tmp_path):
  """Another --seed deals other lesions into test: many of them are the run's training images."""
  from tfrecords import features
  model_dir = tmp_path / "run"
  shutil.copytree(trained_run[1], model_dir)
  metrics = (model_dir / "metrics.json").read_bytes()
  other = str(tmp_path / "other_seed")
  convert.convert(source, other, convert.Settings(source=source.description, seed=7), workers=2)
  with pytest.raises(cli.UserError, match=rf"^--data_dir={other}: its test split is not the one the run in "
                     rf"--model_dir={model_dir} was trained beside \(--data_dir=.*another conversion's test images "
                     r"may be this run's training images.*Nothing was written\.$"):
    evaluate.evaluate(str(model_dir), other, "test")
  assert (model_dir / "metrics.json").read_bytes() == metrics and not (model_dir / "evaluation").exists()
  # A run recorded before split checksums: the whole manifest is compared.
  config = json.loads((model_dir / "run_config.json").read_text())
  del config["split_checksums"]
  (model_dir / "run_config.json").write_text(json.dumps(config))
  with pytest.raises(cli.UserError, match="its test split is not the one"):
    evaluate.evaluate(str(model_dir), other, "test")
  assert features.EXTERNAL not in features.SPLITS  # --split=external stays allowed


@pytest.mark.slow
def test_a_killed_export_leaves_the_served_folder_whole(trained_run, tmp_path):
  """SIGTERM while the SavedModel is being written: serving/1 keeps the export before it (TF
  Serving and upload_model read that folder), and the next export clears what was left."""
  serving = tmp_path / "serving"
  (serving / "1").mkdir(parents=True)
  (serving / "1" / "saved_model.pb").write_bytes(b"the export before")
  command = [sys.executable, "-m", "job.predict", f"--model_dir={trained_run[1]}", f"--export_dir={serving / '1'}"]
  export = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  wait_until(lambda: glob.glob(str(serving / ".1.tmp-*" / "variables" / "*")), export, "the export writing")
  export.send_signal(signal.SIGTERM)
  export.wait(timeout=60)
  assert (serving / "1" / "saved_model.pb").read_bytes() == b"the export before"
  assert os.listdir(serving / "1") == ["saved_model.pb"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(serving)) == ["1"]  # the killed export's temporary folder is gone
  assert {"saved_model.pb", "variables"} <= set(os.listdir(serving / "1"))
  assert tf.saved_model.load(str(serving / "1")).signatures["serving_default"] is not None


@pytest.mark.slow  # fresh TensorFlow processes
def test_the_synthetic_sets_least_size_is_the_one_its_help_says(tmp_path):
  from tfrecords import synthetic
  with pytest.raises(cli.UserError, match=r"--num_images=299: need at least 300"):
    synthetic.class_image_counts(synthetic.MIN_NUM_IMAGES - 1)
  result = subprocess.run([sys.executable, "-m", "tfrecords.synthetic", "--num_images=200",
                           f"--output_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "flag --num_images=200: 200 is not integer >= 300" in result.stderr
  assert not (tmp_path / "out").exists()
  helped = subprocess.run([sys.executable, "-m", "tfrecords.synthetic", "--helpfull"], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
  assert "Number of images (≥ 300," in helped


@pytest.mark.slow
def test_a_disk_that_fills_during_a_backup_ends_in_one_line_naming_the_file(shards_dir, tmp_path):
  """140 MB: room for the best model (95 MB at 32 px), none for the stage's backup of the same
  weights (.weights.h5). h5py used to leave that file open; HDF5's second flush at exit, with
  the disk still full, killed the process (exit 139) after the one line."""
  full = tmp_path / "full"
  full.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=140m", "tmpfs", str(full)], capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    result = subprocess.run([sys.executable, "-m", "job.train", f"--data_dir={shards_dir}", f"--model_dir={full / 'run'}",
                             "--weights=none", "--image_size=32", "--global_batch_size=16", "--stage1_epochs=1",
                             "--stage2_epochs=1", "--noserving"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the device of {full}/run/backup/stage1/latest.weights.h5: free some space and "
        "rerun (what was there before is kept)")
    assert (full / "run" / "best_model.keras").stat().st_size > 0  # the best model written before is whole
    assert not [f for f in os.listdir(full / "run" / "backup" / "stage1") if ".tmp-" in f]
  finally:
    subprocess.run(["umount", str(full)], check=False)


def test_a_csv_that_is_not_utf8_names_its_row(small_copy):
  path = small_copy / "HAM10000_metadata.csv"
  lines = path.read_bytes().split(b"\n")
  lines[6] = lines[6].replace(b"back", "b\u00e4ck".encode("latin-1"), 1) if b"back" in lines[6] else lines[6] + b"\xe4"
  path.write_bytes(b"\n".join(lines))
  with pytest.raises(sources.SourceError, match=rf"{path} row 7: not UTF-8 text .* re-save the file as UTF-8"):
    sources.open_source(str(small_copy))


def test_an_id_with_stray_spaces_is_shown_quoted_and_a_half_extracted_download_is_named(small_copy):
  path = small_copy / "HAM10000_metadata.csv"
  table = pd.read_csv(path, dtype=str)
  first = table.at[0, "image_id"]
  table.at[0, "image_id"] = first + " "
  table.to_csv(path, index=False)
  with pytest.raises(sources.SourceError, match=rf"row 2: image '{first} ' not found"):
    sources.open_source(str(small_copy))
  table.at[0, "image_id"] = first
  table.to_csv(path, index=False)
  shutil.make_archive(str(small_copy / "HAM10000_images_part_2"), "zip", small_copy, "HAM10000_images_part_2")
  shutil.rmtree(small_copy / "HAM10000_images_part_2")
  with pytest.raises(sources.SourceError, match=r"HAM10000_images_part_2.zip is still zipped beside extracted images"):
    sources.open_source(str(small_copy))


def test_predict_reads_bmp_and_names_an_empty_folder(tmp_path, monkeypatch):
  from PIL import Image
  from job import predict
  from tfrecords import features
  Image.fromarray(np.full((45, 60, 3), 120, np.uint8)).save(tmp_path / "lesion.bmp")
  image = features.decode_and_resize(open(tmp_path / "lesion.bmp", "rb").read(), 32, any_format=True)
  assert image.shape == (32, 32, 3) and int(image.numpy().mean()) == 120
  assert predict.expand_paths([str(tmp_path)]) == ([str(tmp_path / "lesion.bmp")], [])
  assert predict.expand_paths([str(tmp_path / "*.jpg")]) == ([], [])  # main() then names the glob


def png_declaring(width: int, height: int) -> bytes:
  """A valid PNG of width×height black pixels: a few hundred KB that decode to gigabytes."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  packer = zlib.compressobj(9)
  row = bytes(1 + 3 * width)  # filter byte, then RGB
  pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def tiny_inference(image_size=32):
  """An ensemble of one small classifier: what predict and the export need, without a run."""
  import keras
  from job import ensemble
  from tfrecords import features
  inputs = keras.Input((None, None, 3))
  outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
  member = ensemble.Member("tiny", keras.Model(inputs, outputs), image_size, features.CLASS_NAMES, None)
  return ensemble.Ensemble("tiny", (member,))


def test_every_header_says_the_image_size_before_anything_is_decoded():
  from PIL import Image
  from tfrecords import features
  pixels = np.zeros((45, 60, 3), np.uint8)
  encoded = {}
  for kind in ("PNG", "JPEG", "GIF", "BMP"):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, kind)
    encoded[kind] = out.getvalue()
  for kind, contents in encoded.items():
    assert features.declared_size(contents).numpy().tolist() == [45, 60], kind
  assert features.declared_size(png_declaring(16000, 12000)[:40]).numpy().tolist() == [12000, 16000]
  assert features.declared_size(b"not an image").numpy().tolist() == [0, 0]
  assert features.declared_size(b"").numpy().tolist() == [0, 0]


def test_predict_names_a_pixel_bomb_and_predicts_the_rest(tmp_path):
  from job import predict
  Image = pytest.importorskip("PIL.Image")
  Image.fromarray(np.full((45, 60, 3), 120, np.uint8)).save(tmp_path / "lesion.jpg")
  (tmp_path / "bomb.png").write_bytes(png_declaring(8000, 8000))  # 64 MP: 190 MB once decoded
  table, unreadable = predict.predict_files(tiny_inference(), [str(tmp_path / "bomb.png"), str(tmp_path / "lesion.jpg")])
  assert table["path"].tolist() == [str(tmp_path / "lesion.jpg")]
  assert unreadable == [f"{tmp_path / 'bomb.png'} (8000×8000 pixels, more than the 50,000,000 allowed "
                        "(HAM10000's are 600×450))"]


def test_the_serving_signature_refuses_a_pixel_bomb_and_serves_the_next_request(tmp_path):
  from job import predict
  Image = pytest.importorskip("PIL.Image")
  out = io.BytesIO()
  Image.fromarray(np.full((45, 60, 3), 120, np.uint8)).save(out, "JPEG")
  lesion = out.getvalue()
  predict.export_serving(tiny_inference(), str(tmp_path / "serving"))
  serve = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"]
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"the image declares more pixels than the 50,000,000 "
                     r"allowed; height, width:.*8000 8000"):
    serve(image_bytes=tf.constant([lesion, png_declaring(8000, 8000)]))
  assert serve(image_bytes=tf.constant([lesion]))["probabilities"].shape == (1, 7)


def test_predict_reads_regular_files_only_and_names_what_it_leaves(tmp_path):
  from job import predict
  Image = pytest.importorskip("PIL.Image")
  Image.fromarray(np.full((45, 60, 3), 120, np.uint8)).save(tmp_path / "lesion.jpg")
  os.mkfifo(tmp_path / "fifo.jpg")  # reading it would block forever
  odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, not UTF-8
  with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
    f.write((tmp_path / "lesion.jpg").read_bytes())
  (tmp_path / "empty.jpg").mkdir()  # a folder named like an image, holding none
  paths, not_read = predict.expand_paths([str(tmp_path), str(tmp_path / "empty.jpg"), str(tmp_path / "fifo.jpg")])
  assert paths == [str(tmp_path / "lesion.jpg")]
  assert not_read == [f"{tmp_path / 'caf'}\\xe9.jpg (its name is not UTF-8: rename it)",
                      f"{tmp_path / 'empty.jpg'} (not a regular file)",
                      f"{tmp_path / 'fifo.jpg'} (not a regular file)",
                      f"{tmp_path / 'empty.jpg'} (a folder without .jpg, .jpeg, .png, .gif, .bmp files)",
                      f"{tmp_path / 'fifo.jpg'} (not a regular file)"]
  assert odd not in paths


def test_a_rerun_removes_what_a_killed_write_left(tmp_path):
  from tfrecords import fileio
  (tmp_path / ".best_model.keras.tmp-abc123.keras").write_text("half")
  (tmp_path / "history.csv").write_text("kept")
  assert [os.path.basename(p) for p in fileio.remove_temporaries(str(tmp_path))] == [".best_model.keras.tmp-abc123.keras"]
  assert sorted(os.listdir(tmp_path)) == ["history.csv"]


def test_another_data_dir_is_named_by_its_folders(tmp_path):
  from job import run_state
  from tfrecords import fileio
  earlier = config_lib.TrainConfig(data_dir="/data/shards-a", model_dir=str(tmp_path / "run"))
  fileio.write_json(str(tmp_path / "run" / "checkpoints" / "stage1.json"),
                    {"fingerprint": run_state.fingerprint(earlier, "sha-a", 1)})
  fileio.write_json(str(tmp_path / "run" / "run_config.json"), {"flags": {"data_dir": "/data/shards-a"}})
  later = config_lib.TrainConfig(data_dir="/data/shards-b", model_dir=str(tmp_path / "run"))
  with pytest.raises(cli.UserError, match=r"the shards: --data_dir=/data/shards-a → /data/shards-b"):
    run_state.check(later, "sha-b", overwrite=False, chief=True)


def test_folders_to_create_on_a_read_only_filesystem_are_named(tmp_path, monkeypatch, source):
  import errno
  from job import run_state
  real_makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / "ro")):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, "makedirs", read_only)
  with pytest.raises(cli.UserError, match=rf"--model_dir={tmp_path / 'ro' / 'run'} is not writable: .*Read-only"):
    run_state.Lease(str(tmp_path / "ro" / "run"), {}).acquire()
  from tfrecords import fileio
  monkeypatch.setattr(fileio.tf.io.gfile, "makedirs", read_only)
  with pytest.raises(cli.UserError, match=rf"--output_dir={tmp_path / 'ro' / 'out'} is not writable: .*Read-only"):
    convert.convert(source, str(tmp_path / "ro" / "out"), convert.Settings(source="x"), workers=1)
