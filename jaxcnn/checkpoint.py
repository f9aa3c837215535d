"""Checkpoints of the whole training state with Orbax, written so that a resumed run is the same run.

A checkpoint holds the `TrainState` (parameters, optimizer state, BatchNorm statistics, step),
the device-side metric sums of the current logging window, and a JSON record of the data position
(the epoch and batch of device-resident data, the batch number of a stream), the evaluation
metrics and a checksum of every array. Randomness is a
function of (seed, step), so nothing else is needed for a bitwise-identical continuation.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed at any moment leaves either the whole checkpoint or none; saving is asynchronous, so the
loop only waits for the copy off the device. On restore, a checkpoint that fails to read or whose
arrays do not match their checksums is reported and skipped for the previous one.

Checkpoints are stored as nested dicts of plain arrays (`{'params': {'conv1': {'kernel': ...}}}`),
independent of the Python classes that hold them in memory.
"""

import dataclasses
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxcnn import config as config_lib
from jaxcnn import tree_paths
from jaxcnn.errors import ConfigError, JaxcnnError, UserError

CHECKPOINT_DIR = 'checkpoints'
# Where damaged checkpoints are moved, beside CHECKPOINT_DIR: kept for inspection, never restored.
DAMAGED_DIR = 'checkpoints-damaged'


# ---------------------------------------------------------------- Pytrees <-> nested dicts

def to_nested_dict(tree) -> dict:
  """A nested dict of the pytree's leaves, keyed by the names along each leaf's path."""
  return nest({tree_paths.dotted(path): leaf
               for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]})


def from_nested_dict(template, nested: Mapping):
  """The inverse of `to_nested_dict`: `template`'s structure with the leaves of `nested`."""
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, _ in leaves_with_paths:
    node = nested
    for name in tree_paths.path_names(path):
      node = node[name]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def flat_leaves(nested: Mapping, prefix: str = '') -> dict:
  """The leaves of a nested dict, keyed by dotted path."""
  leaves = {}
  for name, value in nested.items():
    path = f'{prefix}{name}'
    if isinstance(value, Mapping):
      leaves.update(flat_leaves(value, path + '.'))
    else:
      leaves[path] = value
  return leaves


def nest(flat: Mapping[str, object]) -> dict:
  """The inverse of `flat_leaves`: a nested dict of the values keyed by dotted path."""
  nested: dict = {}
  for path, value in flat.items():
    *parents, name = path.split('.')
    node = nested
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return nested


# ---------------------------------------------------------------- Checksums

@jax.jit
def _checksums(tree):
  """Two uint32 sums per leaf of its bit patterns, one weighted by position, mod 2**32."""
  def checksum(x):
    x = jnp.ravel(x)
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
  return jax.tree.map(checksum, tree)


def checksums(nested: Mapping) -> dict[str, list[int]]:
  """Checksums of every array of a nested dict, keyed by dotted path (JSON-friendly)."""
  sums = jax.tree_util.tree_flatten_with_path(_checksums(nested))[0]
  return {'.'.join(tree_paths.key_name(k) for k in path): [int(v) for v in np.asarray(
      value.addressable_shards[0].data)] for path, value in sums}


# ---------------------------------------------------------------- The manager

class CheckpointError(Exception):
  """A checkpoint could not be restored (unreadable, or its arrays fail their checksums)."""


class NoGoodCheckpoint(JaxcnnError):
  """Every checkpoint of a run is damaged: the run is neither resumed nor silently restarted."""


def _short(message: str, limit: int = 160) -> str:
  """The first line of an exception message, cut to `limit` characters (TensorStore's messages
  hold whole JSON specs)."""
  line = message.splitlines()[0] if message else ''
  line = line.split(' See full TensorStore details')[0]
  return line if len(line) <= limit else line[:limit] + '...'


