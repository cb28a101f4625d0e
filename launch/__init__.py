"""Submitting the training job and publishing its model.

  vertex.py        Vertex AI custom and tuning jobs (`python -m launch.vertex`)
  upload_model.py  the serving SavedModel into the Model Registry (`python -m launch.upload_model`)
  multi_gpu.py     all the GPUs of one VM (`python -m launch.multi_gpu`)
"""

import tfrecords  # noqa: F401  pylint: disable=unused-import  (TensorFlow's C++ log level, before TensorFlow loads)
