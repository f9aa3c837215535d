"""End to end on a mocked TFDS dataset: files, metrics, full evaluation, determinism."""

import contextlib
import json
import os
import re
import threading

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from jaxcnn import checkpoint, parallel, profiling, trainer
from jaxcnn.data.augment import Preprocessor
from jaxcnn import workdir as workdir_lib
from jaxcnn.errors import ConfigError, UserError
from jaxcnn.metrics import read_metrics
from jaxcnn.restore import restore_run

from conftest import tiny_config


def test_run_writes_config_metrics_and_tensorboard(fake_tfds, tmp_path):
  result = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  files = os.listdir(tmp_path)
  assert 'config.json' in files and 'metrics.jsonl' in files and 'dataset.json' in files
  assert any(f.startswith('events.out.tfevents') for f in files)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['model'] == 'lenet5'
  records = read_metrics(str(tmp_path))
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  eval_steps = [r['step'] for r in records if 'test/accuracy' in r]
  assert train_steps == [8, 12, 16, 24]  # Every 8 steps, and at each evaluation.
  assert eval_steps == [12, 24]
  for record in records:
    assert all(key == 'step' or '/' in key for key in record)
  assert {'train/loss', 'train/accuracy', 'train/learning_rate', 'train/steps_per_sec',
          'train/examples_per_sec'} <= set(records[0])
  assert {'test/loss', 'test/accuracy'} <= set(records[-2])
  assert result['test/accuracy'] == records[-2]['test/accuracy']
  assert result['step'] == 24
  # TensorBoard holds the same scalars.
  (events_file,) = [f for f in files if f.startswith('events.out.tfevents')]
  scalars = {}
  for event in event_file_loader.LegacyEventFileLoader(str(tmp_path / events_file)).Load():
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  for record in records:
    for key, value in record.items():
      if key != 'step':
        assert scalars[(key, record['step'])] == pytest.approx(value, rel=1e-6)


def test_the_model_learns_the_fake_task(fake_tfds, tmp_path):
  fake_tfds({'train': 1024, 'test': 256})
  result = trainer.train_and_evaluate(
      tiny_config(model='bn_cnn', num_train_steps=60, eval_every_steps=60), str(tmp_path))
  assert result['test/accuracy'] > 0.9


@pytest.mark.parametrize('num_test, eval_batch_size', [(203, 64), (64, 64), (10, 64)])
def test_evaluation_counts_every_test_example(fake_tfds, tmp_path, num_test, eval_batch_size):
  fake_tfds({'train': 256, 'test': num_test})
  result = trainer.train_and_evaluate(
      tiny_config(num_train_steps=4, eval_batch_size=eval_batch_size), str(tmp_path))
  assert result['test/num_examples'] == num_test
  # Accuracy is a count over exactly num_test examples.
  correct = result['test/accuracy'] * num_test
  assert abs(correct - round(correct)) < 1e-6


def test_same_seed_same_metrics_other_seed_other_metrics(fake_tfds, tmp_path):
  config = tiny_config(model='keras_cnn', **{'augment.crop_padding': 2})

  def losses(seed, name):
    config.seed = seed
    trainer.train_and_evaluate(config, str(tmp_path / name))
    return [(r['step'], r.get('train/loss'), r.get('test/loss'))
            for r in read_metrics(str(tmp_path / name)) if 'train/loss' in r or 'test/loss' in r]

  first, second, other = losses(1, 'a'), losses(1, 'b'), losses(2, 'c')
  assert first == second
  assert first != other


