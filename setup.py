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
    install_requires=[
        "tensorflow==2.21.0",  # the version tested; the Dockerfile's base image matches it
        "keras>=3.15,<3.16",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.21",  # not installed with TensorFlow 2.21, needed by the TensorBoard callback
        "google-cloud-storage>=2.10",
        "kagglehub>=0.3",
        "pandas>=2.0",
        "scikit-learn>=1.4",
        "absl-py>=2.0",
        "matplotlib>=3.7",
        "pillow>=10.0",
    ],
    extras_require={
        "gcp": ["google-cloud-aiplatform>=1.60", "cloudml-hypertune>=0.1.0.dev6"],
        # The launcher's tests build real CustomJob messages, and the tuning reporter writes
        # real hypertune metric files. The gs:// tests run a local GCS emulator behind a TLS
        # proxy with a throwaway CA (tests/gcs_emulator.py patches this emulator release).
        "test": ["pytest>=8.0", "google-cloud-aiplatform>=1.60", "cloudml-hypertune>=0.1.0.dev6",
                 "gcp-storage-emulator==2026.7.19", "trustme>=1.1"],
    },
)
