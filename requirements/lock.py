r"""Writes the constraints files that pin every package each install resolves to.

  python requirements/lock.py        # from the repository root, with the package index reachable

constraints-gpu.txt: the GPU trainer image (`pip install .[gpu]`: TensorFlow with pip's
NVIDIA wheels); constraints-tpu.txt: the TPU image (requirements/tpu.txt);
constraints-test.txt: the test environment (`.[test]`, what .ci/run installs). Each is pip's
own resolution (`pip install --dry-run --report`). The images' are resolved for the images'
platform and Python (IMAGE_PYTHON, x86-64 manylinux wheels only) whatever machine runs this;
the test environment's for the Python running it. Rerun it when setup.py or
requirements/tpu.txt change, and commit the result.
"""

import json
import os
import subprocess
import sys
import tempfile

IMAGE_PYTHON = "3.11"  # the Dockerfile's python:3.11-slim
# python:3.11-slim is Debian 12 (glibc 2.36): every manylinux tag up to 2.36 installs there.
IMAGE_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + [
    "manylinux2014_x86_64", "linux_x86_64"]
VARIANTS = {"gpu": ([".[gpu]"], True), "tpu": (["-r", "requirements/tpu.txt"], True), "test": ([".[test]"], False)}
OWN_NAME = "ham10000-resnet50"  # this package: installed from the checkout, never pinned
# Held below what pip would pick, each for a reason that pip cannot know.
HELD = {
    # cuDNN 9.10 is the last release whose CUDA 12 build supports Maxwell, Pascal and Volta GPUs
    # (compute capability 5.0-7.0: Vertex AI's P4, P100 and V100); later 9.x releases dropped
    # them. TensorFlow 2.21 was built against cuDNN 9.3, and any 9.x from 9.3 on satisfies it.
    "nvidia-cudnn-cu12": "9.10.2.21",
}


def pip_report(args: list[str]) -> list[dict]:
  """What `pip install args` would install, without installing it."""
  with tempfile.TemporaryDirectory() as tmp:
    report, holds = os.path.join(tmp, "report.json"), os.path.join(tmp, "holds.txt")
    with open(holds, "w") as f:
      f.writelines(f"{name}=={version}\n" for name, version in HELD.items())
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", report, "-c", holds, *args], check=True)
    with open(report) as f:
      return json.load(f)["install"]


def pins_of(installs: list[dict]) -> dict[str, str]:
  return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}


def resolve_for_image(args: list[str]) -> dict[str, str]:
  """pip's resolution on the image's platform and Python. pip takes only wheels for a foreign
  platform, so the packages published only as source archives (promise, cloudml-hypertune) are
  built here into wheels first; they must be pure Python (py3-none-any), valid on any platform."""
  sources = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in pip_report(args)
             if not i["download_info"]["url"].endswith(".whl") and i["metadata"]["name"] != OWN_NAME]
  with tempfile.TemporaryDirectory() as wheelhouse:
    if sources:
      subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheelhouse, *sources],
                     check=True)
    for wheel in os.listdir(wheelhouse):
      assert wheel.endswith("-none-any.whl"), f"{wheel} is not pure Python: it cannot be locked for the image"
    return pins_of(pip_report(["--python-version", IMAGE_PYTHON, "--implementation", "cp", "--only-binary=:all:",
                               *[f"--platform={p}" for p in IMAGE_PLATFORMS], "--find-links", wheelhouse, *args]))


def main():
  for variant, (args, for_image) in VARIANTS.items():
    pins = resolve_for_image(args) if for_image else pins_of(pip_report(args))
    pins.pop(OWN_NAME, None)
    python = IMAGE_PYTHON if for_image else ".".join(map(str, sys.version_info[:2]))
    where = f"Python {python}" + (", x86-64 Linux" if for_image else "")
    with open(os.path.join("requirements", f"constraints-{variant}.txt"), "w") as f:
      f.write(f"# Written by requirements/lock.py for {where} ({' '.join(args)}): do not edit.\n")
      f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))


if __name__ == "__main__":
  main()
