"""Synthetic image-classification data of any shape and class count.

For benchmarks, smoke runs and tests: no download, no preparation. The images are learnable:
noise plus a bright square whose position encodes the label, so a model's accuracy still tells
whether training works.
"""

import math

import numpy as np


def synthetic_split(num_examples: int, image_shape, num_classes: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, H, W, C], int32 labels [N]), the same for the same arguments."""
  rng = np.random.default_rng(seed)
  height, width, channels = image_shape
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  images = rng.integers(0, 96, (num_examples, height, width, channels), dtype=np.uint8)
  cells = math.ceil(math.sqrt(num_classes))
  cell_h, cell_w = max(height // cells, 1), max(width // cells, 1)
  for label in range(num_classes):
    row, col = divmod(label, cells)
    top, left = min(row * cell_h, height - cell_h), min(col * cell_w, width - cell_w)
    images[labels == label, top:top + cell_h, left:left + cell_w, :] = 255
  return images, labels


class ArraySource:
  """In-memory examples with the random-access API of `tfds.data_source`, so that synthetic data
  can take the streaming path (Grain) too."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self._images[index], 'label': self._labels[index]}

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f'ArraySource({len(self)} examples of shape {self._images.shape[1:]})'
