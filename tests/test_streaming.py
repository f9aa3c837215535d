"""Streaming through Grain: training, full evaluation, host augmentation, exact resume."""

import numpy as np
import pytest

from jaxcnn import trainer
from jaxcnn.data import image_ops, streaming
from jaxcnn.metrics import read_metrics

from conftest import FakeSource, learnable_images, tiny_config


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
  config = tiny_config(num_train_steps=8, eval_every_steps=8)
  device = trainer.train_and_evaluate(config, str(tmp_path / 'device'))
  streamed = trainer.train_and_evaluate(stream_config(num_train_steps=8, eval_every_steps=8),
                                        str(tmp_path / 'device'))  # Resumes: evaluates only.
  assert streamed['step'] == device['step']
  np.testing.assert_allclose(streamed['test/accuracy'], device['test/accuracy'])
  np.testing.assert_allclose(streamed['test/loss'], device['test/loss'], rtol=1e-6)


def test_resumed_stream_continues_with_the_same_batches(fake_tfds, tmp_path):
  config = stream_config(model='keras_cnn', lr_schedule='constant', num_train_steps=48,
                         log_every_steps=4, eval_every_steps=12, **{'augment.crop_padding': 2})
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


def test_a_resume_keeps_the_checkpoints_worker_count(fake_tfds, tmp_path, capsys):
  """Grain batches within each worker: resumed with another data_workers, the run goes on with
  the checkpoint's count, and so with the same batches (instead of failing in Grain)."""
  config = stream_config(model='lenet5', lr_schedule='constant', num_train_steps=16,
                         log_every_steps=4, eval_every_steps=8, data_workers=2)
  trainer.train_and_evaluate(config, str(tmp_path / 'whole'))
  config.num_train_steps = 8
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  config.num_train_steps, config.data_workers = 16, 0
  trainer.train_and_evaluate(config, str(tmp_path / 'halves'))
  assert "resuming with the checkpoint's 2 data workers (not 0)" in capsys.readouterr().out
  losses = lambda name: [(r['step'], r['train/loss']) for r in read_metrics(str(tmp_path / name))
                         if 'train/loss' in r]
  assert losses('halves') == losses('whole')


def test_grain_iterator_state_resumes_with_worker_processes():
  source = FakeSource(*learnable_images(64, (8, 8, 1), 10, seed=0))
  augment = streaming.HostAugment(image_shape=(8, 8, 1), crop_padding=2, flip=True)
  make = lambda: iter(streaming.train_loader(source, augment=augment, batch_size=8, seed=1,
                                             worker_count=2))
  first = make()
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(2)]
  second = make()
  second.set_state(state)
  for batch in expected:
    got = next(second)
    np.testing.assert_array_equal(got['image'], batch['image'])
    np.testing.assert_array_equal(got['label'], batch['label'])
  del first, second


def test_eval_batches_pad_and_mask_the_last_batch():
  source = FakeSource(*learnable_images(21, (4, 4, 1), 3, seed=0))
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
  image = np.zeros((80, 120, 1), np.uint8)
  image[30:50, 50:70] = 255  # A bright square in the middle.
  out = image_ops.resize_and_center_crop(image, 40, 40)
  assert out.shape == (40, 40, 1)
  assert out[20, 20, 0] == 255 and out[0, 0, 0] == 0
