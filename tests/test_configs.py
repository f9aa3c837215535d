"""Every config file loads, validates and documents itself, and its :smoke variant trains."""

import glob
import os
import re

import pytest

from jaxcnn import cli, config as config_lib, trainer, workdir as workdir_lib
from jaxcnn.errors import ConfigError

from conftest import REPO_ROOT

CONFIG_FILES = sorted(os.path.relpath(p, REPO_ROOT)
                      for p in glob.glob(str(REPO_ROOT / 'configs' / '*.py')))


def test_the_configs_the_issues_ask_for_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet_resnet50',
          'imagefolder'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_is_valid_and_its_docstring_gives_the_command_and_expected_result(path):
  config_lib.validate(cli.load_config_file(str(REPO_ROOT / path)))
  with open(REPO_ROOT / path, encoding='utf-8') as f:
    docstring = f.read().split('"""')[1]
  assert f'python train.py --config {path}' in docstring
  assert '%' in docstring  # An expected accuracy, measured or published.
  with pytest.raises(ConfigError, match='unknown variant'):
    cli.load_config_file(f'{REPO_ROOT / path}:nonsense')


@pytest.mark.parametrize('spec', [f'{path}:smoke' for path in CONFIG_FILES]
                         + ['configs/cifar10.py:airbench_smoke'])
def test_smoke_variant_trains_on_synthetic_data_when_the_dataset_is_absent(spec, tmp_path,
                                                                          monkeypatch, capsys):
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  config = cli.load_config_file(str(REPO_ROOT / spec))
  config.data_dir = str(tmp_path / 'empty_tfds')  # Nothing is prepared here.
  config.num_devices = 1
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert 'synthetic' in out
  if config.data_placement == 'stream':  # Through Grain, like the dataset it stands in for.
    assert f'synthetic {config.dataset} (stream)' in out
  assert result['step'] == config.num_train_steps
  assert 0.0 <= result[f'{config.eval_split}/accuracy'] <= 1.0


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_no_shipped_config_sets_what_its_optimizer_or_schedule_never_reads(path):
  from jaxcnn import optim  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError) as refused:  # Its error names every variant the file has.
    cli.load_config_file(f'{REPO_ROOT / path}:nonsense')
  variants = re.findall(r"'(\w*)'", str(refused.value).split('use one of:')[1])
  assert '' in variants
  for variant in variants:
    config = cli.load_config_file(f'{REPO_ROOT / path}' + (f':{variant}' if variant else ''))
    assert optim.unread_settings(config, config_lib.default_config()) == [], variant


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_a_runs_config_json_reads_back_as_the_config_it_records(path, tmp_path):
  config = cli.load_config_file(str(REPO_ROOT / path))
  workdir_lib.write_config(str(tmp_path), config)
  again = cli.load_config_file(str(tmp_path / 'config.json'))
  assert again.to_dict() == config.to_dict()  # Tuples included: (30, 60) != [30, 60].
  assert again.get_ref('data_dir').get_type() is str  # A None key keeps its type for overrides.


@pytest.mark.parametrize('best_metric, after', [(None, 'train[90%:]/accuracy'),
                                                 ('test/loss', 'test/loss')])
def test_a_runs_config_json_with_another_eval_split_ranks_checkpoints_on_it(best_metric, after,
                                                                           tmp_path):
  """best_metric follows eval_split unless it was set: JSON records only its value."""
  config = config_lib.default_config()
  if best_metric:
    config.best_metric = best_metric
  workdir_lib.write_config(str(tmp_path), config)
  again = config_lib.config_from_json(str(tmp_path / 'config.json'))
  again.eval_split, again.train_split = 'train[90%:]', 'train[:90%]'
  assert again.best_metric == after
  if best_metric is None:
    config_lib.validate(again)  # Not refused for ranking on a split it does not evaluate.


@pytest.mark.parametrize('metric, mode, highest', [('test/loss', 'max', 'highest'),
                                                  ('test/accuracy', 'min', 'lowest')])
def test_an_older_runs_best_mode_that_kept_the_worst_is_read_as_auto(tmp_path, capsys, metric,
                                                                     mode, highest):
  (tmp_path / 'config.json').write_text(
      f'{{"best_metric": "{metric}", "best_mode": "{mode}", "eval_split": "test"}}')
  for _ in range(2):  # Warned of once, however often a command reads it.
    config = config_lib.config_from_json(str(tmp_path / 'config.json'))
  assert config.best_mode == 'auto' and config.best_metric == metric
  config_lib.validate(config)  # Its own config resumes the run.
  assert capsys.readouterr().err == (
      f"warning: {tmp_path / 'config.json'} records best_mode '{mode}' for {metric}, which kept "
      f"the {highest} as the best; reading it as 'auto'\n")


def test_a_config_json_with_a_value_of_the_wrong_type_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{"augment": {"flip": 3}}')
  with pytest.raises(ConfigError, match="gives config key 'augment.flip' the value 3; it takes bool"):
    config_lib.config_from_json(str(tmp_path / 'config.json'))


@pytest.mark.parametrize('text, message', [
    ('{"batch_sizz": 64}', "unknown config key 'batch_sizz'; did you mean 'batch_size'"),
    ('{"augment": {"flipp": true}}', "unknown config key 'augment.flipp'; did you mean "
                                     "'augment.flip'?"),
    ('{"zzz": 1}', "unknown config key 'zzz'; jaxcnn/config.py defines every key"),
])
def test_a_config_json_with_an_unknown_key_is_refused(tmp_path, text, message):
  """Locked like any config: a misspelt key is not quietly trained without."""
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.config_from_json(str(tmp_path / 'config.json'))


