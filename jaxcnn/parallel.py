"""Data parallelism over every device: `jit` over a mesh, `shard_map`, or classic `pmap`.

All three run the same `train_step` and compute the same training run; they differ in who writes
the per-device program:

* `jit` (the default, and what JAX recommends): plain `jax.jit` over a 1-D `('data',)` mesh of
  every device of every process. State is replicated, each batch is sharded along `data`, and XLA
  inserts the gradient all-reduce. BatchNorm statistics are global-batch statistics because the
  step sees the global batch.
* `shard_map`: the step is written per device. Each device takes its slice of the batch, and
  gradients, metrics and BatchNorm statistics are averaged with `lax.pmean` over `data`.
* `pmap`: the classic `jax.pmap` step with `lax.pmean`. Replicated values carry a leading axis of
  one entry per local device, built by `device_put` of a broadcast view and read back from one
  device's shard: none of the deprecated `replicate`/`unreplicate`/`device_put_replicated`.

Each strategy builds the trainer's functions, which `Strategy.compile` then compiles ahead of
time: `train_fn(state, sums, seed, split, permutation, first_batch, num_steps)` runs `num_steps`
steps on device-resident data, `eval_fn(state, sums, split, batch_index)` adds one evaluation
batch to running sums, and `stream_train_fn` and `stream_eval_fn` do the same for one streamed
batch. The seed is an argument, not a constant of the program, so that runs with other seeds reuse
the compiled program.
"""

import abc
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcnn import xla_options
from jaxcnn.data import device_data
from jaxcnn.errors import ConfigError
from jaxcnn.train_step import accumulate

