"""Compares runs side by side: one row per run, and the config keys that differ between them.

  python -m jaxcnn.compare                          # every run under runs/
  python -m jaxcnn.compare runs/mnist-lenet5-* RUN  # these runs
  python -m jaxcnn.compare --sort loss --json       # by final eval loss; JSON instead of a table
  python -m jaxcnn.compare --group_seeds            # one row per config: mean ± std over seeds
  python -m jaxcnn.compare --target 99 --sort target  # fastest to 99% test accuracy first

Everything is read from the runs' own files (`config.json`, `dataset.json`, `metrics.jsonl`), so
a run still training can be compared too: its row says how far it has come. A row gives the model,
the data it was trained and evaluated on (the dataset, `synthetic ...` for stand-in data, and the
evaluation split: figures on other data do not compare), its parameter count and the
multiply-adds of its forward pass per image (`jaxcnn.models.cost`; the model is built under
`nnx.eval_shape` and traced: nothing is materialised), the steps trained, the last evaluation's
accuracy and loss (with the top-5 accuracy of datasets of more than 10 classes, the accuracy with
test-time augmentation in runs with `eval_tta`, and that of the weights' moving average in runs
with `ema_decay`), the best accuracy and the step it came at, the training and compile seconds,
and the median of the logged examples/s. Below the table are the config keys whose values differ
between the runs, so that what was varied is plain. A run whose `metrics.jsonl` is damaged is
reported on stderr and left out; the others are still compared.

`--target 99` adds each run's time to 99% (any accuracy, in percent) as the benchmarks measure
it: the training seconds, compile and evaluation excluded, at its first evaluation that reached
it, and that evaluation's step (so it is as fine as the run's `eval_every_steps`).

With `--group_seeds`, the runs whose configs differ only in `seed` are one row, which names their
seeds and gives the mean of each figure over them with the standard deviation beside it: how
configs are compared when one seed's figure is within the noise of another's. A group's time to
`--target` is the mean over the seeds that reached it, with how many did where not all did.
"""

import json
import os
import statistics
import sys
from collections.abc import Mapping, Sequence

from absl import flags
from flax import nnx

from jaxcnn import cli, metrics, models
from jaxcnn import config as config_lib
from jaxcnn import workdir as workdir_lib
from jaxcnn.checkpoint import CHECKPOINT_DIR
from jaxcnn.errors import UserError
from jaxcnn.models import cost

_SORT_KEYS = ('accuracy', 'loss', 'time', 'target', 'name')
_SORT = flags.DEFINE_enum('sort', 'accuracy', _SORT_KEYS,
                          'Order of the rows: best final accuracy first, lowest final loss '
                          'first, least training time first, least training time to --target '
                          'first, or by run folder.')
_TARGET = flags.DEFINE_float(
    'target', None, "Also give each run's time to this test accuracy, in percent (99 for 99%): "
    'the training seconds, compile and evaluation excluded, and the step of its first '
    'evaluation at or above it.')
_JSON = flags.DEFINE_bool('json', False, 'Print the rows as JSON instead of a Markdown table.')
_GROUP_SEEDS = flags.DEFINE_bool(
    'group_seeds', False, 'One row for the runs whose configs differ only in seed: each figure '
    'is their mean, with the standard deviation beside it.')
_DEFAULT_ROOT = 'runs'


def model_size(model: str, image_shape: Sequence[int], num_classes: int,
               model_kwargs: Mapping[str, object] | None = None) -> tuple[int | None, int | None]:
  """The parameters of `model` (built with `model_kwargs`) for these inputs and the multiply-adds
  of its forward pass per image (`models.cost`); (None, None) where it cannot be built here (a
  user's model whose module is not importable from this folder)."""
  try:
    abstract = nnx.eval_shape(lambda: models.create_model(
        model, num_classes=num_classes, input_shape=tuple(image_shape),
        model_kwargs=model_kwargs, warn=False))
  except UserError:
    return None, None
  return models.count_params(abstract), cost.multiply_adds(abstract, image_shape)


