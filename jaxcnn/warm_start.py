"""Starting a run from another run's weights: fine-tuning and warm starts.

A new run with `init_from.workdir` set starts from the weights of one of that run's checkpoints
(`init_from.checkpoint`: 'best', 'latest' or a step; `init_from.weights`: the trained weights or
their moving average) instead of random ones. Every model array (a parameter or a BatchNorm
statistic) that the two models have at the same path and of the same shape is taken; the others
keep their random start and are named, such as the classifier head of a run fine-tuned on a
dataset with another number of classes. The step, the optimizer's state and the data position
start afresh: the new run is a run of its own, with its own schedule, and a resume of it reads
its own checkpoints, not init_from's.

The arrays are read on every process, into host memory, checked against the checksums saved
with them, and placed on the devices as any initial state is. The run records what it started
from in `init_from.json`.
"""

import contextlib
import dataclasses
import json
import os

import ml_collections

from jaxcnn import checkpoint, files, tree_paths
from jaxcnn import workdir as workdir_lib
from jaxcnn.errors import ConfigError, UserError
from jaxcnn.train_state import TrainState, initial_train_state

RECORD_FILE = 'init_from.json'  # In the new run's workdir: the checkpoint it started from.
# The names of a checkpoint's model arrays, by init_from.weights.
_SAVED_WEIGHTS = {'trained': ('params', 'model_state'), 'ema': ('ema_params', 'ema_model_state')}


@dataclasses.dataclass(frozen=True)
class Source:
  """The checkpoint a new run starts from."""
  workdir: str
  step: int
  weights: str  # 'trained' or 'ema'.
  run_config: ml_collections.ConfigDict  # The source run's own config.
  description: str  # How the checkpoint was chosen, for the messages.


def find_source(config: ml_collections.ConfigDict) -> Source:
  """The checkpoint that `config.init_from` names, or a one-line ConfigError saying why there
  is none: not a run, no such checkpoint, no moving average."""
  workdir = config.init_from.workdir
  try:
    source_config = workdir_lib.read_config(workdir)
  except UserError as e:
    raise ConfigError(f"config key 'init_from.workdir' ({workdir!r}) must be the workdir of a "
                      f'jaxcnn run with checkpoints: {e}') from None
  if config.init_from.weights == 'ema' and not source_config.ema_decay:
    raise ConfigError(f"config key 'init_from.weights' ('ema') takes the moving average of the "
                      f'weights, which the run in {workdir} did not keep (ema_decay 0); use '
                      "'trained'")
  with contextlib.closing(checkpoint.make_checkpointer(source_config, workdir,
                                                       reading_only=True)) as checkpointer:
    if not checkpointer.steps():
      raise ConfigError(f"config key 'init_from.workdir' ({workdir!r}) names a run that has no "
                        'checkpoint yet')
    step = checkpointer.step_named(config.init_from.checkpoint, '--config.init_from.checkpoint')
    description = f'step {step}'
    if config.init_from.checkpoint == 'latest':
      description += ', its latest'
    elif config.init_from.checkpoint == 'best':
      metric = source_config.best_metric
      value = checkpointer.read_meta(step)['metrics'][metric]
      description += f', its best by {metric} ({value:.2%})' if metric.endswith(
          'accuracy') else f', its best by {metric} ({value:.4f})'
  return Source(workdir=workdir, step=step, weights=config.init_from.weights,
                run_config=source_config, description=description)


