"""Checkpointing: exact resume after kill -9 and SIGTERM, damage, retention, mismatch, divergence,
and the evaluate and predict command lines."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcnn import trainer
from jaxcnn import workdir as workdir_lib
from jaxcnn.checkpoint import CHECKPOINT_DIR, Checkpointer, NoGoodCheckpoint, make_checkpointer
from jaxcnn.errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError
from jaxcnn.metrics import read_metrics
from jaxcnn.restore import restore_run

from conftest import REPO_ROOT, learnable_images, tiny_config

# keras_cnn has dropout and the crop draws random offsets: a resume must reproduce both.
RUN_FLAGS = ['--config=tests/tiny_config.py:keras_cnn', '--config.augment.crop_padding=2',
             '--config.num_train_steps=160', '--config.log_every_steps=10',
             '--config.eval_every_steps=40', '--config.checkpoint_every_steps=20']


def train_command(workdir, *extra):
  return [sys.executable, 'tests/fake_tfds_run.py', 'train.py', *RUN_FLAGS,
          f'--workdir={workdir}', *extra]


def environment(tmp_path):
  return {**os.environ, 'JAXCNN_CACHE_DIR': str(tmp_path / 'cache'), 'PYTHONUNBUFFERED': '1',
          'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def complete_steps(workdir):
  """Steps of the finished checkpoints (Orbax renames a checkpoint to its step when complete)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def start_and_wait_for_checkpoint(tmp_path, workdir):
  """Starts a training process and returns it once its first checkpoint is complete."""
  process = subprocess.Popen(train_command(workdir), cwd=REPO_ROOT, env=environment(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  try:
    while not complete_steps(workdir):
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.monotonic() < deadline, 'no checkpoint appeared'
      time.sleep(0.02)  # Polling the directory, not waiting for a guessed duration.
  except BaseException:
    process.kill()  # A failed test leaves no training process behind.
    process.communicate()
    raise
  return process


def run_to_completion(tmp_path, workdir):
  result = subprocess.run(train_command(workdir), cwd=REPO_ROOT, env=environment(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def logged(workdir):
  """(step, train/loss) at every log step and the final test metrics, as written."""
  records = read_metrics(str(workdir))
  losses = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
  final = [(r['step'], r['test/loss'], r['test/accuracy']) for r in records if 'test/loss' in r]
  return losses, final[-1]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('uninterrupted')
  run_to_completion(tmp_path, tmp_path / 'run')
  return logged(tmp_path / 'run')


def test_kill_9_then_resume_equals_an_uninterrupted_run_bitwise(tmp_path, uninterrupted):
  workdir = tmp_path / 'run'
  process = start_and_wait_for_checkpoint(tmp_path, workdir)
  process.kill()
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  resumed_from = complete_steps(workdir)[-1]
  assert resumed_from < 160  # It was killed mid-run.
  result = run_to_completion(tmp_path, workdir)
  assert f'resuming from the checkpoint at step {resumed_from}' in result.stdout
  assert logged(workdir) == uninterrupted  # Every logged loss and the final metrics, exactly.


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path, uninterrupted):
  workdir = tmp_path / 'run'
  process = start_and_wait_for_checkpoint(tmp_path, workdir)
  process.send_signal(signal.SIGTERM)
  try:
    _, stderr = process.communicate(timeout=60)  # A run that ignored the signal fails here.
  finally:
    process.kill()  # A no-op for a process that has exited.
  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  last_line = stderr.strip().splitlines()[-1]
  assert last_line.startswith('stopped: stopped by SIGTERM at step ')
  stopped_at = int(last_line.split(' at step ')[1].split()[0])
  assert complete_steps(workdir)[-1] == stopped_at  # The checkpoint of that very step.
  run_to_completion(tmp_path, workdir)
  assert logged(workdir) == uninterrupted


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_a_streamed_run_with_workers_at_a_checkpoint(
    tmp_path, stop_signal):
  """Ctrl-C in a terminal, or `timeout`, signals Grain's worker processes too: they must leave
  stopping to the trainer, which saves the step it is at and exits 128 + the signal."""
  workdir = tmp_path / 'run'
  command = train_command(workdir, '--config.data_placement=stream', '--config.data_workers=2',
                          '--config.num_train_steps=100000')
  process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # Its own process group, as in a terminal.
  try:
    deadline = time.monotonic() + 240
    while not complete_steps(workdir):
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.monotonic() < deadline, 'no checkpoint appeared'
      time.sleep(0.02)  # Polling the directory, not waiting for a guessed duration.
    os.killpg(process.pid, stop_signal)
    _, stderr = process.communicate(timeout=120)
  finally:  # A run that did not stop must not outlive the test, nor its workers.
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
  assert process.returncode == 128 + stop_signal, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert 'leaked shared_memory' not in stderr  # Every batch's shared memory was unlinked.
  last_line = stderr.strip().splitlines()[-1]
  assert last_line.startswith(f'stopped: stopped by {stop_signal.name} at step '), stderr[-3000:]
  assert complete_steps(workdir)[-1] == int(last_line.split(' at step ')[1].split()[0])


def test_ctrl_c_while_a_run_sets_up_stops_it_before_training_in_one_line(tmp_path):
  """While the run loads its data or compiles, a Ctrl-C is neither a traceback nor swallowed."""
  workdir = tmp_path / 'run'
  process = subprocess.Popen(train_command(workdir), cwd=REPO_ROOT, env=environment(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = process.stdout.readline()  # Printed as the data phase begins; compiling comes next.
    assert line.startswith('decoding '), line + process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert stderr == 'stopped: stopped by SIGINT before training began; nothing was saved\n'
  assert 'step 1/' not in stdout and not complete_steps(workdir)


def test_a_second_ctrl_c_stops_at_once_in_one_line(fake_tfds, tmp_path, monkeypatch):
  with trainer._StopRequests() as requests:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)  # The first asks to stop after the step...
    assert requests.signal_number == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # ...the second interrupts.
      os.kill(os.getpid(), signal.SIGINT)

  def second_ctrl_c(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(trainer, '_train', second_ctrl_c)
  with pytest.raises(TrainingInterrupted) as stopped:
    trainer.train_and_evaluate(tiny_config(), str(tmp_path / 'run'))
  assert stopped.value.exit_status == 128 + signal.SIGINT
  assert str(stopped.value).startswith('stopped at once by a second SIGINT, without saving; ')
  # Nor does a run that stopped before writing anything leave its new folder behind.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(TrainingInterrupted):
    trainer.train_and_evaluate(tiny_config())
  assert not os.listdir(tmp_path / 'runs')


def test_a_refused_resume_says_how_to_resume_and_that_command_resumes(tmp_path):
  workdir = tmp_path / 'run'
  def train(*flags):
    return subprocess.run([sys.executable, 'tests/fake_tfds_run.py', 'train.py', *flags,
                           f'--workdir={workdir}'], cwd=REPO_ROOT, env=environment(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
  first = train('--config=tests/tiny_config.py', '--config.num_train_steps=8')
  assert first.returncode == 0, first.stderr[-3000:]
  refused = train('--config=tests/tiny_config.py:bn_cnn', '--config.num_train_steps=16')
  assert refused.returncode == 2 and refused.stderr.startswith('error: the checkpoint at step 8')
  advice = refused.stderr.split("resume with the run's own config (--config ")[1].split(')')[0]
  assert advice == str(workdir / 'config.json')
  resumed = train('--config', advice, '--config.num_train_steps=16')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from the checkpoint at step 8' in resumed.stdout
  assert [r['step'] for r in read_metrics(str(workdir)) if 'train/loss' in r][-1] == 16


def test_a_stop_asked_for_in_the_last_call_lets_the_run_finish(fake_tfds, tmp_path, monkeypatch):
  calls = []

  def stop_after_the_eighth_call(self):  # One step per call: the last one.
    del self
    calls.append(None)
    return len(calls) == 8

  monkeypatch.setattr(trainer._StopRequests, 'should_stop',  # pylint: disable=protected-access
                      stop_after_the_eighth_call)
  result = trainer.train_and_evaluate(tiny_config(num_train_steps=8, steps_per_call=1),
                                      str(tmp_path))
  assert len(calls) == 8 and result['step'] == 8 and 'test/accuracy' in result
  records = read_metrics(str(tmp_path))
  assert records[-1]['step'] == 8 and 'time/train_seconds' in records[-1]


def test_a_finished_run_says_so_and_more_steps_continue_it(fake_tfds, tmp_path, capsys):
  config = tiny_config(num_train_steps=24)
  trainer.train_and_evaluate(config, str(tmp_path))
  capsys.readouterr()
  again = trainer.train_and_evaluate(config, str(tmp_path))
  assert again['step'] == 24 and 'train/loss' not in again  # Nothing was trained.
  assert (f'{tmp_path} already holds a checkpoint at step 24 (this config trains 24 steps): '
          'nothing to train.') in capsys.readouterr().out
  config.num_train_steps = 36
  longer = trainer.train_and_evaluate(config, str(tmp_path))
  assert longer['step'] == 36
  steps = [r['step'] for r in read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert steps == [8, 12, 16, 24, 32, 36]


def _truncate_largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def _delete_array_data(directory):
  for root, _, names in os.walk(directory):
    if os.path.basename(root) == 'd':  # OCDBT's data files.
      for name in names:
        os.remove(os.path.join(root, name))


def _alter_a_checksum(directory):
  """Arrays that read back but differ from what was saved (as a flipped bit on disk would):
  their recorded checksum no longer matches them."""
  path = os.path.join(os.path.dirname(directory), 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  name = sorted(meta['checksums'])[0]
  meta['checksums'][name][0] ^= 1
  with open(path, 'w') as f:
    json.dump(meta, f)


# A failed read leaves Orbax's tensorstore callbacks firing on an asyncio loop it already closed;
# Python reports them as unraisable exceptions. They are noise here, not a failure.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_truncate_largest_file, _delete_array_data, _alter_a_checksum])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(fake_tfds, tmp_path, damage,
                                                                capfd):
  config = tiny_config(num_train_steps=24, checkpoint_every_steps=8)
  trainer.train_and_evaluate(config, str(tmp_path))
  checkpointer = make_checkpointer(config, str(tmp_path))
  assert checkpointer.steps() == [8, 16, 24]
  checkpointer.close()
  damage(os.path.join(checkpointer.directory, '24', 'state'))
  config.num_train_steps = 32
  result = trainer.train_and_evaluate(config, str(tmp_path))
  captured = capfd.readouterr()
  assert 'warning: checkpoint 24 ' in captured.err
  assert ('warning: checkpoint 24 does not match its checksums' in captured.err) == (
      damage is _alter_a_checksum)
  assert 'resuming from the checkpoint at step 16' in captured.out
  assert result['step'] == 32
  # The damaged 24 was set aside, so the resumed run saved its own step 24 again, intact.
  assert os.listdir(tmp_path / 'checkpoints-damaged') == ['24']
  checkpointer = make_checkpointer(config, str(tmp_path))
  assert checkpointer.steps() == [16, 24, 32]
  assert checkpointer.read_meta(24)['step'] == 24
  checkpointer.close()


def test_a_damaged_orbax_metadata_file_resumes_without_a_word(fake_tfds, tmp_path, capfd,
                                                              caplog):
  """Orbax's `_CHECKPOINT_METADATA` holds nothing jaxcnn reads: damaged, it costs nothing and
  is not reported (Orbax's own log of it printed the file's content twice)."""
  config = tiny_config(num_train_steps=16, checkpoint_every_steps=8)
  trainer.train_and_evaluate(config, str(tmp_path))
  (tmp_path / CHECKPOINT_DIR / '16' / '_CHECKPOINT_METADATA').write_text('garbage{')
  capfd.readouterr()
  config.num_train_steps = 24
  with caplog.at_level(logging.INFO):  # Where absl's records go under pytest.
    assert trainer.train_and_evaluate(config, str(tmp_path))['step'] == 24
  captured = capfd.readouterr()
  assert 'resuming from the checkpoint at step 16' in captured.out
  assert not [r for r in caplog.records if 'garbage' in r.getMessage()]
  assert 'garbage' not in captured.err


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_when_every_checkpoint_is_damaged_the_run_is_not_restarted_over_them(fake_tfds, tmp_path):
  config = tiny_config(num_train_steps=16, checkpoint_every_steps=8)
  trainer.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(str(tmp_path))
  for step in ('8', '16'):
    _delete_array_data(os.path.join(tmp_path, CHECKPOINT_DIR, step, 'state'))
  config.num_train_steps = 24
  with pytest.raises(NoGoodCheckpoint, match=r'every checkpoint in .* is damaged \(steps 8, 16\)'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert complete_steps(tmp_path) == [8, 16]  # Nothing was moved, deleted or written over.
  assert read_metrics(str(tmp_path)) == records
  with pytest.raises(NoGoodCheckpoint, match=r'\(steps 8, 16\): there are no weights to read'):
    restore_run(str(tmp_path), 'latest')  # What evaluate and predict do.


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_run_is_rebuilt_with_its_model_kwargs_and_a_resume_changing_them_names_them(
    fake_tfds, tmp_path):
  kwargs = {'widths': (4, 8), 'hidden': 16}
  trainer.train_and_evaluate(tiny_config(num_train_steps=4, model='bn_cnn', model_kwargs=kwargs),
                             str(tmp_path))
  run = restore_run(str(tmp_path))  # From config.json alone, as evaluate and predict rebuild it.
  assert run.state.params['fc1']['kernel'].shape == (7 * 7 * 8, 16)
  for changed, shown in (({'widths': (4, 8), 'hidden': 32}, "{'hidden': 32, 'widths': (4, 8)}"),
                         ({}, '{}')):  # Left out: the model's own defaults.
    with pytest.raises(ConfigError, match=re.escape(
        f"this config changes model_kwargs {{'hidden': 16, 'widths': (4, 8)}} -> {shown}, which "
        'can shape the training state')):
      trainer.train_and_evaluate(
          tiny_config(num_train_steps=8, model='bn_cnn', model_kwargs=changed), str(tmp_path))


def test_a_state_mismatch_says_whether_the_model_or_the_optimizer_differs():
  from jaxcnn.checkpoint import StateMismatch  # pylint: disable=g-import-not-at-top
  model = StateMismatch(8, '/r/checkpoints', 'state.params.fc.kernel has shape (4, 10) in the '
                        'checkpoint and (3, 10) in the model')
  optimizer = StateMismatch(8, '/r/checkpoints', 'state.opt_state.0.count (shape ()) is in the '
                            'checkpoint but not in the model')
  assert model.in_model and not optimizer.in_model
  assert str(model).endswith("; resume with the run's own config (--config /r/config.json), or "
                             'start a new --workdir')


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_refused_resume_keeps_the_runs_own_config_and_times_add_up_over_resumes(
    fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=12), str(tmp_path))
  first = read_metrics(str(tmp_path))
  config_json = (tmp_path / 'config.json').read_text()
  with pytest.raises(ConfigError, match='does not match this config'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=24, model='bn_cnn'), str(tmp_path))
  # Options with state of their own, turned on: the message names the key to take back (the
  # run's own config.json, which it used to suggest, may be what the user resumes with).
  for key, change in (('grad_clip_norm', '0.0 -> 1.0'), ('ema_decay', '0.0 -> 0.99')):
    with pytest.raises(ConfigError, match=(
        rf'does not match this config: state\.\S+ \(shape .*\) is in the \w+ but not in the '
        rf'\w+; this config changes {key} {re.escape(change)}, which can shape the training '
        r"state; resume with the run's own config \(--config .*config\.json\) without that "
        'change, or start a new --workdir$')):
      trainer.train_and_evaluate(
          tiny_config(num_train_steps=24, **{key: float(change.split()[-1])}), str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == config_json  # evaluate still rebuilds lenet5.
  result = trainer.train_and_evaluate(tiny_config(num_train_steps=24), str(tmp_path))
  assert '"num_train_steps": 24' in (tmp_path / 'config.json').read_text()
  # Training seconds continue from the checkpoint's: time to accuracy spans the whole run.
  seconds_at_12 = [r['train/seconds'] for r in first if 'train/seconds' in r][-1]
  records = read_metrics(str(tmp_path))
  seconds = [r['train/seconds'] for r in records if 'train/seconds' in r]
  assert seconds == sorted(seconds) and seconds[-1] > seconds_at_12
  assert result['time/train_seconds'] > [r['time/train_seconds'] for r in first
                                         if 'time/train_seconds' in r][0]
  # One end-of-run record of times, the resumed run's, and the saves of both runs counted.
  assert [r['step'] for r in records if 'time/train_seconds' in r] == [24]
  assert [r['time/checkpoint_saves'] for r in first if 'time/checkpoint_saves' in r] == [1]
  assert result['time/checkpoint_saves'] == 2  # Steps 12 and 24.


def test_last_k_and_best_k_are_kept(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), keep_last=2, keep_best=2, best_metric='test/accuracy')
  accuracies = {1: 0.50, 2: 0.90, 3: 0.60, 4: None, 5: 0.80, 6: 0.70, 7: 0.65}
  for step, accuracy in accuracies.items():
    metrics = {'test/accuracy': accuracy} if accuracy is not None else None
    checkpointer.save(step, {'w': jnp.full((2,), step, jnp.float32)}, meta={}, metrics=metrics)
  checkpointer.wait()
  assert checkpointer.steps() == [2, 5, 6, 7]  # Best two (0.90, 0.80) and last two (6, 7).
  assert checkpointer.best_step() == 2
  checkpointer.close()


def test_a_resumed_run_keeps_the_best_checkpoint_of_its_earlier_part(tmp_path):
  """The ranks come from each checkpoint's own record, not from the memory of the manager that
  saved it: a new checkpointer (a resumed run) kept only its own checkpoints' ranks before."""
  def open_checkpointer():
    return Checkpointer(str(tmp_path), keep_last=1, keep_best=1, best_metric='test/accuracy')

  def save(checkpointer, step, accuracy):
    checkpointer.save(step, {'w': jnp.full((2,), step, jnp.float32)}, meta={},
                      metrics={'test/accuracy': accuracy})

  checkpointer = open_checkpointer()
  save(checkpointer, 1, 0.9)
  save(checkpointer, 2, 0.5)
  checkpointer.close()
  checkpointer = open_checkpointer()
  save(checkpointer, 3, 0.4)
  save(checkpointer, 4, float('nan'))  # Ranks nowhere, as one saved without the metric.
  checkpointer.wait()
  assert checkpointer.steps() == [1, 4] and checkpointer.best_step() == 1
  checkpointer.close()


def test_of_tied_losses_the_latest_checkpoint_is_the_best_and_is_kept(tmp_path):
  """`best_step` and `keep_best` agree: the best named while step 2 is still among the last two
  must be the one that stays when it leaves them."""
  checkpointer = Checkpointer(str(tmp_path), keep_last=2, keep_best=1, best_metric='test/loss',
                              best_mode='min')

  def save(step, loss):
    checkpointer.save(step, {'w': jnp.full((2,), step, jnp.float32)}, meta={},
                      metrics={'test/loss': loss})
    checkpointer.wait()

  for step, loss in {1: 0.3, 2: 0.2, 3: 0.2}.items():
    save(step, loss)
  assert checkpointer.steps() == [2, 3] and checkpointer.best_step() == 3
  save(4, 0.5)
  assert checkpointer.steps() == [3, 4] and checkpointer.best_step() == 3
  checkpointer.close()


def test_retention_in_a_run_follows_the_eval_metric(fake_tfds, tmp_path):
  # best_mode 'auto' (the default): the best by a loss is the lowest.
  config = tiny_config(num_train_steps=48, eval_every_steps=8, keep_checkpoints=1, keep_best=1,
                       best_metric='test/loss')
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = {r['step']: r['test/loss'] for r in read_metrics(str(tmp_path)) if 'test/loss' in r}
  assert sorted(losses) == [8, 16, 24, 32, 40, 48]
  best = min(losses, key=losses.get)
  checkpointer = make_checkpointer(config, str(tmp_path))
  assert checkpointer.steps() == sorted({best, 48})
  assert checkpointer.best_step() == best
  checkpointer.close()
  # A lowest loss early in a run is kept by it alone: the last checkpoint is another.
  checkpointer = make_checkpointer(config, str(tmp_path / 'early'))
  for step, loss in {8: 0.5, 16: 0.2, 24: 0.4, 32: 0.6}.items():
    checkpointer.save(step, {'w': jnp.full((2,), step, jnp.float32)}, meta={},
                      metrics={'test/loss': loss})
  checkpointer.wait()
  assert checkpointer.steps() == [16, 32] and checkpointer.best_step() == 16
  checkpointer.close()


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter(fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))
  with pytest.raises(ConfigError) as error:
    trainer.train_and_evaluate(tiny_config(num_train_steps=16, dataset='cifar10'), str(tmp_path))
  assert 'state.params.conv1.kernel has shape (5, 5, 1, 6) in the checkpoint and (5, 5, 3, 6) ' \
         'in the model' in str(error.value)


def test_a_changed_batch_size_is_refused_even_within_the_first_epoch(fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=4, checkpoint_every_steps=4),
                             str(tmp_path))
  with pytest.raises(ConfigError, match=r'written with batch_size 32; with batch_size 16 .* '
                                        r'--config.batch_size=32'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=8, batch_size=16), str(tmp_path))


def test_a_resume_over_a_changed_split_of_as_many_batches_is_refused(fake_tfds, tmp_path):
  """520 examples make as many batches of 32 as 512 do, but another order of them."""
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))
  fake_tfds({'train': 520})
  with pytest.raises(ConfigError, match='written with 512 training examples, this run has 520'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=16), str(tmp_path))


def test_a_resume_names_what_it_changes_and_refuses_another_seed(fake_tfds, tmp_path, capsys):
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))
  trainer.train_and_evaluate(tiny_config(num_train_steps=16, learning_rate=0.01), str(tmp_path))
  assert ('resuming from the checkpoint at step 8 (epoch 0, batch 8) with changed config: '
          'learning_rate 0.003 -> 0.01, num_train_steps 8 -> 16\n') in capsys.readouterr().out
  with pytest.raises(ConfigError, match='was trained with seed 0, and its data order, '
                                        'augmentation and dropout derive from it; resume with '
                                        '--config.seed=0'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=24, seed=3), str(tmp_path))
  assert workdir_lib.read_config(str(tmp_path)).seed == 0  # The run's record is kept.


