"""Streaming through Grain: training, full evaluation, host augmentation, exact resume."""

import multiprocessing
import threading
import types

import jax
import numpy as np
import pytest

from jaxcnn import feeds, parallel, trainer
from jaxcnn.data import image_ops, pipeline, streaming
from jaxcnn.data.synthetic import ArraySource
from jaxcnn.errors import ConfigError, DataError
from jaxcnn.metrics import read_metrics
from jaxcnn.restore import restore_run

from conftest import learnable_images, tiny_config


def stream_config(**overrides):
  return tiny_config(**{'data_placement': 'stream', 'data_workers': 0, **overrides})


def test_streamed_training_learns_and_evaluates_every_example(fake_tfds, tmp_path):
  fake_tfds({'train': 1024, 'test': 203})
  result = trainer.train_and_evaluate(
      stream_config(model='bn_cnn', num_train_steps=60, eval_every_steps=60), str(tmp_path))
  assert result['test/num_examples'] == 203
  assert result['test/accuracy'] > 0.9


def test_streamed_and_device_resident_evaluation_agree(fake_tfds, tmp_path):
  """The same weights give the same test metrics whichever way the data arrives."""
  fake_tfds({'train': 256, 'test': 203})
  workdir = str(tmp_path / 'device')
  device = trainer.train_and_evaluate(tiny_config(num_train_steps=8, eval_every_steps=8), workdir)
  # The run's last checkpoint evaluated again, as `jaxcnn.evaluate` does, but streamed.
  data = pipeline.load_data(stream_config(), train=False)
  assert data.placement == 'stream'
  run = restore_run(workdir, 'latest', placement='stream')
  feed = feeds.make_eval_feed(run.config, run.experiment, data)
  feed.compile(run.state, run.experiment.zero_eval_sums())
  streamed = trainer.evaluate(run.experiment, run.state, feed, 'test')
  assert run.step == device['step'] == 8
  assert streamed['test/num_examples'] == device['test/num_examples'] == 203
  np.testing.assert_allclose(streamed['test/accuracy'], device['test/accuracy'])
  np.testing.assert_allclose(streamed['test/loss'], device['test/loss'], rtol=1e-6)


def test_resumed_stream_continues_with_the_same_batches(fake_tfds, tmp_path):
  config = stream_config(model='keras_cnn', lr_schedule='constant', num_train_steps=48,
                         log_every_steps=4, eval_every_steps=12,
                         **{'augment.crop_padding': 2, 'augment.randaugment_ops': 2})
  trainer.train_and_evaluate(config, str(tmp_path / 'whole'))
  config.num_train_steps = 20
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  config.num_train_steps = 48
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))

  def logged(name):
    records = read_metrics(str(tmp_path / name))
    train = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
    final = [(r['step'], r['test/loss'], r['test/accuracy']) for r in records if 'test/loss' in r]
    return train, final[-1]
  assert logged('halves') == logged('whole')  # Every train/loss and the final test metrics.


def test_a_streamed_run_is_the_same_for_any_worker_count(fake_tfds, tmp_path):
  """Batches are a function of (seed, batch number): a run made by two worker processes, and one
  made in this process and resumed with two workers, log the same losses."""
  config = stream_config(model='lenet5', lr_schedule='constant', num_train_steps=16,
                         log_every_steps=4, eval_every_steps=8, data_workers=2,
                         **{'augment.crop_padding': 2, 'augment.flip': True})
  trainer.train_and_evaluate(config, str(tmp_path / 'workers'))
  config.num_train_steps, config.data_workers = 8, 0
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  config.num_train_steps, config.data_workers = 16, 2
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  losses = lambda name: [(r['step'], r['train/loss']) for r in read_metrics(str(tmp_path / name))
                         if 'train/loss' in r]
  assert len(losses('workers')) == 4
  assert losses('halves') == losses('workers')


@pytest.fixture
def two_cores(monkeypatch):
  """A process that may use 2 CPU cores, and has not warned of its data workers yet."""
  monkeypatch.setattr(feeds, 'usable_cpu_cores', lambda: 2)
  monkeypatch.setattr(feeds, '_warned_of_workers', False)


def streamed_feeds(config, monkeypatch):
  """The train and eval feeds of `config`, and the worker count each would start Grain with
  (none is started: the train stream is only made, with Grain's function replaced)."""
  data = pipeline.load_data(config)
  experiment = types.SimpleNamespace(strategy=parallel.make_strategy('jit', 1), train_fn=None,
                                     eval_fn=None, steps_per_epoch=1)
  train_feed = feeds.make_train_feed(config, experiment, data)
  eval_feed = feeds.make_eval_feed(config, experiment, data)
  monkeypatch.setattr(streaming, 'train_batches', lambda *unused, worker_count, **kw: worker_count)
  return train_feed._make_batches(0), eval_feed._workers  # pylint: disable=protected-access


