"""Writing files that other processes (or a later run) may read at any moment."""

import contextlib
import fcntl
import os
import socket
import sys
import uuid
import zipfile
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from jaxcnn.errors import UserError


def write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
  """Writes `path` through `write(file)` so that readers see either no file or the whole file.

  The data goes to a temporary file beside `path` (its folder is created if needed), named for
  this host, process and call (hosts sharing a folder can have the same process ids), and is
  flushed to the disk before it replaces `path` in one step: a crash or power loss leaves the old
  file or the new one, whole. Raises OSError if that fails, leaving no temporary file behind.
  """
  tmp = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(tmp, 'xb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text_atomically(path: str, text: str) -> None:
  """`write_atomically` of `text`, in UTF-8."""
  write_atomically(path, lambda f: f.write(text.encode('utf-8')))


@contextlib.contextmanager
def exclusive_lock(path: str):
  """Holds an exclusive advisory lock on the file `path` (created if missing) while the block
  runs, first waiting for any other process or thread that holds it."""
  with open(path, 'a', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_arrays(path: str) -> dict[str, np.ndarray] | None:
  """The arrays of the .npz cache file `path`, or None where it cannot be read: the damaged file
  is then removed, with a warning, so that the data is decoded and cached afresh."""
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return {name: arrays[name] for name in arrays.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    print(f'warning: removing the damaged cache file {path} ({type(e).__name__}: {e}); '
          'decoding again', file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
      os.remove(path)
    return None


def make_writable_folder(path: str, flag: str) -> None:
  """Creates the folder `path` if needed, or raises a UserError naming `flag` (the command-line
  flag that gave it, e.g. '--workdir') and saying why it cannot hold what is to be written."""
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise UserError(f'{flag} {path!r} is not a folder: it, or a folder above it, is a file; '
                    'give a new or existing folder') from None
  except OSError as e:
    raise UserError(f'{flag} {path!r} cannot be created: {e.strerror}') from None
  if not os.access(path, os.W_OK):
    raise UserError(f'{flag} {path!r} is not writable')
