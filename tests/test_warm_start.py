"""Fine-tuning: a new run that starts from the weights of another run's checkpoint."""

import json
import re
import shutil

import numpy as np
import pytest

from jaxcnn import checkpoint, models, trainer, warm_start
from jaxcnn import workdir as workdir_lib
from jaxcnn.errors import ConfigError, UserError
from jaxcnn.restore import restore_run
from jaxcnn.warm_start import RECORD_FILE

from conftest import tiny_config

# A learning rate too small to move a weight by 1e-9 in a few SGD steps: the weights a run ends
# with are those it started from, up to that.
BN_CNN = {'widths': (4, 8), 'hidden': 16}
STILL = dict(optimizer='sgd', learning_rate=1e-12, lr_schedule='constant', num_train_steps=2,
             eval_every_steps=2)


def weights(workdir, which='latest', ema=False):
  """The model arrays of a run's checkpoint `which`, keyed by dotted path, as host arrays."""
  run = restore_run(str(workdir), which)
  state = run.experiment.strategy.fetch(run.state)
  state = state.averaged() if ema else state
  flat = {}
  for group in (state.params, state.model_state):
    flat.update({path: np.asarray(value) for path, value in
                 checkpoint.flat_leaves(checkpoint.to_nested_dict(group)).items()})
  return flat


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  """A bn_cnn run on the fake MNIST with BatchNorm statistics, a moving average of its weights
  and checkpoints at steps 8, 16 and 24."""
  from conftest import mock_tfds  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('source')
  with mock_tfds({'train': 512, 'test': 200}), pytest.MonkeyPatch.context() as patch:
    # The decoded fake data is cached apart from the real data's, as `fake_tfds` does.
    patch.setenv('JAXCNN_CACHE_DIR', str(workdir.parent / 'source-cache'))
    trainer.train_and_evaluate(
        tiny_config(model='bn_cnn', model_kwargs=BN_CNN, ema_decay=0.9, num_train_steps=24,
                    eval_every_steps=8, checkpoint_every_steps=8), str(workdir))
  return workdir


def test_a_new_run_starts_from_the_best_checkpoints_weights_and_its_own_optimizer(
    fake_tfds, source_run, tmp_path, capsys):
  config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN, ema_decay=0.5, **STILL)
  config.init_from.workdir = str(source_run)
  result = trainer.train_and_evaluate(config, str(tmp_path / 'new'))
  best = restore_run(str(source_run), 'best').step
  out = capsys.readouterr().out
  assert re.search(rf'starting from the weights of {re.escape(str(source_run))} \(step {best}, '
                   r'its best by test/accuracy \(\d+\.\d\d%\)\): 14 of 14 arrays\n', out), out
  record = json.loads((tmp_path / 'new' / RECORD_FILE).read_text())
  assert (record['step'], record['weights'], record['random_start'], record['not_used']) == (
      best, 'trained', [], [])
  started = weights(source_run, str(best))
  ended = weights(tmp_path / 'new')
  for path, value in started.items():
    if path.endswith(('mean', 'var')):  # BatchNorm statistics move in training mode.
      continue
    np.testing.assert_allclose(ended[path], value, atol=1e-8, err_msg=path)
  # Its moving average started at the weights taken, not at random ones.
  averaged = weights(tmp_path / 'new', ema=True)
  np.testing.assert_allclose(averaged['fc2.kernel'], started['fc2.kernel'], atol=1e-8)
  # The optimizer starts afresh: the new run's steps are its own.
  assert restore_run(str(tmp_path / 'new')).step == 2 and result['step'] == 2


def test_fine_tuning_on_other_classes_keeps_a_random_head_and_the_rest(fake_tfds, source_run,
                                                                        tmp_path, capsys):
  config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN,
                       dataset='synthetic', **STILL)
  config.synthetic.image_shape = (28, 28, 1)
  config.synthetic.num_classes = 5
  config.synthetic.num_train, config.synthetic.num_eval = 256, 64
  config.init_from.workdir = str(source_run)
  config.init_from.checkpoint = 'latest'
  config.init_from.weights = 'ema'
  trainer.train_and_evaluate(config, str(tmp_path / 'tuned'))
  out = capsys.readouterr().out
  assert ('(step 24, its latest, moving average): 12 of 14 arrays; random start for fc2.bias '
          '(shape (10,) there, (5,) here), fc2.kernel (shape (16, 10) there, (16, 5) here)\n'
          ) in out, out
  started = weights(source_run, '24', ema=True)
  tuned = weights(tmp_path / 'tuned')
  for path, value in started.items():
    if not path.startswith('fc2.') and not path.endswith(('mean', 'var')):
      np.testing.assert_allclose(tuned[path], value, atol=1e-8, err_msg=path)
  # The head is the one this config's seed draws for a fresh model of 5 classes.
  fresh = models.create_model('bn_cnn', num_classes=5, input_shape=(28, 28, 1), dtype='float32',
                              seed=0, axis_name=None,
                              model_kwargs=BN_CNN)
  np.testing.assert_allclose(tuned['fc2.kernel'], np.asarray(fresh.fc2.kernel[...]), atol=1e-8)
  assert not np.allclose(tuned['fc1.kernel'], np.asarray(fresh.fc1.kernel[...]), atol=1e-3)