@pytest.mark.parametrize('line, key, meant', [('config.batch_sise = 64', 'batch_sise', 'batch_size'),
                                              ('config.augment.flipp = True', 'augment.flipp',
                                               'augment.flip')])
def test_a_key_a_config_file_adds_is_refused_before_the_run_starts(line, key, meant, tmp_path):
  """The command line cannot add keys (configs are locked), but a config file adds them before
  it is locked: a misspelt one would be ignored, and recorded in the run's config.json."""
  path = tmp_path / 'typo.py'
  path.write_text('from jaxcnn.config import default_config\n\n\ndef get_config():\n'
                  f'  config = default_config()\n  {line}\n  return config\n')
  config = cli.load_config_file(str(path))
  with pytest.raises(ConfigError, match=re.escape(
      f"the config has an unknown config key '{key}'; did you mean '{meant}'")):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_best_metric_follows_eval_split_until_it_is_set():
  config = config_lib.default_config()
  config.eval_split = 'validation'
  assert config.best_metric == 'validation/accuracy'
  config.best_metric = 'validation/loss'
  config.eval_split = 'test'
  assert config.best_metric == 'validation/loss'


@pytest.mark.parametrize('metric, mode', [('test/loss', 'min'), ('test/accuracy', 'max'),
                                          ('test/top5_accuracy', 'max'),
                                          ('test/ema_loss', 'min')])
def test_the_best_checkpoint_is_the_lowest_loss_or_the_highest_accuracy(metric, mode):
  config = config_lib.default_config()
  config.ema_decay, config.best_metric = 0.99, metric
  assert config.best_mode == 'auto' and config_lib.metric_direction(metric) == mode
  config_lib.validate(config)
  config.best_mode = mode
  config_lib.validate(config)
  wrong, highest = ('max', 'highest') if mode == 'min' else ('min', 'lowest')
  config.best_mode = wrong  # Would keep the worst checkpoint as the best, silently.
  with pytest.raises(ConfigError, match=re.escape(
      f"config key 'best_mode' ('{wrong}') would keep the checkpoints with the {highest} "
      f"{metric} as the best; use '{mode}' or 'auto'")):
    config_lib.validate(config)


@pytest.mark.parametrize('metric, needs', [
    ('test/tta_accuracy', "eval_tta set to 'flip' or 'flip_translate'"),
    ('test/ema_tta_loss', 'ema_decay set to a decay in (0, 1)')])
def test_a_best_metric_the_run_would_not_evaluate_names_the_key_that_would(metric, needs):
  config = config_lib.default_config()
  config.best_metric = metric
  with pytest.raises(ConfigError, match=re.escape(
      f"config key 'best_metric' ('{metric}') is evaluated only with {needs}; this run "
      'evaluates test/accuracy, test/loss, test/top5_accuracy')):
    config_lib.validate(config)
  config.eval_tta, config.ema_decay = 'flip_translate', 0.9
  config_lib.validate(config)


@pytest.mark.parametrize('seed', [-1, 2 ** 31])
def test_a_seed_the_steps_cannot_take_is_refused(seed):
  """The compiled steps take the seed as an int32 argument."""
  config = config_lib.default_config()
  config.seed = seed
  with pytest.raises(ConfigError, match=re.escape(
      f"config key 'seed' must be an integer from 0 to 2147483647, got {seed}")):
    config_lib.validate(config)
  config.seed = 2 ** 31 - 1
  config_lib.validate(config)


@pytest.mark.parametrize('key, dataset', [('data_dir', 'mnist'), ('manual_dir', 'mnist'),
                                          ('image_folder', 'imagefolder')])
def test_an_empty_folder_name_is_refused_not_read_as_the_current_folder(key, dataset):
  config = config_lib.default_config()
  config.dataset = dataset
  for empty in ('', '  '):  # As from --config.data_dir=$DATA with DATA unset.
    config[key] = empty
    with pytest.raises(ConfigError, match=re.escape(f"config key {key!r} must be a folder")):
      config_lib.validate(config)
  config[key] = 'folder'
  config_lib.validate(config)


def test_model_kwargs_are_checked_against_the_model_and_read_back_as_tuples(tmp_path):
  config = config_lib.default_config()
  config.model_kwargs = {'widths': (8, 16), 'hidden': 32}
  config_lib.validate(config)
  workdir_lib.write_config(str(tmp_path), config)
  again = config_lib.config_from_json(str(tmp_path / 'config.json'))
  assert config_lib.model_kwargs(again) == {'hidden': 32, 'widths': (8, 16)}  # Not [8, 16].
  config.model_kwargs = {'widths': {'a': 1}}  # config.json could not record it as itself.
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'model_kwargs.widths' must be a number, string, true or false, None, or a "
      "tuple of those")):
    config_lib.validate(config)
  config.model_kwargs = {'widht': (8, 16)}
  with pytest.raises(ConfigError, match=re.escape(
      "config key 'model_kwargs' sets 'widht', which model 'bn_cnn' does not take; it takes: "
      'widths (default (16, 32, 64)), hidden (default 128)')):
    config_lib.validate(config)
