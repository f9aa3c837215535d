"""`python -m jaxcnn.compare`: runs side by side, from their own files."""

import os
import subprocess
import sys

import pytest

from jaxcnn import compare, trainer
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
  rows = {row['run']: row for row in map(compare.describe_run, compare.find_runs(str(runs)))}
  assert sorted(rows) == [str(runs / 'lr0.0001'), str(runs / 'lr0.003')]
  for lr, result in results.items():
    row = rows[str(runs / f'lr{lr}')]
    assert (row['model'], row['parameters'], row['step'], row['finished']) == (
        'lenet5', 61_706, 24, True)  # LeNet-5 on 28x28x1: the README's count.
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
  assert lines[2].startswith('| lr0.0001 | lenet5 | 61,706 | 24 | ')
  assert lines[3].startswith('| lr0.003 | lenet5 | 61,706 | 24 (running or stopped) | ')
  assert '  learning_rate: lr0.0001=0.0001, lr0.003=0.003' in lines

  with open(stopped, 'a', encoding='utf-8') as f:  # A line cut short by a full disk, say.
    f.write('{"step": 30, "train/lo')
  with pytest.raises(UserError, match=f'{stopped} is damaged'):
    compare.describe_run(str(runs / 'lr0.003'))


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