WORKERS_WARNING = ('warning: data_workers=5 is more than the 2 CPU cores this process may use; '
                   'each data worker is a process of its own, so more workers than cores add '
                   'memory, not speed\n')


def test_more_data_workers_than_cores_are_started_with_one_warning(fake_tfds, two_cores,
                                                                   monkeypatch, capsys):
  """Obeyed (a config from a bigger machine must still run), with one warning for both feeds."""
  assert streamed_feeds(stream_config(data_workers=5), monkeypatch) == (5, 5)
  assert capsys.readouterr().err == WORKERS_WARNING
  assert streamed_feeds(stream_config(data_workers=5), monkeypatch) == (5, 5)
  assert capsys.readouterr().err == ''  # Once a process.


@pytest.mark.parametrize('workers', [0, 2, -1])
def test_no_more_data_workers_than_cores_is_no_warning(fake_tfds, two_cores, monkeypatch,
                                                       capsys, workers):
  expected = 0 if workers == -1 else workers  # The default: none when the CPU trains.
  assert streamed_feeds(stream_config(data_workers=workers), monkeypatch) == (expected, expected)
  assert capsys.readouterr().err == ''


def test_the_default_data_workers_are_the_cores_this_process_may_use(monkeypatch):
  """Its CPU affinity (taskset, a cgroup), not every core of the machine."""
  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
  monkeypatch.setattr(pipeline.os, 'cpu_count', lambda: 64)
  monkeypatch.setattr(pipeline.jax, 'default_backend', lambda: 'gpu')
  assert pipeline.default_data_workers() == 3


def numbered_source(num_examples):
  """Examples whose image is filled with their index, so that a batch shows which they are."""
  images = np.broadcast_to(np.arange(num_examples, dtype=np.uint8)[:, None, None, None],
                           (num_examples, 4, 4, 1))
  return ArraySource(np.ascontiguousarray(images), np.arange(num_examples) % 3)


def example_indexes(batch):
  return batch['image'][:, 0, 0, 0].tolist()


def take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


def test_train_batches_depend_only_on_the_batch_number():
  source = ArraySource(*learnable_images(64, (8, 8, 1), 10, seed=0))
  augment = streaming.HostAugment(image_shape=(8, 8, 1), crop_padding=2, flip=True)
  batches = lambda workers, start: streaming.train_batches(
      source, augment=augment, batch_size=8, seed=1, worker_count=workers, start_batch=start)
  expected = take(batches(0, 0), 12)
  for got, batch in zip(take(batches(2, 5), 7), expected[5:], strict=True):
    np.testing.assert_array_equal(got['image'], batch['image'])
    np.testing.assert_array_equal(got['label'], batch['label'])
  assert not np.array_equal(expected[0]['image'], expected[8]['image'])  # Epoch 2 differs.


def test_every_epoch_is_a_new_permutation_of_the_split():
  augment = streaming.HostAugment(image_shape=(4, 4, 1))
  batches = take(streaming.train_batches(numbered_source(40), augment=augment, batch_size=8,
                                         seed=3, worker_count=0), 10)
  epochs = [sum((example_indexes(b) for b in batches[e * 5:(e + 1) * 5]), []) for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(40))


def test_processes_share_each_global_batch(monkeypatch):
  """With P processes, process p takes the p-th block of the same global batches: the rows its
  devices hold, so that each row of a global batch is the same example for any P."""
  augment = streaming.HostAugment(image_shape=(4, 4, 1))
  global_batches = take(streaming.train_batches(numbered_source(48), augment=augment,
                                                batch_size=8, seed=0, worker_count=0), 9)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shares = []
  for process in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda process=process: process)
    shares.append(take(streaming.train_batches(numbered_source(48), augment=augment,
                                               batch_size=4, seed=0, worker_count=0), 9))
  for whole, first, second in zip(global_batches, *shares, strict=True):
    assert example_indexes(first) == example_indexes(whole)[:4]
    assert example_indexes(second) == example_indexes(whole)[4:]


def test_a_stream_resume_refuses_a_changed_batch_size_or_split():
  feed = feeds.StreamTrainFeed(parallel.make_strategy('jit', 1), None, make_batches=None,
                               seed=0, batch_size=64, num_examples=1000)
  position = {'stream_batch': 7, 'batch_size': 64, 'num_examples': 1000}
  feed.restore(7, position, 64)
  assert feed.position(7) == position
  with pytest.raises(ConfigError, match='written with 128 batch_size, this run has 64'):
    feed.restore(7, {**position, 'batch_size': 128}, 64)
  with pytest.raises(ConfigError, match='written with 999 training examples'):
    feed.restore(7, {**position, 'num_examples': 999}, 64)
  with pytest.raises(ConfigError, match='data_placement=device'):
    feed.restore(7, {'epoch': 0, 'batch_in_epoch': 7}, 64)