class StateMismatch(ConfigError):
  """A checkpoint whose training state another config built (another model, optimizer, or an
  option with state of its own, such as ema_decay, turned on or off), or other model code.

  Attributes:
    step: the checkpoint's step.
    directory: the run's checkpoint folder.
    difference: the first array that differs, and how.
    run_config: the run's own config file.
    in_model: whether that array is the model's (its weights, statistics or their averages)
      rather than the optimizer's.
  """

  def __init__(self, step: int, directory: str, difference: str, advice: str | None = None):
    """`advice`: what to do, for the message (default: resume with the run's own config)."""
    self.step, self.directory, self.difference = step, directory, difference
    self.run_config = os.path.join(os.path.dirname(directory), 'config.json')
    self.in_model = not difference.startswith('state.opt_state.')
    advice = advice or (f"resume with the run's own config (--config {self.run_config}), or "
                        'start a new --workdir')
    super().__init__(f'the checkpoint at step {step} in {directory} does not match this config: '
                     f'{difference}; {advice}')


class _WithoutUnusedMetadataErrors(logging.Filter):
  """Drops Orbax's ERROR log of a checkpoint's `_CHECKPOINT_METADATA` that does not parse.

  jaxcnn reads nothing from that file (its own record is the `meta` item, checked with the
  arrays), and Orbax goes on without it: yet it logs an error with the file's whole content,
  once per thread, before a resume that then works.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Failed to json parse Metadata file')


# Orbax logs through absl, whose records go to the 'absl' logger.
logging.getLogger('absl').addFilter(_WithoutUnusedMetadataErrors())


def _ignore_failed_read_leftovers() -> None:
  """Filters what a failed checkpoint read leaves behind out of Python's unraisable reports.

  After a failed read, Orbax leaves the reads of the other arrays to fail on their own, as
  coroutines never awaited and TensorStore callbacks on the asyncio loop it has closed; Python
  would print a traceback for each (dozens to thousands of lines, each with a JSON spec) as the
  process goes on or exits. Those alone are dropped; other unraisable exceptions are reported as
  before. Installed before every restore, once per process.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'jaxcnn_filter', False):
    return

  def from_a_failed_read(unraisable) -> bool:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return True
    code = getattr(unraisable.object, 'cr_code', None)  # A coroutine of Orbax's reading.
    return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename

  def hook(unraisable):
    if not from_a_failed_read(unraisable):
      previous(unraisable)

  hook.jaxcnn_filter = True
  sys.unraisablehook = hook


def damaged_for_any_process(step: int, error: CheckpointError | None) -> CheckpointError | None:
  """This process's verdict on checkpoint `step` (`error` if it failed to read it), agreed with
  the other processes of a multi-process run: a checkpoint that any of them failed to read is
  damaged for all, so that every process resumes from the same step."""
  if jax.process_count() == 1:
    return error
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
  if error is None and failed.any():
    processes = ', '.join(str(i) for i in np.flatnonzero(failed))
    return CheckpointError(f'checkpoint {step} could not be read by process {processes}')
  return error


def holds_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint (complete or not), from which a run there resumes."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class _ManagerOutsideThePreemptionSyncPoint(ocp.CheckpointManager):
  """Orbax's checkpoint manager, kept from checking JAX's preemption sync point.

  The sync point keeps one counter per process, the id of its last check, and on a preemption
  notice stops every process at the check one past the furthest counter. Orbax's manager checks it
  too, with the checkpoint's step, in `save` and from the thread that finishes an asynchronous
  save: that sets the counter to an id of its own at a moment of its own, behind the training
  loop's, and a process whose loop is already past the check agreed on never stops while the
  others wait for it at their last save. The training loop alone checks it
  (`trainer._StopRequests`) and saves the step it stopped at.
  """

  def reached_preemption(self, step: int) -> bool:
    del step  # Only Orbax's logging and save policy ask, and every save here is asked for.
    return False


