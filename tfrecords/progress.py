"""Progress a person can follow: a bar with a rate and time left in a terminal, log lines elsewhere.

In a terminal (stderr is a TTY, and not on Vertex AI) the converter and the
evaluation draw a tqdm bar, and Keras draws its own bar for each epoch; in a
non-interactive run (Vertex AI, CI, a pipe) the log keeps one line per shard
or epoch instead.
"""

import shutil
import sys

from tqdm import tqdm

from tfrecords import logs


def interactive(stream=None) -> bool:
  stream = sys.stderr if stream is None else stream
  return bool(getattr(stream, "isatty", lambda: False)()) and not logs.on_vertex()


def bar(total: int, unit: str, description: str) -> tqdm | None:
  """A bar on stderr in a terminal, else None (the caller logs lines instead)."""
  if not interactive():
    return None
  # A terminal that reports no size (a bare pseudo-terminal says 0×0) would get no bar at all
  # from tqdm: give it 80×24.
  size = shutil.get_terminal_size((80, 24))
  return tqdm(total=total, unit=unit, desc=description, ncols=size.columns or 80, nrows=size.lines or 24,
              file=sys.stderr)


def keras_verbosity() -> int:
  """Keras's fit(verbose=): its progress bar in a terminal, one line per epoch elsewhere."""
  return 1 if interactive(sys.stdout) else 2
