# The trainer image: python -m job.train as the entrypoint.
#   GPU (default):  docker build -t trainer .
#   TPU:            docker build --build-arg VARIANT=tpu -t trainer-tpu .
# No credentials go into the image: on Vertex AI the job runs as the job's service account.
#
# GPU: TensorFlow's official GPU image at setup.py's pin, plus this package and its run-time
# requirements (not the launchers' Vertex AI SDK), at the versions pinned in
# requirements/constraints-gpu.txt, so that an image built later is the image tested.
# TPU: Python 3.11 with TensorFlow's TPU build from requirements/tpu.txt. That build is a
# release behind the GPU pin (tensorflow-tpu 2.20.0 is the newest on PyPI), with its own
# tensorboard and the libtpu it names; Keras is the same 3.15 as on GPU, so
# job/keras_compat.py applies alike. Vertex AI wants libtpu.so in /lib of a custom TPU
# container, and TensorFlow's PJRT runtime finds it through the variables below.
ARG TF_VERSION=2.21.0
ARG VARIANT=gpu

FROM tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu

FROM python:3.11-slim AS base-tpu
ENV TPU_LIBRARY_PATH=/lib/libtpu.so \
    TF_PLUGGABLE_DEVICE_LIBRARY_PATH=/lib/libtpu.so \
    NEXT_PLUGGABLE_DEVICE_USE_C_API=true

FROM base-${VARIANT} AS trainer
ARG VARIANT
# TensorFlow's C++ runtime writes straight to stderr, which Cloud Logging shows as ERROR.
# Level 2 keeps its errors and drops its INFO and WARNING lines; in a healthy run those
# warnings are harmless notices (a generator dataset left unoptimised, an iterator's
# prefetch cancelled at the end of an epoch: "Local rendezvous is aborting ... CANCELLED").
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /trainer
COPY setup.py README.md ./
COPY requirements requirements
COPY tfrecords tfrecords
COPY job job
COPY launch launch
RUN if [ "$VARIANT" = "tpu" ]; then \
      pip install --no-cache-dir -c requirements/constraints-tpu.txt -r requirements/tpu.txt \
      && pip install --no-cache-dir --no-deps . \
      && cp "$(python -c 'import libtpu, os; print(os.path.join(os.path.dirname(libtpu.__file__), "libtpu.so"))')" /lib/libtpu.so ; \
    else \
      pip install --no-cache-dir -c requirements/constraints-gpu.txt . ; \
    fi

# GPU: an unprivileged user (the job needs no more than its home, /tmp and Cloud Storage).
FROM trainer AS final-gpu
RUN useradd --create-home --uid 1000 trainer
USER trainer

# TPU: root. The TPU runtime opens the host's TPU devices (/dev/accel*, /dev/vfio), which
# Vertex AI hands to the container as root-owned nodes.
FROM trainer AS final-tpu

FROM final-${VARIANT}
ENTRYPOINT ["python", "-m", "job.train"]
