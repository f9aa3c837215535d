"""`python -m jaxcnn.compare`: runs side by side, from their own files."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from jaxcnn import compare, trainer
from jaxcnn import workdir as workdir_lib
from jaxcnn.errors import UserError

from conftest import REPO_ROOT, tiny_config


def run_compare(*args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, '-m', 'jaxcnn.compare', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120, check=False,
                        env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)})


def test_two_runs_side_by_side_with_what_differs(fake_tfds, tmp_path):
  runs = tmp_path / 'runs'
  results = {lr: trainer.train_and_evaluate(tiny_config(learning_rate=lr), str(runs / f'lr{lr}'))
             for lr in (3e-3, 1e-4)}
  rows = {row['run']: row for row in map(compare.describe_run, workdir_lib.find_runs(str(runs)))}
  assert sorted(rows) == [str(runs / 'lr0.0001'), str(runs / 'lr0.003')]
  for lr, result in results.items():
    row = rows[str(runs / f'lr{lr}')]
    # LeNet-5 on 28x28x1: the README's count, and test_models.py's multiply-adds.
    assert (row['model'], row['parameters'], row['multiply_adds'], row['step'],
            row['finished']) == ('lenet5', 61_706, 416_520, 24, True)
    assert row['accuracy'] == pytest.approx(result['test/accuracy'])
    assert row['loss'] == pytest.approx(result['test/loss'])
    assert row['train_seconds'] == pytest.approx(result['time/train_seconds'])
    assert row['compile_seconds'] == pytest.approx(result['time/compile_seconds'])
    assert row['best_accuracy'] >= row['accuracy'] and row['best_step'] in (12, 24)
  assert compare.differing_keys(list(rows.values())) == ['learning_rate']
  by_loss = compare.sort_rows(list(rows.values()), 'loss')
  assert by_loss[0]['loss'] <= by_loss[1]['loss']

  # A run stopped before its end: its last logged figures, and said to be unfinished.
  stopped = runs / 'lr0.003' / 'metrics.jsonl'
  lines = stopped.read_text().splitlines(keepends=True)
  stopped.write_text(''.join(line for line in lines if 'time/train_seconds' not in line))
  row = compare.describe_run(str(runs / 'lr0.003'))
  assert not row['finished'] and row['compile_seconds'] is None
  assert row['train_seconds'] == pytest.approx(results[3e-3]['time/train_seconds'])  # At step 24.

  # A finished run resumed for more steps: going again, past its earlier end.
  resumed = runs / 'lr0.0001' / 'metrics.jsonl'
  with open(resumed, 'a', encoding='utf-8') as f:
    f.write('{"step": 32, "train/loss": 0.5, "train/examples_per_sec": 100.0}\n')
  row = compare.describe_run(str(runs / 'lr0.0001'))
  assert (row['finished'], row['step']) == (False, 32)
  resumed.write_text(''.join(resumed.read_text().splitlines(keepends=True)[:-1]))

  # The command: every run under runs/ of the current folder, as a Markdown table.
  result = run_compare('--sort', 'name', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  data = f'{rows[str(runs / "lr0.003")]["dataset"]}, test'
  assert lines[2].startswith(f'| lr0.0001 | lenet5 | {data} | 61,706 | 417K | 24 | ')
  assert lines[3].startswith(
      f'| lr0.003 | lenet5 | {data} | 61,706 | 417K | 24 (running or stopped) | ')
  assert '  learning_rate: lr0.0001=0.0001, lr0.003=0.003' in lines

  with open(stopped, 'a', encoding='utf-8') as f:  # A last line cut short by a kill, say.
    f.write('{"step": 30, "train/lo')
  row = compare.describe_run(str(runs / 'lr0.003'))
  assert (row['step'], row['finished']) == (24, False)


def write_run(run_dir, records, dataset='mnist/3.0.1', eval_split='test', last_line='',
              **config):
  """A run folder as the trainer leaves it: config.json (only the keys that matter here, and
  `config`: the others are the defaults), dataset.json and metrics.jsonl with `records`, then
  `last_line`."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'dataset': 'mnist', 'model': 'lenet5', 'eval_split': eval_split, **config}, f)
  with open(os.path.join(run_dir, 'dataset.json'), 'w', encoding='utf-8') as f:
    json.dump({'name': dataset, 'image_shape': [28, 28, 1], 'num_classes': 10,
               'class_names': [str(i) for i in range(10)], 'num_train_examples': 60000,
               'mean': [33.3], 'std': [78.6]}, f)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(record) + '\n' for record in records) + last_line)
  return str(run_dir)


