"""jaxcnn's benchmark suite: jaxcnn against PyTorch on this machine's device, in one invocation.

  python benchmarks/run.py [--quick] [--mnist_dir ../shared/datasets/mnist] [--seeds 5]
      [--output_dir benchmarks/results] [--sections mnist,mnist_speedrun,throughput,cpu]
      [--budget_seconds S]

Writes `<output_dir>/<date>-<device>.json` with the device, library versions, the command, every
raw measurement (median, min and max of several repeats) and a flat `summary`. Sections:

* time to accuracy: training seconds (compile and evaluation excluded, as airbench reports them)
  until the full MNIST test set reaches 99.0% and 99.5%, with `configs/mnist.py`, over several seeds
  (section mnist), and the same for its batch-512 variant `configs/mnist.py:speedrun`, which
  needs a third to a quarter of the steps (section mnist_speedrun);
* throughput: steady-state training images/s of LeNet-5, CIFAR ResNet-20, the fast CIFAR network
  and ResNet-50 at 224x224, float32 and bfloat16, on synthetic data in device memory, for jaxcnn
  and for the PyTorch reference of `benchmarks/torch_reference.py` (channels_last, bf16 autocast,
  torch.compile and fused SGD on accelerators, and for the two smallest models also CUDA graphs,
  whichever is faster);
* MFU of ResNet-50: 24.6 GFLOP per training image against the bf16 matmul rate measured here
  (`resnet50_mfu`), and against the card's datasheet bf16 peak (`resnet50_mfu_of_datasheet_peak`);
* CPU: one epoch of LeNet-5 on MNIST at batch 128, the whole process timed from outside, jaxcnn's
  `python train.py --config configs/mnist.py:lenet5_epoch` against the PyTorch reference script.

`--quick` runs every section with few steps, one seed and, of the throughputs, LeNet-5 in float32
only: a smoke check for CI, not a measurement.

The suite is a list of measurements (one MNIST seed of a recipe, one model and dtype of the
throughput section, the CPU epoch), run with the README's summary figures first: the first seed of
each MNIST recipe, then the fast CIFAR network and ResNet-50 in bfloat16, then the CPU epoch, then
the other seeds and throughputs. The results file is rewritten after every measurement, so a run
stopped from outside keeps what it measured; `--budget_seconds` starts no measurement after that
many seconds of the process and lists the ones it left under `skipped` (for a lent GPU with
minutes of device time). A measurement that fails is recorded under `errors` with its one-line
cause, the others still run, and the exit status is then 1.
"""

import atexit
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

# The budget counts from here, before the slow imports of JAX and PyTorch.
_PROCESS_START = time.perf_counter()

# PyTorch shares the accelerator with JAX in this process: JAX must not take 75% of its memory up
# front, as it does by default, but only what its programs use.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from absl import app, flags

from jaxcnn import cli
from jaxcnn.files import write_atomically
from jaxcnn.metrics import read_metrics
from jaxcnn.trainer import TIMED_PHASES
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
# The time-to-accuracy sections and the config file (and variant) each trains.
MNIST_RECIPES = {'mnist': 'configs/mnist.py', 'mnist_speedrun': 'configs/mnist.py:speedrun'}
SECTIONS = (*MNIST_RECIPES, 'throughput', 'cpu')
_SECTIONS = flags.DEFINE_list('sections', list(SECTIONS),
                              f'Sections to run: {", ".join(SECTIONS)}.')
_THROUGHPUTS = flags.DEFINE_list(
    'throughputs', None, 'The throughput measurements to run, as <model>_<dtype> (e.g. '
    'resnet50_float32,lenet5_bfloat16; default: all of them). With --update, the ones measured '
    'replace their earlier figures and the others are kept, so that a measurement skipped or '
    'cut off on a lent GPU can be taken in a later call.')
_BUDGET_SECONDS = flags.DEFINE_float(
    'budget_seconds', 0.0, 'Start no measurement after this many seconds of the run (0: no limit); '
    "the ones left are listed under 'skipped'. Leave the longest measurement's time (a few "
    'minutes for ResNet-50 with torch.compile on a GPU) between this and any outside time limit.')


def _spread(values: list[float]) -> dict:
  """Median, min, max, mean and standard deviation of repeated measurements."""
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'mean': statistics.fmean(values),
          'stdev': statistics.stdev(values) if len(values) > 1 else 0.0, 'values': values}


