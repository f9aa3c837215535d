"""How batches reach the compiled step: gathered on the device, or streamed from the host.

A train feed hands the trainer the jitted function to compile and run, its arguments for the next
call of several steps, and the data position to store in a checkpoint. An eval feed runs a whole
evaluation.

* `DeviceTrainFeed`: the split lives in device memory; each epoch's permutation is drawn on the
  device and the compiled function gathers its batches, several steps per call.
* `StreamTrainFeed`: a Grain loader produces this process's share of each batch; a background
  thread moves the next batches to the devices while the current step runs.
"""

import queue
import sys
import threading
from collections.abc import Callable, Generator

import jax

from jaxcnn import xla_options
from jaxcnn.data.pipeline import Data, default_data_workers, usable_cpu_cores
from jaxcnn.errors import ConfigError

_PREFETCH = 2


class DeviceTrainFeed:
  """Batches gathered under `jit` from a device-resident split, `steps_per_call` at a time."""

  def __init__(self, strategy, train_fn, data: Data, *, seed: int, steps_per_epoch: int):
    self.strategy = strategy
    self.fn = train_fn
    self.split = strategy.replicate(data.train)
    self.seed = seed
    self._seed_arg = strategy.scalar(seed)
    self.steps_per_epoch = steps_per_epoch
    self._permutation, self._permutation_epoch = None, None

  def max_steps(self, step: int) -> int:
    """Steps a call may run from `step`: a call never crosses into the next epoch."""
    return self.steps_per_epoch - step % self.steps_per_epoch

  def static(self, num_steps: int) -> tuple:
    return (num_steps,)

  def warm_up(self, step: int) -> None:
    """Draws the order of `step`'s epoch now, so that drawing it (and compiling the program
    that draws it) is not timed as training."""
    self._epoch_order(step // self.steps_per_epoch)

  def _epoch_order(self, epoch: int) -> jax.Array:
    """The permutation of `epoch`, drawn on the devices once per epoch."""
    if epoch != self._permutation_epoch:
      self._permutation = self.strategy.permutation(self.seed, epoch, self.split.num_examples)
      self._permutation_epoch = epoch
    return self._permutation

  def args(self, state, sums, step: int, num_steps: int) -> tuple:
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    return (state, sums, self._seed_arg, self.split, self._epoch_order(epoch),
            self.strategy.scalar(batch_in_epoch))

  def position(self, step: int) -> dict:
    """The data position after `step` steps, for the checkpoint, with the split's size: the
    epoch's order is a permutation of that many examples."""
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    return {'epoch': epoch, 'batch_in_epoch': batch_in_epoch,
            'num_examples': self.split.num_examples}

  def restore(self, step: int, position: dict, batch_size: int) -> None:
    """Checks that this config continues from the checkpoint's data position."""
    if 'stream_batch' in position or 'grain_iterator' in position:
      raise ConfigError(f'the checkpoint at step {step} was written by a run that streamed its '
                        'data; resume with --config.data_placement=stream')
    saved_batch_size = position.get('batch_size', batch_size)
    if saved_batch_size != batch_size:
      raise ConfigError(
          f'the checkpoint at step {step} was written with batch_size {saved_batch_size}; with '
          f'batch_size {batch_size} the run would not continue with the same examples. Resume '
          f'with --config.batch_size={saved_batch_size}, or start a new --workdir')
    _check_unchanged(step, 'training examples', 'the split',
                     position.get('num_examples', self.split.num_examples),  # Older: unrecorded.
                     self.split.num_examples)
    if (position.get('epoch'), position.get('batch_in_epoch')) != divmod(step,
                                                                         self.steps_per_epoch):
      raise ConfigError(
          f'the checkpoint at step {step} was taken at epoch {position.get("epoch")}, batch '
          f'{position.get("batch_in_epoch")}, but this training split has '
          f'{self.steps_per_epoch} batches per epoch: the dataset or split has changed since. '
          'Resume with the data the run was trained on, or start a new --workdir')

  def close(self) -> None:
    pass


def _check_unchanged(step: int, name: str, changed: str, saved: int, now: int) -> None:
  """Refuses a resume whose `name` (what `changed` sets) differs from the checkpoint's: the run
  would not continue with the same examples."""
  if saved != now:
    raise ConfigError(
        f'the checkpoint at step {step} was written with {saved} {name}, this run has {now}: '
        f'{changed} has changed, and the run would not continue with the same examples. Resume '
        'with what the run was trained with, or start a new --workdir')


class StreamTrainFeed:
  """Batches from a Grain pipeline, moved to the devices ahead of time by a background thread."""

  def __init__(self, strategy, train_fn, make_batches: Callable[[int], Generator[dict]], *,
               seed: int, batch_size: int, num_examples: int):
    """`make_batches(g)` iterates over this process's share of global batches g, g + 1, ...
    (`streaming.train_batches`): a batch depends only on its number, so that number is the
    whole data position. `seed` is the run's, for the randomness drawn inside the step."""
    self.strategy = strategy
    self.fn = train_fn
    self._seed_arg = strategy.scalar(seed)
    self._make_batches = make_batches
    self._batch_size, self._num_examples = batch_size, num_examples
    self._next_batch = 0  # The number of the batch the next step trains on.
    self._iterator = None
    self._queue: queue.Queue | None = None
    self._thread = None
    self._stop = threading.Event()
    self._first = None  # The first batch, taken from the queue by `warm_up`.

  def max_steps(self, step: int) -> int:
    del step
    return 1  # Streamed steps are big enough that dispatch costs nothing.

  def warm_up(self, step: int) -> None:
    """Starts the pipeline and waits for its first batch, so that starting Grain's workers is
    not timed as training."""
    del step  # `restore` has set the batch to start from.
    self._start()
    self._first = self._take()

  def static(self, num_steps: int) -> tuple:
    del num_steps
    return ()

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        self._put(self.strategy.put_batch(next(self._iterator)))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      self._put(e)

  def _put(self, item) -> None:
    """Queues `item` once there is room, or gives up when the feed is stopped: a full queue
    must not keep the thread, which `close` waits for, from ending."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _take(self):
    """The next device batch; an error of the pipeline is raised here, in the training loop."""
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def _start(self) -> None:
    if self._thread is None:
      self._iterator = self._make_batches(self._next_batch)
      self._queue = queue.Queue(maxsize=_PREFETCH)
      self._thread = threading.Thread(target=self._produce, daemon=True, name='jaxcnn-prefetch')
      self._thread.start()

  def args(self, state, sums, step: int, num_steps: int) -> tuple:
    del step, num_steps
    self._start()
    item = self._first if self._first is not None else self._take()
    self._first = None
    self._next_batch += 1
    return (state, sums, self._seed_arg, item)

  def position(self, step: int) -> dict:
    del step
    return {'stream_batch': self._next_batch, 'batch_size': self._batch_size,
            'num_examples': self._num_examples}

  def restore(self, step: int, position: dict, batch_size: int) -> None:
    """Continues from the checkpoint's batch, if this config reads the same stream."""
    del batch_size  # Recorded in the position, with the split's size.
    self._stop_thread()
    if 'grain_iterator' in position:  # An earlier jaxcnn's Grain DataLoader state.
      print(f'the checkpoint at step {step} holds an earlier jaxcnn\'s data position: continuing '
            f'at batch {step} of the stream, whose examples differ from the uninterrupted run\'s',
            flush=True)
      self._next_batch = step
      return
    if 'stream_batch' not in position:
      raise ConfigError(f'the checkpoint at step {step} was written by a run whose data lived in '
                        'device memory; resume with --config.data_placement=device')
    for key, name, changed in (('batch_size', 'batch_size', 'the config'),
                               ('num_examples', 'training examples', 'the split')):
      _check_unchanged(step, name, changed, position[key], getattr(self, f'_{key}'))
    self._next_batch = position['stream_batch']

  def _stop_thread(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._stop = None, threading.Event()
      self._iterator.close()  # Stops Grain's workers now, not at garbage collection.
      # Batches read ahead may still hold Grain's shared memory: let it go now, not at exit.
      self._iterator = self._queue = self._first = None

  def close(self) -> None:
    self._stop_thread()


class DeviceEvalFeed:
  """Evaluation over a padded, device-resident split, one compiled call per batch."""

  def __init__(self, strategy, eval_fn, data: Data, batch_size: int):
    self.strategy = strategy
    self.fn = eval_fn
    self.split = strategy.replicate(data.eval)
    self.num_batches = self.split.images.shape[-4] // batch_size
    self._compiled = None

  def compile(self, state, zero_sums):
    self._compiled = self.strategy.compile(self.fn, state, zero_sums, self.split,
                                           self.strategy.scalar(0),
                                           options=xla_options.inference_options())

  def run(self, state, sums):
    for batch_index in range(self.num_batches):
      sums = self._compiled(state, sums, self.split, self.strategy.scalar(batch_index))
    return sums


class StreamEvalFeed:
  """Evaluation over a streamed split: this process's examples in order, padded and masked."""

  def __init__(self, strategy, eval_fn, data: Data, *, batch_size: int, worker_count: int):
    self.strategy = strategy
    self.fn = eval_fn
    self._source = data.eval
    self._shape = data.image_shape
    self._keys = (data.image_key, data.label_key)
    self._local_batch = batch_size // jax.process_count()
    self._workers = worker_count
    self._compiled = None

  def _batches(self):
    # Fresh Grain workers for every evaluation, stopped at its end. Workers kept for the next
    # one would read its batches ahead all through training, taking cores and memory from the
    # training stream's workers. Starting and stopping them costs little beside an evaluation
    # of a split too large for device memory (2 workers: 1.5 s in all on a 2-core machine).
    from jaxcnn.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.eval_batches(self._source, image_shape=self._shape,
                                  batch_size=self._local_batch, worker_count=self._workers,
                                  image_key=self._keys[0], label_key=self._keys[1])

  def compile(self, state, zero_sums):
    from jaxcnn.data import streaming  # pylint: disable=g-import-not-at-top
    empty = streaming.masked_batch(self._local_batch, self._shape)
    self._compiled = self.strategy.compile(self.fn, state, zero_sums,
                                           self.strategy.put_batch(empty),
                                           options=xla_options.inference_options())

  def run(self, state, sums):
    for batch in self._batches():
      sums = self._compiled(state, sums, self.strategy.put_batch(batch))
    return sums


def make_train_feed(config, experiment, data: Data):
  """The train feed of `data` for the experiment's compiled train function."""
  strategy = experiment.strategy
  if data.placement == 'device':
    return DeviceTrainFeed(strategy, experiment.train_fn, data, seed=config.seed,
                           steps_per_epoch=experiment.steps_per_epoch)
  from jaxcnn.data import streaming  # pylint: disable=g-import-not-at-top  (Grain: 0.5 s to import)
  augment = streaming.HostAugment(image_shape=data.image_shape,
                                  crop_padding=config.augment.crop_padding,
                                  pad_mode=config.augment.pad_mode,
                                  flip=config.augment.flip,
                                  inception_crop=config.augment.inception_crop)

  workers = _workers(config)  # Now, not at each (re)start of the stream: it may warn.

  def make_batches(start_batch: int):
    return streaming.train_batches(data.train, augment=augment,
                                   batch_size=config.batch_size // jax.process_count(),
                                   seed=config.seed, worker_count=workers,
                                   start_batch=start_batch, image_key=data.image_key,
                                   label_key=data.label_key)

  return StreamTrainFeed(strategy, experiment.train_fn, make_batches, seed=config.seed,
                         batch_size=config.batch_size, num_examples=data.num_train_examples)


def make_eval_feed(config, experiment, data: Data):
  """The eval feed of `data` for the experiment's compiled eval function."""
  if data.placement == 'device':
    return DeviceEvalFeed(experiment.strategy, experiment.eval_fn, data, config.eval_batch_size)
  return StreamEvalFeed(experiment.strategy, experiment.eval_fn, data,
                        batch_size=config.eval_batch_size, worker_count=_workers(config))


# Whether this process has warned of more data workers than cores: once, not once per feed.
_warned_of_workers = False


def _workers(config) -> int:
  """The Grain worker processes of a streamed feed: `data_workers`, or the default for -1.

  A number above the cores this process may use is still obeyed (a config from a bigger machine
  must still run), with a warning: every worker is a Python process with its own memory.
  """
  global _warned_of_workers
  if config.data_workers < 0:
    return default_data_workers()
  cores = usable_cpu_cores()
  if config.data_workers > cores and not _warned_of_workers:
    _warned_of_workers = True
    print(f'warning: data_workers={config.data_workers} is more than the {cores} CPU cores this '
          'process may use; each data worker is a process of its own, so more workers than '
          'cores add memory, not speed', file=sys.stderr, flush=True)
  return config.data_workers