@contextlib.contextmanager
def compilations():
  """Records the programs JAX compiles inside the block, as (name, answered by the persistent
  cache). JAX reports a program that the persistent cache answers with a cache-retrieval event
  just before the program's backend-compile event, on the same thread; a program that XLA
  compiles has the backend-compile event alone."""
  compiled = []
  cache_answered = threading.local()

  def listener(event, seconds, **kwargs):
    del seconds
    if event == '/jax/compilation_cache/cache_retrieval_time_sec':
      cache_answered.value = True
    elif event == '/jax/core/compile/backend_compile_duration':
      compiled.append((kwargs['fun_name'], getattr(cache_answered, 'value', False)))
      cache_answered.value = False

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_a_run_with_another_seed_reuses_the_compiled_train_program(fake_tfds, tmp_path):
  """A seed sweep compiles its train step once: the seed is an argument of the compiled program,
  so the second seed finds the program in the persistent compilation cache (a seed compiled in
  as a constant would make another program, which XLA compiles again)."""
  config = tiny_config(model='keras_cnn', **{'augment.crop_padding': 2})

  def train(seed):
    config.seed = seed
    with compilations() as compiled:
      result = trainer.train_and_evaluate(config, str(tmp_path / str(seed)))
    # The train step's programs, one per chunk length: 'jit(train_steps)' under parallel='jit'.
    return [answered for name, answered in compiled if name == 'jit(train_steps)'], result

  first, first_result = train(918273)
  second, second_result = train(192837)
  # The first run compiled its train step (or found it cached by an earlier test of this config);
  # the second ran the same programs, every one from the cache.
  assert first and len(second) == len(first)
  assert all(second), 'the second seed compiled its train step again'
  # Another run (test_train_step: the step draws from the seed).
  assert first_result['train/loss'] != second_result['train/loss']


def test_a_compilation_cache_chosen_elsewhere_still_keeps_small_programs(monkeypatch):
  """$JAX_COMPILATION_CACHE_DIR (as benchmarks/run.py sets it) chooses the folder, not what is
  kept: the small programs of a run (initialisers, checkpoint checksums) are cached there too."""
  from jaxcnn import caches  # pylint: disable=g-import-not-at-top
  folder = jax.config.jax_compilation_cache_dir
  saved = jax.config.jax_persistent_cache_min_compile_time_secs
  monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', raising=False)
  try:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)  # JAX's default.
    caches.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == folder  # The folder chosen is kept...
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.1  # ...and 0.1 s applies.
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
    caches.enable_compilation_cache()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0  # The user's own stays.
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', saved)


def test_steps_per_call_does_not_change_the_run(fake_tfds, tmp_path, capfd):
  """Scanning several steps per compiled call computes the same steps as one call per step (on
  the CPU, many times slower, which a warning says)."""
  results, warned = [], []
  for k in (1, 5):
    results.append(trainer.train_and_evaluate(tiny_config(steps_per_call=k),
                                              str(tmp_path / str(k))))
    warned.append(f'warning: steps_per_call={k} on the CPU' in capfd.readouterr().err)
  assert warned == [False, True]
  np.testing.assert_allclose(results[0]['train/loss'], results[1]['train/loss'], rtol=1e-5)
  np.testing.assert_allclose(results[0]['test/loss'], results[1]['test/loss'], rtol=1e-5)


def test_a_call_cut_short_by_a_boundary_runs_a_power_of_two_steps():
  assert [trainer.call_length(25, n) for n in (400, 25, 24, 17, 16, 9, 3, 2, 1)] == [
      25, 25, 16, 16, 16, 8, 2, 2, 1]
  # The steps up to any boundary take few calls and few distinct (compiled) lengths.
  lengths = set()
  for boundary in range(1, 200):
    step, calls = 0, 0
    while step < boundary:
      length = trainer.call_length(25, boundary - step)
      lengths.add(length)
      step, calls = step + length, calls + 1
    assert step == boundary and calls <= boundary // 25 + 4  # 23 = 16 + 4 + 2 + 1.
  assert lengths == {25, 16, 8, 4, 2, 1}


def test_new_workdir_is_unique_under_runs(tmp_path):
  first = workdir_lib.new_workdir('mnist', 'lenet5', root=str(tmp_path))
  second = workdir_lib.new_workdir('mnist', 'lenet5', root=str(tmp_path))  # In the same second.
  assert first != second and os.path.dirname(first) == str(tmp_path)
  assert os.path.isdir(first) and os.path.isdir(second)  # Created, so that no other run takes it.
  assert os.path.basename(first).startswith('mnist-lenet5-')
  (tmp_path / 'runs').write_text('')  # Where a run without --workdir would make its folder.
  with pytest.raises(UserError, match=r"cannot create a folder for the run in '.*runs': Not a "
                                      'directory; give one with --workdir'):
    workdir_lib.new_workdir('mnist', 'lenet5', root=str(tmp_path / 'runs'))


