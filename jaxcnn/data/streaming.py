"""Datasets too large for device memory: streamed from `tfds.data_source` through Grain.

Grain reads examples by index from the prepared ArrayRecord files, decodes and augments them in
worker processes, and batches each process's share of every global batch (`ShardByJaxProcess`).
The iterator's position is a small JSON state that goes into every checkpoint, so a resumed run
reads exactly the batches the uninterrupted run would have read.

Augmentation here works on one uint8 HWC image at a time with a NumPy generator that Grain derives
from (seed, example index), so each example's augmentation is the same whatever the number of
workers. Which examples make up a batch is not: Grain's DataLoader deals examples out to its
workers in turn and each worker batches its own. A streamed run is repeatable for a given
`data_workers` (set it explicitly to repeat a run on another machine: its default is one per
core), and a resume continues with the worker count its checkpoint was written with.
"""

import dataclasses
import math

import grain.python as grain
import numpy as np
from absl import flags

from jaxcnn.data.image_ops import random_resized_crop, resize_and_center_crop


@dataclasses.dataclass(frozen=True)
class HostAugment:
  """What the Grain workers do to each training example."""
  image_shape: tuple[int, int, int]
  crop_padding: int = 0
  flip: bool = False
  inception_crop: bool = False


class _TrainTransform(grain.RandomMapTransform):
  """Decoded TFDS example -> fixed-size, augmented uint8 image and int32 label."""

  def __init__(self, augment: HostAugment, image_key: str, label_key: str):
    self.augment, self.image_key, self.label_key = augment, image_key, label_key

  def random_map(self, element, rng: np.random.Generator):
    height, width, _ = self.augment.image_shape
    image = np.asarray(element[self.image_key], np.uint8)
    if self.augment.inception_crop:
      image = random_resized_crop(image, height, width, rng)
    else:
      image = resize_and_center_crop(image, height, width)
    padding = self.augment.crop_padding
    if padding:
      padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
      top, left = rng.integers(0, 2 * padding + 1, size=2)
      image = padded[top:top + height, left:left + width]
    if self.augment.flip and rng.integers(0, 2):
      image = image[:, ::-1]
    return {'image': np.ascontiguousarray(image), 'label': np.int32(element[self.label_key])}


class _EvalTransform(grain.MapTransform):
  """Decoded TFDS example -> centre-cropped uint8 image, int32 label and a True mask."""

  def __init__(self, image_shape, image_key: str, label_key: str):
    self.image_shape, self.image_key, self.label_key = image_shape, image_key, label_key

  def map(self, element):
    height, width, _ = self.image_shape
    image = resize_and_center_crop(np.asarray(element[self.image_key], np.uint8), height, width)
    return {'image': image, 'label': np.int32(element[self.label_key]), 'mask': np.bool_(True)}


def _allow_grain_flags() -> None:
  # Grain's worker processes read absl flags; a library caller may not have parsed any.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_loader(source, *, augment: HostAugment, batch_size: int, seed: int, worker_count: int,
                 image_key: str = 'image', label_key: str = 'label') -> grain.DataLoader:
  """An endless, shuffled loader of this process's `batch_size` examples of each global batch."""
  _allow_grain_flags()
  sampler = grain.IndexSampler(len(source), shard_options=grain.ShardByJaxProcess(
      drop_remainder=True), shuffle=True, num_epochs=None, seed=seed)
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=worker_count,
      operations=[_TrainTransform(augment, image_key, label_key),
                  grain.Batch(batch_size, drop_remainder=True)])


def eval_batches(source, *, image_shape, batch_size: int, worker_count: int,
                 image_key: str = 'image', label_key: str = 'label'):
  """This process's share of a split in order, as full batches padded with masked examples.

  Every process yields the same number of batches (some wholly masked), so that processes stay
  in step in the collective evaluation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  _allow_grain_flags()
  shard = grain.ShardByJaxProcess(drop_remainder=False)
  per_process = math.ceil(len(source) / jax.process_count())
  num_batches = math.ceil(per_process / batch_size)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=False, num_epochs=1)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=worker_count,
      operations=[_EvalTransform(image_shape, image_key, label_key),
                  grain.Batch(batch_size, drop_remainder=False)])
  height, width, channels = image_shape
  empty = {'image': np.zeros((batch_size, height, width, channels), np.uint8),
           'label': np.zeros((batch_size,), np.int32), 'mask': np.zeros((batch_size,), bool)}
  produced = 0
  for batch in loader:
    missing = batch_size - len(batch['label'])
    if missing:
      batch = {k: np.concatenate([v, empty[k][:missing]]) for k, v in batch.items()}
    produced += 1
    yield batch
  for _ in range(num_batches - produced):
    yield empty