def cpu_model() -> str | None:
  """The host CPU's model name ('AMD EPYC ...', 'Intel(R) Xeon(R) ...'), where Linux tells it:
  CPU figures, and PyTorch's against XLA's, differ between machines of the same core count."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
  except OSError:
    return None
  return names[0] if names else None


def environment() -> dict:
  """The device and the library versions the numbers belong to."""
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets',
                  'grain', 'torch', 'numpy', 'ml_dtypes'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  return {'device': device.device_kind if device.platform != 'cpu' else
                    f'cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})',
          'backend': jax.default_backend(), 'num_devices': jax.device_count(),
          'host': platform.node(), 'cpu_model': cpu_model(), 'python': platform.python_version(),
          'versions': versions,
          'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': ' '.join(['python'] + sys.argv)}


def use_fresh_compilation_cache() -> str:
  """Points JAX's persistent compilation cache, for this process and the ones it starts, at an
  empty folder removed at exit, unless $JAX_COMPILATION_CACHE_DIR names one; returns which.

  So that compile times mean the same on every run of the suite: the first compile of each
  program is from scratch, as on a new machine, not from what an earlier run left in the cache.
  """
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  folder = tempfile.mkdtemp(prefix='jaxcnn-benchmark-xla-')
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  jax.config.update('jax_compilation_cache_dir', folder)
  return 'fresh'


def matmul_flops(quick: bool) -> dict:
  """The device's measured matmul rate: bf16 on accelerators, float32 on the CPU.

  On an accelerator each timing is 20 matmuls back to back with one synchronisation (one 8192^2
  bf16 matmul takes about 1.5 ms on an H100, so a sync per matmul would cost a few percent), after
  half a second of matmuls that bring the clocks up.
  """
  on_cpu = jax.default_backend() == 'cpu'
  size = 256 if quick else (2048 if on_cpu else 8192)
  calls = 1 if on_cpu or quick else 20
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  warm_until = time.perf_counter() + (0.0 if on_cpu or quick else 0.5)
  while time.perf_counter() < warm_until:
    matmul(a, b).block_until_ready()
  rates = []
  for _ in range(3 if quick else 10):
    start = time.perf_counter()
    for _ in range(calls):
      out = matmul(a, b)
    out.block_until_ready()
    rates.append(calls * 2 * size ** 3 / (time.perf_counter() - start))
  return {'size': size, 'dtype': jnp.dtype(dtype).name, 'calls_per_timing': calls,
          'flops': _spread(rates)}


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by a part
# of the device name JAX reports: MFU as the field usually quotes it is against these.
# The first part found in the name counts, so a variant comes before its family's SXM part.
BF16_PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.4),
                    ('H200 NVL', 835.0), ('H200', 989.4), ('A100', 312.0))


def datasheet_bf16_tflops(device: str) -> float | None:
  """The datasheet's dense bf16 peak of `device` (a JAX device_kind), or None if not listed."""
  return next((tflops for part, tflops in BF16_PEAK_TFLOPS if part in device), None)


# ---------------------------------------------------------------- Time to accuracy

MNIST_TRAIN_EXAMPLES = 60_000


