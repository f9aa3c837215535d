"""jaxcnn's benchmark suite: jaxcnn against PyTorch on this machine's device, in one invocation.

  python benchmarks/run.py [--quick] [--mnist_dir ../shared/datasets/mnist] [--seeds 5]
      [--output_dir benchmarks/results]

Writes `<output_dir>/<date>-<device>.json` with the device, library versions, the command, every
raw measurement (median, min and max of several repeats) and a flat `summary`. Sections:

* time to accuracy: training seconds (compile and evaluation excluded, as airbench reports them)
  until the full MNIST test set reaches 99.0% and 99.5%, with `configs/mnist.py`, over several seeds;
* throughput: steady-state training images/s of LeNet-5, CIFAR ResNet-20, the fast CIFAR network
  and ResNet-50 at 224x224, float32 and bfloat16, on synthetic data in device memory, for jaxcnn
  and for the PyTorch reference of `benchmarks/torch_reference.py` (channels_last, bf16 autocast,
  torch.compile on accelerators);
* MFU of ResNet-50: 24.6 GFLOP per training image against the bf16 matmul rate measured here;
* CPU: one epoch of LeNet-5 on MNIST at batch 128, the whole process timed from outside, jaxcnn's
  `python train.py --config configs/mnist.py:lenet5_epoch` against the PyTorch reference script.

`--quick` runs every section with few steps and one seed: a smoke check for CI, not a measurement.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcnn import cli
from jaxcnn.metrics import read_metrics
from measure import measure_throughput

import torch_reference  # pylint: disable=g-bad-import-order

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET50_TRAIN_GFLOP = 24.6  # Per image: 3x the 4.1 GMAC (8.2 GFLOP) forward pass.

_QUICK = flags.DEFINE_bool('quick', False, 'Few steps and one seed: a smoke check, for CI.')
_MNIST_DIR = flags.DEFINE_string(
    'mnist_dir', os.path.join(REPO_ROOT, '..', 'shared', 'datasets', 'mnist'),
    'The four official MNIST files (TFDS prepares MNIST from them; PyTorch reads them).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: TFDS\'s own).')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Seeds of the time-to-accuracy runs.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats of each measurement.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', os.path.join(REPO_ROOT, 'benchmarks', 'results'),
                                  'Where the results JSON goes.')
_UPDATE = flags.DEFINE_bool(
    'update', False, "Replace only the sections run in today's results file for this device, "
    'keeping the others (e.g. re-measure the cpu section after a change without the hour-long '
    'mnist one); each section keeps the environment and command it was measured with.')
_SECTIONS = flags.DEFINE_list('sections', ['mnist', 'throughput', 'cpu'],
                              'Sections to run: mnist, throughput, cpu.')


def _spread(values: list[float]) -> dict:
  """Median, min, max, mean and standard deviation of repeated measurements."""
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'mean': statistics.fmean(values),
          'stdev': statistics.stdev(values) if len(values) > 1 else 0.0, 'values': values}


def environment() -> dict:
  """The device and the library versions the numbers belong to."""
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets',
                  'grain', 'torch', 'numpy'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  return {'device': device.device_kind if device.platform != 'cpu' else
                    f'cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})',
          'backend': jax.default_backend(), 'num_devices': jax.device_count(),
          'host': platform.node(), 'python': platform.python_version(), 'versions': versions,
          'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': ' '.join(['python'] + sys.argv)}


def matmul_flops(quick: bool) -> dict:
  """The device's measured matmul rate: bf16 on accelerators, float32 on the CPU."""
  on_cpu = jax.default_backend() == 'cpu'
  size = 256 if quick else (2048 if on_cpu else 8192)
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  rates = []
  for _ in range(3 if quick else 10):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    rates.append(2 * size ** 3 / (time.perf_counter() - start))
  return {'size': size, 'dtype': jnp.dtype(dtype).name, 'flops': _spread(rates)}


# ---------------------------------------------------------------- Time to accuracy

def mnist_time_to_accuracy(seeds: int, quick: bool, data_dir: str | None, mnist_dir: str) -> dict:
  """Training seconds until the MNIST test accuracy reaches 99.0% and 99.5%, per seed."""
  from jaxcnn import cli as cli_lib  # pylint: disable=g-import-not-at-top,reimported
  from jaxcnn.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top
  runs = []
  for seed in range(seeds):
    config = cli_lib.load_config_file(os.path.join(REPO_ROOT, 'configs', 'mnist.py'))
    config.seed = seed
    config.data_dir, config.manual_dir = data_dir, mnist_dir
    config.eval_every_steps = 25 if quick else 117  # Four evaluations per epoch.
    config.log_every_steps = config.eval_every_steps
    if quick:
      config.num_train_steps = 50
    with tempfile.TemporaryDirectory() as workdir:
      result = train_and_evaluate(config, workdir)
      evals = [r for r in read_metrics(workdir) if 'test/accuracy' in r]
    run = {'seed': seed, 'final_accuracy': result['test/accuracy'],
           'compile_seconds': result['time/compile_seconds'],
           'train_seconds': result['time/train_seconds'],
           'curve': [(r['step'], r['train/seconds'], r['test/accuracy']) for r in evals]}
    for target, key in ((0.99, 'seconds_to_99'), (0.995, 'seconds_to_99_5')):
      reached = [r['train/seconds'] for r in evals if r['test/accuracy'] >= target]
      run[key] = reached[0] if reached else None
    runs.append(run)
  summary = {}
  for key in ('seconds_to_99', 'seconds_to_99_5', 'compile_seconds'):
    values = [r[key] for r in runs if r[key] is not None]
    summary[key] = _spread(values) if values else None
    summary[f'{key}_reached'] = f'{len(values)}/{len(runs)}'
  return {'config': 'configs/mnist.py', 'runs': runs, **summary}


