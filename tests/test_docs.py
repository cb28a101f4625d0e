"""The commands the README and docs/ quote still work as written: every module exists and takes
every flag a page gives it, and the launchers' commands run as far as `--dry_run` goes."""

import concurrent.futures
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # a fresh Python for each command's --help
PACKAGES = ("tfrecords.", "job.", "launch.", "bench.")
DRY_RUN = ("launch.vertex", "launch.upload_model")  # submit nothing with --dry_run


def pages() -> list[str]:
  return [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def quoted_commands() -> list[tuple[str, str, list[str]]]:
  """(page, module, arguments) of every `python -m` command of ours in a bash block."""
  found = []
  for page in pages():
    text = open(page, encoding="utf-8").read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
      for line in block.replace("\\\n", " ").splitlines():
        for command in line.split("&&"):
          try:
            words = shlex.split(command, comments=True)
          except ValueError:  # a quote left open by a placeholder
            continue
          if len(words) > 2 and words[0] == "python" and words[1] == "-m" and words[2].startswith(PACKAGES):
            found.append((os.path.relpath(page, REPO), words[2], words[3:]))
  return found


def flag_names(arguments: list[str]) -> tuple[list[str], list[str]]:
  """The flags given to the command itself, and those after `--` (passed on to job.train)."""
  own, passed = [], []
  target = own
  for word in arguments:
    word = word.strip("[]")
    if word == "--":
      target = passed
    elif word.startswith("--") and len(word) > 2:
      target.append(word[2:].split("=", 1)[0])
  return own, passed


def defined_flags(module: str) -> set[str]:
  result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  names = set(re.findall(r"^\s+--(?:\[no\])?([\w]+)", result.stdout, re.M))  # absl's --help exits 1
  assert names, (module, result.stdout[-1000:], result.stderr[-2000:])
  return names


def test_every_quoted_command_names_a_module_and_flags_that_exist():
  commands = quoted_commands()
  modules = sorted({module for _, module, _ in commands} | {"job.train"})
  assert {"tfrecords.convert", "job.train", "job.preflight", "launch.vertex", "job.evaluate"} <= set(modules)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    known = dict(zip(modules, pool.map(defined_flags, modules)))
  problems = []
  for page, module, arguments in commands:
    own, passed = flag_names(arguments)
    for owner, names in ((module, own), ("job.train", passed)):
      for name in names:
        if name not in known[owner] and not (name.startswith("no") and name[2:] in known[owner]):
          problems.append(f"{page}: python -m {module} … --{name}: {owner} has no such flag")
  assert problems == []


def test_the_quoted_launcher_commands_run_as_dry_runs():
  commands = [(page, module, arguments) for page, module, arguments in quoted_commands()
              if module in DRY_RUN and not any("…" in word or word == "..." for word in arguments)]
  assert len(commands) >= 4
  for page, module, arguments in commands:
    arguments = [word.strip("[]") for word in arguments if word.strip("[]")]
    split = arguments.index("--") if "--" in arguments else len(arguments)
    # --wait and --preflight follow the job once submitted: a dry run submits nothing.
    own = [word for word in arguments[:split] if word not in ("--wait",)]
    result = subprocess.run([sys.executable, "-m", module, *own, "--dry_run", *arguments[split:]], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{page}: python -m {module} {' '.join(arguments)}\n{result.stderr[-1500:]}"
