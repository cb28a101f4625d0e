"""The HAM10000 training job (ResNet-50 by default): shards in, a calibrated classifier and its figures out.

  train.py          the two stages, start to end (`python -m job.train`)
  config.py         the settings (TrainConfig) and the flags that fill them
  data.py           shards → uint8 batches: training, padded validation, prediction
  augment.py        the augmentation (the seed's, the dermoscopy preset), XLA-compilable, inside the model
  mixing.py         mixup and CutMix, in the training wrapper's own step
  patient_metadata  age, sex and site as model inputs (--metadata), one site vocabulary
  color_constancy   Shades of Gray, the saved model's first layer (--color_constancy)
  model.py          the saved inner model and the training wrapper around it
  backbones.py      the backbones by name (--backbone), their input and stage-2 share
  distribute_utils  the tf.distribute strategy, chosen in one place
  performance.py    mixed precision and XLA, decided per device
  callbacks.py      best model, history, preemptible backups, tuning reports
  keras_compat.py   where the job leans on Keras internals, each gated by version
  evaluate.py       the ISIC metric set on a split (`python -m job.evaluate`)
  metrics.py        the figures themselves; calibration.py temperature scaling
  plots.py          the three pictures
  predict.py        inference on JPEGs and the serving export (`python -m job.predict`)
  ensemble.py       one run or several (folds) as one predictor; tta.py its views
  cross_validate.py every fold, out-of-fold figures, the fold ensemble (`python -m job.cross_validate`)
  compare.py        two runs on the same test images, paired (`python -m job.compare`)
  run_state.py      one run per model_dir: fingerprints, resuming, the lease
  accelerators.py   the accelerator guard; gpu_startup.py why a GPU did not register
  preflight.py      a few timed steps on the real machine (`python -m job.preflight`)
  artifacts.py      the run's files in --model_dir, named once
  demo.py           the offline demo on synthetic data (`python -m job.demo`)

It reads what tfrecords/ writes (tfrecords.manifest, tfrecords.features) and
stores through tfrecords.fileio; tfrecords/ imports nothing from here.
"""

import tfrecords  # noqa: F401  pylint: disable=unused-import  (TensorFlow's C++ log level, before TensorFlow loads)
from job import gpu_startup  # noqa: E402

# The CUDA libraries TensorFlow's GPU build cannot find by itself in pip's wheels, opened before
# TensorFlow loads (job/gpu_startup.py says which and why).
gpu_startup.preload()
