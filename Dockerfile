# The trainer image: python -m job.train as the entrypoint.
#   GPU (default):  docker build -t trainer .
#   TPU:            docker build --build-arg VARIANT=tpu -t trainer-tpu .
# No credentials go into the image: on Vertex AI the job runs as the job's service account.
#
# GPU: Python 3.11 with this package and its `gpu` extra, tensorflow[and-cuda] at setup.py's
# pin: pip's NVIDIA wheels bring the CUDA runtime, cuDNN, cuBLAS, NCCL and nvcc's ptxas and
# libdevice (for XLA), the versions TensorFlow was built against, in site-packages/nvidia/*/lib.
# TensorFlow finds most of them there itself; the two it does not (cuSOLVER, and cuDNN's nvrtc)
# are opened by `import job` before TensorFlow loads (job/gpu_startup.py), so the image needs no
# LD_LIBRARY_PATH of its own. Only the driver comes from the host (tests/test_gpu_startup.py
# starts this image's packages under a stand-in driver placed where the ENV below says). Not TensorFlow's own
# tensorflow/tensorflow:*-gpu image: since 2.18 it carries a system cuDNN 8 that TensorFlow
# >= 2.18 (built against cuDNN 9) cannot load, so TensorFlow registers no GPU and trains on the
# CPU (tensorflow/tensorflow#62412, #94593; tensorflow/build#217). Versions are pinned in
# requirements/constraints-gpu.txt (requirements/lock.py), so an image built later is the
# image tested; the launchers' Vertex AI SDK is not installed.
# TPU: Python 3.11 with TensorFlow's TPU build from requirements/tpu.txt. That build is a
# release behind the GPU pin (tensorflow-tpu 2.20.0 is the newest on PyPI), with its own
# tensorboard and the libtpu it names; Keras is the same 3.15 as on GPU, so
# job/keras_compat.py applies alike. Vertex AI wants libtpu.so in /lib of a custom TPU
# container, and TensorFlow's PJRT runtime finds it through the variables below.
ARG VARIANT=gpu

FROM python:3.11-slim AS base-gpu
# What NVIDIA's container runtime and the driver mounts of Vertex AI and GKE expect of an image
# not built on nvidia/cuda: which GPUs and driver parts to mount (compute: libcuda; utility:
# nvidia-smi), and where the driver's libraries and tools appear (/usr/local/nvidia).
# TensorFlow 2.21 has compiled kernels up to sm_89; on H100/H200 and newer the driver compiles
# the PTX at the first start, into a compute cache that a restart in the same container reuses
# when it is large enough (the default is smaller than TensorFlow's kernels).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    PATH=/usr/local/nvidia/bin:${PATH} \
    CUDA_CACHE_MAXSIZE=4294967296

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
# The benchmarks too: bench.gpu measures a GPU machine with the image itself (docs/performance.md).
COPY bench bench
RUN if [ "$VARIANT" = "tpu" ]; then \
      pip install --no-cache-dir -c requirements/constraints-tpu.txt -r requirements/tpu.txt \
      && pip install --no-cache-dir --no-deps . \
      && cp "$(python -c 'import libtpu, os; print(os.path.join(os.path.dirname(libtpu.__file__), "libtpu.so"))')" /lib/libtpu.so ; \
    else \
      pip install --no-cache-dir -c requirements/constraints-gpu.txt ".[gpu]" ; \
    fi

# GPU: an unprivileged user (the job needs no more than its home, /tmp and Cloud Storage), and
# the folders where cloudml-hypertune writes a tuning trial's metric (CLOUD_ML_HP_METRIC_FILE:
# /var/hypertune where the platform says so, else /tmp/hypertune), made its own: the library
# creates them as root only otherwise (GoogleCloudPlatform/cloudml-hypertune#6).
FROM trainer AS final-gpu
RUN useradd --create-home --uid 1000 trainer \
    && install -d -o trainer -g trainer /var/hypertune /tmp/hypertune
USER trainer

# TPU: root. The TPU runtime opens the host's TPU devices (/dev/accel*, /dev/vfio), which
# Vertex AI hands to the container as root-owned nodes.
FROM trainer AS final-tpu

FROM final-${VARIANT}
ENTRYPOINT ["python", "-m", "job.train"]