def describe_run(run_dir: str, target: float | None = None) -> dict:
  """A run's row: what it trained and what it reached, from its own files. With `target` (an
  accuracy, 0.99), also when it got there: `target_seconds` and `target_step`, those of its
  first evaluation at or above it (None where none is)."""
  config = workdir_lib.read_config(run_dir)
  record = workdir_lib.read_dataset(run_dir)
  try:
    records = metrics.read_metrics(run_dir)
  except FileNotFoundError:
    records = []  # Started, and stopped before its first log step.
  split = config.eval_split
  evaluations = [r for r in records if f'{split}/accuracy' in r]
  # Of tied accuracies the latest step, as `--checkpoint best` picks (checkpoint.best_step: of
  # ties the latest): for a run ranked by accuracy with a checkpoint at every evaluation, the
  # step named here is the checkpoint that flag loads.
  best = max(evaluations, key=lambda r: (r[f'{split}/accuracy'], r['step']), default=None)
  # Time to accuracy as the benchmarks measure it: training seconds, compile and evaluation
  # excluded, at the first evaluation that reached it (so at the evaluations' granularity).
  reached = next((r for r in evaluations if target is not None
                  and r[f'{split}/accuracy'] >= target), None)

  def last(key):
    return next((r[key] for r in reversed(records) if key in r), None)

  speeds = [r['train/examples_per_sec'] for r in records if 'train/examples_per_sec' in r]
  # The timing record ends a finished run; a finished run resumed for more steps writes on.
  finished = bool(records) and 'time/train_seconds' in records[-1]
  parameters, multiply_adds = model_size(config.model, record.image_shape, record.num_classes,
                                         config_lib.model_kwargs(config))
  return {
      'run': run_dir, 'model': config.model, 'dataset': record.name,
      'parameters': parameters, 'multiply_adds': multiply_adds,
      # A run stopped by a signal saves its last step, which it may not have logged.
      'step': max(max((r['step'] for r in records), default=0), latest_checkpoint_step(run_dir)),
      'finished': finished,
      'eval_split': split,
      'accuracy': evaluations[-1][f'{split}/accuracy'] if evaluations else None,
      'loss': evaluations[-1][f'{split}/loss'] if evaluations else None,
      # Counted for datasets of more than 10 classes.
      'top5_accuracy': evaluations[-1].get(f'{split}/top5_accuracy') if evaluations else None,
      # Averaged over test-time views (eval_tta), evaluated beside the plain accuracy.
      'tta_accuracy': evaluations[-1].get(f'{split}/tta_accuracy') if evaluations else None,
      # The moving average of the weights (ema_decay > 0), evaluated beside them.
      'ema_accuracy': evaluations[-1].get(f'{split}/ema_accuracy') if evaluations else None,
      'best_accuracy': best[f'{split}/accuracy'] if best else None,
      'best_step': best['step'] if best else None,
      'target': target,
      'target_seconds': reached.get('train/seconds') if reached else None,
      'target_step': reached['step'] if reached else None,
      'train_seconds': last('time/train_seconds') if finished else last('train/seconds'),
      'compile_seconds': last('time/compile_seconds'),
      'examples_per_sec': statistics.median(speeds) if speeds else None,
      'config': config_lib.flatten(config.to_dict()),
  }


def latest_checkpoint_step(run_dir: str) -> int:
  """The step of the run's newest complete checkpoint, 0 if none: Orbax writes a checkpoint
  under a temporary name and renames it to its step once it is complete."""
  try:
    names = os.listdir(os.path.join(run_dir, CHECKPOINT_DIR))
  except OSError:
    return 0
  return max((int(name) for name in names if name.isascii() and name.isdigit()), default=0)


def differing_keys(rows: Sequence[dict]) -> list[str]:
  """The config keys whose values are not the same in every row, sorted."""
  keys = sorted({key for row in rows for key in row['config']})
  return [key for key in keys
          if len({json.dumps(row['config'].get(key)) for row in rows}) > 1]


# The figures of a row that `group_seeds` averages over the seeds.
AVERAGED = ('accuracy', 'loss', 'top5_accuracy', 'tta_accuracy', 'ema_accuracy', 'best_accuracy',
            'target_seconds', 'train_seconds', 'compile_seconds', 'examples_per_sec')