DATA_AXIS = 'data'


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D mesh named `data` over `num_devices` devices (-1: every device).

  In a multi-process run every process must hold devices of the mesh (each feeds its share of
  every batch): the mesh takes the same number of each process's devices, the first ones.
  """
  devices = select_devices(jax.devices(), num_devices, jax.process_count())
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def select_devices(devices: list, num_devices: int, num_processes: int) -> list:
  """`num_devices` of `devices` (-1: all), an equal number from each of the `num_processes`."""
  if num_devices > len(devices):
    raise ConfigError(f'config key \'num_devices\' ({num_devices}) is more than the '
                      f'{len(devices)} devices this run has')
  if num_devices <= 0 or num_devices == len(devices):
    return list(devices)
  if num_devices % num_processes:
    raise ConfigError(f"config key 'num_devices' ({num_devices}) must be a multiple of the "
                      f'{num_processes} processes, which each hold devices of the run')
  per_process = num_devices // num_processes
  by_process = {}
  for device in devices:
    by_process.setdefault(device.process_index, []).append(device)
  return [device for process in sorted(by_process) for device in by_process[process][:per_process]]


def _add(sums, values):
  return jax.tree.map(jnp.add, sums, values)


def _stream_eval(eval_step):
  """`(state, sums, batch) -> sums` of a streamed batch, whose `mask` marks its real examples
  (the same program on the global batch under jit, or on each device's part of it)."""
  def eval_one(state, sums, batch):
    return _add(sums, eval_step(state, batch, batch['mask']))
  return eval_one


def _run_steps(one_step, carry, num_steps: int):
  """Runs `one_step(carry, i)` for i in [0, num_steps): unrolled once, or as a `lax.scan`."""
  if num_steps == 1:
    return one_step(carry, 0)
  return jax.lax.scan(lambda c, i: (one_step(c, i), None), carry, jnp.arange(num_steps))[0]


class Strategy(abc.ABC):
  """How the train and eval steps are spread over the devices of `mesh`."""

  name: str
  # The mapped axis the per-device step averages over; None when the compiler partitions (jit).
  axis_name: str | None = DATA_AXIS

  def __init__(self, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.num_devices = mesh.size

  def check_batch_size(self, key: str, batch_size: int) -> None:
    """Refuses a global batch that does not split evenly over the devices."""
    if batch_size % self.num_devices:
      raise ConfigError(f'config key {key!r} ({batch_size}) must be divisible by the number of '
                        f'devices ({self.num_devices})')

  def scalar(self, value: int):
    """`value` as an int32 scalar argument of a compiled step (a batch index, the seed).

    On one device a NumPy scalar: it needs no dispatch of its own, about 0.5 ms less per
    LeNet-5 step on the 2-core CPU machine than a JAX array. On several, a JAX array: XLA:CPU
    can deadlock a collective while it transfers a NumPy argument to many host devices
    (observed: an all-reduce rendezvous timing out with 8 of them).
    """
    return np.int32(value) if self.num_devices == 1 else jnp.int32(value)

  def replicate(self, tree):
    """Places a pytree of host or device arrays on every device, in this strategy's layout."""
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: _global_array(np.asarray(x), sharding), tree)

  def unreplicate(self, tree):
    """The global (replicated over the mesh) arrays of a pytree in this strategy's layout."""
    return tree

  def fetch(self, tree):
    """A replicated pytree as host numpy arrays, read from this process's first device.

    Reading one local copy works in a multi-process run too, where a global array is not fully
    addressable, and it copies one replica instead of gathering all of them.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

  def from_global(self, tree):
    """The inverse of `unreplicate`: global replicated arrays in this strategy's layout."""
    return tree

  def permutation(self, seed: int, epoch: int, num_examples: int) -> jax.Array:
    """The order of epoch `epoch`, replicated in this strategy's layout."""
    fn = jax.jit(device_data.epoch_permutation, static_argnums=(2,),
                 out_shardings=NamedSharding(self.mesh, P()))
    return fn(jnp.int32(seed), jnp.int32(epoch), num_examples)

  def put_batch(self, local_batch: dict):
    """A global batch of which this process holds the rows `local_batch`, in this layout."""
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        local_batch)

  def compile(self, fn: Callable, *args, static=(), options: dict[str, str] | None = None
              ) -> Callable:
    """Compiles `fn` ahead of time for `args`, so that compiling is timed apart from running.

    `options` are XLA compiler options (see `xla_options`)."""
    return xla_options.compile_lowered(fn.lower(*args, *static), options)

  @abc.abstractmethod
  def train_fn(self, train_step: Callable, batch_size: int) -> Callable:
    """The jitted `(state, sums, seed, split, permutation, first_batch, num_steps) ->
    (state, sums)`, `num_steps` static."""

  @abc.abstractmethod
  def eval_fn(self, eval_step: Callable, batch_size: int) -> Callable:
    """The jitted `(state, sums, split, batch_index) -> sums`."""

  @abc.abstractmethod
  def stream_train_fn(self, train_step: Callable) -> Callable:
    """The jitted `(state, sums, seed, batch) -> (state, sums)` for one streamed batch."""

  @abc.abstractmethod
  def stream_eval_fn(self, eval_step: Callable) -> Callable:
    """The jitted `(state, sums, batch) -> sums` for one streamed batch with a `mask`."""


class JitStrategy(Strategy):
  """`jax.jit` over the mesh: global batch, compiler-inserted collectives."""

  name = 'jit'
  axis_name = None

  def _jit(self, fn: Callable, **options) -> Callable:
    """`jax.jit` of `fn`, whose outputs (the state, the metric sums) are replicated over the mesh,
    as its inputs are: left to XLA, an output could come back sharded, and the next call, compiled
    ahead of time for replicated arguments, would refuse it; the donated buffers would not be
    reused either."""
    return jax.jit(fn, out_shardings=NamedSharding(self.mesh, P()), **options)

  def train_fn(self, train_step, batch_size):
    batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

    @functools.partial(self._jit, donate_argnums=(0, 1), static_argnums=(6,))
    def train_steps(state, sums, seed, split, permutation, first_batch, num_steps):
      def one_step(carry, i):
        state, sums = carry
        start = (first_batch + i) * batch_size
        batch = device_data.train_batch(split, permutation, start, batch_size)
        state, metrics = train_step(state, jax.lax.with_sharding_constraint(batch, batch_sharding),
                                    seed)
        return state, accumulate(sums, metrics)
      return _run_steps(one_step, (state, sums), num_steps)

    return train_steps

  def eval_fn(self, eval_step, batch_size):
    batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

    @functools.partial(self._jit, donate_argnums=(1,))
    def eval_batch(state, sums, split, batch_index):
      batch, mask = device_data.eval_batch(split, batch_index * batch_size, batch_size)
      batch, mask = jax.lax.with_sharding_constraint((batch, mask), batch_sharding)
      return _add(sums, eval_step(state, batch, mask))

    return eval_batch

  def stream_train_fn(self, train_step):
    @functools.partial(self._jit, donate_argnums=(0, 1))
    def train_one(state, sums, seed, batch):
      state, metrics = train_step(state, batch, seed)
      return state, accumulate(sums, metrics)
    return train_one

  def stream_eval_fn(self, eval_step):
    return self._jit(_stream_eval(eval_step), donate_argnums=(1,))