@dataclasses.dataclass(frozen=True)
class _BestRanked:
  """Orbax preservation policy: keeps the `n` checkpoints of highest `rank(step)`, of those
  ranked (`Checkpointer._rank`)."""
  rank: Callable[[int], tuple[float, int] | None]
  n: int

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    ranks = [rank for rank in (self.rank(info.step) for info in checkpoints) if rank is not None]
    kept = {step for _, step in sorted(ranks)[-self.n:]}
    return [info.step in kept for info in checkpoints]


class Checkpointer:
  """Saves and restores training checkpoints in `<workdir>/checkpoints/<step>/`.

  Keeps the `keep_last` most recent checkpoints and, separately, the `keep_best` best ones by
  `best_metric` (among checkpoints saved with that metric). `reading_only` (evaluating a run)
  leaves the folder as it is: not even created where it is missing.
  """

  def __init__(self, workdir: str, *, keep_last: int, keep_best: int, best_metric: str,
               best_mode: str = 'max', async_save: bool = True, reading_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._keep_best = keep_best
    # Each checkpoint's rank by best_metric, read from its own JSON record once (see _rank).
    self._ranks: dict[int, tuple[float, int] | None] = {}
    policies = [checkpoint_managers.LatestN(n=keep_last)]
    if keep_best > 0:
      policies.append(_BestRanked(rank=self._ranks.get, n=keep_best))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not reading_only,
        create=not reading_only)
    # Handlers named up front, so that a new process can read metadata before any restore.
    self._manager = _ManagerOutsideThePreemptionSyncPoint(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._closed = False

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    steps = self.steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The kept checkpoint with the best `best_metric` (of ties the latest), or None if none has
    it."""
    ranks = [rank for rank in map(self._rank, self.steps()) if rank is not None]
    return max(ranks)[1] if ranks else None

  def _rank(self, step: int) -> tuple[float, int] | None:
    """How checkpoint `step` ranks for `keep_best` and `best_step`, the greater the better:
    (its `best_metric`, negated where lower is better, and its step, so that of ties the latest
    ranks first); None where it was saved without that metric (or with NaN) or cannot be read.

    Read from the checkpoint's own JSON record, once: Orbax's manager keeps a checkpoint's
    metrics for its best-N policy in memory only (it writes them to disk only with its own
    `best_fn`, which would rank the checkpoints of an older run as having none), so a resumed
    run would have deleted the best checkpoint of its earlier part as soon as that left the last
    `keep_last`.
    """
    if step not in self._ranks:
      try:
        value = self.read_meta(step).get('metrics', {}).get(self.best_metric)
      except Exception:  # pylint: disable=broad-except  (a damaged checkpoint ranks nowhere)
        value = None
      self._ranks[step] = self._ranked(value, step)
    return self._ranks[step]

  def _ranked(self, value: float | None, step: int) -> tuple[float, int] | None:
    if value is None or math.isnan(value):
      return None
    return (value if self.best_mode == 'max' else -value, step)

  def save(self, step: int, tree, meta: dict, metrics: Mapping[str, float] | None = None) -> None:
    """Starts writing checkpoint `step` of `tree` (replicated global arrays) and returns.

    `meta` is stored as JSON with the checksums of the arrays; `metrics` (evaluation results),
    if any, rank the checkpoint for `keep_best`.
    """
    nested = to_nested_dict(tree)
    meta = {**meta, 'step': int(step), 'metrics': dict(metrics or {}),
            'checksums': checksums(nested)}
    # Every checkpoint's rank known before Orbax's manager applies `keep_best`, within this save
    # (which must not be re-entered to read one).
    if self._keep_best:
      for earlier in self.steps():
        self._rank(earlier)
    self._ranks[int(step)] = self._ranked(meta['metrics'].get(self.best_metric), int(step))
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(nested),
                                      meta=ocp.args.JsonSave(meta)))
    if not saved:  # Orbax skips, without an error, a step not newer than the latest on disk.
      raise RuntimeError(f'checkpoint {step} was not written: {self.directory} holds checkpoints '
                         f'up to step {self.latest_step()}')

  def read_meta(self, step: int) -> dict:
    """The JSON record of checkpoint `step`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def step_named(self, name: str, option: str) -> int:
    """The step of the checkpoint that `name` ('latest', 'best' or a step number) names, in a
    run that holds checkpoints (its callers say in their own words that one holds none).

    Raises a UserError, which names `option` (how the user gave `name`), when there is no such
    checkpoint.
    """
    steps = self.steps()
    if name == 'latest':
      return steps[-1]
    if name == 'best':
      step = self.best_step()
      if step is None:
        raise UserError(f'no checkpoint in {self.directory} was saved with {self.best_metric}; '
                        f'use {option}=latest')
      return step
    if name.isdigit() and int(name) in steps:
      return int(name)
    raise UserError(f"{option}={name!r} is not 'latest', 'best' or one of the steps saved in "
                    f'{self.directory}: {", ".join(map(str, steps))}')

  def saved_arrays(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shape and dtype of every array of checkpoint `step`, keyed by dotted path
    (`state.params.conv1.kernel`), from its metadata alone.

    Raises:
      CheckpointError: the metadata cannot be read (a damaged checkpoint).
    """
    try:
      leaves = flat_leaves(self._manager.item_metadata(step)['state'].tree)
      return {path: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
              for path, leaf in leaves.items()}
    except Exception as e:  # pylint: disable=broad-except  (unreadable metadata means damage)
      raise CheckpointError(f'checkpoint {step} has unreadable metadata: {type(e).__name__}: '
                            f'{_short(str(e))}') from e

  def read_arrays(self, step: int, wanted: Mapping[str, jax.ShapeDtypeStruct]
                  ) -> dict[str, np.ndarray]:
    """Some arrays of checkpoint `step`, keyed by dotted path as `saved_arrays` gives them, read
    into host memory on every process and checked against their checksums.

    Raises:
      CheckpointError: the checkpoint cannot be read or fails its checksums.
    """
    abstract = nest({path: jax.ShapeDtypeStruct(array.shape, array.dtype)
                     for path, array in wanted.items()})
    # The manager's own handler restores whole trees only; this one reads what it is given.
    reader = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(create=False,
                                                             cleanup_tmp_directories=False),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    _ignore_failed_read_leftovers()
    try:
      restored = reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any read failure means damage)
      logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # As in `restore`.
      raise CheckpointError(f'checkpoint {step} cannot be read: {type(e).__name__}: '
                            f'{_short(str(e))}') from e
    finally:
      reader.close()
    arrays = {path: np.asarray(value) for path, value in flat_leaves(restored['state']).items()}
    saved_sums = restored['meta'].get('checksums', {})
    if any(saved_sums.get(path) != sums for path, sums in checksums(nest(arrays)).items()):
      raise CheckpointError(f'checkpoint {step} does not match its checksums')
    return arrays

  def check_compatible(self, step: int, template) -> None:
    """Raises a StateMismatch naming the first array whose shape differs from `template`'s, or a
    CheckpointError if the checkpoint's metadata cannot be read (a damaged checkpoint).

    Parameters are compared first, so the message names the layer that changed rather than its
    optimizer moments.
    """
    saved = {path: array.shape for path, array in self.saved_arrays(step).items()}
    wanted = {path: tuple(leaf.shape)
              for path, leaf in flat_leaves(to_nested_dict(template)).items()}
    for path in sorted(set(saved) | set(wanted), key=lambda p: ('.params.' not in f'.{p}', p)):
      if saved.get(path) == wanted.get(path):
        continue
      if path not in saved:
        difference = f'{path} (shape {wanted[path]}) is in the model but not in the checkpoint'
      elif path not in wanted:
        difference = f'{path} (shape {saved[path]}) is in the checkpoint but not in the model'
      else:
        difference = (f'{path} has shape {saved[path]} in the checkpoint and {wanted[path]} in '
                      'the model')
      raise StateMismatch(step, self.directory, difference)

  def restore(self, step: int, template, sharding) -> tuple[object, dict]:
    """Restores checkpoint `step` into `template`'s structure, placed with `sharding`.

    Raises:
      CheckpointError: the checkpoint cannot be read or fails its checksums.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            to_nested_dict(template))
    _ignore_failed_read_leftovers()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any read failure means damage)
      # The reads of the other arrays end as asyncio tasks whose exceptions nobody retrieves;
      # asyncio would log each with its whole TensorStore spec. The warning below says it all.
      logging.getLogger('asyncio').setLevel(logging.CRITICAL)
      raise CheckpointError(f'checkpoint {step} cannot be read: {type(e).__name__}: '
                            f'{_short(str(e))}') from e
    nested, meta = restored['state'], dict(restored['meta'])
    if checksums(nested) != meta.get('checksums'):
      raise CheckpointError(f'checkpoint {step} does not match its checksums')
    return from_nested_dict(template, nested), meta

  def restore_latest_good(self, template, sharding,
                          set_aside_damaged: bool = True) -> tuple[object, dict] | None:
    """Restores the newest checkpoint that reads back intact, warning about each damaged one.

    With `set_aside_damaged` (a run about to train on), damaged checkpoints newer than the one
    restored are moved to `checkpoints-damaged/` beside the checkpoints (kept, never restored), so
    that the run saves those steps again; Orbax would skip them while they are there.

    Returns None when there is no checkpoint. Raises a ConfigError when the checkpoints were
    written by a different model or optimizer, and NoGoodCheckpoint when every one is damaged:
    starting again from step 0 in their place would quietly discard the run.
    """
    damaged = []
    for step in reversed(self.steps()):
      try:
        self.check_compatible(step, template)
        restored, error = self.restore(step, template, sharding), None
      except CheckpointError as e:
        restored, error = None, e
      error = damaged_for_any_process(step, error)
      if error is not None:
        print(f'warning: {str(error).rstrip(".")}; trying the previous checkpoint',
              file=sys.stderr, flush=True)
        damaged.append(step)
        continue
      if damaged and set_aside_damaged:
        self._set_aside(damaged)
      return restored
    if damaged:
      steps = ', '.join(map(str, sorted(damaged)))
      if not set_aside_damaged:  # Reading the weights, not resuming.
        raise NoGoodCheckpoint(f'every checkpoint in {self.directory} is damaged (steps {steps}): '
                               'there are no weights to read')
      raise NoGoodCheckpoint(
          f'every checkpoint in {self.directory} is damaged (steps {steps}), so the run cannot '
          'resume; move that folder away to train again from step 0, or start a new --workdir')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves the checkpoints of `steps` out of the manager's folder, into DAMAGED_DIR."""
    damaged_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(damaged_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(damaged_dir, str(step))
        suffix = 1
        while os.path.exists(target):
          target = os.path.join(damaged_dir, f'{step}.{suffix}')
          suffix += 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        print(f'warning: moved the damaged checkpoint {step} to {target}', file=sys.stderr,
              flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('jaxcnn_damaged_checkpoints_set_aside')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every checkpoint started so far is completely written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for every checkpoint to be written, then releases the manager (once: closing a
    closed checkpointer does nothing)."""
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._closed = True


def make_checkpointer(config: ml_collections.ConfigDict, workdir: str,
                      reading_only: bool = False) -> Checkpointer:
  """The checkpoint manager of a run, with the config's retention and saving options."""
  return Checkpointer(workdir, keep_last=config.keep_checkpoints, keep_best=config.keep_best,
                      best_metric=config.best_metric,
                      best_mode=config_lib.metric_direction(config.best_metric),
                      async_save=config.async_checkpointing, reading_only=reading_only)