def group_seeds(rows: Sequence[dict]) -> list[dict]:
  """One row for each set of `rows` whose configs (and data) differ only in `seed`.

  A group's row is its first run's (by seed) with: `runs` and `seeds`, its runs and their seeds;
  each figure of `AVERAGED` the mean over the runs that have it and `<figure>_std` its sample
  standard deviation (0 for one run, None for none; `target_seconds` over the runs that reached
  the target, and `target_reached` says how many did); `step` the fewest steps of its runs,
  `finished` whether all finished; no `best_step` nor `target_step` (the runs' steps differ);
  and a config without `seed`.
  """
  groups: dict[str, list[dict]] = {}
  for row in rows:
    # The data too: a smoke run on stand-in data has the config of one on the real dataset.
    key = json.dumps([row['dataset'], {k: v for k, v in row['config'].items() if k != 'seed'}],
                     sort_keys=True)
    groups.setdefault(key, []).append(row)
  grouped = []
  for members in groups.values():
    members = sorted(members, key=lambda member: member['config'].get('seed', 0))
    row = {**members[0], 'runs': [m['run'] for m in members],
           'seeds': [m['config'].get('seed', 0) for m in members],
           'step': min(m['step'] for m in members),
           'finished': all(m['finished'] for m in members), 'best_step': None,
           'target_step': None,
           'target_reached': sum(m['target_seconds'] is not None for m in members),
           'config': {k: v for k, v in members[0]['config'].items() if k != 'seed'}}
    for figure in AVERAGED:
      values = [m[figure] for m in members if m[figure] is not None]
      row[figure] = statistics.mean(values) if values else None
      row[f'{figure}_std'] = (statistics.stdev(values) if len(values) > 1 else
                              0.0 if values else None)
    grouped.append(row)
  return grouped


def sort_rows(rows: list[dict], by: str) -> list[dict]:
  """`rows` in the order `by` asks for; rows without the figure go last."""
  if by == 'name':
    return sorted(rows, key=lambda row: row['run'])
  field, sign = {'accuracy': ('accuracy', -1), 'loss': ('loss', 1),
                 'time': ('train_seconds', 1), 'target': ('target_seconds', 1)}[by]
  return sorted(rows, key=lambda row: (row[field] is None, sign * (row[field] or 0), row['run']))