class _PerDeviceStrategy(Strategy):
  """Shared by shard_map and pmap: the per-device programs, which differ only in how they map."""

  def _per_device_train(self, train_step, batch_size):
    local_batch = batch_size // self.num_devices

    def train_steps(state, sums, seed, split, permutation, first_batch, num_steps):
      device = jax.lax.axis_index(DATA_AXIS)

      def one_step(carry, i):
        state, sums = carry
        start = (first_batch + i) * batch_size + device * local_batch
        batch = device_data.train_batch(split, permutation, start, local_batch)
        state, metrics = train_step(state, batch, seed, first_example=device * local_batch)
        return state, accumulate(sums, metrics)
      return _run_steps(one_step, (state, sums), num_steps)

    return train_steps

  def _per_device_eval(self, eval_step, batch_size):
    local_batch = batch_size // self.num_devices

    def eval_batch(state, sums, split, batch_index):
      start = batch_index * batch_size + jax.lax.axis_index(DATA_AXIS) * local_batch
      batch, mask = device_data.eval_batch(split, start, local_batch)
      return _add(sums, eval_step(state, batch, mask))

    return eval_batch

  def _per_device_stream_train(self, train_step):
    def train_one(state, sums, seed, batch):
      first_example = jax.lax.axis_index(DATA_AXIS) * batch['label'].shape[0]
      state, metrics = train_step(state, batch, seed, first_example=first_example)
      return state, accumulate(sums, metrics)
    return train_one


class ShardMapStrategy(_PerDeviceStrategy):
  """`jax.shard_map` over the mesh: explicit per-device code with `lax.pmean`."""

  name = 'shard_map'

  # check_vma=False: JAX's check of which values vary over the devices refuses a `lax.switch`
  # under `vmap` whose branches hold constants (jax 0.10: "Primitive sub requires varying manual
  # axes to match"), and RandAugment, TrivialAugment, AutoAugment and AugMix draw each image's
  # operation that way. The step averages gradients and metrics with explicit `lax.pmean`s, as
  # under pmap, so it needs nothing that the check adds (the tests compare both with one device).
  def _map(self, fn, num_args):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(),) * num_args, out_specs=P(),
                         check_vma=False)

  def train_fn(self, train_step, batch_size):
    per_device = self._per_device_train(train_step, batch_size)

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(6,))
    def train_steps(state, sums, seed, split, permutation, first_batch, num_steps):
      fn = functools.partial(per_device, num_steps=num_steps)
      return self._map(fn, 6)(state, sums, seed, split, permutation, first_batch)

    return train_steps

  def eval_fn(self, eval_step, batch_size):
    return jax.jit(self._map(self._per_device_eval(eval_step, batch_size), 4),
                   donate_argnums=(1,))

  def _map_batch(self, fn, num_args):
    """`fn` mapped over its arguments: replicated ones, then a batch split over the devices."""
    return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(),) * (num_args - 1) + (P(DATA_AXIS),),
                         out_specs=P(), check_vma=False)  # As in `_map`.

  def stream_train_fn(self, train_step):
    return jax.jit(self._map_batch(self._per_device_stream_train(train_step), 4),
                   donate_argnums=(0, 1))

  def stream_eval_fn(self, eval_step):
    return jax.jit(self._map_batch(_stream_eval(eval_step), 3),
                   donate_argnums=(1,))


