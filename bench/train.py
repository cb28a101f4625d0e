r"""Training throughput through the job against the bound no input pipeline can beat.

  python -m bench.train [--image_size=64] [--epochs=3]

"job": the job's pipeline (job/data.py) feeding the job's training wrapper
(job/model.py, compiled by job/train.py). "bound": the same compiled model fed
one in-memory batch over and over. Each is timed over `--epochs` epochs after
one warm-up epoch (tracing, cache fill), alternately, and the ratio is taken
pair by pair. Then the same job under variants: mixed_bfloat16,
steps_per_execution, XLA (augmentation included: job/augment.py compiles under
XLA), the augmentation left out (to see what running it in the step costs), the
dermoscopy preset in place of the seed's (`--augment=dermoscopy`), mixup and
CutMix in the training step (`--mixup=0.8 --cutmix=1.0`, job/mixing.py), the
patient's fields through their branch (`--metadata=age,sex,localization`), Shades
of Gray (`--color_constancy`), and last --deterministic (op determinism, which
cannot be undone in a process).
"""

import dataclasses

import numpy as np
import tensorflow as tf
from absl import flags, logging

from bench import common
from bench.timing import build, images_per_second
from job import config as config_lib, data, performance
from tfrecords import cli, manifest

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num_images", 600, "Synthetic images.")
  flags.DEFINE_integer("image_size", 64, "Training image size.")
  flags.DEFINE_integer("batch_size", 32, "Global batch size.")
  flags.DEFINE_integer("epochs", 3, "Timed epochs per measurement (after one warm-up epoch).")
  flags.DEFINE_integer("rounds", 2, "job/bound pairs, alternated.")
  flags.DEFINE_bool("variants", True, "Also measure precision, steps_per_execution, XLA, augmentation.")
  flags.DEFINE_bool("deterministic", True, "Last, the job with op determinism (its --deterministic).")
  flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temporary folder).")


def main(argv):
  del argv
  _, shards_dir, _ = common.prepare(FLAGS.work_dir, FLAGS.num_images)
  info = manifest.split_info(shards_dir, manifest.read(shards_dir), "train")
  weights = data.class_weights(info.class_counts)
  steps = int(np.ceil(info.num_examples / FLAGS.batch_size))
  base = config_lib.TrainConfig(data_dir=shards_dir, image_size=FLAGS.image_size, mixed_precision="off",
                                global_batch_size=FLAGS.batch_size, jit_compile="off")

  def pipeline(cfg=base):
    return data.train_dataset(info, FLAGS.image_size, FLAGS.batch_size, metadata=cfg.metadata)

  model = build(base, weights)
  one_batch = next(iter(pipeline()))
  bound_dataset = tf.data.Dataset.from_tensors(one_batch).repeat()  # in memory: costs nothing
  ratios, job_figures, bound_figures = [], [], []
  for _ in range(FLAGS.rounds):
    job_figures.append(images_per_second(model, pipeline(), steps, FLAGS.epochs, FLAGS.batch_size))
    bound_figures.append(images_per_second(model, bound_dataset, steps, FLAGS.epochs, FLAGS.batch_size))
    ratios.append(job_figures[-1] / bound_figures[-1])
  figures = {"bench": "train", "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size,
             "job_img_s": float(np.median(job_figures)), "bound_img_s": float(np.median(bound_figures)),
             "job_vs_bound": float(np.median(ratios))}
  logging.info("job %.1f img/s, bound %.1f img/s", figures["job_img_s"], figures["bound_img_s"])

  if FLAGS.variants:
    variants = {
        "mixed_bfloat16": (dataclasses.replace(base, mixed_precision="bfloat16"), True),
        "steps_per_execution_8": (dataclasses.replace(base, steps_per_execution=8), True),
        "no_augmentation": (base, False),
        "xla_with_augmentation": (dataclasses.replace(base, jit_compile="on"), True),
        "dermoscopy_augmentation": (dataclasses.replace(base, augment="dermoscopy"), True),  # vs the seed's
        "mixup_cutmix": (dataclasses.replace(base, mixup=0.8, cutmix=1.0), True),  # timm's alphas, in the step
        "metadata": (dataclasses.replace(base, metadata=config_lib.METADATA_FIELDS), True),  # the fields' branch
        "color_constancy": (dataclasses.replace(base, color_constancy="shades_of_gray"), True),
    }
    reference = figures["job_img_s"]
    for name, (cfg, augment) in variants.items():
      variant = build(cfg, weights, augment)
      speed = images_per_second(variant, pipeline(cfg), steps, FLAGS.epochs, FLAGS.batch_size)
      figures[f"{name}_vs_float32"] = speed / reference
      if name == "xla_with_augmentation":
        figures["xla_in_effect_with_augmentation"] = bool(variant.jit_compile)
      logging.info("%s: %.1f img/s (%.2f× the float32 job)", name, speed, speed / reference)
    performance.set_policy("float32")
  if FLAGS.deterministic:
    # Last: op determinism (the job's --deterministic) cannot be switched off in a process.
    tf.config.experimental.enable_op_determinism()
    speed = images_per_second(build(base, weights), pipeline(), steps, FLAGS.epochs, FLAGS.batch_size)
    figures["deterministic_vs_float32"] = speed / figures["job_img_s"]
    logging.info("deterministic: %.1f img/s (%.2f× the float32 job)", speed, figures["deterministic_vs_float32"])
  common.report(figures)


if __name__ == "__main__":
  cli.run(main, define_flags)
