"""Shared fixtures: a fake TFDS dataset with learnable images, and the real MNIST files."""

import atexit
import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
from unittest import mock

# Eight CPU devices for the multi-device tests (unless a worker process chose its own count);
# this must happen before JAX initialises.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import pytest

# One compilation cache for the whole session, subprocesses included: the many tiny runs of the
# suite compile the same programs again and again.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcnn-tests-xla-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # So that tests can import configs/ like train.py does.
  sys.path.insert(0, str(REPO_ROOT))

# The official MNIST files (TFDS checksums). CI has no route to the dataset hosts.
MNIST_MANUAL_DIR = pathlib.Path(
    os.environ.get('JAXCNN_MNIST_DIR', REPO_ROOT.parent / 'shared' / 'datasets' / 'mnist'))


@pytest.fixture(scope='session')
def mnist_data_dir(tmp_path_factory):
  """A TFDS data_dir in which real MNIST was prepared from the official files, once a session.

  Preparing runs jaxcnn's own path: a TensorFlow subprocess reading MNIST_MANUAL_DIR. Under
  pytest-xdist the workers share one copy: the first to need it prepares it (about 35 s on a
  CI core) while the others wait on a lock, then find it prepared.
  """
  assert (MNIST_MANUAL_DIR / 'train-images-idx3-ubyte.gz').is_file(), (
      f'the official MNIST files are expected in {MNIST_MANUAL_DIR} (or $JAXCNN_MNIST_DIR)')
  from jaxcnn.data import tfds_data
  session_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # Each worker's basetemp is a folder of the session's.
    session_dir = session_dir.parent
  data_dir = session_dir / 'mnist_tfds'
  with open(session_dir / 'mnist_tfds.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    tfds_data.ensure_prepared('mnist', str(data_dir), str(MNIST_MANUAL_DIR))
  return data_dir


def learnable_images(num_examples: int, image_shape, num_classes: int, seed: int):
  """uint8 images of noise with a bright square whose position encodes the label."""
  from jaxcnn.data.synthetic import synthetic_split
  return synthetic_split(num_examples, image_shape, num_classes, seed)


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
    from jaxcnn.data.synthetic import ArraySource  # The same API as tfds.data_source.
    return ArraySource(*learnable_images(sizes[split], shape, num_classes, seed))

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


# Tries at starting processes that listen on a `free_port`: another program may take the port
# after `free_port` found it free and before the coordinator listens on it.
LAUNCH_ATTEMPTS = 3


def free_port() -> int:
  """A localhost port that no program listens on now (another may take it before it is used)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def coordinator_port_was_taken(stderr: str, port: int) -> bool:
  """Whether a process 0's `stderr` says its coordinator could not listen on `port` because
  another program had taken it: mostly jaxcnn's one line, from its check before joining; or, when
  the port was taken after that check, gRPC's log line before the process crashes (seen by
  holding the port while starting the processes without the check)."""
  return (f'port {port} is already in use on this host' in stderr or
          re.search(rf"Failed to add port to server: .* for '.*:{port}'", stderr) is not None)