class PmapStrategy(_PerDeviceStrategy):
  """Classic `jax.pmap` with `lax.pmean`; replicated values carry a leading device axis.

  As in every multi-host pmap program, each process holds arrays over its own devices only:
  a leading axis of one entry per local device. The collectives still span every process.
  """

  name = 'pmap'

  def __init__(self, mesh):
    super().__init__(mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    # pmap maps over every device unless told otherwise. For a subset it must be given all of
    # the subset's devices, every process's, in the same order on each: given only its own,
    # each process maps alone and its collectives never reach the others.
    self._devices = list(mesh.devices.flat) if mesh.size != jax.device_count() else None
    local_mesh = jax.sharding.Mesh(np.array(local), (DATA_AXIS,))
    self._stacked = NamedSharding(local_mesh, P(DATA_AXIS))
    self._num_local = len(local)
    self._permutation_fns = {}

  def replicate(self, tree):
    def stack(x):
      # A broadcast view: every device receives one copy, the host makes none.
      return jax.device_put(np.broadcast_to(x, (self._num_local, *np.shape(x))), self._stacked)
    return jax.tree.map(lambda x: stack(np.asarray(x)), tree)

  def unreplicate(self, tree):
    # One device's copy, reshaped: no gather of all copies as `x[0]` on a pmapped array would do.
    sharding = NamedSharding(self.mesh, P())

    def first(x):
      copies = [jnp.reshape(shard.data, x.shape[1:]) for shard in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, copies)
    return jax.tree.map(first, tree)

  def fetch(self, tree):
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

  def from_global(self, tree):
    return self.replicate(jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree))

  def compile(self, fn, *args, static=(), options=None):
    if jax.process_count() == 1:
      return super().compile(fn, *args, static=static, options=options)
    # A multi-process pmap lowers for global shapes but is called with per-process ones, so it
    # cannot be compiled ahead of time; it compiles on its first call instead, with XLA's
    # default options.
    return functools.partial(_call_with_static, fn, static)

  def permutation(self, seed, epoch, num_examples):
    # One pmapped function per split size, kept: pmap caches its compilation on the function, so
    # a new one each epoch compiled anew each epoch (0.7 to 1.1 s on a CPU, inside training).
    if num_examples not in self._permutation_fns:
      self._permutation_fns[num_examples] = jax.pmap(
          functools.partial(device_data.epoch_permutation, num_examples=num_examples),
          axis_name=DATA_AXIS, in_axes=(None, 0), devices=self._devices)
    return self._permutation_fns[num_examples](jnp.int32(seed), self.replicate(np.int32(epoch)))

  def train_fn(self, train_step, batch_size):
    return jax.pmap(self._per_device_train(train_step, batch_size), axis_name=DATA_AXIS,
                    in_axes=(0, 0, None, 0, 0, None), static_broadcasted_argnums=(6,),
                    donate_argnums=(0, 1), devices=self._devices)

  def eval_fn(self, eval_step, batch_size):
    return jax.pmap(self._per_device_eval(eval_step, batch_size), axis_name=DATA_AXIS,
                    in_axes=(0, 0, 0, None), donate_argnums=(1,), devices=self._devices)

  def put_batch(self, local_batch):
    def split(x):
      x = np.asarray(x)
      return jax.device_put(x.reshape(self._num_local, -1, *x.shape[1:]), self._stacked)
    return jax.tree.map(split, local_batch)

  def stream_train_fn(self, train_step):
    return jax.pmap(self._per_device_stream_train(train_step), axis_name=DATA_AXIS,
                    in_axes=(0, 0, None, 0), donate_argnums=(0, 1), devices=self._devices)

  def stream_eval_fn(self, eval_step):
    return jax.pmap(_stream_eval(eval_step), axis_name=DATA_AXIS,
                    donate_argnums=(1,), devices=self._devices)


STRATEGIES = {cls.name: cls for cls in (JitStrategy, ShardMapStrategy, PmapStrategy)}


def make_strategy(name: str, num_devices: int = -1) -> Strategy:
  """The strategy `name` ('jit', 'shard_map' or 'pmap') over `num_devices` devices (-1: all)."""
  if name not in STRATEGIES:
    raise ConfigError(f'unknown parallel strategy {name!r}; choose one of: '
                      f'{", ".join(STRATEGIES)}')
  return STRATEGIES[name](make_mesh(num_devices))


def _call_with_static(fn, static, *args):
  return fn(*args, *static)


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds in full."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