def test_a_workdir_that_cannot_be_a_folder_is_a_one_line_error(fake_tfds, tmp_path):
  (tmp_path / 'afile').write_text('')
  for workdir in (tmp_path / 'afile', tmp_path / 'afile' / 'sub'):
    with pytest.raises(UserError, match=r"--workdir '.*afile.*' is not a folder"):
      trainer.train_and_evaluate(tiny_config(), str(workdir))


def test_a_workdir_in_use_by_another_run_is_refused(fake_tfds, tmp_path):
  with workdir_lib.in_use(str(tmp_path)):  # As another run holds it.
    with pytest.raises(UserError, match=r"--workdir '.*' is in use by another run; wait for it to "
                                        'end, or give another --workdir'):
      trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))  # Once it is free.


@pytest.mark.parametrize('name, text, why', [
    ('config.json', '{"name": "my project", "version": 2}\n', 'no dataset, model and batch_size keys'),
    ('config.json', 'learning_rate: 0.1\n', 'not JSON'),
    ('dataset.json', '{"name": "mnist"}\n', 'that is a JSON object of name, image_shape'),
    ('metrics.jsonl', 'epoch,loss\n1,0.5\n', 'line 1 is not JSON'),
    ('metrics.jsonl', '{"epoch": 1, "loss": 0.5}\n', 'line 1 is not a record of a step'),
])
def test_a_workdir_with_files_of_a_runs_names_not_a_runs_is_left_untouched(fake_tfds, tmp_path,
                                                                           name, text, why):
  """A run would overwrite its config.json and dataset.json and cut its metrics.jsonl: files of
  those names that a jaxcnn run did not write are the user's, and stop the run."""
  (tmp_path / 'notes.txt').write_text('mine')
  (tmp_path / name).write_text(text)
  with pytest.raises(UserError, match=rf"--workdir '.*' holds a {name} that is not a jaxcnn "
                                      rf"run's \({why}.*\), which the run would overwrite"):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(['notes.txt', name])
  assert (tmp_path / name).read_text() == text


def test_a_folder_of_runs_is_not_taken_for_a_run(fake_tfds, tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path / 'runs' / 'first'))
  with pytest.raises(UserError, match=re.escape(
      f"--workdir '{tmp_path / 'runs'}' holds other runs (first) and is not one itself; give the "
      f"run a folder of its own, e.g. --workdir {tmp_path / 'runs' / 'NAME'}")):
    trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path / 'runs'))
  assert os.listdir(tmp_path / 'runs') == ['first']
  # A run's own workdir still resumes (its checkpoints folder holds no run).
  trainer.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / 'runs' / 'first'))


def test_batch_larger_than_the_dataset_is_refused(fake_tfds, tmp_path):
  fake_tfds({'train': 16, 'test': 16})
  with pytest.raises(ConfigError, match='batch_size'):
    trainer.train_and_evaluate(tiny_config(batch_size=32), str(tmp_path))


def test_a_warm_up_that_outlasts_the_run_is_announced(fake_tfds, tmp_path, capsys):
  fake_tfds({'train': 64, 'test': 32})  # Two steps an epoch: 3 epochs of warm-up are 6 steps.
  trainer.train_and_evaluate(tiny_config(num_train_steps=6, warmup_epochs=3), str(tmp_path / 'a'))
  warnings = [line for line in capsys.readouterr().err.splitlines() if 'warmup' in line]
  assert warnings == [
      'warning: warmup_epochs=3 is 6 steps, as long as the run (6 steps) or longer: the learning '
      'rate rises over the whole run and reaches learning_rate at its last step']
  trainer.train_and_evaluate(tiny_config(num_train_steps=6, warmup_epochs=2.5), str(tmp_path / 'b'))
  assert 'warmup_epochs' not in capsys.readouterr().err  # 5 steps of warm-up, then the schedule.


def test_an_adamw_sized_weight_decay_or_a_setting_the_optimizer_never_reads_is_warned_of(
    fake_tfds, tmp_path, capsys):
  fake_tfds({'train': 64, 'test': 32})
  for run, (optimizer, decay) in enumerate([('momentum', 0.05), ('adamw', 0.05), ('sgd', 5e-4)]):
    trainer.train_and_evaluate(tiny_config(num_train_steps=2, optimizer=optimizer,
                                           weight_decay=decay, beta2=0.99),
                               str(tmp_path / str(run)))
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if 'weight_decay' in line] == ([
        "warning: weight_decay=0.05 with optimizer 'momentum' is an L2 penalty, 100x the usual "
        "5e-4; values like it are AdamW's decoupled decay (optimizer 'adamw'), which scales with "
        'the learning rate'] if optimizer == 'momentum' else [])
    assert [line for line in err if 'no effect' in line] == ([] if optimizer == 'adamw' else [
        f"warning: beta2=0.99 has no effect with optimizer {optimizer!r}: it is read only with "
        "optimizer 'adam' or 'adamw' or 'lamb'"])


