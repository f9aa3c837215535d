"""Datasets too large for device memory: streamed from `tfds.data_source` through Grain.

Grain reads examples by index from the prepared ArrayRecord files, then decodes, augments and
batches them in worker processes. The pipeline is index-based end to end (Grain's `MapDataset`):
global batch g is a fixed function of the seed and g, whichever process or worker makes it. A
checkpoint therefore stores only the number of the next batch, a resumed run reads exactly the
batches the uninterrupted run would have read, and neither depends on `data_workers`.

Augmentation here works on one uint8 HWC image at a time with a NumPy generator that Grain derives
from the seed and the example's place in the stream.
"""

import atexit
import contextlib
import dataclasses
import functools
import gc
import math
import signal

import grain.python as grain
import numpy as np
from absl import flags

from jaxcnn.data.image_ops import random_resized_crop, resize_and_center_crop


@dataclasses.dataclass(frozen=True)
class HostAugment:
  """What the Grain workers do to each training example."""
  image_shape: tuple[int, int, int]
  crop_padding: int = 0
  pad_mode: str = 'constant'  # np.pad's mode for that padding: 'constant' (zeros) or 'reflect'.
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
      padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                      mode=self.augment.pad_mode)
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


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_END = object()  # next()'s default: the iterator had nothing.


def _leave_stopping_to_the_trainer(unused_worker_index: int, unused_worker_count: int) -> None:
  """Grain worker init: ignore SIGINT and SIGTERM (see `_iterate`)."""
  for number in _STOP_SIGNALS:
    signal.signal(number, signal.SIG_IGN)


@contextlib.contextmanager
def _stop_signals_blocked():
  """Blocks SIGINT and SIGTERM in this thread; one that arrives meanwhile is delivered after."""
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _iterate(batches: grain.MapDataset, worker_count: int):
  """A generator of `batches`, made in `worker_count` processes (0: threads of this one).

  Grain gives worker k the batches k, k + worker_count, ... and interleaves their output back
  into order, so the sequence of batches does not depend on the number of workers. Each batch is
  made whole by one thread: one per worker process, two where there are no workers.

  Ctrl-C in a terminal and `timeout` signal the whole process group. A worker that died of it
  would fail the run before the trainer, which takes these signals as a request to save and stop
  (and closes the workers itself), got there. So the workers ignore them, and until they have
  set that up (while Grain starts them and its threads, up to the first batch) they are born
  with the signals blocked, inherited from this thread.
  """
  _allow_grain_flags()
  threads = 1 if worker_count else 2
  iterable = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                       prefetch_buffer_size=threads))
  if worker_count:
    _release_shared_memory_at_exit()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                    worker_init_fn=_leave_stopping_to_the_trainer)
  with _stop_signals_blocked():
    iterator = iter(iterable)
    first = next(iterator, _END)
  try:
    if first is not _END:
      yield first
      yield from iterator
  finally:
    _close(iterator)


def train_batches(source, *, augment: HostAugment, batch_size: int, seed: int, worker_count: int,
                  start_batch: int = 0, image_key: str = 'image', label_key: str = 'label'):
  """An endless generator of this process's `batch_size` examples of each global batch,
  from global batch `start_batch` on.

  The training stream is the split shuffled afresh each epoch (from `seed` and the epoch),
  epoch after epoch, with each example augmented by a generator drawn from `seed` and its place
  in the stream. Global batch g is the stream's examples g * B to (g + 1) * B - 1 (B: the global
  batch size); process p of P takes the p-th block of B / P of them, the rows of the global batch
  that its devices hold. So a batch, row by row, is a function of (seed, g) alone: the same for
  any number of workers or processes (what pairs rows, as micro-batches and Mixup do, sees the
  same rows), and a resume at batch g needs only g.
  """
  import jax  # pylint: disable=g-import-not-at-top  (Grain's workers import this module)
  process, num_processes = jax.process_index(), jax.process_count()
  stream = (grain.MapDataset.source(source).seed(seed % 2**32).shuffle().repeat(None)
            .random_map(_TrainTransform(augment, image_key, label_key)))
  # Blocks of `batch_size` (this process's share) in stream order: block g * P + p is process
  # p's part of global batch g. Only the examples of a process's own blocks are read and decoded.
  batches = stream.batch(batch_size, drop_remainder=True)[process::num_processes]
  yield from _iterate(batches[start_batch:], worker_count)


def masked_batch(batch_size: int, image_shape) -> dict[str, np.ndarray]:
  """A batch of `batch_size` examples that are all masked out: padding, and a compile example."""
  return {'image': np.zeros((batch_size, *image_shape), np.uint8),
          'label': np.zeros((batch_size,), np.int32), 'mask': np.zeros((batch_size,), bool)}


def eval_batches(source, *, image_shape, batch_size: int, worker_count: int,
                 image_key: str = 'image', label_key: str = 'label'):
  """This process's share of a split (every P-th example from the p-th, for process p of P) in
  order, as full batches padded with masked examples.

  Every process yields the same number of batches (some wholly masked), so that processes stay
  in step in the collective evaluation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  process, num_processes = jax.process_index(), jax.process_count()
  num_batches = math.ceil(math.ceil(len(source) / num_processes) / batch_size)
  examples = grain.MapDataset.source(source)[process::num_processes]
  batches = (examples.map(_EvalTransform(image_shape, image_key, label_key))
             .batch(batch_size, drop_remainder=False))
  iterator = _iterate(batches, worker_count)
  empty = masked_batch(batch_size, image_shape)
  try:
    # Exactly len(batches) reads: a worker iterator run to its end leaves one shared memory
    # block behind (grain 0.2.18), which Python's resource tracker then reports at exit.
    for _ in range(len(batches)):
      batch = next(iterator)
      missing = batch_size - len(batch['label'])
      if missing:
        batch = {k: np.concatenate([v, empty[k][:missing]]) for k, v in batch.items()}
      yield batch
  finally:
    iterator.close()
  for _ in range(num_batches - len(batches)):
    yield empty


@functools.cache  # Once per process.
def _release_shared_memory_at_exit() -> None:
  atexit.register(_release_shared_memory)


def _release_shared_memory() -> None:
  """Frees the batches no longer referenced and waits until Grain has unlinked their shared
  memory; run at exit by a process that had Grain workers.

  A closed Grain iterator's read-ahead batches are freed only by the garbage collector (they sit
  in reference cycles); on a CPU the last batches trained on are freed only when training
  returns; and Grain unlinks a freed batch's shared memory on a background thread. Blocks still
  there at exit are left to Python's resource tracker, which removes them but warns of "leaked
  shared_memory objects". Grain offers no public call for this; its deletion pool is private, so
  a Grain without one is simply not waited for.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    try:  # Older Grain (0.2.10).
      from grain._src.python import shared_memory_array  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
  gc.collect()
  pool = getattr(getattr(shared_memory_array, 'SharedMemoryArray', None), '_del_thread_pool', None)
  if pool is not None:
    # The pool has one thread (Grain's process prefetch makes it so): a task queued now runs
    # after every deletion queued before it.
    try:
      pool.apply(lambda: None)
    except ValueError:  # The pool was closed.
      pass


def _close(iterator) -> None:
  """Stops an iterator's worker processes and threads now rather than at garbage collection
  (older Grain iterators have none)."""
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()
