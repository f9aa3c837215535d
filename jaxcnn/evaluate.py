"""Evaluates a trained run on its evaluation split.

  python -m jaxcnn.evaluate --workdir DIR [--checkpoint best|latest|STEP] [--split test]

Rebuilds the run from its `config.json` and `dataset.json`, restores the chosen checkpoint and
prints the metrics over every example of the split.
"""

from absl import flags

from jaxcnn import cli, feeds
from jaxcnn import workdir as workdir_lib
from jaxcnn.data import pipeline
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
  config = workdir_lib.read_config(_WORKDIR.value)
  split = _SPLIT.value or config.eval_split
  with config.unlocked():
    config.eval_split = split
  data = pipeline.load_data(config, train=False)
  run = restore_run(_WORKDIR.value, _CHECKPOINT.value, placement=data.placement)
  feed = feeds.make_eval_feed(run.config, run.experiment, data)
  feed.compile(run.state, run.experiment.zero_eval_sums())
  metrics = evaluate(run.experiment, run.state, feed, split)
  print(f'{_WORKDIR.value}, checkpoint at step {run.step} ({_CHECKPOINT.value}), '
        f'{data.name} {split}:')
  count = metrics[f'{split}/num_examples']
  for name, value in metrics.items():
    if name.endswith('accuracy'):
      print(f'  {name} {value:.4f} ({round(value * count)}/{count})')
    elif name.endswith('loss'):
      print(f'  {name} {value:.4f}')


if __name__ == '__main__':
  cli.run(main)
