r"""Writes the constraints files that pin every package each install resolves to.

  python requirements/lock.py        # from the repository root, with the package index reachable

constraints-gpu.txt: the GPU trainer image (`pip install .`); constraints-tpu.txt: the TPU
image (requirements/tpu.txt); constraints-test.txt: the test environment (`.[test]`, what
.ci/run installs). Each is pip's own resolution (`pip install --dry-run --report`) for this
Python, so an image or CI run built later installs what was tested. Rerun it when setup.py
or requirements/tpu.txt change, and commit the result.
"""

import json
import os
import subprocess
import sys
import tempfile

VARIANTS = {"gpu": ["."], "tpu": ["-r", "requirements/tpu.txt"], "test": [".[test]"]}
OWN_NAME = "ham10000-resnet50"  # this package: installed from the checkout, never pinned


def resolve(args: list[str]) -> dict[str, str]:
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "report.json")
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", report, *args], check=True)
    with open(report) as f:
      installs = json.load(f)["install"]
  return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}


def main():
  python = ".".join(map(str, sys.version_info[:2]))
  for variant, args in VARIANTS.items():
    pins = {name: version for name, version in resolve(args).items() if name != OWN_NAME}
    with open(os.path.join("requirements", f"constraints-{variant}.txt"), "w") as f:
      f.write(f"# Written by requirements/lock.py for Python {python} ({' '.join(args)}): do not edit.\n")
      f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))


if __name__ == "__main__":
  main()
