# The trainer image: python -m job.train as the entrypoint.
#   GPU (default):  docker build -t trainer .
#   TPU (Vertex AI TPU VMs need TensorFlow's TPU build, with libtpu):
#                   docker build --build-arg VARIANT=tpu -t trainer-tpu .
# The TensorFlow version matches setup.py's pin. No credentials go into the image:
# on Vertex AI the job runs as the job's service account.
ARG TF_VERSION=2.21.0
ARG VARIANT=gpu

FROM tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu

FROM python:3.11-slim AS base-tpu

FROM base-${VARIANT} AS trainer
ARG VARIANT
ARG TF_VERSION
# The TPU build; if the pinned version is not yet on the libtpu index, pass --build-arg TF_TPU_VERSION.
ARG TF_TPU_VERSION=${TF_VERSION}
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
WORKDIR /trainer
COPY setup.py README.md ./
COPY tfrecords tfrecords
COPY job job
COPY launch launch
RUN pip install --no-cache-dir ".[gcp]" \
 && if [ "$VARIANT" = "tpu" ]; then \
      pip uninstall -y tensorflow \
      && pip install --no-cache-dir "tensorflow-tpu==${TF_TPU_VERSION}" \
           -f https://storage.googleapis.com/libtpu-tf-releases/index.html ; \
    fi
ENTRYPOINT ["python", "-m", "job.train"]
