"""Evaluates a trained run on its evaluation split.

  python -m jaxcnn.evaluate --workdir DIR [--checkpoint best|latest|STEP] [--split test]

Rebuilds the run from its `config.json` and `dataset.json`, restores the chosen checkpoint and
prints the metrics over every example of the split.
"""

from absl import flags

from jaxcnn import cli
from jaxcnn.data import device_data, tfds_data
from jaxcnn.errors import UserError
from jaxcnn.restore import restore_run
from jaxcnn.trainer import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory to evaluate.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  "'latest', 'best' (by the run's best_metric) or a step number.")
_SPLIT = flags.DEFINE_string('split', None, "Split to evaluate (default: the run's eval_split).")


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
  config = run.config
  split_name = _SPLIT.value or config.eval_split
  _, splits = tfds_data.load_splits(config.dataset, [split_name], config.data_dir,
                                    config.manual_dir)
  images, labels = splits[split_name]
  split = run.experiment.strategy.replicate(
      device_data.pad_split(images, labels, pad_to_multiple_of=config.eval_batch_size))
  metrics = evaluate(run.experiment, run.state, split, split_name)
  print(f'{_WORKDIR.value}, checkpoint at step {run.step} ({_CHECKPOINT.value}), '
        f'{config.dataset} {split_name}:')
  count = metrics[f'{split_name}/num_examples']
  accuracy = metrics[f'{split_name}/accuracy']
  print(f'  {split_name}/accuracy {accuracy:.4f} ({round(accuracy * count)}/{count})')
  print(f'  {split_name}/loss {metrics[f"{split_name}/loss"]:.4f}')


if __name__ == '__main__':
  cli.run(main)