def test_a_resumed_fine_tuning_run_reads_its_own_checkpoint_not_the_source(fake_tfds, source_run,
                                                                            tmp_path, capsys):
  source = tmp_path / 'source'
  shutil.copytree(source_run, source)
  config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN,
                       num_train_steps=4, eval_every_steps=4)
  config.init_from.workdir = str(source)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  shutil.rmtree(source)  # Gone: a resume must not need it.
  config.num_train_steps = 8
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'resuming from the checkpoint at step 4' in capsys.readouterr().out
  assert restore_run(str(tmp_path / 'run')).step == 8


@pytest.mark.parametrize('key, value, message', [
    ('workdir', 'nowhere', "config key 'init_from.workdir' ('nowhere') must be the workdir of a "
     "jaxcnn run with checkpoints: 'nowhere' is not a jaxcnn run directory: it has no "
     'config.json'),
    ('checkpoint', '5', "--config.init_from.checkpoint='5' is not 'latest', 'best' or one of the "
     'steps saved in {source}/checkpoints: 8, 16, 24'),
    ('checkpoint', 'first', "config key 'init_from.checkpoint' must be 'best', 'latest' or a step "
     "number, got 'first'"),
    ('weights', 'average', "config key 'init_from.weights' must be one of trained, ema, got "
     "'average'"),
])
def test_a_bad_init_from_is_one_line_naming_it_before_any_work(fake_tfds, source_run, tmp_path,
                                                               key, value, message):
  config = tiny_config(model='bn_cnn')
  config.init_from.workdir = str(source_run)
  config.init_from[key] = value
  with pytest.raises(UserError, match=re.escape(message.format(source=source_run))):
    trainer.train_and_evaluate(config, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()  # Refused before the run wrote anything.


def test_a_source_without_a_moving_average_or_sharing_no_array_is_refused(fake_tfds, tmp_path):
  plain = tmp_path / 'plain'
  trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(plain))  # lenet5
  config = tiny_config(num_train_steps=2)
  config.init_from.workdir = str(plain)
  config.init_from.weights = 'ema'
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'init_from.weights' ('ema') takes the moving average of the weights, which the "
      f"run in {plain} did not keep (ema_decay 0); use 'trained'")):
    trainer.train_and_evaluate(config, str(tmp_path / 'new'))
  early = tmp_path / 'early'  # A run's folder before its first checkpoint.
  early.mkdir()
  shutil.copy(plain / 'config.json', early)
  config.init_from.workdir, config.init_from.weights = str(early), 'trained'
  with pytest.raises(ConfigError, match=re.escape(
      f"config key 'init_from.workdir' ({str(early)!r}) names a run that has no checkpoint yet")):
    trainer.train_and_evaluate(config, str(tmp_path / 'new'))
  other = tiny_config(num_train_steps=2, model='keras_cnn')
  other.init_from.workdir = str(plain)
  with pytest.raises(ConfigError, match=re.escape(
      f"config key 'init_from.workdir' ({str(plain)!r}) holds a run of model 'lenet5', none of "
      "whose arrays has the name and shape of one of this model's (")):
    trainer.train_and_evaluate(other, str(tmp_path / 'other'))


def test_a_linear_probe_from_another_run_works_over_several_devices(fake_tfds, source_run,
                                                                     tmp_path):
  started = weights(source_run, '16')
  for strategy in ('pmap', 'shard_map'):
    config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN, parallel=strategy, num_devices=2,
                         num_train_steps=2, eval_every_steps=2, learning_rate=0.01,
                         frozen=r'^(?!fc2\.)')
    config.init_from.workdir = str(source_run)
    config.init_from.checkpoint = '16'
    trainer.train_and_evaluate(config, str(tmp_path / strategy))
    probed = weights(tmp_path / strategy)
    for path, value in started.items():
      if path.startswith('fc2.'):
        assert not np.allclose(probed[path], value, atol=1e-4), (strategy, path)
      else:
        np.testing.assert_array_equal(probed[path], value, err_msg=f'{strategy} {path}')
  assert workdir_lib.read_config(str(tmp_path / 'pmap')).init_from.workdir == str(source_run)