def start_from(source: Source, state: TrainState, tx, strategy) -> tuple[TrainState, dict]:
  """A step-0 state with `source`'s weights wherever they fit this model, else `state`'s.

  `state` is the new run's initial state, in `strategy`'s layout; `tx` its optimizer, whose
  state (and the moving averages, if the run keeps them) starts afresh at the weights taken.
  Returns the state, in the same layout, and the record of what was taken (RECORD_FILE's).
  Raises a ConfigError when the two models share no array.
  """
  host = strategy.fetch(state)
  ours = {**_flat(host.params, 'params'), **_flat(host.model_state, 'model_state')}
  saved_names = dict(zip(_SAVED_WEIGHTS['trained'], _SAVED_WEIGHTS[source.weights]))

  def saved_path(path: str) -> str:
    group, name = path.split('.', 1)
    return f'state.{saved_names[group]}.{name}'

  with contextlib.closing(checkpoint.make_checkpointer(
      source.run_config, source.workdir, reading_only=True)) as checkpointer:
    try:
      saved = checkpointer.saved_arrays(source.step)
      prefixes = tuple(f'state.{name}.' for name in _SAVED_WEIGHTS[source.weights])
      theirs = {path for path in saved if path.startswith(prefixes)}
      fitting = [path for path, array in ours.items()
                 if saved_path(path) in saved and saved[saved_path(path)].shape == array.shape]
      if not fitting:
        raise ConfigError(
            f"config key 'init_from.workdir' ({source.workdir!r}) holds a run of model "
            f'{source.run_config.model!r}, none of whose arrays has the name and shape '
            f'of one of this model\'s ({tree_paths.listed(sorted(_short(p) for p in ours))})')
      arrays = checkpointer.read_arrays(source.step, {saved_path(p): saved[saved_path(p)]
                                                      for p in fitting})
    except checkpoint.CheckpointError as e:  # A damaged checkpoint: the user's to know of.
      raise UserError(f"config key 'init_from.workdir' ({source.workdir!r}): {e}") from None
  taken = {path: arrays[saved_path(path)].astype(ours[path].dtype) for path in fitting}
  weights = checkpoint.nest({**ours, **taken})
  params = checkpoint.from_nested_dict(host.params, weights['params'])
  model_state = checkpoint.from_nested_dict(host.model_state, weights['model_state'])
  new_state = initial_train_state(tx, params, model_state, ema=host.ema_params is not None)
  record = {
      'workdir': os.path.abspath(source.workdir), 'step': source.step, 'weights': source.weights,
      'taken': sorted(_short(p) for p in fitting),
      'random_start': sorted(_random_start(ours, saved, saved_path, fitting)),
      'not_used': sorted(_short(p) for p in theirs - {saved_path(p) for p in ours})}
  return strategy.replicate(new_state), record


def describe(source: Source, record: dict) -> str:
  """The line that says what a new run started from: a warning when it took fewer than half of
  the model's arrays, which is more likely a mistake than a plan."""
  taken, fresh, unused = record['taken'], record['random_start'], record['not_used']
  line = (f'starting from the weights of {source.workdir} ({source.description}'
          f'{", moving average" if source.weights == "ema" else ""}): {len(taken)} of '
          f'{len(taken) + len(fresh)} arrays')
  if fresh:
    line += f'; random start for {tree_paths.listed(fresh)}'
  if unused:
    line += f'; not used: {len(unused)} of that model\'s ({tree_paths.listed(unused)})'
  if len(taken) < len(fresh):
    line = (f'warning: {line}; fewer than half of the arrays fit: is that the run you meant '
            'to start from?')
  return line


def write_record(workdir: str, record: dict) -> None:
  """Records in the new run's workdir the checkpoint it started from and what it took."""
  files.write_text_atomically(os.path.join(workdir, RECORD_FILE),
                              json.dumps(record, indent=2) + '\n')


def _flat(tree, group: str) -> dict:
  """The arrays of `tree`, keyed by dotted path under `group`."""
  return {f'{group}.{path}': array for path, array in checkpoint.flat_leaves(
      checkpoint.to_nested_dict(tree)).items()}


def _random_start(ours: dict, saved: dict, saved_path, fitting: list[str]) -> list[str]:
  """This model's arrays that keep their random start, each with why."""
  described = []
  for path in sorted(set(ours) - set(fitting)):
    there = saved.get(saved_path(path))
    described.append(f'{_short(path)} (not in that model)' if there is None else
                     f'{_short(path)} (shape {there.shape} there, {ours[path].shape} here)')
  return described


def _short(path: str) -> str:
  """An array's path as a user names it: `conv1.kernel`, without the state's groups."""
  parts = path.split('.')
  return '.'.join(parts[2:] if parts[0] == 'state' else parts[1:])
