"""Rebuilding a trained run from its directory, with the state of one of its checkpoints.

Used by `jaxcnn.evaluate` and `jaxcnn.predict`: the run's `config.json` and `dataset.json` give
the model, optimizer and normalisation; the checkpoint gives the state.
"""

import dataclasses
import sys

import jax

from jaxcnn import models, parallel
from jaxcnn import workdir as workdir_lib
from jaxcnn.checkpoint import CheckpointError, StateMismatch, make_checkpointer
from jaxcnn.errors import UserError
from jaxcnn.trainer import Experiment, build_experiment


@dataclasses.dataclass
class RestoredRun:
  """A trained run rebuilt from its directory, with the state of one checkpoint."""
  config: object
  dataset: workdir_lib.DatasetRecord
  experiment: Experiment
  state: object
  step: int


def restore_run(workdir: str, checkpoint: str = 'latest', placement: str = 'device',
                confusion_matrix: bool = False, eval_tta: str | None = None) -> RestoredRun:
  """Rebuilds the run in `workdir` and restores its `checkpoint` ('latest', 'best' or a step).

  `placement` says where the data to evaluate will live ('device' or 'stream');
  `confusion_matrix` has its evaluation count the confusion matrix too; `eval_tta`, where not
  None, is the test-time augmentation to evaluate with instead of the run's own.
  """
  config = workdir_lib.read_config(workdir)
  record = workdir_lib.read_dataset(workdir)
  # Evaluate on every device when the eval batch splits evenly over them, else on one.
  num_devices = -1 if config.eval_batch_size % jax.device_count() == 0 else 1
  with config.unlocked():
    config.parallel, config.num_devices = 'jit', num_devices
    if eval_tta is not None:
      config.eval_tta = eval_tta
  strategy = parallel.make_strategy('jit', num_devices)
  experiment, state = build_experiment(
      config, image_shape=record.image_shape, num_classes=record.num_classes,
      num_train_examples=record.num_train_examples, mean=record.mean, std=record.std,
      strategy=strategy, placement=placement, training=False, confusion_matrix=confusion_matrix)
  checkpointer = make_checkpointer(config, workdir, reading_only=True)
  try:  # Closed on every path: an open manager's threads fail noisily at interpreter exit.
    template = {'state': state, 'train_sums': experiment.zero_train_sums()}
    sharding = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
    if not checkpointer.steps():
      raise UserError(f'{workdir} has no checkpoint yet')
    if checkpoint == 'latest':
      # Reading only: damaged checkpoints stay where they are, for the run itself to deal with.
      restored = checkpointer.restore_latest_good(template, sharding, set_aside_damaged=False)
    else:
      step = checkpointer.step_named(checkpoint, '--checkpoint')
      try:  # A damaged checkpoint (unreadable metadata or arrays) is the user's to know about.
        checkpointer.check_compatible(step, template)
        restored = checkpointer.restore(step, template, sharding)
      except CheckpointError as e:
        raise UserError(str(e)) from e
  except StateMismatch as e:
    # The config is the run's own: what builds other arrays now is the model's code, or another
    # version of jaxcnn (or of Optax, for the optimizer's state).
    if e.in_model and ':' in config.model:
      cause = (f'the code of model {config.model!r} builds other arrays than it did for the run: '
               'restore that code')
    else:
      cause = ('another version of jaxcnn wrote it, whose '
               + ('model' if e.in_model else "optimizer's state (or Optax's)")
               + ' differs from this one')
    raise StateMismatch(e.step, e.directory, e.difference, cause) from None
  finally:
    checkpointer.close()
  tree, meta = restored
  source_change = workdir_lib.changed_model_source(workdir, models.source_digest(config.model))
  if source_change:
    print(source_change, file=sys.stderr, flush=True)
  return RestoredRun(config=config, dataset=record, experiment=experiment, state=tree['state'],
                     step=meta['step'])