# ---------------------------------------------------------------- Throughput

THROUGHPUT_MODELS = {
    # name: (jaxcnn model, dataset for the shape, batch on accelerators, batch on the CPU)
    'lenet5': ('lenet5', 'mnist', 512, 128),
    'cifar_resnet20': ('cifar_resnet20', 'cifar10', 512, 64),
    'fastcifar': ('airbench', 'cifar10', 1024, 64),
    'resnet50': ('resnet50', 'imagenet2012', 256, 4),
}


def _throughput_config(model: str, dataset: str, batch_size: int, dtype: str):
  """The same work as the PyTorch reference: momentum SGD, no augmentation, synthetic data."""
  from jaxcnn.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.model, config.dataset, config.batch_size, config.dtype = model, dataset, batch_size, dtype
  config.optimizer, config.learning_rate, config.momentum = 'momentum', 0.01, 0.9
  config.weight_decay = 5e-4
  config.num_devices = 1
  return config


def throughput(quick: bool, repeats: int) -> dict:
  """Images/s of every model and dtype, for jaxcnn and PyTorch, and their ratio."""
  on_cpu = jax.default_backend() == 'cpu'
  shapes = {'lenet5': (28, 28, 1, 10), 'cifar_resnet20': (32, 32, 3, 10),
            'fastcifar': (32, 32, 3, 10), 'resnet50': (224, 224, 3, 1000)}
  names = ['lenet5', 'cifar_resnet20'] if quick else list(THROUGHPUT_MODELS)
  dtypes = ['float32'] if quick else ['float32', 'bfloat16']
  steps = 3 if quick else (10 if on_cpu else 50)
  repeats = 2 if quick else repeats
  results = {}
  for name in names:
    model, dataset, accelerator_batch, cpu_batch = THROUGHPUT_MODELS[name]
    batch = cpu_batch if on_cpu else accelerator_batch
    height, width, channels, classes = shapes[name]
    for dtype in dtypes:
      key = f'{name}_{dtype}'
      print(f'throughput: {key}, batch {batch}', file=sys.stderr, flush=True)
      ours = measure_throughput(_throughput_config(model, dataset, batch, dtype), steps, repeats,
                                image_shape=(height, width, channels), num_classes=classes)
      theirs = torch_reference.measure_throughput(
          name if name != 'fastcifar' else 'airbench', batch_size=batch, dtype=dtype, steps=steps,
          repeats=repeats, compile=not on_cpu, device='cpu' if on_cpu else 'cuda')
      entry = {'batch_size': batch, 'dtype': dtype, 'jaxcnn': ours, 'pytorch': theirs,
               'jaxcnn_img_per_s': ours['examples_per_sec'],
               'pytorch_img_per_s': theirs.get('images_per_s_median')}
      if entry['pytorch_img_per_s']:
        entry['ratio_jaxcnn_to_pytorch'] = entry['jaxcnn_img_per_s'] / entry['pytorch_img_per_s']
      results[key] = entry
  return results


# ---------------------------------------------------------------- CPU section

def _timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} failed ({result.returncode}): {result.stderr[-2000:]}')
  return seconds, result


