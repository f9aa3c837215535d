"""Datasets that live in device memory: shuffled, sliced and batched under `jit`.

MNIST (47 MB), Fashion-MNIST and CIFAR (150 MB) fit many times over in any accelerator's memory.
They are copied there once as uint8; every epoch's order is a permutation drawn on the device from
(seed, epoch), and the train step gathers its batch from it. No host-to-device copy happens per step.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import rng


@flax.struct.dataclass
class DeviceSplit:
  """One split of a dataset in device memory.

  Attributes:
    images: uint8 [N_padded, H, W, C]; rows past `num_examples` are zero padding.
    labels: int32 [N_padded]; rows past `num_examples` are zero padding.
    num_examples: the number of real examples.
  """
  images: jax.Array
  labels: jax.Array
  num_examples: int = flax.struct.field(pytree_node=False)


def pad_split(images: np.ndarray, labels: np.ndarray, *,
              pad_to_multiple_of: int = 1) -> DeviceSplit:
  """A host split zero-padded to a multiple of `pad_to_multiple_of` rows, ready to be replicated.

  Evaluation pads this way so that every example is seen in full batches; the padding rows are
  masked out of every metric. Place the result with `Strategy.replicate` (or `jax.device_put`).
  """
  num_examples = len(images)
  padded = math.ceil(num_examples / pad_to_multiple_of) * pad_to_multiple_of
  if padded != num_examples:
    images = np.concatenate([images, np.zeros((padded - num_examples, *images.shape[1:]),
                                              images.dtype)])
    labels = np.concatenate([labels, np.zeros((padded - num_examples,), labels.dtype)])
  return DeviceSplit(images=images, labels=labels.astype(np.int32), num_examples=num_examples)


@functools.partial(jax.jit, static_argnums=(2,))
def epoch_permutation(seed: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
  """The order in which epoch `epoch` visits the training examples."""
  return jax.random.permutation(rng.epoch_key(seed, epoch), num_examples).astype(jnp.int32)


def train_batch(split: DeviceSplit, permutation: jax.Array, start: jax.Array,
                size: int) -> dict[str, jax.Array]:
  """The `size` examples at permutation[start:start + size]."""
  indices = jax.lax.dynamic_slice_in_dim(permutation, start, size)
  return {'image': split.images[indices], 'label': split.labels[indices]}


def eval_batch(split: DeviceSplit, start: jax.Array,
               size: int) -> tuple[dict[str, jax.Array], jax.Array]:
  """The `size` examples from `start` of a padded split, in order, with the mask of the real ones."""
  batch = {
      'image': jax.lax.dynamic_slice_in_dim(split.images, start, size),
      'label': jax.lax.dynamic_slice_in_dim(split.labels, start, size),
  }
  mask = start + jnp.arange(size) < split.num_examples
  return batch, mask