def test_a_start_that_takes_fewer_than_half_of_the_arrays_is_a_warning():
  source = warm_start.Source(workdir='runs/a', step=8, weights='trained',
                             run_config=None, description='step 8, its latest')
  record = {'taken': ['conv1.kernel'], 'not_used': ['fc.kernel'],
            'random_start': ['conv2.kernel (not in that model)', 'fc.bias (not in that model)']}
  assert warm_start.describe(source, record) == (
      'warning: starting from the weights of runs/a (step 8, its latest): 1 of 3 arrays; random '
      'start for conv2.kernel (not in that model), fc.bias (not in that model); not used: 1 of '
      "that model's (fc.kernel); fewer than half of the arrays fit: is that the run you meant to "
      'start from?')
  record['taken'].append('conv2.bias')
  assert not warm_start.describe(source, record).startswith('warning')


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # As for resumes.
def test_weights_that_fail_their_checksums_or_do_not_read_are_refused(fake_tfds, source_run,
                                                                      tmp_path):
  for damage in ('checksum', 'data'):
    source = tmp_path / f'source-{damage}'
    shutil.copytree(source_run, source)
    step_dir = source / 'checkpoints' / '24'
    if damage == 'checksum':  # Arrays that read back but differ from those saved.
      meta_path = step_dir / 'meta' / 'metadata'
      meta = json.loads(meta_path.read_text())
      meta['checksums']['state.params.fc1.kernel'][0] ^= 1
      meta_path.write_text(json.dumps(meta))
      expected = re.escape('checkpoint 24 does not match its checksums')
    else:  # OCDBT's data files gone.
      for data_file in step_dir.glob('state/**/d/*'):
        data_file.unlink()
      expected = 'checkpoint 24 (cannot be read|has unreadable metadata): '
    config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN, **STILL)
    config.init_from.workdir, config.init_from.checkpoint = str(source), 'latest'
    with pytest.raises(UserError, match=re.escape(
        f"config key 'init_from.workdir' ({str(source)!r}): ") + expected):
      trainer.train_and_evaluate(config, str(tmp_path / f'new-{damage}'))


def test_a_linear_probe_trains_the_head_alone_and_a_resume_must_keep_it(fake_tfds, source_run,
                                                                        tmp_path, capsys):
  config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN, num_train_steps=4,
                       eval_every_steps=4, learning_rate=0.01, frozen=r'^(?!fc2\.)')
  config.init_from.workdir = str(source_run)
  trainer.train_and_evaluate(config, str(tmp_path / 'probe'))
  assert ('frozen: 8 of 10 parameter arrays (6,636 of 6,806 parameters) and 2 BatchNorm layers, '
          'which normalise with their running statistics; training fc2.bias, fc2.kernel\n'
          ) in capsys.readouterr().out
  started, probed = weights(source_run, 'best'), weights(tmp_path / 'probe')
  for path, value in started.items():  # BatchNorm statistics included.
    if path.startswith('fc2.'):
      assert not np.allclose(probed[path], value, atol=1e-4), path
    else:
      np.testing.assert_array_equal(probed[path], value, err_msg=path)
  # The optimizer's state is the head's alone: a resume without the freeze is another state.
  config.frozen, config.num_train_steps = '', 8
  with pytest.raises(ConfigError, match=re.escape(
      "this config changes frozen '^(?!fc2\\.)' -> '', which can shape the training state")):
    trainer.train_and_evaluate(config, str(tmp_path / 'probe'))


def test_a_frozen_stage_keeps_its_batchnorm_statistics_and_a_trained_one_follows_the_data(
    fake_tfds, source_run, tmp_path, capsys):
  config = tiny_config(model='bn_cnn', model_kwargs=BN_CNN, num_train_steps=2,
                       eval_every_steps=2, frozen=r'^stages\.0\.')
  config.init_from.workdir, config.init_from.checkpoint = str(source_run), 'latest'
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert ('frozen: 3 of 10 parameter arrays (44 of 6,806 parameters) and 1 BatchNorm layer, '
          'which normalises with its running statistics;') in capsys.readouterr().out
  started, ended = weights(source_run, 'latest'), weights(tmp_path / 'run')
  for statistic in ('mean', 'var'):
    frozen, trained = (f'stages.{i}.layers.1.{statistic}' for i in (0, 1))
    np.testing.assert_array_equal(ended[frozen], started[frozen])
    assert not np.allclose(ended[trained], started[trained], atol=1e-6), trained


@pytest.mark.parametrize('pattern, message', [
    ('(', "config key 'frozen' ('(') is not a regular expression: missing ), unterminated "
     'subpattern at position 0'),
    ('head', "config key 'frozen' ('head') matches none of the parameters of model 'lenet5': "
     'conv1.bias, conv1.kernel, conv2.bias, conv2.kernel, ...'),
    ('.', "config key 'frozen' ('.') matches every parameter of model 'lenet5': nothing would "
     'train'),
])
def test_a_frozen_pattern_that_is_no_regex_or_freezes_nothing_or_everything_is_refused(
    fake_tfds, tmp_path, pattern, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    trainer.train_and_evaluate(tiny_config(frozen=pattern), str(tmp_path))
