"""jaxcnn's caches on disk: decoded datasets and compiled XLA programs.

Both live under $JAXCNN_CACHE_DIR (default ~/.cache/jaxcnn), so that a second run neither decodes
its dataset nor compiles its steps again.
"""

import os

import jax


def cache_dir() -> str:
  """$JAXCNN_CACHE_DIR, else ~/.cache/jaxcnn."""
  return os.environ.get('JAXCNN_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jaxcnn')


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache in `cache_dir()/xla`, unless one is set already
  (e.g. with $JAX_COMPILATION_CACHE_DIR)."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache_dir(), 'xla'))
