"""The benchmark scripts run and report what they should (smoke checks: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MNIST_MANUAL_DIR, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
import report  # pylint: disable=g-import-not-at-top,wrong-import-position

SUMMARY_KEYS = {'device', 'mnist_seconds_to_99', 'mnist_seconds_to_99_5', 'mnist_compile_seconds',
                'mnist_speedrun_seconds_to_99', 'mnist_speedrun_seconds_to_99_5',
                'resnet50_bf16_img_per_s', 'resnet50_bf16_img_per_s_pytorch', 'resnet50_mfu',
                'fastcifar_bf16_img_per_s', 'fastcifar_bf16_img_per_s_pytorch',
                'lenet5_cpu_epoch_seconds', 'lenet5_cpu_epoch_seconds_pytorch'}


# The benchmarks measure what a user runs: one CPU device, not the session's eight fake ones.
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def run(*command, env=None):
  result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False, env=env or ONE_DEVICE)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_throughput_prints_compile_time_and_rates_as_json():
  result = run('benchmarks/throughput.py', '--config=configs/mnist.py:lenet5_epoch',
               '--steps=4', '--repeats=2', '--config.batch_size=32')
  measured = json.loads(result.stdout)
  assert measured['model'] == 'lenet5' and measured['batch_size'] == 32
  assert measured['compile_seconds'] > 0 and measured['steps_timed'] == 4
  for figure in ('steps_per_sec', 'examples_per_sec'):  # Median, min and max of the repeats.
    assert 0 < measured[f'{figure}_min'] <= measured[figure] <= measured[f'{figure}_max']
  assert measured['examples_per_sec'] == pytest.approx(32 * measured['steps_per_sec'])
  assert measured['multiply_adds_per_example'] == 416_520  # test_models.py's LeNet-5 count.
  assert measured['model_tflops_per_sec'] == pytest.approx(
      6 * 416_520 * measured['examples_per_sec'] / 1e12)


def run_refused(*command, env=None):
  """Runs a benchmark script that must refuse its arguments; returns its one line of stderr."""
  result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env=env or ONE_DEVICE)
  assert result.returncode == 2 and not result.stdout, result.stderr[-3000:]
  assert result.stderr.count('\n') == 1, result.stderr  # Nothing was measured before.
  return result.stderr


def test_throughput_ignores_an_eval_batch_it_never_uses():
  # configs/mnist.py:lenet5_epoch evaluates in batches of 200, which 3 devices do not split.
  result = run('benchmarks/throughput.py', '--config=configs/mnist.py:lenet5_epoch', '--steps=1',
               '--repeats=1', '--config.batch_size=48', '--config.num_devices=3',
               env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=3'})
  measured = json.loads(result.stdout)
  assert (measured['num_devices'], measured['batch_size']) == (3, 48)


def test_a_batch_too_large_for_device_memory_is_a_one_line_error(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import measure  # pylint: disable=g-import-not-at-top
  from jaxcnn import cli  # pylint: disable=g-import-not-at-top
  from jaxcnn.errors import UserError  # pylint: disable=g-import-not-at-top

  def exhausted(*unused_args):
    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9.1GiB')
  monkeypatch.setattr(measure, '_measure', exhausted)
  config = cli.load_config_file(f'{REPO_ROOT}/configs/mnist.py:lenet5_epoch')
  with pytest.raises(UserError, match=r'^lenet5 at a global batch of 128 on \d+ cpu device\(s\) '
                                      r'does not fit in device memory \(RESOURCE_EXHAUSTED\); '
                                      'measure a smaller batch$'):
    measure.measure_throughput(config, 1, 1, image_shape=(28, 28, 1), num_classes=10)


@pytest.mark.parametrize('flag', ['--steps=0', '--steps=-5', '--repeats=0'])
def test_throughput_refuses_a_count_that_is_not_positive(flag):
  name, value = flag[2:].split('=')
  assert run_refused('benchmarks/throughput.py', '--config=configs/mnist.py', flag) == (
      f'error: flag --{name}={value}: {value} is not a positive integer\n')


def test_throughput_of_an_image_folder_config_needs_no_folder():
  # Synthetic images of the stand-in shape a smoke run uses, at the config's image_size (bn_cnn,
  # not its ResNet-20, which compiles for 5 s more).
  result = run('benchmarks/throughput.py', '--config=configs/imagefolder.py', '--steps=1',
               '--repeats=1', '--config.image_size=16', '--config.batch_size=4',
               '--config.model=bn_cnn')
  measured = json.loads(result.stdout)
  assert measured['dataset'] == 'imagefolder' and measured['image_shape'] == [16, 16, 3]


@pytest.mark.parametrize('args, error', [
    (['--devices=1,2', '--strategies=jit,foo'],
     "--strategies takes jit,shard_map,pmap or some of them; got 'foo'"),
    (['--devices=1,3', '--global_batch=64'],
     '--global_batch 64 must be divisible by every count in --devices, and 3 does not divide it'),
    (['--devices=1,x'], "--devices must be positive integers, e.g. 1,2,4,8; got '1,x'"),
    (['--repeats=0'], 'flag --repeats=0: 0 is not a positive integer'),
    (['--devices=1,2', '--per_device_batch=33', '--config.grad_accum_steps=2'],
     "weak scaling of jit on 1 devices, batch 33 from --per_device_batch 33 x 1 devices: config "
     "key 'batch_size' (33) must be divisible by 'grad_accum_steps' (2)"),
])
def test_scaling_refuses_a_bad_argument_before_measuring_anything(args, error):
  assert run_refused('benchmarks/scaling.py', '--config=configs/mnist.py:lenet5_epoch', '--steps=1',
                     *args, env={**os.environ, 'XLA_FLAGS': ''}) == f'error: {error}\n'


def test_scaling_over_devices_that_do_not_split_the_configs_eval_batch():
  # configs/mnist.py:lenet5_epoch evaluates in batches of 200, which 3 devices do not split; the
  # benchmark never evaluates, so that batch is no reason to refuse.
  result = run('benchmarks/scaling.py', '--config=configs/mnist.py:lenet5_epoch', '--devices=1,3',
               '--strategies=jit', '--per_device_batch=8', '--global_batch=48', '--steps=1',
               '--repeats=1', env={**os.environ, 'XLA_FLAGS': ''})
  assert '| strong | jit | 3 | 48 |' in result.stdout


def test_scaling_measures_every_strategy_and_device_count(tmp_path):
  output = tmp_path / 'scaling.json'
  # Given in any order, the counts are measured from the fewest, the baseline.
  result = run('benchmarks/scaling.py', '--config=configs/mnist.py:lenet5_epoch',
               '--strategies=jit,shard_map,pmap', '--devices=2,1', '--per_device_batch=16',
               '--global_batch=32', '--steps=2', '--repeats=1', f'--output={output}',
               env={**os.environ, 'XLA_FLAGS': ''})
  measured = json.loads(output.read_text())
  assert measured['fake_cpu_devices'] is True
  points = {(r['mode'], r['parallel'], r['num_devices']): r for r in measured['runs']}
  assert len(points) == 2 * 3 * 2
  for strategy in ('jit', 'shard_map', 'pmap'):
    assert points[('weak', strategy, 2)]['batch_size'] == 32
    assert points[('strong', strategy, 2)]['batch_size'] == 32
    for mode in ('weak', 'strong'):
      one, two = points[(mode, strategy, 1)], points[(mode, strategy, 2)]
      assert one['baseline_devices'] == two['baseline_devices'] == 1
      assert one['efficiency'] == pytest.approx(1.0)
      assert two['speedup'] == pytest.approx(two['examples_per_sec'] / one['examples_per_sec'])
      assert two['efficiency'] == pytest.approx(two['speedup'] / 2)
  table = result.stdout[result.stdout.index('| mode |'):]  # The Markdown table, after the JSON.
  assert '| weak | jit | 2 | 32 |' in table
  assert 'Speedup: examples/s over those of the same mode and strategy on 1 device(s)' in table
  assert 'Note: fake CPU devices share the same cores' in table


def test_checkpoint_cost_reports_blocking_and_completion_per_mode(tmp_path):
  output = tmp_path / 'cost.json'
  run('benchmarks/checkpoint_cost.py', '--saves=2', f'--output={output}')
  measured = json.loads(output.read_text())
  assert measured['model'] == 'bn_cnn' and measured['checkpoint_bytes'] > 0
  for mode in ('async', 'sync'):
    blocked, complete = measured[mode]['blocked_seconds'], measured[mode]['complete_seconds']
    assert len(blocked['values']) == 2
    assert all(0 < b <= c for b, c in zip(blocked['values'], complete['values']))


def test_levers_compare_steps_per_call_and_data_placement(tmp_path, mnist_data_dir):
  output = tmp_path / 'levers.json'
  run('benchmarks/levers.py', '--quick', '--spc=2', f'--mnist_dir={MNIST_MANUAL_DIR}',
      f'--data_dir={mnist_data_dir}', f'--output={output}')
  measured = json.loads(output.read_text())
  calls = measured['steps_per_call']
  assert calls['default'] == 1  # On the CPU; measured as the reference though not asked for.
  assert {k: run['steps_per_call'] for k, run in calls['runs'].items()} == {'2': 2, '1': 1}
  assert calls['runs']['1']['ratio_to_default'] == 1.0
  assert calls['runs']['2']['ratio_to_default'] == pytest.approx(
      calls['runs']['2']['examples_per_sec'] / calls['runs']['1']['examples_per_sec'])
  placed = measured['data_placement']
  assert placed['config'] == 'configs/mnist.py:smoke' and set(placed['runs']) == {'device', 'stream'}
  for placement in placed['runs'].values():
    assert placement['steps'] == 8 and placement['train_seconds'] > 0
    assert 0 < placement['test_accuracy'] <= 1
  assert placed['runs']['device']['train_seconds_ratio_to_device'] == 1.0


@pytest.mark.parametrize('args, error', [
    (['--spc=1,0'], "--spc '0' is not a number of steps of at least 1"),
    (['--placements=device,gpu'], "--placements 'device,gpu': choose from device, stream")])
def test_levers_refuse_a_bad_choice(args, error):
  assert run_refused('benchmarks/levers.py', *args) == f'error: {error}\n'


def test_suite_quick_mode_writes_every_summary_figure(tmp_path, mnist_data_dir):
  run('benchmarks/run.py', '--quick', f'--output_dir={tmp_path}', f'--data_dir={mnist_data_dir}',
      f'--mnist_dir={MNIST_MANUAL_DIR}')
  (path,) = list(tmp_path.glob('*-quick.json'))
  results = json.loads(path.read_text())
  assert set(results['summary']) >= SUMMARY_KEYS
  assert results['environment']['versions']['jax'] and results['environment']['versions']['torch']
  assert set(results['throughput']) == {'lenet5_float32'}  # Quick: one model, one dtype.
  entry = results['throughput']['lenet5_float32']
  assert entry['jaxcnn_img_per_s'] > 0 and entry['pytorch_img_per_s'] > 0
  assert entry['ratio_jaxcnn_to_pytorch'] == pytest.approx(
      entry['jaxcnn_img_per_s'] / entry['pytorch_img_per_s'])
  cpu = results['cpu']
  # Every phase the trainer times, and the rest of the process (imports, set-up, exit) beside them.
  epoch = cpu['jaxcnn']['runs'][0]
  phases = ('data', 'compile', 'train', 'eval', 'checkpoint', 'other')
  assert all(epoch[f'{phase}_seconds'] > 0 for phase in phases)
  assert results['summary']['lenet5_cpu_epoch_seconds'] > 0
  for section, recipe in (('mnist', 'configs/mnist.py'),
                          ('mnist_speedrun', 'configs/mnist.py:speedrun')):
    assert results[section]['config'] == recipe
    assert results[section]['runs'][0]['curve']  # Test accuracy against training seconds.
  # Quick runs never reach the README.
  assert path.name not in {os.path.basename(p) for p in report.result_files(str(tmp_path))}


def test_the_suite_without_the_mnist_files_says_so_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'benchmarks/run.py', '--quick', f'--mnist_dir={tmp_path}',
       f'--output_dir={tmp_path}'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: --mnist_dir '{tmp_path}' lacks the official MNIST "
                                  'file(s) train-images-idx3-ubyte.gz')
  assert result.stderr.count('\n') == 1 and not os.listdir(tmp_path)  # Nothing measured.


def test_update_replaces_only_the_sections_measured_again():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  old_env = {'device': 'cpu', 'date': '2026-01-01', 'command': 'python benchmarks/run.py'}
  new_env = {'device': 'cpu', 'date': '2026-01-02',
             'command': 'python benchmarks/run.py --sections cpu --update'}
  epoch = lambda seconds: {'jaxcnn': {'process_seconds': {'median': seconds}},
                           'pytorch': {'process_seconds': {'median': 9.0}}}
  previous = suite.merge_results(None, {'environment': old_env, 'matmul': {'tflops': 0.2},
                                        'mnist': {'seconds_to_99': {'median': 70.0}},
                                        'cpu': epoch(13.7)}, quick=False)
  updated = suite.merge_results(previous, {'environment': new_env, 'matmul': {'tflops': 0.1},
                                           'cpu': epoch(9.5)}, quick=False)
  assert updated['environment'] == old_env and updated['mnist'] == previous['mnist']
  assert updated['matmul'] == {'tflops': 0.2}  # Kept with the throughput it belongs to.
  assert updated['updates'] == [{'sections': ['cpu'], 'environment': new_env}]
  assert updated['summary']['lenet5_cpu_epoch_seconds'] == 9.5
  assert updated['summary']['mnist_seconds_to_99'] == 70.0


def test_update_replaces_only_the_throughputs_measured_again():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  env = lambda date: {'device': 'NVIDIA H200', 'date': date, 'command': 'python benchmarks/run.py'}
  rate = lambda images: {'jaxcnn_img_per_s': images, 'pytorch_img_per_s': 100.0}
  matmul = lambda tflops: {'dtype': 'bfloat16', 'flops': {'median': tflops * 1e12}}
  first = suite.merge_results(None, {
      'environment': env('1'), 'matmul': matmul(800.0),
      'throughput': {'resnet50_bfloat16': rate(4000.0), 'lenet5_float32': rate(1.0)},
      'skipped': ['throughput resnet50_float32', 'throughput fastcifar_float32'],
      'errors': {'throughput lenet5_float32': 'pytorch: CUDA out of memory'}}, quick=False)
  # A later call measures two throughputs the first one skipped, or measured wrongly.
  second = suite.merge_results(first, {
      'environment': env('2'), 'matmul': matmul(600.0),
      'throughput': {'lenet5_float32': rate(2.0), 'resnet50_float32': rate(3.0)},
      'running': 'throughput fastcifar_float32'}, quick=False)  # Cut off by a time limit.
  assert second['throughput'] == {'resnet50_bfloat16': rate(4000.0), 'lenet5_float32': rate(2.0),
                                  'resnet50_float32': rate(3.0)}
  # The MFU still divides ResNet-50's figure by the rate measured in the same call as it.
  assert second['matmul'] == matmul(800.0)
  assert second['summary']['resnet50_mfu'] == pytest.approx(4000 * 24.6e9 / 800e12)
  assert second['updates'] == [{'sections': ['throughput'], 'environment': env('2'),
                                'running': 'throughput fastcifar_float32',
                                'throughputs': ['lenet5_float32', 'resnet50_float32'],
                                'matmul': matmul(600.0)}]
  # What the file still lacks: the measurement skipped first and cut off in the update.
  assert second['skipped'] == ['throughput fastcifar_float32'] and 'errors' not in second
  # Measured again with ResNet-50's bfloat16 figure, the rate is replaced with it.
  third = suite.merge_results(second, {
      'environment': env('3'), 'matmul': matmul(500.0),
      'throughput': {'resnet50_bfloat16': rate(5000.0)}}, quick=False)
  assert third['matmul'] == matmul(500.0)
  assert third['summary']['resnet50_mfu'] == pytest.approx(5000 * 24.6e9 / 500e12)
  assert third['throughput']['resnet50_float32'] == rate(3.0)


def test_throughputs_select_the_measurements_and_unknown_ones_are_refused():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  from absl import app  # pylint: disable=g-import-not-at-top
  plan = suite.measurement_plan(['mnist', 'throughput'], quick=False, seeds=2, repeats=1,
                                data_dir=None, mnist_dir='',
                                throughputs=['resnet50_float32', 'fastcifar_bfloat16'])
  assert [m.name for m in plan] == ['mnist seed 0', 'throughput fastcifar_bfloat16',
                                    'mnist seed 1', 'throughput resnet50_float32']
  suite.check_selection(['throughput'], ['resnet50_float32'], quick=False)
  with pytest.raises(app.UsageError, match=r"^unknown throughput 'resnet50_fp32' in "
                     r"--throughputs; choose from lenet5_float32, lenet5_bfloat16, "):
    suite.check_selection(['throughput'], ['resnet50_fp32'], quick=False)
  with pytest.raises(app.UsageError, match=r'^--throughputs resnet50_float32 measures nothing '
                     r'without the throughput section: add throughput to --sections$'):
    suite.check_selection(['mnist'], ['resnet50_float32'], quick=False)
  with pytest.raises(app.UsageError, match=r"^unknown section 'gpu' in --sections"):
    suite.check_selection(['gpu'], None, quick=False)


def test_plan_measures_the_summary_figures_first():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  plan = suite.measurement_plan(suite.SECTIONS, quick=False, seeds=3, repeats=1, data_dir=None,
                                mnist_dir='')
  names = [m.name for m in plan]
  assert names[:7] == ['mnist seed 0', 'mnist_speedrun seed 0', 'throughput fastcifar_bfloat16',
                       'throughput resnet50_bfloat16', 'cpu epoch', 'mnist seed 1',
                       'mnist seed 2']
  assert names[7:9] == ['mnist_speedrun seed 1', 'mnist_speedrun seed 2']
  # Seeds of both recipes, models x dtypes, the CPU epoch.
  assert len(names) == len(set(names)) == 2 * 3 + 8 + 1
  only_mnist = suite.measurement_plan(['mnist'], quick=True, seeds=5, repeats=1, data_dir=None,
                                      mnist_dir='')
  assert [m.name for m in only_mnist] == ['mnist seed 0']


def test_a_failed_or_late_measurement_leaves_the_others_recorded():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  times = iter([1.0, 2.0, 3.0, 99.0])  # The clock before each; the budget counts from 0.5 s.

  def fails():
    raise RuntimeError('CUDA out of memory\nmore detail')

  run = lambda seed: {'seed': seed, 'final_accuracy': 0.99, 'compile_seconds': 1.0,
                      'train_seconds': 5.0, 'seconds_to_99': 4.0 + seed, 'seconds_to_99_5': None}
  plan = [suite.Measurement('mnist', 0, lambda: run(0)),
          suite.Measurement('throughput', 'resnet50_bfloat16', fails),
          suite.Measurement('mnist', 1, lambda: run(1)),
          suite.Measurement('throughput', 'lenet5_float32', lambda: {'jaxcnn_img_per_s': 1.0})]
  written = []
  measured = suite.measure_all(plan, {'environment': {}}, budget_seconds=10.0,
                               on_progress=lambda m: written.append(json.loads(json.dumps(m))),
                               clock=lambda: next(times), start=0.5)
  assert measured['errors'] == {
      'throughput resnet50_bfloat16': 'RuntimeError: CUDA out of memory'}
  assert measured['skipped'] == ['throughput lenet5_float32']  # Its turn came at 99 s.
  assert measured['mnist']['seconds_to_99']['values'] == [4.0, 5.0]
  assert measured['mnist']['seconds_to_99_5']['reached'] == '0/2'
  # Written before and after every measurement that ran: while one runs, the file names it (a
  # run killed then says what it was measuring); the file after the first holds seed 0.
  assert [w.get('running') for w in written] == [
      'mnist seed 0', None, 'throughput resnet50_bfloat16', None, 'mnist seed 1', None]
  assert 'mnist' not in written[0] and written[1]['mnist']['seconds_to_99']['reached'] == '1/1'
  assert 'running' not in measured
  results = suite.merge_results(None, {**measured, 'environment': {'device': 'cpu'}},
                                quick=False)
  assert results['errors'] == measured['errors'] and results['summary']['mnist_seconds_to_99'] == 4.5


def test_each_mnist_recipe_is_summarised_in_its_own_section():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  run = lambda seed, seconds: {'seed': seed, 'compile_seconds': 0.5 + 9 * (seed == 0),
                               'seconds_to_99': seconds, 'seconds_to_99_5': None}
  measured = {'environment': {'device': 'cpu'}}
  for section, seed, seconds in (('mnist', 0, 30.0), ('mnist_speedrun', 0, 40.0),
                                 ('mnist', 1, 20.0), ('mnist_speedrun', 1, 50.0),
                                 ('mnist', 2, 25.0)):
    suite.record(measured, suite.Measurement(section, seed, measure=dict), run(seed, seconds))
  assert measured['mnist']['config'] == 'configs/mnist.py'
  assert measured['mnist_speedrun']['config'] == 'configs/mnist.py:speedrun'
  assert [r['seed'] for r in measured['mnist_speedrun']['runs']] == [0, 1]
  summary = suite.merge_results(None, measured, quick=False)['summary']
  assert (summary['mnist_seconds_to_99'], summary['mnist_speedrun_seconds_to_99']) == (25.0, 45.0)
  # Compiling from scratch (the first seed) and from the cache (the others) are told apart.
  assert (summary['mnist_compile_seconds'], summary['mnist_cached_compile_seconds']) == (9.5, 0.5)
  assert summary['mnist_speedrun_seconds_to_99_5'] is None  # Reached by no seed.


def test_a_seed_that_never_reaches_the_target_counts_as_the_slowest():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  # The median over all five seeds is the third fastest, not the median of the three that got there.
  spread = suite.time_to_target([40.0, None, 10.0, 30.0, None])
  assert (spread['median'], spread['min'], spread['max'], spread['reached']) == (
      40.0, 10.0, None, '3/5')
  assert suite.time_to_target([None, None, 10.0])['median'] is None  # Most seeds never got there.
  assert suite.time_to_target([None, 20.0, 10.0, 30.0])['median'] == 25.0
  everyone = suite.time_to_target([3.0, 1.0, 2.0])
  assert (everyone['median'], everyone['max'], everyone['reached']) == (2.0, 3.0, '3/3')


def test_the_suite_compiles_into_a_fresh_cache_unless_given_one(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/chosen/by/the/user')
  assert suite.use_fresh_compilation_cache() == '/chosen/by/the/user'
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  session_cache = jax.config.jax_compilation_cache_dir
  try:
    assert suite.use_fresh_compilation_cache() == 'fresh'
    folder = os.environ['JAX_COMPILATION_CACHE_DIR']  # Inherited by the cpu section's processes.
    assert jax.config.jax_compilation_cache_dir == folder != session_cache
    assert os.path.isdir(folder) and not os.listdir(folder)
  finally:
    jax.config.update('jax_compilation_cache_dir', session_cache)


def test_report_renders_a_row_per_full_result(tmp_path):
  summary = {key: None for key in SUMMARY_KEYS}
  summary.update(device='NVIDIA H100 80GB HBM3', mnist_seconds_to_99=0.8,
                 mnist_speedrun_seconds_to_99=0.3, resnet50_mfu=0.31,
                 resnet50_mfu_of_datasheet_peak=0.22)
  (tmp_path / '2026-01-01-nvidia-h100.json').write_text(json.dumps(
      {'environment': {'date': '2026-01-01T00:00:00+00:00'}, 'summary': summary}))
  (tmp_path / '2026-01-02-cpu-quick.json').write_text('{}')  # Quick runs are left out.
  readme = f'intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n'
  rendered = report.render(readme, str(tmp_path))
  assert rendered.startswith('intro\n') and rendered.endswith(f'{report.END}\noutro\n')
  row = [line for line in rendered.splitlines() if line.startswith('| 2026-01-01')]
  assert row == ['| 2026-01-01 | NVIDIA H100 80GB HBM3 | 0.80 | - | - | 0.30 | - | - | 31.0% | '
                 '22.0% | - | - | - | - |']
  assert 'old table' not in rendered


def test_report_names_the_seeds_that_reached_a_target_and_cpu_float32_throughput(tmp_path):
  summary = {key: None for key in SUMMARY_KEYS}
  summary.update(device='cpu (2 cores, x86_64)', mnist_seconds_to_99=27.5,
                 mnist_seconds_to_99_reached='5/5', mnist_seconds_to_99_5=90.8,
                 mnist_seconds_to_99_5_reached='4/5', resnet50_bf16_img_per_s=3.7,
                 resnet50_bf16_img_per_s_pytorch=0.27, resnet50_f32_img_per_s=4.0,
                 resnet50_f32_img_per_s_pytorch=4.8)
  (tmp_path / '2026-01-01-cpu.json').write_text(json.dumps(
      {'environment': {'date': '2026-01-01T00:00:00+00:00', 'backend': 'cpu'},
       'summary': summary}))
  row = report.table(str(tmp_path)).splitlines()[-1]
  assert row == ('| 2026-01-01 | cpu (2 cores, x86_64) | 27.50 | 90.80 (4/5 seeds) | - | - | '
                 '4.00 (f32) | 4.80 (f32) | - | - | - | - | - | - |')  # Three digits, zeros kept.
  # A run cut short (its budget, a failure, an outside limit) after 2 of 5 seeds: its medians are
  # over the seeds that ran, and say so.
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  plan = suite.measurement_plan(['mnist'], quick=False, seeds=5, repeats=1, data_dir=None,
                                mnist_dir='')
  measured = {}
  for measurement, run in zip(plan, (
      {'seconds_to_99': 10.0, 'seconds_to_99_5': None, 'compile_seconds': 2.0},
      {'seconds_to_99': 12.0, 'seconds_to_99_5': 40.0, 'compile_seconds': 0.3})):
    suite.record(measured, measurement, run)
  results = {'environment': {'device': 'cpu', 'date': '2026-01-02T00:00:00+00:00',
                             'backend': 'cpu'}, **measured}
  summary = suite.summarise(results)
  assert (summary['mnist_seeds_not_run'], summary['mnist_speedrun_seeds_not_run']) == (3, 0)
  (tmp_path / '2026-01-02-cpu.json').write_text(json.dumps({**results, 'summary': summary}))
  row = report.table(str(tmp_path)).splitlines()[2]
  assert row.startswith('| 2026-01-02 | cpu | 11.00 (3 seeds not run) | '
                        '- (1/2 seeds) (3 seeds not run) | 2.0 |'), row


def test_readme_table_is_generated_from_the_committed_results():
  run('benchmarks/report.py', '--check')


def test_time_to_accuracy_evaluates_at_a_divisor_of_the_epoch_eight_times_or_more():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  # configs/mnist.py (batch 128) and its :speedrun (batch 512) on MNIST's 60,000 images.
  assert suite.evaluation_interval(60_000 // 128) == 52 and suite.evaluation_interval(117) == 13
  for steps_per_epoch in (468, 117, 97, 8, 7, 1):
    interval = suite.evaluation_interval(steps_per_epoch)
    assert steps_per_epoch % interval == 0
    assert steps_per_epoch // interval >= min(8, steps_per_epoch)


def test_mfu_is_reported_against_the_measured_rate_and_the_datasheet_peak():
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  measured = {'environment': {'device': 'NVIDIA H100 80GB HBM3'},
              'matmul': {'dtype': 'bfloat16', 'flops': {'median': 700e12}},
              'throughput': {'resnet50_bfloat16': {'jaxcnn_img_per_s': 8000.0}}}
  summary = suite.merge_results(None, measured, quick=False)['summary']
  assert summary['resnet50_mfu'] == pytest.approx(8000 * 24.6e9 / 700e12)
  assert summary['datasheet_bf16_tflops'] == 989.4
  assert summary['resnet50_mfu_of_datasheet_peak'] == pytest.approx(8000 * 24.6e9 / 989.4e12)
  assert suite.datasheet_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert suite.datasheet_bf16_tflops('NVIDIA H200') == 989.4
  assert suite.datasheet_bf16_tflops('NVIDIA H200 NVL') == 835.0
  assert suite.datasheet_bf16_tflops('cpu (2 cores, x86_64)') is None


@pytest.mark.parametrize('failing', ['jaxcnn', 'pytorch'])
def test_one_frameworks_failure_keeps_the_others_throughput(monkeypatch, failing):
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)

  def raises(*args, **kwargs):
    raise ValueError('device cuda was asked for, but torch sees no CUDA device\nmore detail')

  if failing == 'jaxcnn':
    monkeypatch.setattr(suite, 'measure_throughput', raises)
  else:
    monkeypatch.setattr(suite.torch_reference, 'measure_throughput', raises)
  entry = suite.throughput('lenet5_float32', quick=True, repeats=1)
  survivor = 'pytorch' if failing == 'jaxcnn' else 'jaxcnn'
  assert entry[failing] == {
      'error': 'ValueError: device cuda was asked for, but torch sees no CUDA device'}
  assert entry[f'{failing}_img_per_s'] is None and entry[f'{survivor}_img_per_s'] > 0
  assert 'ratio_jaxcnn_to_pytorch' not in entry
  assert entry['pytorch_mode'] == (None if failing == 'pytorch' else 'eager')
  # Still an error of the suite (its exit status says so), the survivor's figure recorded.
  measured = {}
  suite.record(measured, suite.Measurement('throughput', 'lenet5_float32', lambda: entry), entry)
  assert measured['errors'] == {'throughput lenet5_float32': (
      f'{failing}: ValueError: device cuda was asked for, but torch sees no CUDA device')}
  assert measured['throughput']['lenet5_float32'][f'{survivor}_img_per_s'] > 0


def test_a_failed_matmul_rate_costs_only_the_mfu(monkeypatch):
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)

  def raises(quick):
    raise RuntimeError('CUDA_ERROR_ILLEGAL_ADDRESS\nmore detail')

  monkeypatch.setattr(suite, 'matmul_flops', raises)
  measured = suite.describe_run(quick=True, compilation_cache='fresh')
  assert measured['errors'] == {'matmul': 'RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS'}
  measured['throughput'] = {'resnet50_bfloat16': {'jaxcnn_img_per_s': 3000.0}}
  summary = suite.merge_results(None, measured, quick=True)['summary']
  assert summary['resnet50_bf16_img_per_s'] == 3000.0 and summary['resnet50_mfu'] is None


def test_the_cpu_epoch_runs_both_frameworks_on_the_cpu_of_a_gpu_machine(monkeypatch):
  import run as suite  # pylint: disable=g-import-not-at-top  (benchmarks/run.py)
  environments = []

  def timed(command, env):
    environments.append(env)
    raise RuntimeError('enough: the environment is what is checked')

  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setattr(suite, '_timed', timed)
  with pytest.raises(RuntimeError, match='enough'):
    suite.lenet5_epoch(quick=True, repeats=1, data_dir=None, mnist_dir=str(MNIST_MANUAL_DIR))
  assert environments[0]['JAX_PLATFORMS'] == 'cpu'
  assert environments[0]['CUDA_VISIBLE_DEVICES'] == ''


def test_preflight_passes_where_jax_computes_and_stops_a_gpu_run_without_a_gpu():
  on_cpu = {**ONE_DEVICE, 'JAX_PLATFORMS': 'cpu'}  # So on a machine with a GPU too.
  result = run('benchmarks/preflight.py', '--platform', 'cpu', env=on_cpu)
  assert "JAX computes on cpu; its convolutions and PyTorch's run" in result.stdout
  result = subprocess.run([sys.executable, 'benchmarks/preflight.py'], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False, env=on_cpu)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "preflight: error: JAX runs on 'cpu' ([CpuDevice(id=0)]), not 'gpu': its CUDA plugin did "
      "not start (see the log above), so every figure would be the CPU's"]
