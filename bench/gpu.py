r"""Training throughput on a GPU: mixed_float16, XLA on and off, augmentation on the
accelerator or on the host, global batch 64/128/256.

  python -m bench.gpu                 # on a machine with a GPU
  python -m bench.gpu --smoke         # a tiny CPU run that checks the benchmark itself works

For each configuration: images/s through the job (pipeline + fit), images/s of
the same compiled model fed one in-memory batch (the bound), and the share of
step time spent waiting for input, 1 − job/bound, and whether XLA was in effect.
"augmentation": "accelerator" is the job's way (inside the compiled step,
job/augment.py); "host" runs the same augmentation in the tf.data pipeline on
the CPU and trains the model without it, the usual way. The summary gives
XLA ÷ no XLA and accelerator ÷ host per batch size. Absolute figures hold on a
GPU; on a CPU only the ratios mean anything.
"""


import numpy as np
import tensorflow as tf
from absl import flags, logging

from bench import common
from bench.timing import build, images_per_second
from job import config as config_lib, data, model as model_lib
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_bool("smoke", False, "Tiny CPU run: 32 px, batch 8, float32, one epoch.")
  flags.DEFINE_integer("num_images", 2000, "Synthetic images (converted once at 256 px).")
  flags.DEFINE_integer("epochs", 3, "Timed epochs per measurement, after a warm-up epoch.")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def augment_on_host(dataset: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """The job's augmentation run in the input pipeline on the CPU (uint8 in and out)."""
  layer = model_lib.augmentation(seed)

  def augment(images, labels):
    draws = layer.draw(tf.shape(images)[0], uniform=lambda shape, low, high: tf.random.uniform(
        shape, low, high, seed=seed))
    augmented = layer.apply(tf.cast(images, tf.float32), **draws)
    return tf.cast(tf.round(augmented), tf.uint8), labels

  return dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def measure(info, weights, cfg, augmentation):
  def pipeline():
    dataset = data.train_dataset(info, cfg.image_size, cfg.global_batch_size, metadata=cfg.metadata)
    return augment_on_host(dataset, cfg.seed) if augmentation == "host" else dataset
  steps = max(2, int(np.ceil(info.num_examples / cfg.global_batch_size)))
  model = build(cfg, weights, augment=augmentation == "accelerator")
  job = images_per_second(model, pipeline(), steps, FLAGS.epochs, cfg.global_batch_size)
  bound_data = tf.data.Dataset.from_tensors(next(iter(pipeline()))).repeat()
  bound = images_per_second(model, bound_data, steps, FLAGS.epochs, cfg.global_batch_size)
  return {"job_img_s": job, "bound_img_s": bound, "input_wait_share": max(0.0, 1 - job / bound),
          "xla_in_effect": bool(model.jit_compile)}


def ratios(results: list[dict]) -> dict:
  """XLA ÷ no XLA (augmentation on the accelerator) and accelerator ÷ host (no XLA), per batch."""
  by = {(r["global_batch_size"], r["xla"], r["augmentation"]): r["job_img_s"] for r in results}
  out = {}
  for batch in sorted({r["global_batch_size"] for r in results}):
    no_xla = by.get((batch, False, "accelerator"))
    if no_xla and (batch, True, "accelerator") in by:
      out[f"xla_vs_no_xla_b{batch}"] = by[(batch, True, "accelerator")] / no_xla
    if no_xla and (batch, False, "host") in by:
      out[f"accelerator_vs_host_augmentation_b{batch}"] = no_xla / by[(batch, False, "host")]
  return out


def main(argv):
  del argv
  gpus = tf.config.list_physical_devices("GPU")
  if not gpus and not FLAGS.smoke:
    raise cli.UserError("no GPU visible: run on a GPU machine, or pass --smoke to check the benchmark")
  image_size, batches, precision = (32, (8,), "off") if FLAGS.smoke else (224, (64, 128, 256), "float16")
  num_images = 300 if FLAGS.smoke else FLAGS.num_images
  _, shards_dir, _ = common.prepare(FLAGS.work_dir, num_images, image_size=0 if FLAGS.smoke else 256)
  info = manifest.split_info(shards_dir, manifest.read(shards_dir), "train")
  weights = data.class_weights(info.class_counts)
  configurations = [(batch, xla, augmentation) for batch in batches
                    for xla, augmentation in ((False, "accelerator"), (True, "accelerator"), (False, "host"))]
  if FLAGS.smoke:  # XLA-compiling ResNet-50 on a CPU takes minutes
    configurations = [c for c in configurations if not c[1]]
  results = []
  for batch, xla, augmentation in configurations:
    cfg = config_lib.TrainConfig(data_dir=shards_dir, image_size=image_size, global_batch_size=batch,
                                 mixed_precision=precision, jit_compile="on" if xla else "off")
    row = {"global_batch_size": batch, "xla": xla, "augmentation": augmentation,
           **measure(info, weights, cfg, augmentation)}
    logging.info("%s", row)
    results.append(row)
  best = max(results, key=lambda r: r["job_img_s"])
  common.report({"bench": "gpu", "device": gpus[0].name if gpus else "cpu (smoke)",
                 "image_size": image_size, "precision": precision, "results": results,
                 "best_job_img_s": best["job_img_s"], "best_config": {k: best[k] for k in (
                     "global_batch_size", "xla", "augmentation")}, **ratios(results),
                 "max_input_wait_share": max(r["input_wait_share"] for r in results)})


if __name__ == "__main__":
  cli.run(main, define_flags)