def test_a_changed_optimizer_is_refused(fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))
  with pytest.raises(ConfigError, match='is in the checkpoint but not in the model'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=16, optimizer='sgd'), str(tmp_path))


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(fake_tfds, tmp_path):
  config = tiny_config(num_train_steps=200, optimizer='sgd', checkpoint_every_steps=4,
                       log_every_steps=4, eval_every_steps=100)
  config.learning_rate = 1.0
  trainer.train_and_evaluate(tiny_config(num_train_steps=8, optimizer='sgd',
                                         checkpoint_every_steps=4, log_every_steps=4),
                             str(tmp_path))  # Two good checkpoints first.
  config.learning_rate = 1e30  # Then a rate that overflows within a few steps.
  with pytest.raises(TrainingDiverged) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  bad_step = int(message.split('not finite at step ')[1].split(',')[0])
  assert 9 <= bad_step < 200  # Counted as metrics count steps: step 9 is the first after 8.
  checkpointer = make_checkpointer(config, str(tmp_path))
  latest = checkpointer.latest_step()
  checkpointer.close()
  assert f'The last good checkpoint is step {latest} in' in message
  assert 8 <= latest < bad_step  # Nothing from the bad step on was saved.
  restored = restore_run(str(tmp_path), 'latest')
  assert restored.step == latest
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))


