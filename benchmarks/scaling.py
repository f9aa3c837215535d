"""Data-parallel scaling of each strategy over 1, 2, 4 and 8 devices, as JSON and a table.

  python benchmarks/scaling.py [--config configs/mnist.py] [--strategies jit,shard_map,pmap]
      [--devices 1,2,4,8] [--per_device_batch 64] [--global_batch 512] [--steps 20]
      [--repeats 3] [--output scaling.json]

Weak scaling keeps the per-device batch fixed (the global batch grows with the devices); strong
scaling keeps the global batch fixed. Efficiency is throughput(n) / ((n / b) x throughput(b)) of
the same strategy, b being the fewest devices measured (1 by default), so that 1.0 is linear
scaling; the table says which b it is, and gives each median's min and max over the repeats, as
one strategy's baseline can differ from another's by more than noise on a busy machine. Each
point runs the config's real compiled train function on synthetic data in device memory
(benchmarks/throughput.py), with the config's steps per call (by default 25 on accelerators, as
training runs them: one step per call would measure dispatch more than the devices; on a CPU
the default is 1, as several steps per call are much slower there).

On a machine with one CPU device the script gives itself 8 fake CPU devices. They share the
machine's cores, so there the numbers only show that the harness works, not how jaxcnn scales:
real scaling needs real devices.
"""

import os
import sys

_FAKE_DEVICES = 8
# Fake CPU devices must be requested before JAX starts; real accelerators are left alone.
if '--no_fake_devices' not in sys.argv and 'xla_force_host_platform_device_count' not in \
    os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_FAKE_DEVICES}').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from jaxcnn import cli, config as config_lib, parallel  # pylint: disable=g-import-not-at-top
from jaxcnn.errors import UserError  # pylint: disable=g-import-not-at-top
from jaxcnn.trainer import check_batch_sizes  # pylint: disable=g-import-not-at-top
from measure import (  # pylint: disable=g-import-not-at-top
    REPO_ROOT, device_description, emit_json, measure_throughput, training_only)

_CONFIG = config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'mnist.py'),
                                          'Config to measure.',
                                          lock_config=True)
_STRATEGIES = flags.DEFINE_list('strategies', ['jit', 'shard_map', 'pmap'], 'Strategies.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts.')
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 64, 'Weak scaling: batch per device.',
                                         lower_bound=1)
_GLOBAL_BATCH = flags.DEFINE_integer('global_batch', 512, 'Strong scaling: global batch.',
                                     lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps per timed repeat.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats per point; the median is used.',
                                lower_bound=1)
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON here.')
flags.DEFINE_bool('no_fake_devices', False, 'Use the devices there are, even a single CPU.')


def point_config(config, mode: str, strategy: str, num_devices: int, per_device_batch: int,
                 global_batch: int):
  """`config` for one point, checked as training checks it, so that a mistake in any point is
  found before the others are measured."""
  if mode == 'weak':
    batch = per_device_batch * num_devices
    source = f'--per_device_batch {per_device_batch} x {num_devices} devices'
  else:
    batch, source = global_batch, f'--global_batch {global_batch}'
  point = config.copy_and_resolve_references()
  with point.unlocked():
    point.parallel, point.num_devices, point.batch_size = strategy, num_devices, batch
  point = training_only(point)
  try:
    config_lib.validate(point)
    check_batch_sizes(point, parallel.make_strategy(strategy, num_devices))
  except UserError as e:  # It names 'batch_size', which the user set through a flag of ours.
    raise UserError(f'{mode} scaling of {strategy} on {num_devices} devices, batch {batch} '
                    f'from {source}: {e}') from None
  return point


