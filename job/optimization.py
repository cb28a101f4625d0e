"""Learning rates for the global batch: the scaling rule and the warm-up.

The seed's rates (1e-4, then 2e-5) are for batch 32. At a global batch of 256
an epoch has 8× fewer steps; at the same rate the model under-trains. For Adam
the rate grows with the square root of the batch (Malladi et al., NeurIPS 2022,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"); `linear` is
SGD's rule (Goyal et al., 2017). Each stage starts with a linear warm-up, so a
large rate does not meet a fresh head (stage 1) or freshly unfrozen layers
(stage 2) at full strength. The warm-up is a callback that sets the optimizer's
rate, not a schedule, so that ReduceLROnPlateau can still lower it.
"""

import math

import keras

from job.config import LR_SCALING  # the choices, defined with the flags


def scaled_learning_rate(base_lr: float, global_batch_size: int, base_batch_size: int,
                         scaling: str) -> float:
  """`base_lr`, meant for `base_batch_size`, at `global_batch_size` (either way)."""
  ratio = global_batch_size / base_batch_size
  return base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[scaling]


class WarmUp(keras.callbacks.Callback):
  """Raises the rate linearly from target/steps to `target` over the stage's first `steps`
  steps, counted from the stage's first epoch, so a resumed stage warms up where it was.
  Past the warm-up it leaves the rate alone (ReduceLROnPlateau's, or a restored backup's).

  It never raises a rate that something else lowered: when the optimizer's rate is below
  what the warm-up last set (ReduceLROnPlateau within the warm-up, or a restored backup of
  a stage whose rate had been lowered), the rest of the warm-up is scaled down by as much."""

  def __init__(self, target: float, steps: int, first_epoch: int, steps_per_epoch: int):
    super().__init__()
    self.target, self.steps = target, steps
    self.first_epoch, self.steps_per_epoch = first_epoch, steps_per_epoch
    self._epoch, self._warming = first_epoch, False
    self._scale, self._last = 1.0, None  # the share of the warm-up's rates that is left; the rate last set

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def _lowered_since(self, expected: float):
    # As ReduceLROnPlateau reads it: a MirroredVariable under tf.distribute has no float().
    current = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
    if current < expected * (1 - 1e-6):
      self._scale *= current / expected

  def on_train_batch_begin(self, batch, logs=None):
    step = (self._epoch - self.first_epoch) * self.steps_per_epoch + batch
    if self._last is not None:
      self._lowered_since(self._last)
    elif 0 < step <= self.steps:  # resumed: what the warm-up would have set last
      self._lowered_since(self.target * step / self.steps)
    if step < self.steps:
      self._set(self._scale * self.target * (step + 1) / self.steps)
      self._warming = True
    elif self._warming:  # the first step past the warm-up (steps_per_execution may skip over it)
      self._set(self._scale * self.target)
      self._warming = False

  def _set(self, rate: float):
    self.model.optimizer.learning_rate = rate
    self._last = rate
