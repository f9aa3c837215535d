"""Evaluates a trained run on its evaluation split.

  python -m jaxcnn.evaluate --workdir DIR [--checkpoint best|latest|STEP] [--split SPLIT]
                           [--data_dir DIR] [--manual_dir DIR] [--per_class]
                           [--tta none|flip|flip_translate]

Rebuilds the run from its `config.json` and `dataset.json`, restores the chosen checkpoint and
prints the metrics over every example of the split. `--per_class` adds a line for each class: the
accuracy on its examples and the classes they were most often taken for, from the confusion
matrix that the same evaluation counts. `--tta` evaluates with another test-time augmentation
than the run's `eval_tta`: `--tta flip` tells what averaging in mirror images would give a run
trained without it.
"""

from absl import flags

from jaxcnn import cli, feeds
from jaxcnn import workdir as workdir_lib
from jaxcnn.data import pipeline
from jaxcnn.data.augment import TEST_TIME_AUGMENTATIONS
from jaxcnn.errors import UserError
from jaxcnn.restore import restore_run
from jaxcnn.trainer import evaluate

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command: importing this module beside
  another command's `--workdir` (train.py's, predict's) must not clash."""
  flags.DEFINE_string('workdir', None, 'The run directory to evaluate.', required=True)
  flags.DEFINE_string('checkpoint', 'latest',
                      "'latest', 'best' (by the run's best_metric) or a step number.")
  flags.DEFINE_string('split', None, "Split to evaluate (default: the run's eval_split).")
  flags.DEFINE_string('data_dir', None, "TFDS data_dir to read it from (default: the run's).")
  flags.DEFINE_string('manual_dir', None,
                      "Folder of the dataset's downloaded files, to prepare it from where it is "
                      "not prepared in data_dir (default: the run's).")
  flags.DEFINE_bool('per_class', False,
                    'Also print, for each class, the accuracy on its examples and the classes '
                    'they were most often taken for.')
  flags.DEFINE_enum('tta', None, TEST_TIME_AUGMENTATIONS,
                    "Test-time augmentation to evaluate with too (default: the run's eval_tta).")


def main(argv):
  """Evaluates `--workdir`'s `--checkpoint` on `--split` and prints the metrics."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = workdir_lib.read_config(FLAGS.workdir)
  split = FLAGS.split or config.eval_split
  record = workdir_lib.read_dataset(FLAGS.workdir)
  if pipeline.is_synthetic(record.name) and split not in (config.train_split, config.eval_split):
    raise UserError(f'{FLAGS.workdir} was trained on {record.name} data, which has two splits: '
                    f'{config.train_split!r} (its training data) and {config.eval_split!r} (its '
                    f'evaluation data); --split {split!r} is neither')
  with config.unlocked():
    config.eval_split = split
    if pipeline.is_synthetic(record.name) and config.dataset != pipeline.SYNTHETIC:
      # A :smoke run that trained on a synthetic stand-in: its evaluation split is that data's,
      # even if the real dataset has been prepared since.
      print(f'{FLAGS.workdir} was trained on {record.name} data: evaluating on that', flush=True)
      config.dataset = pipeline.SYNTHETIC
      config.synthetic.image_shape = tuple(record.image_shape)
      config.synthetic.num_classes = record.num_classes
    else:  # Trained on real data: never evaluated on a synthetic stand-in for it.
      config.synthetic_if_unprepared = False
    if FLAGS.data_dir:
      config.data_dir = FLAGS.data_dir
    if FLAGS.manual_dir:
      config.manual_dir = FLAGS.manual_dir
  data = pipeline.load_data(config, train=False, flag_prefix='--')
  workdir_lib.check_same_classes(FLAGS.workdir, data.class_names)
  run = restore_run(FLAGS.workdir, FLAGS.checkpoint, placement=data.placement,
                    confusion_matrix=FLAGS.per_class, eval_tta=FLAGS.tta)
  feed = feeds.make_eval_feed(run.config, run.experiment, data)
  feed.compile(run.state, run.experiment.zero_eval_sums())
  metrics = evaluate(run.experiment, run.state, feed, split)
  which = '' if FLAGS.checkpoint.isdigit() else f' ({FLAGS.checkpoint})'
  print(f'{FLAGS.workdir}, checkpoint at step {run.step}{which}, {data.name} {split}:')
  count = metrics[f'{split}/num_examples']
  for name, value in metrics.items():
    if name.endswith('accuracy'):
      print(f'  {name} {value:.4f} ({round(value * count)}/{count})')
    elif name.endswith('loss'):
      print(f'  {name} {value:.4f}')
  if FLAGS.per_class:
    print('\n'.join(describe_classes(metrics[f'{split}/confusion_matrix'], data.class_names)))


def describe_classes(confusion, class_names, mistakes: int = 3) -> list[str]:
  """A line per class of `confusion` (rows: labels, columns: predictions): the accuracy on its
  examples, how many of them were right, and the `mistakes` classes they were most often taken
  for, with how often: `cat   92.00%   92/100  taken for dog (6), fox (2)`."""
  width = max(len(name) for name in class_names)
  digits = len(str(int(confusion.sum(axis=1).max())))
  lines = ['  per class: accuracy, correct/examples, and the classes its examples were most often '
           'taken for']
  for label, (name, row) in enumerate(zip(class_names, confusion)):
    total, right = int(row.sum()), int(row[label])
    accuracy = f'{100 * right / total:6.2f}%' if total else '      -'
    wrong = sorted(((-int(count), predicted) for predicted, count in enumerate(row)
                    if predicted != label and count))[:mistakes]
    line = f'    {name:<{width}}  {accuracy}  {right:>{digits}}/{total:<{digits}}'
    if wrong:
      line += '  taken for ' + ', '.join(f'{class_names[p]} ({-count})' for count, p in wrong)
    lines.append(line.rstrip())
  return lines


if __name__ == '__main__':
  define_flags()
  cli.run(main)
