"""What a checkpoint costs the training loop, with and without asynchronous saving, as JSON.

  python benchmarks/checkpoint_cost.py [--config configs/mnist.py] [--saves 10]
      [--output benchmarks/results/checkpoint_cost/<date>-<device>.json]

Builds the config's training state (model, optimizer state, BatchNorm statistics) on this
machine's devices and saves it `--saves` times through jaxcnn's Checkpointer, first with Orbax's
asynchronous saving, then without. For each save it records how long the call blocked the loop
(what a training step waits for) and how long until the checkpoint was complete on disk.
"""

import datetime
import os
import statistics
import sys
import tempfile
import time

import jax
from absl import flags
from ml_collections import config_flags

from jaxcnn import cli, parallel
from jaxcnn.checkpoint import Checkpointer
from measure import (REPO_ROOT, build_synthetic_experiment, dataset_shape, device_description,
                     emit_json)

_CONFIG = config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'mnist.py'),
                                          'Config whose state to save.',
                                          lock_config=True)
_SAVES = flags.DEFINE_integer('saves', 10, 'Checkpoints saved in each mode.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON here.')


def _spread(values):
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'values': values}


def measure(config, saves: int) -> dict:
  """Blocking and completion seconds per save, asynchronous and synchronous."""
  image_shape, num_classes = dataset_shape(config)
  experiment, state = build_synthetic_experiment(
      config, image_shape, num_classes, num_train_examples=60_000,
      strategy=parallel.make_strategy('jit', 1))
  tree = {'state': state, 'train_sums': experiment.zero_train_sums()}
  size = sum(x.nbytes for x in jax.tree.leaves(tree))
  results = {'model': config.model, 'optimizer': config.optimizer, 'checkpoint_bytes': size}
  for mode, async_save in (('async', True), ('sync', False)):
    blocked, complete = [], []
    with tempfile.TemporaryDirectory() as workdir:
      checkpointer = Checkpointer(workdir, keep_last=2, keep_best=0, best_metric='test/accuracy',
                                  async_save=async_save)
      for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.save(step, tree, meta={'data': {}, 'batch_size': config.batch_size})
        blocked.append(time.perf_counter() - start)
        checkpointer.wait()
        complete.append(time.perf_counter() - start)
      checkpointer.close()
    results[mode] = {'blocked_seconds': _spread(blocked), 'complete_seconds': _spread(complete)}
  return results


def main(argv):
  del argv
  result = {**device_description(), **measure(_CONFIG.value, _SAVES.value),
            'saves': _SAVES.value, 'date': datetime.datetime.now().astimezone().isoformat(
                timespec='seconds'), 'command': ' '.join(['python'] + sys.argv)}
  emit_json(result, _OUTPUT.value)


if __name__ == '__main__':
  cli.run(main, config_flag='config')
