"""`python train.py`: a user's mistake is one line on stderr, exit status 2, and no traceback."""

import os
import re
import socket
import subprocess
import sys

import pytest

from jaxcnn import distributed
from jaxcnn.errors import ConfigError

from conftest import LAUNCH_ATTEMPTS, REPO_ROOT, coordinator_port_was_taken, free_port


def run_train(*args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=cwd, capture_output=True,
                        text=True, timeout=120, check=False)


def test_the_model_kwargs_suggested_for_a_key_the_config_does_not_set_are_accepted():
  result = subprocess.run([sys.executable, '-m', 'jaxcnn.summary', '--config', 'configs/mnist.py',
                           "--config.model_kwargs={'widths': (8, 16, 32)}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('bn_cnn with widths=(8, 16, 32): input 28,28,1, 10 classes')


def test_an_empty_workdir_is_refused_rather_than_taken_as_none(tmp_path):
  result = subprocess.run([sys.executable, f'{REPO_ROOT}/train.py', '--config',
                           f'{REPO_ROOT}/configs/mnist.py:smoke', '--workdir='], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr == ('error: --workdir is empty; give a folder, or leave --workdir out '
                           'for a new one under runs/\n')
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('override, expected', [
    ('--config.batch_sise=64', "unknown config key 'batch_sise'; did you mean 'batch_size'"),
    ('--config.augment.flipp=true', "unknown config key 'augment.flipp'; did you mean 'augment.flip'"),
    ('--config.model=resnet9000', "unknown model 'resnet9000'; choose one of: airbench, bn_cnn, cifar_resnet20"),
    ('--config.dataset=mnistt', "unknown dataset 'mnistt': not a TFDS dataset name"),
    ('--config.batch_size=0', "config key 'batch_size' must be a positive integer, got 0"),
    ('--config.batch_size=-32', "config key 'batch_size' must be a positive integer, got -32"),
    ('--config.learning_rate=fast', "invalid value 'fast' for config key 'learning_rate'"),
    ('--config.augment.flip=maybe',
     "invalid value 'maybe' for config key 'augment.flip': it takes true or false"),
    ('--config.image_folder=/data/pets',
     "config key 'image_folder' is read only with --config.dataset=imagefolder"),
    ('--config.dtype=float16', "config key 'dtype' must be one of float32, bfloat16, got 'float16'"),
    ('--config.augment.cutout=-1',
     "config key 'augment.cutout' must be an integer >= 0 (pixels), got -1"),
    ('--config.augment.randaugment_magnitude=30',
     "config key 'augment.randaugment_magnitude' must be a number from 0 to 10, got 30.0"),
    ('--config.augment.randaugment_probability=1.5',
     "config key 'augment.randaugment_probability' must be a number from 0 to 1, got 1.5"),
    ('--config.augment.random_erasing_mode=noise',
     "config key 'augment.random_erasing_mode' must be one of pixel, rand, const, got 'noise'"),
    ('--config.augment.autoaugment=mnist',
     "config key 'augment.autoaugment' must be one of none, imagenet, cifar10, svhn, got 'mnist'"),
    ('--config.augment.augmix_severity=11',
     "config key 'augment.augmix_severity' must be an integer from 1 to 10, got 11"),
    ('--config.augment.pad_mode=wrap',
     "config key 'augment.pad_mode' must be one of constant, reflect, got 'wrap'"),
    ('--config.best_metric=test/acc',
     "config key 'best_metric' must be one of test/accuracy, test/loss, test/top5_accuracy, got "
     "'test/acc'"),
    ('--config.lr_decay_epochs=abc', "config key 'lr_decay_epochs' must be increasing positive"),
    ('--config.profile_steps=-5', "config key 'profile_steps' must be an integer >= 0, got -5"),
    ('--config.synthetic.image_shape=16,16',
     "config key 'synthetic.image_shape' must be three positive integers, height,width,channels"),
    # A dict that is no literal, and whose text holds ': ', as absl quotes it back.
    ("--config.model_kwargs={'widths': (8,) * 6}",
     "invalid value \"{'widths': (8,) * 6}\" for config key 'model_kwargs': it takes a dict of "
     'Python literals'),
    # A model argument the config does not set yet: the whole dict is how to give it.
    ('--config.model_kwargs.hidden=256',
     "config key 'model_kwargs.hidden' is not among the model_kwargs this config sets (none); "
     "give it as --config.model_kwargs=\"{'hidden': 256}\""),
    # ...with the value as the literal it reads as, which that flag accepts (a test below).
    ('--config.model_kwargs.widths=8,16,32', "--config.model_kwargs=\"{'widths': (8, 16, 32)}\""),
    ('--config.model_kwargs.shortcut=B', "--config.model_kwargs=\"{'shortcut': 'B'}\""),
    ('--config.model_kwargs.hidden={[1]: 2}', "--config.model_kwargs=\"{'hidden': '{[1]: 2}'}\""),
    # TFDS cannot parse the name: the same error as for a name it knows no dataset by.
    ('--config.dataset=cifar-10', "unknown dataset 'cifar-10': not a TFDS dataset name"),
    # As from --config.data_dir=$DATA with DATA unset: not the current folder.
    ('--config.data_dir=',
     "config key 'data_dir' must be a folder, or left unset for TFDS's default, got ''"),
])
def test_config_mistakes_are_one_line_errors(override, expected, tmp_path):
  result = run_train('--config', 'configs/mnist.py', override, f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr + result.stdout
  assert not (tmp_path / 'run').exists()  # Nothing was started.


def test_missing_config_file_is_one_line_error():
  result = run_train('--config', 'configs/no_such_config.py')
  assert result.returncode == 2
  assert result.stderr == "error: config file 'configs/no_such_config.py' does not exist\n"


def test_unknown_config_variant_is_one_line_error():
  result = run_train('--config', 'configs/mnist.py:smok')
  assert result.returncode == 2
  assert "unknown variant 'smok' of configs/mnist.py" in result.stderr
  assert result.stderr.count('\n') == 1


def test_a_variant_of_a_runs_config_json_is_one_line_error(tmp_path):
  from configs import mnist  # pylint: disable=g-import-not-at-top
  from jaxcnn import workdir  # pylint: disable=g-import-not-at-top
  workdir.write_config(str(tmp_path), mnist.get_config('smoke'))
  result = run_train('--config', f'{tmp_path}/config.json:smoke', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr == (f"error: config file '{tmp_path}/config.json' is a run's config.json, "
                           "which has no variants; give it without ':smoke'\n")
  assert not (tmp_path / 'run').exists()


def test_the_last_of_two_config_files_is_the_one_checked():
  # absl takes the last value of a flag given twice, so that is the file that must exist.
  result = run_train('--config', 'configs/mnist.py:smoke', '--config', 'configs/nope.py')
  assert result.returncode == 2
  assert result.stderr == "error: config file 'configs/nope.py' does not exist\n"


@pytest.mark.parametrize('body, variant, expected', [
    ("config.learning_rate = '0.1'\n  return config", '',
     "TypeError: Could not override field 'learning_rate' (reference). 0.1 is of original type "
     "<class 'str'> and cannot be casted to type <class 'float'>"),
    ('return config', ':smoke',
     'TypeError: get_config() takes 0 positional arguments but 1 was given'),
])
def test_what_a_config_file_raised_is_in_the_one_line(body, variant, expected, tmp_path):
  config_file = tmp_path / 'my_config.py'
  config_file.write_text('import jaxcnn.config\n\n\ndef get_config():\n'
                         f'  config = jaxcnn.config.default_config()\n  {body}\n')
  result = run_train('--config', f'{config_file}{variant}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr == (f'error: flag --config={config_file}{variant}: Error whilst parsing '
                           f'config file: {expected}\n')
  assert not (tmp_path / 'run').exists()


def test_a_split_the_dataset_lacks_is_named_before_anything_starts(mnist_data_dir, tmp_path):
  """Not a best_metric error: best_metric follows eval_split."""
  result = run_train('--config', 'configs/mnist.py', '--config.eval_split=validation',
                     f'--config.data_dir={mnist_data_dir}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr == ("error: dataset 'mnist/3.0.1' has no split 'validation'; it has: "
                           "test, train (and TFDS slices of them, e.g. 'train[:90%]' and "
                           "'train[90%:]' to hold out a tenth of train)\n")
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('process_id', [0, 1])
def test_a_process_whose_peer_never_joins_gives_up_in_one_line(tmp_path, process_id):
  for _ in range(LAUNCH_ATTEMPTS):
    port = free_port()  # Nobody listens on it: process 1 finds no coordinator.
    result = run_train('--config', 'configs/mnist.py', f'--coordinator_address=localhost:{port}',
                       '--num_processes=2', f'--process_id={process_id}', '--join_timeout=3',
                       f'--workdir={tmp_path / "run"}')
    # Again on another port if another program took this one before process 0's coordinator
    # listened on it.
    if not coordinator_port_was_taken(result.stderr, port):
      break
  assert result.returncode == 2
  assert result.stdout == (f'process {process_id} of 2: joining the run at localhost:{port} '
                           '(waiting up to 3 s for every process to join; --join_timeout)\n')
  assert result.stderr == (
      f'error: process {process_id} of 2 waited 3 s and not every process joined the run; start '
      'the same command on every host with its own --process_id, the same --num_processes and '
      "process 0's HOST:PORT as --coordinator_address (or a longer --join_timeout)\n")
  assert not (tmp_path / 'run').exists()
  result = run_train('--config', 'configs/mnist.py', '--join_timeout=0')
  assert result.returncode == 2
  assert result.stderr == ('error: --join_timeout must be a number of seconds from 1 to 604800 '
                           '(a week), got 0\n')


@pytest.mark.parametrize('arguments, message', [
    ({'num_processes': 0, 'process_id': 0},
     '--num_processes must be a positive number of processes, got 0'),
    ({'num_processes': -2, 'process_id': 0},
     '--num_processes must be a positive number of processes, got -2'),
    ({'num_processes': 2, 'process_id': 0, 'join_timeout_s': 3_000_000_000},
     '--join_timeout must be a number of seconds from 1 to 604800 (a week), got 3000000000'),
])
def test_multi_process_flags_out_of_range_are_named(arguments, message):
  """Refused before JAX is asked to join (a timeout past 2**31 s was a TypeError from JAX)."""
  with pytest.raises(ConfigError, match=re.escape(message)):
    distributed.initialize(coordinator_address='localhost:1', **arguments)


def test_a_coordinator_address_without_a_port_is_a_one_line_error(tmp_path):
  result = run_train('--config', 'configs/mnist.py', '--coordinator_address=localhost',
                     '--num_processes=2', '--process_id=0', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr == ("error: --coordinator_address 'localhost' must be HOST:PORT, the "
                           'address of process 0 and a free port on it, e.g. node0:12355\n')


def test_process_0_on_a_port_another_program_holds_is_a_one_line_error(tmp_path):
  """Refused before joining: JAX's coordinator, failing to listen, crashed the process."""
  with socket.socket() as holder:  # Another program, listening on the port.
    holder.bind(('localhost', 0))
    holder.listen()
    port = holder.getsockname()[1]
    result = run_train('--config', 'configs/mnist.py', f'--coordinator_address=localhost:{port}',
                       '--num_processes=2', '--process_id=0', '--join_timeout=60',
                       f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr == (f"error: --coordinator_address 'localhost:{port}': port {port} is "
                           "already in use on this host (process 0's coordinator listens on it); "
                           'choose a free port\n')
  assert result.stdout == ''  # Not even "joining the run".
  assert not (tmp_path / 'run').exists()


def test_a_coordinator_host_that_does_not_resolve_is_a_one_line_error_at_once(tmp_path):
  """Not after --join_timeout: a name that does not resolve will not resolve by waiting."""
  result = run_train('--config', 'configs/mnist.py',
                     '--coordinator_address=nosuchhost.invalid:1234', '--num_processes=2',
                     '--process_id=1', '--join_timeout=60', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr[-3000:]
  # The resolver's reason depends on the host ("Name or service not known", ...).
  assert re.fullmatch(r"error: --coordinator_address 'nosuchhost\.invalid:1234': host "
                      r"'nosuchhost\.invalid' does not resolve \([^()\n]+\); give the name or IP "
                      r"address of process 0's host\n", result.stderr), result.stderr[-3000:]
  assert result.stdout == ''
  assert not (tmp_path / 'run').exists()


@pytest.fixture
def no_joining(monkeypatch):
  """Fails a test that would join a run in the test's own process."""
  def join(*unused_args, **unused_kwargs):
    raise AssertionError('jax.distributed was asked to join')
  monkeypatch.setattr(distributed, '_join', join)


@pytest.mark.parametrize('process_id', [0, 1])
def test_every_process_resolves_the_coordinator_host_first(no_joining, process_id):
  with pytest.raises(ConfigError, match=r"host 'nosuchhost\.invalid' does not resolve \("):
    distributed.initialize(coordinator_address='nosuchhost.invalid:1234', num_processes=2,
                           process_id=process_id)


def test_a_bracketed_ipv6_coordinator_host_resolves(no_joining):
  """'[::1]' is the host ::1: it resolves (numeric, so even without IPv6), and process 0 then
  finds the port taken (on IPv4: the coordinator listens on every interface)."""
  with socket.socket() as holder:
    holder.bind(('127.0.0.1', 0))
    holder.listen()
    port = holder.getsockname()[1]
    with pytest.raises(ConfigError, match=re.escape(
        f"--coordinator_address '[::1]:{port}': port {port} is already in use on this host")):
      distributed.initialize(coordinator_address=f'[::1]:{port}', num_processes=2, process_id=0)