def test_a_profiled_run_traces_the_chosen_steps_and_trains_the_same_run(fake_tfds, tmp_path,
                                                                        capsys):
  config = tiny_config(steps_per_call=3)
  plain = trainer.train_and_evaluate(config, str(tmp_path / 'plain'))
  config.profile_start_step, config.profile_steps = 4, 4
  profiled = trainer.train_and_evaluate(config, str(tmp_path / 'profiled'))
  # The window follows the compiled calls (0-3, 3-6, 6-8, 8-11, ...): it begins with the first
  # call from step 4 on and ends with the call that completes 4 steps.
  assert 'profiled steps 7 to 11 into ' in capsys.readouterr().out
  (trace,) = (tmp_path / 'profiled' / 'plugins' / 'profile').glob('*/*.xplane.pb')
  assert b'jit(train_steps)' in trace.read_bytes()
  assert not (tmp_path / 'plain' / 'plugins').exists()
  assert profiled['train/loss'] == plain['train/loss']
  assert profiled['test/loss'] == plain['test/loss']


def test_a_profile_window_the_run_does_not_fill_is_said(fake_tfds, tmp_path, capsys):
  config = tiny_config(profile_start_step=20, profile_steps=10)  # A run of 24 steps.
  trainer.train_and_evaluate(config, str(tmp_path / 'cut'))
  assert 'profiled steps 21 to 24 (the run ended before 10 steps) into ' in capsys.readouterr().out
  config.profile_start_step = 24
  trainer.train_and_evaluate(config, str(tmp_path / 'past'))
  assert ('warning: profile_start_step=24 is not before the last step (24): no steps will be '
          'profiled; lower profile_start_step') in capsys.readouterr().err
  assert not (tmp_path / 'past' / 'plugins').exists()


def test_a_profile_window_stopped_inside_its_first_call_reports_no_steps(tmp_path):
  reports = []
  window = profiling.ProfileWindow(str(tmp_path), start_step=0, num_steps=5,
                                   report=reports.append)
  with pytest.raises(KeyboardInterrupt), window:
    window.before_call(0)  # The trace starts; the call is interrupted before it returns.
    raise KeyboardInterrupt
  assert not reports  # Not 'profiled steps 1 to None'.
  assert window.done and window.first_step is None  # The trace was stopped all the same.