def short_names(paths: Sequence[str]) -> list[str]:
  """The shortest trailing parts of `paths` that tell them apart: `run` for runs/a/run and
  runs/b/run would not, `a/run` and `b/run` do."""
  parts = [os.path.normpath(path).split(os.sep) for path in paths]
  for depth in range(1, max(map(len, parts)) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return list(paths)  # The same run named twice.


def format_table(rows: Sequence[dict]) -> str:
  """The rows as a Markdown table, then the config keys that differ between them. Rows of
  `group_seeds` show their seeds, and each figure's standard deviation beside its mean."""
  grouped = any('seeds' in row for row in rows)

  def number(value, spec, row=None, figure=None, scale=1, unit=''):
    if value is None:
      return '-'
    text = format(scale * value, spec)
    spread = row.get(f'{figure}_std') if row is not None else None
    return f'{text} ± {format(scale * spread, spec)}{unit}' if spread is not None else text + unit

  best_header = 'best accuracy' if grouped else 'best accuracy (step)'  # Steps differ by seed.
  target = next((row['target'] for row in rows if row['target'] is not None), None)
  target_header = (f' to {100 * target:g}%: train s{"" if grouped else " (step)"} |'
                   if target is not None else '')

  def time_to_target(row) -> str:
    if row['target_seconds'] is None:
      return ' not reached |'
    text = number(row['target_seconds'], '.1f', row, 'target_seconds')
    if not grouped:
      text += f' ({row["target_step"]:,})'
    elif row['target_reached'] < len(row['seeds']):
      text += f' ({row["target_reached"]}/{len(row["seeds"])} seeds)'
    return f' {text} |'

  lines = [f'| run | model | data | parameters | multiply-adds | steps | accuracy | loss | '
           f'{best_header} |{target_header} train s | compile s | examples/s |',
           '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |'
           + (' ---: |' if target is not None else '') + ' ---: | ---: | ---: |']
  names = short_names([row['run'] for row in rows])
  for name, row in zip(names, rows):
    if 'seeds' in row:
      name += f' (seed{"s" if len(row["seeds"]) > 1 else ""} {", ".join(map(str, row["seeds"]))})'
    steps = f'{row["step"]:,}' + ('' if row['finished'] else ' (running or stopped)')
    best = number(row['best_accuracy'], '.2f', row, 'best_accuracy', 100, '%')
    if row['best_step'] is not None:
      best += f' ({row["best_step"]:,})'
    accuracy = number(row['accuracy'], '.2f', row, 'accuracy', 100, '%')
    if row['top5_accuracy'] is not None:
      accuracy += f' (top-5 {number(row["top5_accuracy"], ".2f", row, "top5_accuracy", 100, "%")})'
    for key, shown in (('tta_accuracy', 'TTA'), ('ema_accuracy', 'EMA')):
      if row[key] is not None:
        accuracy += f' ({shown} {number(row[key], ".2f", row, key, 100, "%")})'
    data = f'{row["dataset"]}, {row["eval_split"]}'  # Trained on, evaluated on.
    multiply_adds = ('-' if row['multiply_adds'] is None
                     else cost.format_count(row['multiply_adds']))
    lines.append(f'| {name} | {row["model"]} | {data} | {number(row["parameters"], ",")} | '
                 f'{multiply_adds} | {steps} | {accuracy} | '
                 f'{number(row["loss"], ".4f", row, "loss")} | {best} |'
                 f'{time_to_target(row) if target is not None else ""} '
                 f'{number(row["train_seconds"], ".1f", row, "train_seconds")} | '
                 f'{number(row["compile_seconds"], ".1f", row, "compile_seconds")} | '
                 f'{number(row["examples_per_sec"], ",.0f", row, "examples_per_sec")} |')
  lines.append('\nMultiply-adds: of the forward pass, per image. Accuracy and loss: the last '
               'evaluation, on the split named under data'
               + ('; TTA: that of the logits averaged over test-time views (eval_tta)'
                  if any(row['tta_accuracy'] is not None for row in rows) else '')
               + ('; EMA: that of the moving average of the weights'
                  if any(row['ema_accuracy'] is not None for row in rows) else '')
               + (f'. To {100 * target:g}%: the training seconds (compile and evaluation '
                  'excluded) at the first evaluation that reached it'
                  + ('' if grouped else ', and its step') if target is not None else '')
               + ('. Each row: the mean over its seeds ± the standard deviation.' if grouped
                  else '.'))
  differing = differing_keys(rows) if len(rows) > 1 else []
  if differing:
    lines.append('Config keys that differ:')
    for key in differing:
      # Unset: a model argument that the run left at the model's own default.
      values = ', '.join(f'{name}=' + (json.dumps(row['config'][key]) if key in row['config']
                                       else 'unset')
                         for name, row in zip(names, rows))
      lines.append(f'  {key}: {values}')
  elif len(rows) > 1:
    lines.append('The runs have the same config.')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  run_dirs = list(argv[1:]) or workdir_lib.find_runs(_DEFAULT_ROOT)
  if not run_dirs:
    raise UserError(f'no runs to compare: {_DEFAULT_ROOT}/ holds no run folders here; name the '
                    'run folders, e.g. python -m jaxcnn.compare RUN1 RUN2')
  target = _TARGET.value
  if target is not None and not 0 < target <= 100:
    raise UserError(f'--target must be an accuracy in percent, in (0, 100], got {target:g}')
  if _SORT.value == 'target' and target is None:
    raise UserError('--sort target orders the runs by their time to --target: give --target too')
  # Rounded, as accuracies are counts over the split: 94.2 / 100 is 0.9420000000000001, above
  # the 0.942 of 9,420 right answers in 10,000.
  fraction = None if target is None else round(target / 100, 9)
  rows, damaged = [], []
  for run_dir in run_dirs:
    try:
      rows.append(describe_run(run_dir, fraction))
    except metrics.DamagedMetrics as e:
      damaged.append(str(e))
  if not rows:
    raise UserError('; '.join(damaged) + '; no run is left to compare')
  for message in damaged:  # One line each; the other runs are still worth comparing.
    print(f'warning: {message}; that run is left out', file=sys.stderr, flush=True)
  if _GROUP_SEEDS.value:
    rows = group_seeds(rows)
  rows = sort_rows(rows, _SORT.value)
  if _JSON.value:
    print(json.dumps(rows, indent=2))
  else:
    print(format_table(rows))


if __name__ == '__main__':
  cli.run(main)