def evaluation(step, accuracy, split='test'):
  return {'step': step, f'{split}/loss': 1 - accuracy, f'{split}/accuracy': accuracy}


def test_each_row_says_what_data_it_was_trained_and_evaluated_on(tmp_path):
  # A smoke run on stand-in synthetic data scores 100% and sorts first: the row must say so.
  write_run(tmp_path / 'runs' / 'smoke', [evaluation(50, 1.0)], dataset='synthetic mnist')
  write_run(tmp_path / 'runs' / 'real', [evaluation(50, 0.98, 'train[90%:]')],
            eval_split='train[90%:]')
  result = run_compare(cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('| run | model | data | parameters | multiply-adds |')
  assert lines[2].startswith('| smoke | lenet5 | synthetic mnist, test | 61,706 | 417K | 50 ')
  assert lines[3].startswith('| real | lenet5 | mnist/3.0.1, train[90%:] | 61,706 | 417K | 50 ')


def test_runs_of_one_model_with_other_model_kwargs_count_their_own_parameters(tmp_path):
  rows = [compare.describe_run(write_run(tmp_path / name, [evaluation(50, 0.98)], model='bn_cnn',
                                         **config))
          for name, config in (('narrow', {'model_kwargs': {'widths': [8, 16], 'hidden': 32}}),
                               ('default', {}))]
  # bn_cnn's README count, and by hand: convolutions 1*8*9 and 8*16*9, BatchNorm scales and
  # biases 2*(8+16), fc1 (7*7*16 + 1)*32, fc2 (32 + 1)*10.
  assert [row['parameters'] for row in rows] == [72 + 1152 + 48 + 25_120 + 330, 98_554]
  assert [row['multiply_adds'] for row in rows] == [307_648, 1_994_240]  # As test_summary's.
  lines = compare.format_table(rows).splitlines()
  assert '  model_kwargs.hidden: narrow=32, default=unset' in lines
  assert '  model_kwargs.widths: narrow=[8, 16], default=unset' in lines


def test_runs_that_differ_only_in_seed_are_one_row_of_means_and_spreads(tmp_path):
  runs = tmp_path / 'runs'
  for seed, accuracy in ((1, 0.99), (0, 0.98), (2, 0.97)):
    write_run(runs / f'a{seed}', [evaluation(50, accuracy)], seed=seed)
  write_run(runs / 'b0', [evaluation(50, 0.5)], seed=0, learning_rate=0.1)
  rows = compare.group_seeds([compare.describe_run(str(run)) for run in sorted(runs.iterdir())])
  assert [(row['seeds'], row['runs']) for row in rows] == [
      ([0, 1, 2], [str(runs / 'a0'), str(runs / 'a1'), str(runs / 'a2')]), ([0], [str(runs / 'b0')])]
  assert rows[0]['accuracy'] == pytest.approx(0.98)
  assert rows[0]['accuracy_std'] == pytest.approx(0.01)  # The sample standard deviation.
  assert rows[0]['loss'] == pytest.approx(0.02) and rows[0]['loss_std'] == pytest.approx(0.01)
  assert (rows[1]['accuracy'], rows[1]['accuracy_std']) == (0.5, 0.0)
  assert 'seed' not in rows[0]['config']
  lines = compare.format_table(rows).splitlines()
  assert lines[0].startswith('| run | model | data | parameters | multiply-adds | steps | accuracy '
                             '| loss | best accuracy | train s |')
  assert lines[2] == ('| a0 (seeds 0, 1, 2) | lenet5 | mnist/3.0.1, test | 61,706 | 417K | 50 '
                      '(running or stopped) | 98.00 ± 1.00% | 0.0200 ± 0.0100 | 98.00 ± 1.00% '
                      '| - | - | - |')
  assert lines[3].startswith('| b0 (seed 0) | lenet5 | mnist/3.0.1, test | 61,706 | 417K | 50 '
                             '(running or stopped) | 50.00 ± 0.00% |')
  assert 'Each row: the mean over its seeds ± the standard deviation.' in lines[5]
  assert '  learning_rate: a0=0.001, b0=0.1' in lines  # Not seed, which the rows average over.

  result = run_compare('--group_seeds', '--json', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert [row['seeds'] for row in json.loads(result.stdout)] == [[0, 1, 2], [0]]  # By accuracy.


def test_a_damaged_metrics_file_leaves_out_only_its_run(tmp_path):
  steps = [{'step': step, 'train/loss': 1.0} for step in range(10, 130, 10)]
  good = write_run(tmp_path / 'good', steps + [evaluation(120, 0.9)])
  # Killed while writing: the last line is cut short, as the trainer itself expects.
  killed = write_run(tmp_path / 'killed', steps + [evaluation(120, 0.8)],
                     last_line='{"step": 130, "train/lo')
  row = compare.describe_run(killed)
  assert (row['step'], row['accuracy'], row['finished']) == (120, 0.8, False)
  # Damaged on line 14 of 15 (the blank line 13 counts: it is a line of the file).
  damaged = write_run(tmp_path / 'damaged', steps, last_line='\n{"step": 130, "train/lo\n' +
                      json.dumps(evaluation(140, 0.95)) + '\n')
  with pytest.raises(UserError, match='damaged/metrics.jsonl is damaged: line 14 is not JSON'):
    compare.describe_run(damaged)

  result = run_compare(good, damaged, killed, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stderr == (f'warning: {damaged}/metrics.jsonl is damaged: line 14 is not JSON; '
                           'that run is left out\n')
  rows = [line.split(' | ')[0] for line in result.stdout.splitlines()[2:] if line.startswith('|')]
  assert rows == ['| good', '| killed']

  result = run_compare(damaged, cwd=tmp_path)  # Nothing left to compare: an error.
  assert (result.returncode, result.stderr) == (
      2, f'error: {damaged}/metrics.jsonl is damaged: line 14 is not JSON; no run is left to '
      'compare\n')

  with open(os.path.join(good, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('[120, 0.9]\n{"step": 130}\n')  # JSON, but not a record of a step.
  with pytest.raises(UserError, match='good/metrics.jsonl is damaged: line 14 is not a record'):
    compare.describe_run(good)


def test_a_target_in_tenths_of_a_percent_is_reached_by_that_accuracy(tmp_path):
  write_run(tmp_path / 'runs' / 'a', [{**evaluation(10, 0.942), 'train/seconds': 5.0},
                                      {**evaluation(20, 0.95), 'train/seconds': 10.0}])
  result = run_compare('--target', '94.2', '--json', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  [row] = json.loads(result.stdout)
  assert (row['target_step'], row['target_seconds']) == (10, 5.0)  # 94.2 / 100 > 0.942 in floats.


def test_time_to_a_target_accuracy_is_that_of_the_first_evaluation_that_reached_it(tmp_path):
  runs = tmp_path / 'runs'

  def timed(step, accuracy, seconds):
    return {**evaluation(step, accuracy), 'train/seconds': seconds}

  # Seeds 0 and 1 get to 99.5% (seed 1 faster), seed 2 does not; another config, faster still.
  write_run(runs / 'a0', [timed(100, 0.990, 5.0), timed(200, 0.995, 9.0), timed(300, 0.994, 13.0)])
  write_run(runs / 'a1', [timed(100, 0.996, 4.0), timed(200, 0.993, 8.0)], seed=1)
  write_run(runs / 'a2', [timed(100, 0.991, 6.0), timed(200, 0.994, 12.0)], seed=2)
  write_run(runs / 'b', [timed(50, 0.9951, 2.5)], learning_rate=0.01)
  rows = {os.path.basename(row['run']): row for row in
          (compare.describe_run(str(run), target=0.995) for run in sorted(runs.iterdir()))}
  assert [(rows[name]['target_seconds'], rows[name]['target_step'])
          for name in ('a0', 'a1', 'a2', 'b')] == [(9.0, 200), (4.0, 100), (None, None), (2.5, 50)]
  assert compare.describe_run(str(runs / 'a0'))['target_seconds'] is None  # No target asked.

  result = run_compare('--target', '99.5', '--sort', 'target', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert '| best accuracy (step) | to 99.5%: train s (step) | train s |' in lines[0]
  assert [line.split(' | ')[0] for line in lines[2:6]] == ['| b', '| a1', '| a0', '| a2']
  assert '| 99.51% (50) | 2.5 (50) |' in lines[2] and '| not reached |' in lines[5]
  assert 'To 99.5%: the training seconds (compile and evaluation excluded) at the first ' \
         'evaluation that reached it, and its step.' in result.stdout

  grouped = run_compare('--target', '99.5', '--group_seeds', '--sort', 'target', cwd=tmp_path)
  assert grouped.returncode == 0, grouped.stderr
  lines = grouped.stdout.splitlines()
  assert lines[2].startswith('| b (seed 0) |') and '| 2.5 ± 0.0 |' in lines[2]
  # The mean of the two seeds that got there, and how many of the three did.
  assert lines[3].startswith('| a0 (seeds 0, 1, 2) |')
  assert f'| 6.5 ± {statistics.stdev([9.0, 4.0]):.1f} (2/3 seeds) |' in lines[3]

  for args, message in ((('--target', '0'), 'error: --target must be an accuracy in percent, in '
                          '(0, 100], got 0\n'),
                        (('--sort', 'target'), 'error: --sort target orders the runs by their '
                         'time to --target: give --target too\n')):
    result = run_compare(*args, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, message)


def test_a_run_with_a_moving_average_shows_its_accuracy_beside_the_weights(tmp_path):
  with_ema = {**evaluation(50, 0.98), 'test/ema_accuracy': 0.9912, 'test/ema_loss': 0.01}
  write_run(tmp_path / 'runs' / 'ema', [with_ema])
  write_run(tmp_path / 'runs' / 'plain', [evaluation(50, 0.97)])
  rows = {os.path.basename(row['run']): row
          for row in map(compare.describe_run, workdir_lib.find_runs(str(tmp_path / 'runs')))}
  assert (rows['ema']['ema_accuracy'], rows['plain']['ema_accuracy']) == (0.9912, None)
  result = run_compare(cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert '| 98.00% (EMA 99.12%) | 0.0200 |' in lines[2] and '| 97.00% | 0.0300 |' in lines[3]
  assert 'EMA: that of the moving average of the weights.' in result.stdout


def test_a_run_with_test_time_augmentation_shows_that_accuracy_beside_the_plain_one(tmp_path):
  views = {**evaluation(50, 0.98), 'test/tta_accuracy': 0.9871, 'test/tta_loss': 0.03}
  rows = [compare.describe_run(write_run(tmp_path / name, [record]))
          for name, record in (('tta', views), ('plain', evaluation(50, 0.97)))]
  assert [row['tta_accuracy'] for row in rows] == [0.9871, None]
  table = compare.format_table(rows)
  assert '| 98.00% (TTA 98.71%) | 0.0200 |' in table.splitlines()[2]
  assert '| 97.00% | 0.0300 |' in table.splitlines()[3]
  assert 'TTA: that of the logits averaged over test-time views (eval_tta)' in table


def test_the_top5_accuracy_is_shown_where_a_run_counted_it(tmp_path):
  run = write_run(tmp_path / 'run', [{**evaluation(50, 0.7612), 'test/top5_accuracy': 0.9287}])
  row = compare.describe_run(run)
  assert row['top5_accuracy'] == 0.9287
  assert '| 76.12% (top-5 92.87%) | 0.2388 |' in compare.format_table([row]).splitlines()[2]


def test_the_best_step_of_tied_accuracies_is_the_one_checkpoint_best_loads(tmp_path):
  # checkpoint.best_step picks max((accuracy, step)): of tied accuracies, the latest step.
  run = write_run(tmp_path / 'run', [evaluation(10, 0.9), evaluation(20, 0.95),
                                     evaluation(30, 0.95), evaluation(40, 0.93)])
  row = compare.describe_run(run)
  assert (row['best_accuracy'], row['best_step'], row['accuracy']) == (0.95, 30, 0.93)


def test_a_run_stopped_after_its_last_log_counts_the_step_of_its_checkpoint(tmp_path):
  # Stopped by SIGTERM at step 2153: the checkpoint of that step is saved; the log ends at 2100.
  run = write_run(tmp_path / 'stopped', [{'step': 2100, 'train/loss': 0.1}, evaluation(2100, 0.99)])
  for name in ('2100', '2153', '2160.orbax-checkpoint-tmp-1'):  # The last one is incomplete.
    os.makedirs(os.path.join(run, 'checkpoints', name))
  row = compare.describe_run(run)
  assert (row['step'], row['finished'], row['accuracy']) == (2153, False, 0.99)


def test_runs_with_the_same_last_folder_name_are_told_apart():
  assert compare.short_names(['a/x/run', 'b/x/run', 'c/run']) == ['a/x/run', 'b/x/run', 'c/run']
  assert compare.short_names(['runs/one', 'runs/two']) == ['one', 'two']


def test_what_is_not_a_run_is_a_one_line_error(tmp_path):
  result = run_compare(str(tmp_path), cwd=tmp_path)
  assert (result.returncode, result.stderr) == (
      2, f"error: '{tmp_path}' is not a jaxcnn run directory: it has no config.json\n")
  result = run_compare(cwd=tmp_path)  # No runs/ here.
  assert result.returncode == 2
  assert result.stderr.startswith('error: no runs to compare: runs/ holds no run folders here')
