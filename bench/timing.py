"""Timing training through the job's own model and compile code (bench.train, bench.gpu)."""

import time

import keras
import numpy as np
import tensorflow as tf

from job import config as config_lib, model as model_lib, performance, train


class EpochTimer(keras.callbacks.Callback):
  def on_train_begin(self, logs=None):
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self.start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self.start)


def build(cfg: config_lib.TrainConfig, class_weights: np.ndarray, augment: bool = True) -> keras.Model:
  """The job's training wrapper in stage 2 (the heavier stage), compiled as the job compiles
  it on one device, one output per class weight; `model.jit_compile` then says whether XLA
  is in effect."""
  performance.set_policy(performance.policy_name(cfg.mixed_precision, "one_device"))
  keras.utils.set_random_seed(cfg.seed)
  inner = model_lib.build_inner_model("none", num_classes=len(class_weights), backbone=cfg.backbone,
                                      metadata=cfg.metadata, color_constancy=cfg.color_constancy)
  wrapper = model_lib.build_training_model(inner, cfg.image_size, cfg.seed,
                                           augment=model_lib.augmentation_of(cfg) if augment else False,
                                           mixing=config_lib.mixing(cfg) if augment else None)
  model_lib.set_trainable_for_stage(inner, stage=2)
  train.compile_model(wrapper, tf.distribute.get_strategy(), cfg, cfg.stage2_lr,
                      xla=performance.use_xla(cfg.jit_compile, "one_device"), class_weights=class_weights)
  return wrapper


def images_per_second(model, dataset, steps, epochs, batch_size) -> float:
  """Median images/s over `epochs` epochs, after one warm-up epoch."""
  timer = EpochTimer()
  model.fit(dataset, epochs=epochs + 1, steps_per_epoch=steps, callbacks=[timer], verbose=0,
            shuffle=False)  # the datasets shuffle themselves (or are one batch repeated)
  return steps * batch_size / float(np.median(timer.seconds[1:]))
