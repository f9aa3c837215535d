"""Real MNIST, prepared by TFDS from the official files: a short run reaches 97%."""

import json
import os
import subprocess
import sys

from conftest import MNIST_MANUAL_DIR, REPO_ROOT

TRAIN_AND_REPORT = """
import runpy, sys
sys.argv = ['train.py'] + sys.argv[1:]
try:
  runpy.run_path('train.py', run_name='__main__')
except SystemExit as exit:
  assert not exit.code, exit.code
print('tensorflow imported:', 'tensorflow' in sys.modules)
print('torch imported:', 'torch' in sys.modules)
"""


def test_one_epoch_on_real_mnist_reaches_97_percent_without_importing_tensorflow(
    tmp_path, mnist_data_dir):
  workdir = tmp_path / 'run'
  # One CPU device, as a user's machine has, not the session's eight fake ones.
  env = {**os.environ, 'JAXCNN_CACHE_DIR': str(tmp_path / 'cache'),
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = subprocess.run(
      [sys.executable, '-c', TRAIN_AND_REPORT, '--config', 'configs/mnist.py',
       '--config.num_epochs=1', '--config.log_every_steps=200',
       f'--config.data_dir={mnist_data_dir}', f'--config.manual_dir={MNIST_MANUAL_DIR}',
       f'--workdir={workdir}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  # TensorFlow prepared the dataset in a child process; training itself never imported it, nor
  # PyTorch (TensorBoard's and tensorboardX's writers would, wherever they are installed).
  assert 'tensorflow imported: False' in result.stdout
  assert 'torch imported: False' in result.stdout
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if 'test/accuracy' in r][-1]
  assert final['step'] == 60000 // 128
  assert final['test/accuracy'] >= 0.97, final
