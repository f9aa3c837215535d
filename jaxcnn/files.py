"""Writing files that other processes (or a later run) may read at any moment."""

import os
from collections.abc import Callable
from typing import BinaryIO


def write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
  """Writes `path` through `write(file)` so that readers see either no file or the whole file.

  The data goes to a temporary file beside `path` (its folder is created if needed), which then
  replaces `path` in one step. Raises OSError if that fails, leaving no temporary file behind.
  """
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(tmp, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