def _write_digit_images(directory, count):
  images, labels = learnable_images(count, (28, 28, 1), 10, seed=5)
  paths = []
  for i, image in enumerate(images):
    path = os.path.join(directory, f'digit{i}_label{labels[i]}.png')
    # Saved larger than 28x28: predict must resize as it decodes.
    Image.fromarray(image[:, :, 0]).resize((56, 56), Image.Resampling.NEAREST).save(path)
    paths.append(path)
  return paths, labels


def test_evaluate_and_predict_on_a_trained_run(fake_tfds, tmp_path):
  workdir = tmp_path / 'run'
  # Trained on one device with a batch that 8 devices could not split: evaluating on 8 (the
  # evaluation batch of 64 splits) must not trip over the training batch.
  config = tiny_config(model='bn_cnn', num_train_steps=48, eval_every_steps=16, batch_size=36)
  result = trainer.train_and_evaluate(config, str(workdir))
  env = environment(tmp_path)
  evaluation = subprocess.run(
      [sys.executable, 'tests/fake_tfds_run.py', '-m', 'jaxcnn.evaluate', f'--workdir={workdir}',
       '--per_class', '--tta=flip'],
      cwd=REPO_ROOT, env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
      capture_output=True, text=True, timeout=300, check=False)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert 'checkpoint at step 48 (latest)' in evaluation.stdout
  accuracy = result['test/accuracy']
  assert f'test/accuracy {accuracy:.4f} ({round(accuracy * 200)}/200)' in evaluation.stdout
  assert f'test/loss {result["test/loss"]:.4f}' in evaluation.stdout
  # Test-time augmentation that the run did not train with: counted beside, and warned of.
  assert re.search(r'^  test/tta_accuracy 0\.\d{4} \(\d+/200\)$', evaluation.stdout, re.M)
  assert "eval_tta='flip' averages in mirror images" in evaluation.stderr
  # The confusion matrix of the same evaluation, summed over 8 devices: a line per class whose
  # right and total examples add up to the accuracy's.
  per_class = evaluation.stdout.split('per class: ')[1].splitlines()[1:]
  assert [line.split()[0] for line in per_class] == [str(digit) for digit in range(10)]
  right, total = zip(*(map(int, line.split()[2].split('/')) for line in per_class))
  assert (sum(right), sum(total)) == (round(accuracy * 200), 200)

  paths, labels = _write_digit_images(str(tmp_path), 6)
  broken = str(tmp_path / 'broken.png')
  with open(broken, 'wb') as f:
    f.write(b'not an image')
  prediction = subprocess.run(
      [sys.executable, '-m', 'jaxcnn.predict', f'--workdir={workdir}', '--checkpoint=best',
       paths[0], broken, *paths[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert prediction.returncode == 2
  assert prediction.stderr.strip() == (
      f"error: cannot read image '{broken}': cannot identify image file '{broken}'")
  lines = prediction.stdout.strip().splitlines()
  assert [line.split(':')[0] for line in lines] == paths
  for line, label in zip(lines, labels):
    ranked = line.split(': ', 1)[1].split(', ')
    assert len(ranked) == 5
    assert ranked[0].startswith(f'{label} (')  # The model learned the fake task.
    probabilities = [float(r.split('(')[1].rstrip(')')) for r in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001


def test_an_image_too_large_to_decode_is_an_unreadable_image(tmp_path, monkeypatch):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxcnn.predict import load_image  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # PIL refuses over twice that.
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / 'huge.png')
  with pytest.raises(OSError, match='exceeds limit'):
    load_image(str(tmp_path / 'huge.png'), (28, 28, 1))


def test_predict_with_the_moving_average_of_the_weights(fake_tfds, tmp_path):
  from jaxcnn.predict import load_image  # pylint: disable=g-import-not-at-top
  from jaxcnn.train_step import make_predict_step  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(tiny_config(num_train_steps=8, ema_decay=0.9), str(workdir))
  paths, _ = _write_digit_images(str(tmp_path), 2)
  command = [sys.executable, '-m', 'jaxcnn.predict', f'--workdir={workdir}', '--top_k=1', *paths]
  printed = {}
  for weights in ('trained', 'ema', 'ema --tta=flip_translate'):
    result = subprocess.run([*command, *f'--weights={weights}'.split()], cwd=REPO_ROOT,
                            env=environment(tmp_path), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    printed[weights] = result.stdout.splitlines()
  # The average's probabilities, computed here from the checkpoint: what --weights=ema printed.
  run = restore_run(str(workdir))
  state = run.experiment.strategy.fetch(run.state).averaged()
  images = np.stack([load_image(path, run.dataset.image_shape) for path in paths])
  for tta, shown in (('none', 'ema'), ('flip_translate', 'ema --tta=flip_translate')):
    probabilities = np.asarray(jax.jit(make_predict_step(
        run.experiment.model_def, run.experiment.preprocess, tta))(state, images))
    for line, probs in zip(printed[shown], probabilities):
      assert line.endswith(f'({probs.max():.4f})'), line
  assert printed['trained'] != printed['ema'] != printed['ema --tta=flip_translate']
  plain = tmp_path / 'plain'
  trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(plain))
  result = subprocess.run([*command, f'--workdir={plain}', '--weights=ema'], cwd=REPO_ROOT,
                          env=environment(tmp_path), capture_output=True, text=True, timeout=300,
                          check=False)
  assert (result.returncode, result.stderr) == (2, (
      f'error: the run in {plain} keeps no moving average of its weights (it was trained with '
      'ema_decay 0); predict with --weights=trained\n'))


def test_per_class_lines_name_what_each_class_is_most_often_taken_for():
  from jaxcnn.evaluate import describe_classes  # pylint: disable=g-import-not-at-top
  confusion = np.array([[8, 1, 1, 0], [1, 9, 0, 0], [0, 0, 0, 0], [0, 3, 5, 2]])
  assert describe_classes(confusion, ['cat', 'dog', 'eel', 'fox'], mistakes=1)[1:] == [
      '    cat   80.00%   8/10  taken for dog (1)',  # Of tied counts, the first class.
      '    dog   90.00%   9/10  taken for cat (1)',
      '    eel        -   0/0',  # No example of it in the split.
      '    fox   20.00%   2/10  taken for eel (5)']


def test_a_run_trained_on_a_synthetic_stand_in_is_evaluated_on_it(mnist_data_dir, tmp_path):
  """A :smoke run on an unprepared dataset trains on synthetic data; once the real dataset is
  prepared, evaluating that run still means its own evaluation data, not the real test set."""
  workdir = tmp_path / 'run'
  config = tiny_config(num_train_steps=8, synthetic_if_unprepared=True,
                       data_dir=str(tmp_path / 'empty_tfds'), **{'synthetic.num_eval': 64})
  result = trainer.train_and_evaluate(config, str(workdir))
  config_file = workdir / 'config.json'  # Now point the run at a prepared MNIST.
  config_file.write_text(config_file.read_text().replace(str(tmp_path / 'empty_tfds'),
                                                         str(mnist_data_dir)))
  evaluation = subprocess.run(
      [sys.executable, '-m', 'jaxcnn.evaluate', f'--workdir={workdir}', '--checkpoint=8'],
      cwd=REPO_ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=300,
      check=False)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert 'was trained on synthetic mnist data: evaluating on that' in evaluation.stdout
  assert 'checkpoint at step 8, synthetic test:' in evaluation.stdout
  accuracy = result['test/accuracy']
  assert f'test/accuracy {accuracy:.4f} ({round(accuracy * 64)}/64)' in evaluation.stdout
  # Its other split is its training data; any other name is no split of it.
  command = [sys.executable, '-m', 'jaxcnn.evaluate', f'--workdir={workdir}']
  train = subprocess.run(command + ['--split=train'], cwd=REPO_ROOT, env=environment(tmp_path),
                         capture_output=True, text=True, timeout=300, check=False)
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'synthetic train:' in train.stdout
  assert f'/{config.synthetic.num_train})' in train.stdout  # Every training example.
  validation = subprocess.run(command + ['--split=validation'], cwd=REPO_ROOT,
                              env=environment(tmp_path), capture_output=True, text=True,
                              timeout=300, check=False)
  assert validation.returncode == 2
  assert validation.stderr == (
      f"error: {workdir} was trained on synthetic mnist data, which has two splits: 'train' (its "
      "training data) and 'test' (its evaluation data); --split 'validation' is neither\n")


def test_a_run_trained_on_real_data_is_never_evaluated_on_a_synthetic_stand_in(mnist_data_dir,
                                                                               tmp_path):
  """A :smoke config may stand synthetic data in for an unprepared dataset when training, but a
  run that trained on the real data is evaluated on it or not at all."""
  workdir = tmp_path / 'run'
  result = trainer.train_and_evaluate(tiny_config(num_train_steps=8, synthetic_if_unprepared=True,
                                                  data_dir=str(mnist_data_dir)), str(workdir))
  empty = tmp_path / 'empty_tfds'
  command = [sys.executable, '-m', 'jaxcnn.evaluate', f'--workdir={workdir}',
             f'--data_dir={empty}']
  missing = subprocess.run(command, cwd=REPO_ROOT, env=environment(tmp_path),
                           capture_output=True, text=True, timeout=300, check=False)
  assert missing.returncode == 2, missing.stderr[-3000:]
  assert missing.stderr.startswith(f"error: dataset 'mnist' is not prepared in {empty}")
  assert 'point --manual_dir at a folder' in missing.stderr  # evaluate's flag, not train.py's.
  assert 'synthetic' not in missing.stdout + missing.stderr
  assert 'Traceback' not in missing.stderr
  # --manual_dir reaches the preparation: it looks for the files there. (Preparing from them is
  # the mnist_data_dir fixture's path, tested by tests/test_data.py too.)
  no_files = tmp_path / 'no_files'
  no_files.mkdir()
  elsewhere = subprocess.run(command + [f'--manual_dir={no_files}'], cwd=REPO_ROOT,
                             env=environment(tmp_path), capture_output=True, text=True,
                             timeout=300, check=False)
  assert elsewhere.returncode == 2, elsewhere.stderr[-3000:]
  assert f'put these files in manual_dir {no_files} ' in elsewhere.stderr
  # Where the dataset is prepared, evaluate reads the run's own test set, all of it.
  real = subprocess.run(command[:-1] + [f'--data_dir={mnist_data_dir}'], cwd=REPO_ROOT,
                        env=environment(tmp_path), capture_output=True, text=True, timeout=300,
                        check=False)
  assert real.returncode == 0, real.stderr[-3000:]
  assert 'synthetic' not in real.stdout + real.stderr
  accuracy = result['test/accuracy']
  assert f'test/accuracy {accuracy:.4f} ({round(accuracy * 10_000)}/10000)' in real.stdout


def test_reading_a_checkpoint_with_unreadable_metadata_is_one_user_error(fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=16, checkpoint_every_steps=8),
                             str(tmp_path))
  (tmp_path / CHECKPOINT_DIR / '8' / 'state' / '_METADATA').write_text('garbage{')
  with pytest.raises(UserError, match='checkpoint 8 has unreadable metadata'):
    restore_run(str(tmp_path), checkpoint='8')
  assert restore_run(str(tmp_path), checkpoint='16').step == 16  # The others still read.


def test_evaluate_and_predict_before_the_first_checkpoint_say_so_in_one_line(fake_tfds, tmp_path):
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(workdir))
  shutil.rmtree(workdir / CHECKPOINT_DIR)  # As a run is before its first checkpoint.
  for command in (['tests/fake_tfds_run.py', '-m', 'jaxcnn.evaluate', f'--workdir={workdir}'],
                  ['-m', 'jaxcnn.predict', f'--workdir={workdir}', 'image.png']):
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=environment(tmp_path),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr == f'error: {workdir} has no checkpoint yet\n'  # Nothing more.
