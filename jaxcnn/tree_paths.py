"""The names of a pytree's leaves, as checkpoints, messages and the `frozen` config key name a
model's arrays: `stages.0.layers.0.kernel`."""

from collections.abc import Sequence


def key_name(key) -> str:
  """One step of a JAX key path (a dict key, an attribute, an index) as a name."""
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_names(path: Sequence) -> tuple[str, ...]:
  """The names along a JAX key path, without the trailing `value` of an NNX variable, which
  says nothing about the array."""
  names = tuple(key_name(k) for k in path)
  return names[:-1] if names and names[-1] == 'value' else names


def dotted(path: Sequence) -> str:
  """A JAX key path, or an NNX path of names and indices, as one dotted name:
  `stages.0.layers.0.kernel`."""
  return '.'.join(path_names(path))


def listed(names: Sequence[str], limit: int = 4) -> str:
  """The first `limit` of `names` for a one-line message, with ', ...' where there are more."""
  return ', '.join(names[:limit]) + (', ...' if len(names) > limit else '')