def test_a_run_started_again_before_its_first_checkpoint_logs_each_step_once(fake_tfds,
                                                                            tmp_path):
  """A run killed before it saved anything left metrics behind; run again, it starts from step
  0 and its records replace those."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"step": 8, "train/loss": 9.0}\n'
                                         '{"step": 16, "train/loss": 9.0}\n')
  trainer.train_and_evaluate(tiny_config(), str(workdir))
  records = read_metrics(str(workdir))
  assert [r['step'] for r in records if 'train/loss' in r] == [8, 12, 16, 24]
  assert all(r['train/loss'] != 9.0 for r in records if 'train/loss' in r)


def test_a_moving_average_of_the_weights_is_evaluated_and_resumed_exactly(fake_tfds, tmp_path,
                                                                         capsys):
  # A constant rate: a schedule over 12 steps would be another run from the start.
  config = tiny_config(ema_decay=0.9, lr_schedule='constant', num_train_steps=24,
                       eval_every_steps=12, checkpoint_every_steps=12)
  whole = trainer.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert {'test/ema_accuracy', 'test/ema_loss'} <= set(whole)
  last_lines = capsys.readouterr().out.strip().splitlines()[-2:]  # Step 24's evaluation, done.
  ema = f'EMA accuracy {100 * whole["test/ema_accuracy"]:.2f}%'
  assert last_lines[0].startswith('step 24: test accuracy') and last_lines[0].endswith(ema)
  assert last_lines[1].startswith('done: test accuracy')
  assert f', {ema} after 24 steps' in last_lines[1]
  assert whole['test/ema_loss'] != whole['test/loss']  # The average, not the weights again.
  config.num_train_steps = 12
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  config.num_train_steps = 24
  halves = trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  for name in ('test/ema_loss', 'test/ema_accuracy', 'test/loss'):
    assert halves[name] == whole[name], name  # The average is in the checkpoint, bit for bit.


def test_the_terminal_names_the_moving_averages_accuracy_only_where_there_is_one():
  metrics = {'test/accuracy': 0.98914, 'test/loss': 0.0345}
  assert trainer.describe_evaluation(metrics, 'test') == 'test accuracy 98.91%, loss 0.0345'
  metrics.update({'test/ema_accuracy': 0.9902, 'test/ema_loss': 0.03})
  assert trainer.describe_evaluation(metrics, 'test', loss=False) == (
      'test accuracy 98.91%, EMA accuracy 99.02%')
  metrics.update({'test/tta_accuracy': 0.9911, 'test/ema_tta_accuracy': 0.9923})
  assert trainer.describe_evaluation(metrics, 'test', loss=False) == (
      'test accuracy 98.91%, TTA accuracy 99.11%, EMA accuracy 99.02%, EMA TTA accuracy 99.23%')


def test_test_time_augmentation_is_evaluated_beside_the_plain_accuracy_and_ranks_checkpoints(
    fake_tfds, tmp_path, capsys):
  config = tiny_config(num_train_steps=16, eval_every_steps=8, eval_tta='flip',
                       best_metric='test/tta_loss', keep_checkpoints=1, keep_best=1)
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  captured = capsys.readouterr()
  # The fake digits are not trained with flips: the run says what to expect of their mirrors.
  assert "warning: eval_tta='flip' averages in mirror images" in captured.err
  evaluations = [r for r in read_metrics(str(tmp_path / 'run')) if 'test/accuracy' in r]
  assert [r['step'] for r in evaluations] == [8, 16]
  for record in evaluations:
    assert {'test/tta_accuracy', 'test/tta_loss'} <= set(record)
    assert record['test/tta_loss'] != record['test/loss']
  plain = trainer.train_and_evaluate(tiny_config(num_train_steps=16, eval_every_steps=8),
                                     str(tmp_path / 'plain'))
  # Test-time augmentation adds metrics; it changes neither training nor the plain ones.
  learned = [name for name in plain if name.startswith(('test/', 'train/loss', 'train/acc'))]
  assert len(learned) == 5 and all(result[name] == plain[name] for name in learned)
  assert f'TTA accuracy {100 * result["test/tta_accuracy"]:.2f}% after 16 steps' in captured.out
  best = min(evaluations, key=lambda r: r['test/tta_loss'])['step']
  kept = sorted(int(name) for name in os.listdir(tmp_path / 'run' / 'checkpoints')
                if name.isdigit())
  assert kept == sorted({best, 16})


@pytest.mark.parametrize('augmentation', [
    dict(crop_padding=3, pad_mode='reflect', flip=True, inception_crop=True, randaugment_ops=2,
         randaugment_magnitude=7.0, randaugment_magnitude_std=0.5, randaugment_probability=0.5,
         cutout=5, random_erasing=0.25, random_erasing_mode='rand'),
    dict(trivialaugment=True, random_erasing=0.1),
    dict(autoaugment='svhn', cutout=4),
    dict(augmix=True, augmix_severity=5, augmix_width=2, augmix_depth=2, augmix_alpha=0.5,
         augmix_all_ops=True),
], ids=['randaugment', 'trivialaugment', 'autoaugment', 'augmix'])
def test_every_augmentation_key_reaches_the_devices_preprocessor(augmentation):
  config = tiny_config(dtype='bfloat16', **{f'augment.{k}': v for k, v in augmentation.items()})
  experiment, _ = trainer.build_experiment(
      config, image_shape=(28, 28, 1), num_classes=10, num_train_examples=64, mean=(33.0,),
      std=(78.0,), strategy=parallel.make_strategy('jit', 1))
  assert experiment.preprocess == Preprocessor(mean=(33.0,), std=(78.0,), dtype='bfloat16',
                                               **augmentation)


def test_a_cutout_or_crop_padding_beyond_the_images_is_refused_before_the_run_writes(tmp_path):
  config = tiny_config(dataset='synthetic', num_train_steps=4)
  config.synthetic.image_shape = (28, 20, 1)
  config.augment.cutout = 21
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'augment.cutout' (21) is larger than the 28x20 images it would cut from; use "
      'at most 20 (the Cutout paper cut 16 from 32x32 CIFAR-10 and 8 from CIFAR-100)')):
    trainer.train_and_evaluate(config, str(tmp_path))
  config.augment.cutout = 20
  config.augment.crop_padding = 20
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'augment.crop_padding' (20) is not less than the side of the 28x20 images, so "
      'some crops would hold none of the image; use less than 20 (4 is the usual for 32x32 '
      'CIFAR-10)')):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  config.augment.crop_padding = 19
  assert trainer.train_and_evaluate(config, str(tmp_path))['step'] == 4
  # Evaluating leaves training augmentation out, also one that an older jaxcnn let a run train
  # with: that run is still evaluated.
  record = tmp_path / workdir_lib.CONFIG_FILE
  recorded = json.loads(record.read_text())
  recorded['augment']['crop_padding'] = 30
  record.write_text(json.dumps(recorded))
  assert restore_run(str(tmp_path), 'latest').step == 4


def test_more_than_ten_classes_are_evaluated_for_top5_accuracy_too(tmp_path, capsys):
  # Checkpoints ranked by it: only with more than 10 classes, where it is counted.
  config = tiny_config(dataset='synthetic', num_train_steps=4, eval_every_steps=4,
                       best_metric='test/top5_accuracy')
  config.synthetic.image_shape, config.synthetic.num_classes = (28, 28, 1), 10
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'best_metric' ('test/top5_accuracy') is counted only for datasets of more "
      "than 10 classes, and this one has 10; use 'test/accuracy'")):
    trainer.train_and_evaluate(config, str(tmp_path / 'ten'))
  assert not os.listdir(tmp_path / 'ten')  # Refused before the run wrote anything.
  config.synthetic.num_classes = 20
  config.synthetic.num_train, config.synthetic.num_eval = 128, 100
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['test/accuracy'] < result['test/top5_accuracy'] <= 1
  assert read_metrics(str(tmp_path))[-2]['test/top5_accuracy'] == result['test/top5_accuracy']
  checkpointer = checkpoint.make_checkpointer(config, str(tmp_path), reading_only=True)
  try:  # The checkpoint was saved with the metric that ranks it.
    assert checkpointer.read_meta(4)['metrics']['test/top5_accuracy'] == result[
        'test/top5_accuracy']
    assert checkpointer.best_step() == 4
  finally:
    checkpointer.close()
  top5 = f'top-5 {100 * result["test/top5_accuracy"]:.2f}%'
  evaluation = capsys.readouterr().out.strip().splitlines()[-2]
  assert evaluation.startswith('step 4: test accuracy') and f'%, {top5}, loss ' in evaluation
  assert trainer.describe_evaluation({'test/accuracy': 0.7612, 'test/top5_accuracy': 0.9287,
                                      'test/loss': 1.0}, 'test') == (
      'test accuracy 76.12%, top-5 92.87%, loss 1.0000')


def test_airbench_whitens_its_first_layer_from_streamed_data_as_from_device_data(fake_tfds,
                                                                                  tmp_path):
  """Streamed, the whitening was left at its random start: only device-resident images were
  handed to the model. Frozen, the layer keeps its start through training."""
  kernels = {}
  for placement in ('device', 'stream'):
    config = tiny_config(model='airbench', data_placement=placement, frozen='^whiten\\.',
                         num_train_steps=2, eval_every_steps=2)
    trainer.train_and_evaluate(config, str(tmp_path / placement))
    state = restore_run(str(tmp_path / placement)).state
    kernels[placement] = np.asarray(state.params['whiten']['kernel'])
  np.testing.assert_allclose(kernels['stream'], kernels['device'], rtol=1e-5, atol=1e-6)
  random_start = trainer.build_experiment(
      config, image_shape=(28, 28, 1), num_classes=10, num_train_examples=512, mean=(0.0,),
      std=(1.0,), strategy=parallel.make_strategy('jit', 1))[1]
  assert not np.allclose(np.asarray(random_start.params['whiten']['kernel']), kernels['device'])