def scaling_runs(config, strategies, device_counts, per_device_batch, global_batch, steps,
                 repeats) -> list[dict]:
  """Measures every (mode, strategy, device count) point; adds speedup and efficiency against the
  same strategy on the fewest devices, `device_counts[0]` (ascending)."""
  base = device_counts[0]
  points = [(mode, strategy, num_devices,
             point_config(config, mode, strategy, num_devices, per_device_batch, global_batch))
            for mode in ('weak', 'strong') for strategy in strategies
            for num_devices in device_counts]
  runs, baselines = [], {}
  for mode, strategy, num_devices, point in points:
    result = measure_throughput(point, steps, repeats)
    baseline = baselines.setdefault((mode, strategy), result['examples_per_sec'])
    speedup = result['examples_per_sec'] / baseline
    runs.append({'mode': mode, **result, 'baseline_devices': base, 'speedup': speedup,
                 'efficiency': speedup * base / num_devices})
    print(f'{mode:6s} {strategy:9s} {num_devices} devices, batch {point.batch_size:5d}: '
          f'{result["examples_per_sec"]:10.1f} examples/s, efficiency '
          f'{runs[-1]["efficiency"]:.2f}', file=sys.stderr, flush=True)
  return runs


def parse_arguments(strategies: list[str], values: list[str], global_batch: int) -> list[int]:
  """Checks --strategies, and returns the --devices values as integers, ascending and without
  repeats (the fewest devices are the baseline), each of which must split --global_batch."""
  for strategy in strategies or ['']:
    if strategy not in parallel.STRATEGIES:
      raise UserError(f'--strategies takes {",".join(parallel.STRATEGIES)} or some of them; '
                      f'got {strategy!r}')
  try:
    counts = [int(value) for value in values]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise UserError(f'--devices must be positive integers, e.g. 1,2,4,8; got {",".join(values)!r}')
  available = jax.device_count()
  if max(counts) > available:
    raise UserError(f'--devices asks for {max(counts)} devices; this machine has {available}')
  for count in counts:
    if global_batch % count:
      raise UserError(f'--global_batch {global_batch} must be divisible by every count in '
                      f'--devices, and {count} does not divide it')
  return sorted(set(counts))


def table(runs: list[dict], note: str = '') -> str:
  """A Markdown table of the runs, with what speedup and efficiency are measured against."""
  lines = ['| mode | strategy | devices | global batch | examples/s (median) | min - max | '
           'speedup | efficiency |',
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for run in runs:
    lines.append(f'| {run["mode"]} | {run["parallel"]} | {run["num_devices"]} | '
                 f'{run["batch_size"]} | {run["examples_per_sec"]:,.0f} | '
                 f'{run["examples_per_sec_min"]:,.0f} - {run["examples_per_sec_max"]:,.0f} | '
                 f'{run["speedup"]:.2f} | {run["efficiency"]:.2f} |')
  base = runs[0]['baseline_devices']
  lines.append(f'\nSpeedup: examples/s over those of the same mode and strategy on {base} '
               f'device(s); efficiency: speedup x {base} / devices (1.0 is linear scaling). '
               'Weak scaling keeps the batch per device, strong the global batch.')
  if note:
    lines.append(f'Note: {note}.')
  return '\n'.join(lines)


def main(argv):
  del argv
  counts = parse_arguments(_STRATEGIES.value, _DEVICES.value, _GLOBAL_BATCH.value)
  runs = scaling_runs(_CONFIG.value, _STRATEGIES.value, counts, _PER_DEVICE_BATCH.value,
                      _GLOBAL_BATCH.value, _STEPS.value, _REPEATS.value)
  fake = jax.default_backend() == 'cpu' and jax.device_count() > 1
  note = ('fake CPU devices share the same cores: these numbers show that the harness works, not '
          'how jaxcnn scales') if fake else ''
  result = {**device_description(), 'fake_cpu_devices': fake, 'note': note,
            'command': ' '.join(['python'] + sys.argv), 'runs': runs}
  emit_json(result, _OUTPUT.value)
  print(table(runs, note))


if __name__ == '__main__':
  cli.run(main, config_flag='config')