def lenet5_epoch(quick: bool, repeats: int, data_dir: str | None, mnist_dir: str) -> dict:
  """One epoch of LeNet-5 on MNIST, whole process, jaxcnn against PyTorch (after one warm-up
  run each, so that both find their caches warm, as a user's second run does)."""
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  repeats = 1 if quick else repeats
  jax_runs, torch_runs = [], []
  with tempfile.TemporaryDirectory() as scratch:
    ours = [sys.executable, 'train.py', '--config=configs/mnist.py:lenet5_epoch',
            f'--config.manual_dir={mnist_dir}']
    if data_dir:
      ours.append(f'--config.data_dir={data_dir}')
    if quick:
      ours.append('--config.num_train_steps=20')
    theirs = [sys.executable, 'benchmarks/torch_reference.py', 'mnist-epoch',
              f'--mnist_dir={mnist_dir}'] + (['--max_steps=20'] if quick else [])
    for i in range(repeats + 1):  # The first run of each warms the caches and is not counted.
      workdir = os.path.join(scratch, f'run{i}')
      seconds, _ = _timed(ours + [f'--workdir={workdir}'], env)
      final = read_metrics(workdir)
      timing = [r for r in final if 'time/train_seconds' in r][-1]
      accuracy = [r for r in final if 'test/accuracy' in r][-1]['test/accuracy']
      if i:
        jax_runs.append({'process_seconds': seconds, 'train_seconds': timing['time/train_seconds'],
                         'compile_seconds': timing['time/compile_seconds'],
                         'test_accuracy': accuracy})
      seconds, result = _timed(theirs, env)
      if i:
        torch_runs.append({'process_seconds': seconds,
                           **json.loads(result.stdout.strip().splitlines()[-1])})
  ours_seconds = [r['process_seconds'] for r in jax_runs]
  theirs_seconds = [r['process_seconds'] for r in torch_runs]
  return {'jaxcnn': {'runs': jax_runs, 'process_seconds': _spread(ours_seconds)},
          'pytorch': {'runs': torch_runs, 'process_seconds': _spread(theirs_seconds)},
          'ratio_jaxcnn_to_pytorch': statistics.median(ours_seconds) / statistics.median(
              theirs_seconds)}


# ---------------------------------------------------------------- Report

def summarise(results: dict) -> dict:
  """The flat summary the README's performance table is generated from."""
  def get(*path):
    node = results
    for key in path:
      if not isinstance(node, dict) or node.get(key) is None:
        return None
      node = node[key]
    return node

  summary = {'device': results['environment']['device'],
             'mnist_seconds_to_99': get('mnist', 'seconds_to_99', 'median'),
             'mnist_seconds_to_99_5': get('mnist', 'seconds_to_99_5', 'median'),
             'mnist_compile_seconds': get('mnist', 'compile_seconds', 'median'),
             'resnet50_bf16_img_per_s': get('throughput', 'resnet50_bfloat16', 'jaxcnn_img_per_s'),
             'resnet50_bf16_img_per_s_pytorch': get('throughput', 'resnet50_bfloat16',
                                                    'pytorch_img_per_s'),
             'fastcifar_bf16_img_per_s': get('throughput', 'fastcifar_bfloat16',
                                             'jaxcnn_img_per_s'),
             'fastcifar_bf16_img_per_s_pytorch': get('throughput', 'fastcifar_bfloat16',
                                                     'pytorch_img_per_s'),
             'lenet5_cpu_epoch_seconds': get('cpu', 'jaxcnn', 'process_seconds', 'median'),
             'lenet5_cpu_epoch_seconds_pytorch': get('cpu', 'pytorch', 'process_seconds',
                                                     'median')}
  rate = get('matmul', 'flops', 'median')
  images = summary['resnet50_bf16_img_per_s']
  summary['resnet50_mfu'] = (images * RESNET50_TRAIN_GFLOP * 1e9 / rate
                             if images and rate and results['matmul']['dtype'] == 'bfloat16'
                             else None)
  summary['matmul_tflops'] = rate / 1e12 if rate else None
  return summary


def result_path(output_dir: str, device: str, quick: bool) -> str:
  slug = re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')
  date = datetime.date.today().isoformat()
  return os.path.join(output_dir, f'{date}-{slug}{"-quick" if quick else ""}.json')


def merge_results(previous: dict | None, measured: dict, quick: bool) -> dict:
  """The results file: `measured` alone, or `previous` with the sections in `measured` replaced
  and an entry in its `updates` naming them with the environment they were measured in."""
  if previous is None:
    results = {'environment': measured['environment'], 'quick': quick}
  else:
    results = dict(previous)
    sections = [k for k in measured if k not in ('environment', 'matmul')]
    results['updates'] = [*previous.get('updates', []),
                          {'sections': sections, 'environment': measured['environment']}]
    if 'throughput' not in measured:  # The MFU of the kept throughput uses the kept rate.
      measured = {k: v for k, v in measured.items() if k != 'matmul'}
  results.update({k: v for k, v in measured.items() if k != 'environment'})
  results['summary'] = summarise(results)
  return results


def main(argv):
  del argv
  quick = _QUICK.value
  repeats = 1 if quick else _REPEATS.value
  measured = {'environment': environment(), 'matmul': matmul_flops(quick)}
  if 'mnist' in _SECTIONS.value:
    measured['mnist'] = mnist_time_to_accuracy(1 if quick else _SEEDS.value, quick,
                                               _DATA_DIR.value, _MNIST_DIR.value)
  if 'throughput' in _SECTIONS.value:
    measured['throughput'] = throughput(quick, repeats)
  if 'cpu' in _SECTIONS.value:
    measured['cpu'] = lenet5_epoch(quick, repeats, _DATA_DIR.value, _MNIST_DIR.value)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  path = result_path(_OUTPUT_DIR.value, measured['environment']['device'], quick)
  previous = None
  if _UPDATE.value and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)
  results = merge_results(previous, measured, quick)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  print(json.dumps(results['summary'], indent=2))
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
