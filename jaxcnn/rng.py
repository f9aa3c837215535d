"""Randomness as a pure function of (seed, purpose, counter).

Every random choice in a run derives from the config's seed: the step's dropout and augmentation
keys from (seed, step), the data order from (seed, epoch). A resumed run therefore draws exactly
what the uninterrupted run would have drawn, and no RNG state needs saving.
"""

import jax

_STEP_STREAM = 0
_EPOCH_STREAM = 1


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
  """The key of training step `step`: dropout, augmentation and anything else drawn in the step."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STEP_STREAM), step)


def epoch_key(seed: int | jax.Array, epoch: int | jax.Array) -> jax.Array:
  """The key that orders the training examples of epoch `epoch`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EPOCH_STREAM), epoch)
