"""jit over a mesh, shard_map and pmap compute the same training run on 1 to 8 devices."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from jaxcnn import parallel, trainer, xla_options
from jaxcnn.checkpoint import CHECKPOINT_DIR
from jaxcnn.data import device_data, pipeline
from jaxcnn.errors import ConfigError
from jaxcnn.metrics import read_metrics

from conftest import (LAUNCH_ATTEMPTS, REPO_ROOT, coordinator_port_was_taken, free_port,
                      tiny_config)

RTOL = 1e-3


def run(tmp_path, name, **overrides):
  # SGD with momentum, whose steps scale with the gradient (Adam's would hide a gradient that is
  # a multiple of the right one).
  config = tiny_config(model='bn_cnn', optimizer='momentum', learning_rate=0.05,
                       **{'augment.crop_padding': 2, **overrides})
  return trainer.train_and_evaluate(config, str(tmp_path / name))


@pytest.mark.parametrize('strategy', ['jit', 'shard_map', 'pmap'])
def test_every_device_count_trains_like_one_device(fake_tfds, tmp_path, strategy):
  reference = run(tmp_path, 'one', parallel='jit', num_devices=1)
  # jit on one device is the reference itself; 4 devices: the micro-batch test below.
  for num_devices in (2, 8) if strategy == 'jit' else (1, 2, 8):
    result = run(tmp_path, f'{strategy}{num_devices}', parallel=strategy, num_devices=num_devices)
    for key in ('train/loss', 'train/grad_norm', 'test/loss'):
      np.testing.assert_allclose(result[key], reference[key], rtol=RTOL,
                                 err_msg=f'{strategy} on {num_devices} devices, {key}')
    assert result['test/num_examples'] == 200


@pytest.mark.parametrize('strategy', ['jit', 'shard_map', 'pmap'])
def test_micro_batches_and_mixup_are_the_same_on_any_device_count(fake_tfds, tmp_path, strategy):
  """Micro-batch k takes every k-th example and Mixup pairs neighbours, so neither depends on how
  the batch is split: the BatchNorm statistics and mixed images of 4 devices are those of one.
  Nor does RandAugment, drawn from each example's index in the global batch (with `lax.switch`
  under `vmap`, as TrivialAugment, AutoAugment and AugMix draw theirs, which shard_map's check of
  varying axes refused)."""
  options = {'grad_accum_steps': 2, 'augment.mixup_alpha': 0.4, 'augment.randaugment_ops': 2}
  reference = run(tmp_path, 'one', parallel='jit', num_devices=1, **options)
  result = run(tmp_path, strategy, parallel=strategy, num_devices=4, **options)
  for key in ('train/loss', 'train/grad_norm', 'test/loss'):  # atol: rounding of small losses.
    np.testing.assert_allclose(result[key], reference[key], rtol=RTOL, atol=1e-4, err_msg=key)


def test_augmixs_three_views_are_the_same_on_any_device_count(fake_tfds, tmp_path):
  """Each example's views are drawn from its index in the global batch and run beside each
  other, so the views, and the BatchNorm statistics over them, of 2 devices are those of one:
  under `jit`, where the views of a batch sharded over the devices are reshaped into one batch
  (under shard_map and pmap each device reshapes its own)."""
  options = {'grad_accum_steps': 2, 'augment.augmix': True, 'augment.augmix_jsd_weight': 12.0,
             'num_train_steps': 8, 'eval_every_steps': 8}
  reference = run(tmp_path, 'one', parallel='jit', num_devices=1, **options)
  result = run(tmp_path, 'two', parallel='jit', num_devices=2, **options)
  for key in ('train/loss', 'train/grad_norm', 'test/loss'):
    np.testing.assert_allclose(result[key], reference[key], rtol=RTOL, atol=1e-4, err_msg=key)


def test_the_tolerance_would_catch_a_different_run(fake_tfds, tmp_path):
  """A different data order moves the losses by far more than the tolerance above."""
  first = run(tmp_path, 'a', num_devices=2)
  other = run(tmp_path, 'b', num_devices=2, seed=1)
  assert abs(other['train/loss'] - first['train/loss']) > 10 * RTOL * first['train/loss']


def _no_data_loads(monkeypatch):
  # The batch checks come before any data is read: a refused config costs no loading.
  monkeypatch.setattr(pipeline, 'load_data', lambda *args, **kwargs: pytest.fail('data loaded'))


def test_batch_not_divisible_by_devices_is_refused(fake_tfds, tmp_path, monkeypatch):
  _no_data_loads(monkeypatch)
  with pytest.raises(ConfigError, match=r"'batch_size' \(36\) .* number of devices \(8\)"):
    run(tmp_path, 'x', batch_size=36, num_devices=8)


def test_micro_batches_must_divide_each_devices_batch(fake_tfds, tmp_path, monkeypatch):
  _no_data_loads(monkeypatch)
  with pytest.raises(ConfigError, match=r"'grad_accum_steps' \(8\) must divide the batch of each "
                                        r'device \(32 / 8 devices = 4\)'):
    run(tmp_path, 'x', grad_accum_steps=8, num_devices=8)


@pytest.mark.parametrize('strategy, num_devices', [('shard_map', 2), ('pmap', 2), ('shard_map', 1)])
def test_batchnorm_without_the_mapped_axis_is_refused(fake_tfds, tmp_path, monkeypatch, strategy,
                                                      num_devices):
  """On several devices; on one, where its statistics are the whole batch's, such a model
  trains."""
  (tmp_path / 'localbn.py').write_text(
      'from flax import nnx\n\n\n'
      'class Net(nnx.Module):\n\n'
      '  def __init__(self, *, num_classes, rngs):\n'
      '    self.bn = nnx.BatchNorm(4, rngs=rngs)\n'
      '    self.fc = nnx.Linear(4, num_classes, rngs=rngs)\n\n'
      '  def __call__(self, x):\n'
      '    return self.fc(self.bn(x.reshape(x.shape[0], -1)[:, :4]))\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny_config(model='localbn:Net', parallel=strategy, num_devices=num_devices)
  if num_devices == 1:
    assert trainer.train_and_evaluate(config, str(tmp_path / 'run'))['step'] == 24
    return
  with pytest.raises(ConfigError, match=r"model 'localbn:Net' has BatchNorm layers without "
                                        r"axis_name \(bn\): under .* on 2 devices each would "
                                        r"normalise its device's examples alone"):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize('strategy', ['jit', 'shard_map', 'pmap'])
def test_each_epochs_permutation_compiles_once_per_run(strategy):
  # Lowering to MLIR and compiling, from scratch or from the persistent compilation cache: a
  # program drawn again for a later epoch would show as either.
  compiles = []
  events = ('/jax/core/compile/backend_compile_duration',
            '/jax/core/compile/jaxpr_to_mlir_module_duration')
  listener = lambda event, seconds, **kwargs: compiles.append(event) if event in events else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mesh_strategy = parallel.make_strategy(strategy, 4)
    orders = []
    for epoch in range(3):
      compiles.clear()
      orders.append(np.asarray(mesh_strategy.fetch(mesh_strategy.permutation(0, epoch, 1000))))
      if epoch:
        assert not compiles, f'epoch {epoch} compiled again'
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sorted(orders[2]) == list(range(1000)) and not np.array_equal(orders[1], orders[2])


@pytest.mark.parametrize('model', ['lenet5', 'bn_cnn', 'cifar_resnet20'])
def test_jit_over_a_mesh_exchanges_only_reductions_between_devices(model):
  # Data parallelism needs one all-reduce of the gradients (and of BatchNorm's statistics); any
  # other collective moves activations between devices, as an identity gather over the batch in
  # the CPU kernels once did (an all-gather of a whole layer; theirs and the ResNet blocks' gathers
  # now run over channels).
  config = tiny_config(model=model, batch_size=32, num_devices=2)
  strategy = parallel.make_strategy('jit', 2)
  images = np.zeros((64, 28, 28, 1), np.uint8)
  experiment, state = trainer.build_experiment(
      config, image_shape=(28, 28, 1), num_classes=10, num_train_examples=len(images),
      mean=(0.0,), std=(1.0,), strategy=strategy)
  split = strategy.replicate(device_data.pad_split(images, np.zeros(64, np.int32)))
  compiled = strategy.compile(
      experiment.train_fn, state, experiment.zero_train_sums(), strategy.scalar(0), split,
      strategy.permutation(0, 0, 64), strategy.scalar(0), static=(1,),
      options=xla_options.training_options())
  collectives = re.findall(r'\b(all-gather|all-to-all|collective-permute|reduce-scatter|'
                           r'all-reduce)(?:-start)?\(', compiled.as_text())
  assert set(collectives) == {'all-reduce'}, collectives
  # The state and the sums come back replicated, as the next call was compiled to take them.
  assert all(sharding.is_fully_replicated
             for sharding in jax.tree.leaves(compiled.output_shardings))


def test_a_mesh_over_some_devices_takes_as_many_from_every_process():
  """Two hosts of four devices each, as jax.devices() lists them: process by process."""
  devices = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
  assert [d.id for d in parallel.select_devices(devices, 4, num_processes=2)] == [0, 1, 4, 5]
  assert [d.id for d in parallel.select_devices(devices, -1, num_processes=2)] == list(range(8))
  assert [d.id for d in parallel.select_devices(devices[:4], 2, num_processes=1)] == [0, 1]
  with pytest.raises(ConfigError, match=r"'num_devices' \(3\) must be a multiple of the 2 "
                                        'processes'):
    parallel.select_devices(devices, 3, num_processes=2)


def test_more_devices_than_exist_is_refused():
  with pytest.raises(ConfigError, match="'num_devices' \\(9\\) is more than the 8 devices"):
    parallel.make_mesh(9)


def process_0_lost_its_port(process_0, port: int) -> bool:
  """Whether process 0 has ended because another program took its coordinator's `port`."""
  if process_0.poll() is None:
    return False
  # It has ended: communicate() gives all its output, even if read already.
  return coordinator_port_was_taken(process_0.communicate()[1], port)