def test_a_streamed_run_resumed_with_its_data_in_device_memory_is_told_to_stream(fake_tfds,
                                                                                tmp_path):
  trainer.train_and_evaluate(stream_config(num_train_steps=8), str(tmp_path))
  with pytest.raises(ConfigError, match='the checkpoint at step 8 was written by a run that '
                                        'streamed its data; resume with '
                                        '--config.data_placement=stream'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=16, data_placement='device'),
                               str(tmp_path))


def test_a_pipeline_error_behind_a_full_queue_reaches_the_loop_and_close_returns():
  failed = threading.Event()

  def make_batches(start_batch):
    for index in range(start_batch, start_batch + 3):  # The first, then enough to fill the queue.
      yield {'image': np.full((8, 4, 4, 1), index, np.uint8), 'label': np.zeros(8, np.int32)}
    failed.set()
    raise DataError('cannot decode example 24')

  feed = feeds.StreamTrainFeed(parallel.make_strategy('jit', 1), None, make_batches, seed=0,
                               batch_size=8, num_examples=64)
  feed.warm_up(0)
  assert failed.wait(timeout=60)
  batches = [int(feed.args(None, None, step, 1)[-1]['image'][0, 0, 0, 0]) for step in range(3)]
  assert batches == [0, 1, 2]  # The first, taken while warming up, then the queued ones.
  with pytest.raises(DataError, match='cannot decode example 24'):
    feed.args(None, None, 3, 1)
  # Again with the queue full when the error comes: the thread must still end when closed.
  failed.clear()
  feed.restore(0, {'stream_batch': 0, 'batch_size': 8, 'num_examples': 64}, 8)
  feed.warm_up(0)
  assert failed.wait(timeout=60)
  closing = threading.Thread(target=feed.close)
  closing.start()
  closing.join(timeout=60)  # A hang detector: without it a deadlock would stall the suite.
  assert not closing.is_alive(), 'close() did not return'


def test_a_run_that_fails_midway_stops_its_data_workers(fake_tfds, tmp_path, monkeypatch):
  """Whatever ends a run, its Grain workers are stopped then, not left to the garbage collector
  or the end of the process."""
  def failing_evaluation(*unused_args):
    assert multiprocessing.active_children()  # The training stream's worker, still reading.
    raise RuntimeError('evaluation failed')

  monkeypatch.setattr(trainer, 'evaluate', failing_evaluation)
  with pytest.raises(RuntimeError, match='evaluation failed'):
    trainer.train_and_evaluate(stream_config(num_train_steps=8, eval_every_steps=4,
                                             data_workers=1), str(tmp_path))
  assert not multiprocessing.active_children()


def test_a_checkpoint_of_the_earlier_dataloader_stream_resumes_at_its_step(capsys):
  feed = feeds.StreamTrainFeed(parallel.make_strategy('jit', 1), None, make_batches=None,
                               seed=0, batch_size=64, num_examples=1000)
  feed.restore(30, {'grain_iterator': '{"last_seen_indices": {}}', 'data_workers': 2}, 64)
  assert feed.position(30)['stream_batch'] == 30
  assert 'continuing at batch 30 of the stream' in capsys.readouterr().out


def test_eval_batches_pad_and_mask_the_last_batch():
  source = ArraySource(*learnable_images(21, (4, 4, 1), 3, seed=0))
  batches = list(streaming.eval_batches(source, image_shape=(4, 4, 1), batch_size=8,
                                        worker_count=0))
  assert len(batches) == 3
  assert [int(b['mask'].sum()) for b in batches] == [8, 8, 5]
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, [source[i]['label'] for i in range(21)])


@pytest.mark.parametrize('shape', [(40, 60, 3), (100, 30, 3), (32, 32, 3)])
def test_random_resized_crop_has_the_target_size_and_is_deterministic(shape):
  image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
  crop = lambda seed: image_ops.random_resized_crop(image, 24, 24, np.random.default_rng(seed))
  assert crop(1).shape == (24, 24, 3) and crop(1).dtype == np.uint8
  np.testing.assert_array_equal(crop(1), crop(1))
  assert not np.array_equal(crop(1), crop(2))


def test_centre_crop_keeps_the_middle():
  """The shorter side is resized to the target / 0.875 and the middle cut out: nothing is
  squashed."""
  image = np.random.default_rng(0).integers(0, 256, (80, 120, 1), np.uint8)
  out = image_ops.resize_and_center_crop(image, 40, 40)
  # 80x120 scaled by 40 / 0.875 / 80 is 46x69 (rounded); its middle 40x40 starts at (3, 14).
  np.testing.assert_array_equal(out, image_ops.resize(image, 46, 69)[3:43, 14:54])
  tall = np.swapaxes(image, 0, 1)
  np.testing.assert_array_equal(image_ops.resize_and_center_crop(tall, 40, 40),
                                image_ops.resize(tall, 69, 46)[14:54, 3:43])
