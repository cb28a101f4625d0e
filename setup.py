"""HAM10000 skin-lesion classification with ResNet-50: converter, training job, launchers."""

from setuptools import find_packages, setup

setup(
    name="ham10000-resnet50",
    version="0.1.0",
    description="Lesion-aware HAM10000 TFRecords and a distributed ResNet-50 training job",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["job", "job.*", "tfrecords", "tfrecords.*", "launch", "launch.*",
                                    "bench", "bench.*"]),
    # What the converter and the trainer use at run time, and all the trainer image gets.
    install_requires=[
        "tensorflow==2.21.0",  # the version tested; the Dockerfile's base image matches it
        "keras>=3.15,<3.16",
        "tensorflow-datasets>=4.9",  # the TFDS metadata beside the shards (tfrecords/tfds_metadata.py)
        "jinja2>=3.0",  # tfds.as_dataframe (the README's TFDS example) always styles through pandas' .style
        "tensorboard>=2.21",  # not installed with TensorFlow 2.21, needed by the TensorBoard callback
        "google-cloud-storage>=2.10",  # gs:// source listings with checksums; the model_dir lease
        "kagglehub>=0.3",  # --source=kaggle
        "pandas>=2.0",
        "scikit-learn>=1.4",
        "absl-py>=2.0",
        "matplotlib>=3.7",  # the evaluation's plots
        "pillow>=10.0",  # the synthetic dataset (job.demo)
        "cloudml-hypertune>=0.1.0.dev6",  # reports the monitored metric in a Vertex AI tuning trial
        "tqdm>=4.60",  # progress bars in a terminal
    ],
    extras_require={
        # A GPU: TensorFlow with pip's NVIDIA wheels (CUDA runtime, cuDNN, cuBLAS, NCCL, nvcc's
        # ptxas and libdevice for XLA), at the same pin; only the driver comes from the host.
        # Plain `tensorflow` on Linux brings no CUDA libraries and trains on the CPU.
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        # The launchers (launch/): the Vertex AI client. Not in the trainer image.
        "launch": ["google-cloud-aiplatform>=1.60"],
        # The launcher's tests build real aiplatform_v1 messages and talk to a local gRPC
        # stand-in. The gs:// tests run a local GCS emulator behind a TLS proxy with a
        # throwaway CA (tests/gcs_emulator.py patches this emulator release). The official
        # ISIC scorer needs pandas < 3: tests/test_interop.py installs it in its own environment.
        # pytest-xdist: the suite on two processes, a test file each at a time (docs/testing.md).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "google-cloud-aiplatform>=1.60",
                 "gcp-storage-emulator==2026.7.19", "trustme>=1.1"],
    },
)