@contextlib.contextmanager
def two_processes(tmp_path, workdir, port, *flags):
  """Starts `train.py` as two processes of two CPU devices each on localhost, for the block; on
  leaving it kills and reaps both, so that a failed test leaves none running."""
  address = f'localhost:{port}'
  env = {**os.environ, 'JAXCNN_CACHE_DIR': str(tmp_path / 'cache'), 'PYTHONUNBUFFERED': '1',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  command = [sys.executable, 'tests/fake_tfds_run.py', 'train.py',
             '--config=tests/tiny_config.py:bn_cnn', '--config.augment.crop_padding=2',
             '--config.optimizer=momentum', '--config.learning_rate=0.05',
             '--config.num_devices=-1', f'--workdir={workdir}',
             f'--coordinator_address={address}', '--num_processes=2',
             # Not 300 s: when one process fails early, the other gives up sooner.
             '--join_timeout=120', *flags]
  processes = [subprocess.Popen(command + [f'--process_id={i}'], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  try:
    yield processes
  finally:
    for p in processes:
      p.kill()  # Nothing once it has ended.
    for p in processes:
      p.wait()
      p.stdout.close()
      p.stderr.close()


def run_two_processes(tmp_path, workdir, flags, body):
  """Returns `body(processes)` for `train.py` started as two processes (see `two_processes`).

  When `body` fails because process 0 could not listen on the coordinator port (another program
  took it after `free_port` found it free), starts both again on a new port, up to
  LAUNCH_ATTEMPTS times in all.
  """
  for attempt in range(1, LAUNCH_ATTEMPTS + 1):
    port = free_port()
    with two_processes(tmp_path, workdir, port, *flags) as processes:
      try:
        return body(processes)
      except Exception:  # pylint: disable=broad-except  (re-raised unless the port was taken)
        if attempt == LAUNCH_ATTEMPTS or not process_0_lost_its_port(processes[0], port):
          raise


# Five cases, not every strategy with every option (each costs about 35 s of CPU time): jit and
# shard_map share the mesh and how streamed batches are fed to it, so jit takes data held on two
# devices of each process, and shard_map streamed data and one device of each process.
@pytest.mark.parametrize('strategy, overrides', [
    # Both runs start from the weights of another run (SOURCE, trained in the test), which every
    # process reads for itself.
    ('jit', {'init_from.workdir': 'SOURCE'}), ('pmap', {}),
    # Streamed, each process reads its share of every batch; micro-batches and Mixup pair rows
    # of the global batch, which must be the same examples however many processes read them,
    # here inside shard_map's per-device step.
    ('shard_map', {'data_placement': 'stream', 'grad_accum_steps': 2,
                   'augment.mixup_alpha': 0.4}),
    # One device of each process: the mesh must hold devices of both (the first two listed are
    # process 0's, and process 1 then had nothing to feed while process 0 waited for it), and
    # pmap must be given both, or each process maps over its own device alone and its
    # collectives never reach the other (both trained on the same half of every batch).
    ('shard_map', {'num_devices': 2}), ('pmap', {'num_devices': 2}),
])
def test_two_processes_of_two_devices_equal_one_process_of_four(fake_tfds, tmp_path, strategy,
                                                                overrides):
  if overrides.get('init_from.workdir') == 'SOURCE':
    source = run(tmp_path, 'source', num_train_steps=12)['workdir']
    overrides = {**overrides, 'init_from.workdir': source}
  reference = run(tmp_path, 'one', parallel=strategy, **{'num_devices': 4, **overrides})
  workdir = tmp_path / 'multi'

  def wait_for_both(processes):
    for p in processes:  # Process 0 first: when it fails, process 1 waits for it in vain.
      _, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]

  flags = [f'--config.parallel={strategy}',
           *[f'--config.{key}={value}' for key, value in overrides.items()]]
  run_two_processes(tmp_path, workdir, flags, wait_for_both)
  if 'init_from.workdir' in overrides:
    assert (workdir / 'init_from.json').read_text() == (tmp_path / 'one' /
                                                         'init_from.json').read_text()
  records = read_metrics(str(workdir))
  # Only process 0 wrote metrics: one record per log step, not two.
  assert [r['step'] for r in records if 'train/loss' in r] == [8, 12, 16, 24]
  final = {**[r for r in records if 'train/loss' in r][-1],
           **[r for r in records if 'test/loss' in r][-1]}
  for key in ('train/loss', 'train/grad_norm', 'test/loss', 'test/accuracy'):
    np.testing.assert_allclose(final[key], reference[key], rtol=RTOL, err_msg=key)


# Several steps per compiled call (as on accelerators) too: the step then moves by more than one
# between the sync point's checks, which must count calls, not steps.
@pytest.mark.parametrize('stop_signal, steps_per_call', [(signal.SIGTERM, 1), (signal.SIGINT, 4)])
def test_a_signal_to_one_process_stops_both_at_one_saved_step(tmp_path, stop_signal,
                                                              steps_per_call):
  """A preemption notice (or a Ctrl-C) that reaches one host stops every host at the same step,
  with that step's checkpoint saved, through JAX's preemption sync point."""
  workdir = tmp_path / 'multi'
  checkpoints = workdir / CHECKPOINT_DIR

  def stop_one_after_a_checkpoint(processes):
    """Returns (stderr, exit status) of each process."""
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
      ended = [p for p in processes if p.poll() is not None]
      assert not ended, ended[0].communicate()[1][-3000:]  # Not a wait for one still running.
      assert time.monotonic() < deadline, 'no checkpoint appeared'
      time.sleep(0.02)  # Polling the directory, not waiting for a guessed duration.
    processes[1].send_signal(stop_signal)
    return [(p.communicate(timeout=120)[1], p.returncode) for p in processes]

  outputs = run_two_processes(
      tmp_path, workdir, ['--config.num_train_steps=100000', '--config.log_every_steps=10',
                          '--config.eval_every_steps=100000', '--config.checkpoint_every_steps=20',
                          f'--config.steps_per_call={steps_per_call}'],
      stop_one_after_a_checkpoint)
  # The signalled process names its signal; the other was told by JAX's preemption notice.
  for (err, returncode), expected in zip(outputs, (signal.SIGTERM, stop_signal)):
    assert returncode == 128 + expected, err[-3000:]
  last_lines = [err.strip().splitlines()[-1] for err, _ in outputs]
  assert last_lines[1].startswith(f'stopped: stopped by {stop_signal.name} at step ')
  steps = {int(line.split(' at step ')[1].split()[0]) for line in last_lines}
  assert len(steps) == 1, last_lines
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved[-1] == steps.pop()


def test_only_the_training_loop_checks_the_preemption_sync_point(tmp_path, monkeypatch):
  """JAX's sync point keeps one counter per process: the id of its last check. Orbax's manager
  would check it too, with checkpoint steps and from the thread that finishes an asynchronous
  save, putting the counter back behind the loop's at a moment of its own; a process already past
  the check then agreed on would never stop, and the others would wait for it at the save."""
  from jax.experimental import multihost_utils
  from jaxcnn.checkpoint import Checkpointer
  checked = []
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      lambda step_id: checked.append(step_id) or False)
  checkpointer = Checkpointer(str(tmp_path), keep_last=2, keep_best=0, best_metric='test/loss')
  for step in (20, 40):
    checkpointer.save(step, {'w': np.full((2,), step, np.float32)}, meta={})
  checkpointer.wait()
  assert checkpointer.steps() == [20, 40]
  checkpointer.close()
  assert checked == []


def test_process_0_loads_the_dataset_before_the_others_and_its_error_reaches_them(
    monkeypatch):
  from jax.experimental import multihost_utils
  from jaxcnn.data import pipeline
  from jaxcnn.errors import DataError
  events = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', lambda name: events.append('sync'))

  def prepare():
    events.append('prepare')
    return 'builder'

  for index, expected in ((0, ['prepare', 'sync']), (1, ['sync', 'prepare'])):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    events.clear()
    assert pipeline.process_0_first(prepare) == 'builder'
    assert events == expected

  def fail():
    events.append('prepare')
    raise DataError('no files')

  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  events.clear()
  with pytest.raises(DataError, match='no files'):
    pipeline.process_0_first(fail)
  assert events == ['prepare', 'sync']  # The others were let go before process 0 failed.


def test_a_checkpoint_one_process_cannot_read_is_damaged_for_every_process(monkeypatch):
  from jax.experimental import multihost_utils
  from jaxcnn.checkpoint import CheckpointError, damaged_for_any_process
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  failed_on = []  # The processes that failed to read the checkpoint.
  monkeypatch.setattr(multihost_utils, 'process_allgather',
                      lambda flag: np.array([int(i in failed_on) for i in range(2)]))
  assert damaged_for_any_process(16, None) is None
  failed_on[:] = [1]
  error = damaged_for_any_process(16, None)
  assert isinstance(error, CheckpointError)
  assert str(error) == 'checkpoint 16 could not be read by process 1'
  own = CheckpointError('checkpoint 16 does not match its checksums')
  failed_on[:] = [0, 1]
  assert damaged_for_any_process(16, own) is own
