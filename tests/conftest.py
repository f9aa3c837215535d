"""Shared fixtures: a fake TFDS dataset with learnable images, and the real MNIST files."""

import contextlib
import os
import pathlib
import sys
from unittest import mock

# Eight CPU devices for the multi-device tests (unless a worker process chose its own count);
# this must happen before JAX initialises.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # So that tests can import configs/ like train.py does.
  sys.path.insert(0, str(REPO_ROOT))

# The official MNIST files (TFDS checksums). CI has no route to the dataset hosts.
MNIST_MANUAL_DIR = pathlib.Path(
    os.environ.get('JAXCNN_MNIST_DIR', REPO_ROOT.parent / 'shared' / 'datasets' / 'mnist'))


def learnable_images(num_examples: int, image_shape, num_classes: int, seed: int):
  """uint8 images of noise with a bright square whose position encodes the label."""
  rng = np.random.default_rng(seed)
  height, width, channels = image_shape
  labels = rng.integers(0, num_classes, num_examples).astype(np.int64)
  images = rng.integers(0, 96, (num_examples, height, width, channels)).astype(np.uint8)
  cells = int(np.ceil(np.sqrt(num_classes)))
  cell_h, cell_w = height // cells, width // cells
  for i, label in enumerate(labels):
    row, col = divmod(int(label), cells)
    images[i, row * cell_h:(row + 1) * cell_h, col * cell_w:(col + 1) * cell_w, :] = 255
  return images, labels


class FakeSource:
  """A list of TFDS-style examples with the random-access API of `tfds.data_source`."""

  def __init__(self, images, labels):
    self._images, self._labels = images, labels

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    return {'image': self._images[index], 'label': self._labels[index]}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


@contextlib.contextmanager
def mock_tfds(sizes):
  """Mocks TFDS (`tfds.testing.mock_data`) so that any dataset reads as learnable fake images.

  `sizes` maps split names to example counts; it is read when a split is opened, so it may be
  changed inside the block. Images have the real dataset's shape and number of classes.
  """
  import tensorflow_datasets as tfds

  def as_data_source(builder, split, **unused_kwargs):
    features = builder.info.features
    shape = tuple(features['image'].shape)
    num_classes = features['label'].num_classes
    seed = {'train': 0, 'test': 1}.get(split, 2)
    return FakeSource(*learnable_images(sizes[split], shape, num_classes, seed))

  with tfds.testing.mock_data(as_data_source_fn=as_data_source), mock.patch.object(
      tfds.core.DatasetBuilder, 'is_prepared', lambda self: True):
    yield


@pytest.fixture
def fake_tfds(monkeypatch, tmp_path):
  """Fake TFDS data (see `mock_tfds`); returns `sizes.update` to choose the split sizes, e.g.
  `fake_tfds({'train': 512, 'test': 203})`."""
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  sizes = {'train': 512, 'test': 200}
  with mock_tfds(sizes):
    yield sizes.update


def tiny_config(**overrides):
  """A config that trains in a few seconds on the fake dataset."""
  from jaxcnn.config import default_config
  config = default_config()
  config.dataset = 'mnist'
  config.model = 'lenet5'
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 24
  config.log_every_steps = 8
  config.eval_every_steps = 12
  config.learning_rate = 3e-3
  config.num_devices = 1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