def evaluation_interval(steps_per_epoch: int) -> int:
  """Steps between the evaluations of a time-to-accuracy run: the largest divisor of the epoch
  that evaluates at least 8 times an epoch (52 of 468 steps at batch 128, 13 of 117 at 512).

  An interval that divides the epoch lets every compiled call run the same number of steps;
  evaluations are not timed, and more of them place the moment a target is reached more closely.
  """
  return max(d for d in range(1, max(steps_per_epoch // 8, 1) + 1) if steps_per_epoch % d == 0)


def mnist_seed(recipe: str, seed: int, quick: bool, data_dir: str | None, mnist_dir: str) -> dict:
  """One training run of `recipe` (a config file, e.g. 'configs/mnist.py:speedrun'): its accuracy
  curve against training seconds, and the seconds at which it first reached 99.0% and 99.5% (None
  where it never did)."""
  from jaxcnn import cli as cli_lib  # pylint: disable=g-import-not-at-top,reimported
  from jaxcnn.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = cli_lib.load_config_file(os.path.join(REPO_ROOT, recipe))
  config.seed = seed
  config.data_dir, config.manual_dir = data_dir, mnist_dir
  steps_per_epoch = MNIST_TRAIN_EXAMPLES // config.batch_size
  config.eval_every_steps = 25 if quick else evaluation_interval(steps_per_epoch)
  config.log_every_steps = config.eval_every_steps
  if jax.default_backend() != 'cpu':
    # Every call then runs exactly one interval: one program to compile, not one per remainder.
    config.steps_per_call = config.eval_every_steps
  # One checkpoint, at the end: saving is not training (it is not in the training seconds), and
  # saving at every evaluation would only lengthen the suite.
  config.checkpoint_every_steps = 10 ** 9
  if quick:
    config.num_train_steps = 25  # One evaluation.
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
  return run


def time_to_target(seconds: list[float | None]) -> dict:
  """The spread over seeds of the seconds to reach a target, None for a seed that never did.

  A seed that never reached the target counts as slower than every one that did: the median is
  over all seeds (None when half or more never got there), not over the lucky ones alone, and
  the max is None unless every seed got there.
  """
  reached = sorted(s for s in seconds if s is not None)
  ranked = reached + [math.inf] * (len(seconds) - len(reached))
  median = statistics.median(ranked) if ranked else math.inf
  return {'median': None if math.isinf(median) else median,
          'min': reached[0] if reached else None,
          'max': ranked[-1] if ranked and not math.isinf(ranked[-1]) else None,
          'reached': f'{len(reached)}/{len(seconds)}', 'values': seconds}


def mnist_summary(recipe: str, runs: list[dict], planned_seeds: int | None = None) -> dict:
  """A time-to-accuracy section: every seed's run of `recipe` and the spread of each figure over
  them, and how many seeds the run set out to measure (`planned_seeds`, default: those measured),
  of which the others were skipped for the budget, failed or cut off.

  The seeds share one compiled program (the seed is an argument of the step), so only the first
  seed compiles from scratch (`first_compile_seconds`, with the suite's fresh compilation cache);
  the others read the program from the cache (`cached_compile_seconds`), as a seed sweep does.
  """
  summary = {key: time_to_target([r[key] for r in runs])
             for key in ('seconds_to_99', 'seconds_to_99_5')}
  summary['first_compile_seconds'] = runs[0]['compile_seconds'] if runs else None
  summary['cached_compile_seconds'] = (_spread([r['compile_seconds'] for r in runs[1:]])
                                       if len(runs) > 1 else None)
  return {'config': recipe, 'runs': runs, 'planned_seeds': planned_seeds or len(runs), **summary}


# ---------------------------------------------------------------- Throughput

THROUGHPUT_MODELS = {
    # name: (jaxcnn model, dataset for the shape, batch on accelerators, batch on the CPU, steps
    # per timing on the CPU). LeNet-5 takes 100 CPU steps so that a timing lasts most of a second
    # (ten lasted 70 ms, and PyTorch's medians of them varied from 11,900 to 19,200 images/s
    # between runs on one machine); the others' ten take seconds.
    'lenet5': ('lenet5', 'mnist', 512, 128, 100),
    'cifar_resnet20': ('cifar_resnet20', 'cifar10', 512, 64, 10),
    'fastcifar': ('airbench', 'cifar10', 1024, 64, 10),
    'resnet50': ('resnet50', 'imagenet2012', 256, 4, 10),
}


# Models whose training step takes a GPU about a millisecond or less, where launching each kernel
# from Python costs PyTorch as much as the work itself.
SHORT_STEP_MODELS = ('lenet5', 'cifar_resnet20')


def _throughput_config(model: str, dataset: str, batch_size: int, dtype: str):
  """The same work as the PyTorch reference: momentum SGD, no augmentation, synthetic data."""
  from jaxcnn.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.model, config.dataset, config.batch_size, config.dtype = model, dataset, batch_size, dtype
  config.optimizer, config.learning_rate, config.momentum = 'momentum', 0.01, 0.9
  config.weight_decay = 5e-4
  config.num_devices = 1
  return config


def throughput_keys(quick: bool) -> list[str]:
  """The `<model>_<dtype>` measurements of the throughput section."""
  names = ['lenet5'] if quick else list(THROUGHPUT_MODELS)
  dtypes = ['float32'] if quick else ['float32', 'bfloat16']
  return [f'{name}_{dtype}' for name in names for dtype in dtypes]


def _attempt(failures: list[str], part: str, measure: Callable[..., dict], *args, **kwargs
             ) -> dict:
  """`measure(*args, **kwargs)`, or `{'error': its one-line cause}` (recorded in `failures` as
  `part: cause`, the traceback on stderr) if it raises: one framework's failure must not cost the
  other framework's figure, measured or still to come, on a lent machine.

  Says on stderr how long the part took, so that the log of a run cut off by an outside time
  limit tells which part was running."""
  start = time.perf_counter()
  try:
    result = measure(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    cause = torch_reference.error_line(e)
    failures.append(f'{part}: {cause}')
    print(f'    {part}: failed after {time.perf_counter() - start:.0f} s', file=sys.stderr,
          flush=True)
    return {'error': cause}
  print(f'    {part}: {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
  return result


def throughput(key: str, quick: bool, repeats: int) -> dict:
  """Images/s of one model and dtype (`key`, e.g. 'resnet50_bfloat16'), for jaxcnn and PyTorch,
  and their ratio.

  Each framework's part is measured whatever happened to the other's; a part that raised is kept
  as its `error`, and listed under the entry's `failures` (which `record` makes the suite's
  errors)."""
  name, dtype = key.rsplit('_', 1)
  on_cpu = jax.default_backend() == 'cpu'
  model, dataset, accelerator_batch, cpu_batch, cpu_steps = THROUGHPUT_MODELS[name]
  steps = 3 if quick else (cpu_steps if on_cpu else 50)
  repeats = 2 if quick else repeats
  batch = cpu_batch if on_cpu else accelerator_batch
  torch_name = name if name != 'fastcifar' else 'airbench'
  height, width, channels, classes = torch_reference.MODEL_SHAPES[torch_name]
  failures = []
  ours = _attempt(failures, 'jaxcnn', measure_throughput,
                  _throughput_config(model, dataset, batch, dtype), steps, repeats,
                  image_shape=(height, width, channels), num_classes=classes)
  # On a GPU, torch.compile's graphs and cuDNN's choices settle over the first few steps.
  reference = dict(batch_size=batch, dtype=dtype, steps=steps, repeats=repeats,
                   device='cpu' if on_cpu else 'cuda', warmup_steps=3 if on_cpu else 10)
  theirs = _attempt(failures, 'pytorch', torch_reference.measure_throughput, torch_name,
                    compile=not on_cpu, **reference)
  pytorch_ran = 'compile' in theirs  # Not when it raised.
  entry = {'batch_size': batch, 'dtype': dtype, 'jaxcnn': ours, 'pytorch': theirs,
           'jaxcnn_img_per_s': ours.get('examples_per_sec'),
           'pytorch_img_per_s': theirs.get('images_per_s_median'),
           'pytorch_mode': (('torch.compile' if theirs['compile'] else 'eager') if pytorch_ran
                            else None)}
  if pytorch_ran and theirs['error'] and theirs['compile']:
    # torch.compile failed here (the error is kept): PyTorch's eager mode is still a reference.
    entry['pytorch_eager'] = _attempt(failures, 'pytorch eager',
                                      torch_reference.measure_throughput, torch_name, **reference)
    entry['pytorch_img_per_s'] = entry['pytorch_eager'].get('images_per_s_median')
    entry['pytorch_mode'] = 'eager (torch.compile failed)'
  if not on_cpu and name in SHORT_STEP_MODELS and pytorch_ran:  # (If it raised, so would this.)
    # jaxcnn runs these as scans of many steps per call; PyTorch's answer to per-step launch
    # costs is CUDA graphs. The faster of its two modes is the reference.
    graphs = _attempt(failures, 'pytorch CUDA graphs', torch_reference.measure_throughput,
                      torch_name, compile=True, compile_mode='reduce-overhead', **reference)
    entry['pytorch_cuda_graphs'] = graphs
    rate = graphs.get('images_per_s_median')
    if not graphs['error'] and rate and rate > (entry['pytorch_img_per_s'] or 0):
      entry['pytorch_img_per_s'] = rate
      entry['pytorch_mode'] = "torch.compile mode='reduce-overhead' (CUDA graphs)"
  if entry['jaxcnn_img_per_s'] and entry['pytorch_img_per_s']:
    entry['ratio_jaxcnn_to_pytorch'] = entry['jaxcnn_img_per_s'] / entry['pytorch_img_per_s']
  if failures:
    entry['failures'] = failures
  return entry


# ---------------------------------------------------------------- CPU section

def _timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} failed ({result.returncode}): {result.stderr[-2000:]}')
  return seconds, result


LENET5_EPOCH_CONFIG = 'configs/mnist.py:lenet5_epoch'


def lenet5_epoch(quick: bool, repeats: int, data_dir: str | None, mnist_dir: str) -> dict:
  """One epoch of LeNet-5 on MNIST, whole process, jaxcnn against PyTorch (after one warm-up
  run each, so that both find their caches warm, as a user's second run does; `quick`: one
  run of 20 steps each, no warm-up)."""
  # A CPU figure on a GPU machine too: jaxcnn would otherwise train on the GPU (PyTorch's
  # reference always runs on the CPU), and TensorFlow, if it prepares MNIST, must not take a GPU.
  env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
  repeats, warm_ups = (1, 0) if quick else (repeats, 1)
  jax_runs, torch_runs = [], []
  # PyTorch evaluates in the config's batches too, the faster size on the CPU for both: 0.25 s
  # for jaxcnn against 0.76 s at 1000, 0.22 to 0.24 s for PyTorch against 0.39 to 0.87 s.
  eval_batch_size = cli.load_config_file(os.path.join(REPO_ROOT, LENET5_EPOCH_CONFIG)
                                         ).eval_batch_size
  with tempfile.TemporaryDirectory() as scratch:
    ours = [sys.executable, 'train.py', f'--config={LENET5_EPOCH_CONFIG}',
            f'--config.manual_dir={mnist_dir}']
    if data_dir:
      ours.append(f'--config.data_dir={data_dir}')
    if quick:
      ours.append('--config.num_train_steps=20')
    theirs = [sys.executable, 'benchmarks/torch_reference.py', 'mnist-epoch',
              f'--mnist_dir={mnist_dir}', f'--eval_batch_size={eval_batch_size}'
              ] + (['--max_steps=20'] if quick else [])
    for i in range(warm_ups + repeats):  # Warm-up runs fill the caches and are not counted.
      counted = i >= warm_ups
      workdir = os.path.join(scratch, f'run{i}')
      seconds, _ = _timed(ours + [f'--workdir={workdir}'], env)
      final = read_metrics(workdir)
      timing = [r for r in final if 'time/train_seconds' in r][-1]
      accuracy = [r for r in final if 'test/accuracy' in r][-1]['test/accuracy']
      if counted:
        phases = {f'{phase}_seconds': timing[f'time/{phase}_seconds'] for phase in TIMED_PHASES}
        # What the trainer does not time: imports, building the model and optimizer, and exit.
        jax_runs.append({'process_seconds': seconds, **phases,
                         'other_seconds': seconds - sum(phases.values()),
                         'test_accuracy': accuracy})
      seconds, result = _timed(theirs, env)
      if counted:
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
             'mnist_seconds_to_99_reached': get('mnist', 'seconds_to_99', 'reached'),
             'mnist_seconds_to_99_5_reached': get('mnist', 'seconds_to_99_5', 'reached'),
             'mnist_compile_seconds': get('mnist', 'first_compile_seconds'),
             'mnist_cached_compile_seconds': get('mnist', 'cached_compile_seconds', 'median'),
             'mnist_speedrun_seconds_to_99': get('mnist_speedrun', 'seconds_to_99', 'median'),
             'mnist_speedrun_seconds_to_99_5': get('mnist_speedrun', 'seconds_to_99_5', 'median'),
             'mnist_speedrun_seconds_to_99_reached': get('mnist_speedrun', 'seconds_to_99',
                                                         'reached'),
             'resnet50_bf16_img_per_s': get('throughput', 'resnet50_bfloat16', 'jaxcnn_img_per_s'),
             'resnet50_bf16_img_per_s_pytorch': get('throughput', 'resnet50_bfloat16',
                                                    'pytorch_img_per_s'),
             'fastcifar_bf16_img_per_s': get('throughput', 'fastcifar_bfloat16',
                                             'jaxcnn_img_per_s'),
             'fastcifar_bf16_img_per_s_pytorch': get('throughput', 'fastcifar_bfloat16',
                                                     'pytorch_img_per_s'),
             # The float32 figures beside them: what the README's table shows for a CPU, where
             # bfloat16 speed is a matter of the CPU's bfloat16 units (AMX or none) and PyTorch's
             # autocast runs uncompiled.
             **{f'{model}_f32_img_per_s{suffix}': get('throughput', f'{model}_float32',
                                                      f'{framework}_img_per_s')
                for model in ('resnet50', 'fastcifar')
                for framework, suffix in (('jaxcnn', ''), ('pytorch', '_pytorch'))},
             'lenet5_cpu_epoch_seconds': get('cpu', 'jaxcnn', 'process_seconds', 'median'),
             'lenet5_cpu_epoch_seconds_pytorch': get('cpu', 'pytorch', 'process_seconds',
                                                     'median')}
  rate = get('matmul', 'flops', 'median')
  images = summary['resnet50_bf16_img_per_s']
  summary['resnet50_mfu'] = (images * RESNET50_TRAIN_GFLOP * 1e9 / rate
                             if images and rate and results['matmul']['dtype'] == 'bfloat16'
                             else None)
  summary['matmul_tflops'] = rate / 1e12 if rate else None
  peak = datasheet_bf16_tflops(summary['device'])
  summary['datasheet_bf16_tflops'] = peak
  summary['resnet50_mfu_of_datasheet_peak'] = (images * RESNET50_TRAIN_GFLOP / (peak * 1e3)
                                               if images and peak else None)
  # Seeds of a time to accuracy that did not run (skipped for the budget, failed, or cut off): its
  # median and `reached` are over the others alone.
  for section in MNIST_RECIPES:
    runs = (results.get(section) or {}).get('runs', [])
    planned = (results.get(section) or {}).get('planned_seeds', len(runs))  # Older files: none.
    summary[f'{section}_seeds_not_run'] = planned - len(runs)
  return summary


def result_path(output_dir: str, device: str, quick: bool) -> str:
  slug = re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')
  date = datetime.date.today().isoformat()
  return os.path.join(output_dir, f'{date}-{slug}{"-quick" if quick else ""}.json')


# What a run did not measure: skipped for the budget, failed, or cut off by an outside limit
# while it ran.
_INCOMPLETE = ('skipped', 'errors', 'running')


def measurement_name(section: str, key: str | int) -> str:
  """How the results file names a measurement: 'mnist seed 0', 'throughput lenet5_float32',
  'cpu epoch'."""
  return f'{section} {"seed " if section in MNIST_RECIPES else ""}{key}'


def _measurement_names(measured: dict, throughputs: dict) -> set[str]:
  """The names (`measurement_name`) of the measurements whose figures `measured` holds: the
  seeds of its MNIST sections, the throughputs in `throughputs`, the CPU epoch."""
  names = {measurement_name('throughput', key) for key in throughputs}
  for section in MNIST_RECIPES:
    runs = measured.get(section, {}).get('runs', [])
    names.update(measurement_name(section, run['seed']) for run in runs)
  if 'cpu' in measured:
    names.add(measurement_name('cpu', 'epoch'))
  return names


def merge_results(previous: dict | None, measured: dict, quick: bool) -> dict:
  """The results file: `measured` alone, or `previous` with the sections in `measured` replaced
  and an entry in its `updates` naming them with the environment they were measured in (and what
  that update skipped or failed to measure).

  The throughput section is replaced measurement by measurement: each `<model>_<dtype>` measured
  again replaces its figure and the others are kept. The matmul rate, the MFU's denominator, is
  replaced only with ResNet-50's bfloat16 figure, so that both come from one run; otherwise the
  update's own rate is kept in its `updates` entry. The file's own `skipped` and `errors` then
  list what it still lacks: an earlier run's skipped or failed measurement leaves them once an
  update measures it."""
  incomplete = {k: measured[k] for k in _INCOMPLETE if measured.get(k)}
  measured = {k: v for k, v in measured.items() if k not in _INCOMPLETE}
  if previous is None:
    results = {'environment': measured['environment'], 'quick': quick, **incomplete}
  else:
    results = dict(previous)
    update = {'sections': [k for k in measured if k in SECTIONS],
              'environment': measured['environment'], **incomplete}
    throughputs = measured.get('throughput', {})
    if throughputs:
      update['throughputs'] = list(throughputs)
      measured['throughput'] = {**previous.get('throughput', {}), **throughputs}
    if 'resnet50_bfloat16' not in throughputs and 'matmul' in previous:
      if 'throughput' in measured:
        update['matmul'] = measured['matmul']
      measured = {k: v for k, v in measured.items() if k != 'matmul'}
    results['updates'] = [*previous.get('updates', []), update]
    # What the file still lacks: the earlier runs' skipped and failed measurements less the
    # ones measured now, and what failed now (its figure replaced the earlier one).
    measured_now = _measurement_names(measured, throughputs)
    if 'matmul' in measured:
      measured_now.add('matmul')
    skipped = [name for name in previous.get('skipped', []) if name not in measured_now]
    errors = {**{name: cause for name, cause in previous.get('errors', {}).items()
                 if name not in measured_now}, **incomplete.get('errors', {})}
    for key, value in (('skipped', skipped), ('errors', errors)):
      if value:
        results[key] = value
      else:
        results.pop(key, None)
  results.update({k: v for k, v in measured.items() if k != 'environment'})
  results['summary'] = summarise(results)
  return results


# ---------------------------------------------------------------- The run

@dataclasses.dataclass(frozen=True)
class Measurement:
  """One measurement of the suite: `measure()` returns what `section` records under `key`."""
  section: str
  key: str | int  # The seed of an MNIST run, `<model>_<dtype>` of a throughput, 'epoch'.
  measure: Callable[[], dict]
  planned_seeds: int | None = None  # Of an MNIST run: how many seeds of its recipe the run plans.

  @property
  def name(self) -> str:
    return measurement_name(self.section, self.key)


# The throughputs behind the README's summary columns, measured before the others; the fast
# CIFAR network first, since ResNet-50's compiles take minutes.
SUMMARY_THROUGHPUTS = ('fastcifar_bfloat16', 'resnet50_bfloat16')


def measurement_plan(sections, *, quick: bool, seeds: int, repeats: int, data_dir: str | None,
                     mnist_dir: str, throughputs: list[str] | None = None) -> list[Measurement]:
  """The suite's measurements in `sections`, those of the summary figures first; of the
  throughput section only the keys in `throughputs` (None: all)."""
  def seed_runs(section: str) -> list[Measurement]:
    if section not in sections:
      return []
    recipe = MNIST_RECIPES[section]
    num_seeds = 1 if quick else seeds
    return [Measurement(section, seed, lambda seed=seed: mnist_seed(recipe, seed, quick, data_dir,
                                                                    mnist_dir),
                        planned_seeds=num_seeds)
            for seed in range(num_seeds)]

  mnist_runs = [seed_runs(section) for section in MNIST_RECIPES]
  throughputs = [Measurement('throughput', key, lambda key=key: throughput(key, quick, repeats))
                 for key in throughput_keys(quick)
                 if throughputs is None or key in throughputs] if 'throughput' in sections else []
  first = [m for key in SUMMARY_THROUGHPUTS for m in throughputs if m.key == key]
  epoch = ([Measurement('cpu', 'epoch', lambda: lenet5_epoch(quick, repeats, data_dir, mnist_dir))]
           if 'cpu' in sections else [])
  return [*(runs[0] for runs in mnist_runs if runs), *first, *epoch,
          *(run for runs in mnist_runs for run in runs[1:]),
          *[m for m in throughputs if m not in first]]


def record(measured: dict, measurement: Measurement, value: dict) -> None:
  """Puts one measurement's result where its section keeps it in `measured`."""
  section = measurement.section
  if section in MNIST_RECIPES:
    runs = [*(measured[section]['runs'] if section in measured else []), value]
    measured[section] = mnist_summary(MNIST_RECIPES[section], runs, measurement.planned_seeds)
  elif section == 'throughput':
    measured.setdefault('throughput', {})[measurement.key] = value
    if value.get('failures'):  # A part failed, the other's figure is kept: still an error.
      measured.setdefault('errors', {})[measurement.name] = '; '.join(value['failures'])
  else:
    measured[section] = value


def measure_all(plan: list[Measurement], measured: dict, budget_seconds: float,
                on_progress: Callable[[dict], object],
                clock: Callable[[], float] = time.perf_counter,
                start: float | None = None) -> dict:
  """Runs `plan` in order into `measured`, calling `on_progress(measured)` before and after each.

  A measurement is started only while fewer than `budget_seconds` (0: no limit) have passed since
  `start` (a reading of `clock`, which gives seconds; default: the call); the others are listed
  under `measured['skipped']`. While one runs, `measured['running']` names it, so that a results
  file written before an outside limit killed the run says what was cut off. One that raises is
  recorded under `measured['errors']` with its one-line cause (the traceback goes to stderr) and
  the rest still run: on a lent machine every other figure is worth having.
  """
  start = clock() if start is None else start
  for measurement in plan:
    elapsed = clock() - start
    if budget_seconds and elapsed >= budget_seconds:
      measured.setdefault('skipped', []).append(measurement.name)
      continue
    print(f'[{elapsed:6.0f} s] {measurement.name}', file=sys.stderr, flush=True)
    measured['running'] = measurement.name
    on_progress(measured)
    try:
      value = measurement.measure()
    except Exception as e:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      measured.setdefault('errors', {})[measurement.name] = torch_reference.error_line(e)
    else:
      record(measured, measurement, value)
    del measured['running']
    on_progress(measured)
  return measured


def describe_run(quick: bool, compilation_cache: str) -> dict:
  """What every measurement shares: the environment and the device's measured matmul rate (the
  MFU's denominator; if measuring it fails, that is an error of the run that costs the MFU alone,
  not the results file or the other figures)."""
  measured = {'environment': {**environment(), 'compilation_cache': compilation_cache}}
  failures = []
  measured['matmul'] = _attempt(failures, 'matmul', matmul_flops, quick)
  if failures:
    measured['errors'] = {'matmul': measured['matmul']['error']}
  return measured


def check_selection(sections: list[str], throughputs: list[str] | None, quick: bool) -> None:
  """Raises a one-line UsageError for a section or throughput the suite does not have."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f'unknown section {unknown[0]!r} in --sections; choose from '
                         f'{", ".join(SECTIONS)}')
  if throughputs and 'throughput' not in sections:
    raise app.UsageError(f'--throughputs {",".join(throughputs)} measures nothing without the '
                         'throughput section: add throughput to --sections')
  known = throughput_keys(quick)
  unknown = sorted(set(throughputs or ()) - set(known))
  if unknown:
    raise app.UsageError(f'unknown throughput {unknown[0]!r} in --throughputs; choose from '
                         f'{", ".join(known)}{" (with --quick)" if quick else ""}')


def main(argv):
  del argv
  quick = _QUICK.value
  check_selection(_SECTIONS.value, _THROUGHPUTS.value, quick)
  # The cpu section's PyTorch reference reads the official files themselves (the MNIST sections
  # can do with a prepared TFDS MNIST, as on a GPU machine without them).
  missing = [name for name in torch_reference.MNIST_FILES.values()
             if not os.path.isfile(os.path.join(_MNIST_DIR.value, name))]
  if 'cpu' in _SECTIONS.value and missing:
    raise app.UsageError(f'--mnist_dir {_MNIST_DIR.value!r} lacks the official MNIST file(s) '
                         f'{", ".join(missing)}, which the cpu section reads; point --mnist_dir '
                         'at a folder of the four, or leave cpu out of --sections')
  repeats = 1 if quick else _REPEATS.value
  measured = describe_run(quick, compilation_cache=use_fresh_compilation_cache())
  path = result_path(_OUTPUT_DIR.value, measured['environment']['device'], quick)
  previous = None
  if _UPDATE.value and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)

  def write(measured: dict) -> dict:
    """Rewrites the results file whole (a run stopped from outside keeps what it measured) and
    returns what it wrote."""
    results = merge_results(previous, measured, quick)
    text = json.dumps(results, indent=2) + '\n'
    write_atomically(path, lambda f: f.write(text.encode('utf-8')))
    return results

  plan = measurement_plan(_SECTIONS.value, quick=quick, seeds=_SEEDS.value, repeats=repeats,
                          data_dir=_DATA_DIR.value, mnist_dir=_MNIST_DIR.value,
                          throughputs=_THROUGHPUTS.value)
  measured = measure_all(plan, measured, _BUDGET_SECONDS.value, write, start=_PROCESS_START)
  results = write(measured)  # Again, for the measurements skipped after the last one.
  print(json.dumps(results['summary'], indent=2))
  print(f'wrote {path}')
  if measured.get('skipped'):
    print(f'skipped (over --budget_seconds={_BUDGET_SECONDS.value:g}): '
          f'{", ".join(measured["skipped"])}', file=sys.stderr)
  if measured.get('errors'):
    raise SystemExit('failed: ' + '; '.join(f'{k}: {v}' for k, v in measured['errors'].items()))


if __name__ == '__main__':
  cli.run(main)
