"""The data path: TFDS preparation checks, device-resident splits, augmentation."""

import dataclasses
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import trainer
from jaxcnn.data import augment, decoded_index, device_data, pipeline, tfds_data
from jaxcnn.errors import ConfigError, DataError, UserError

from conftest import MNIST_MANUAL_DIR, REPO_ROOT, tiny_config


# ---------------------------------------------------------------- TFDS

def test_unprepared_dataset_without_network_fails_fast_naming_manual_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, '_hosts_reachable', lambda builder: False)  # Offline, as in CI.
  # Fast: no TensorFlow child is started to find out.
  monkeypatch.setattr(tfds_data, '_run_keeping_error_line',
                      lambda command: pytest.fail(f'started {command}'))
  with pytest.raises(DataError) as error:
    tfds_data.ensure_prepared('mnist', data_dir=str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
               't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
    assert name in message


def test_a_wrong_file_in_manual_dir_is_a_one_line_error_naming_it(tmp_path, capfd):
  """TFDS's checksum error in the TensorFlow child becomes our one line, with no traceback."""
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  for path in MNIST_MANUAL_DIR.glob('*-ubyte.gz'):
    (manual_dir / path.name).write_bytes(path.read_bytes())
  wrong = manual_dir / 't10k-labels-idx1-ubyte.gz'
  wrong.write_bytes(wrong.read_bytes()[:1000])
  with pytest.raises(DataError) as error:
    tfds_data.ensure_prepared('mnist', data_dir=str(tmp_path / 'tfds'),
                              manual_dir=str(manual_dir))
  assert str(error.value).startswith(
      f"{wrong} is not the file dataset 'mnist' is made from: it has 1000 bytes where the "
      'official file has ')
  assert 'Traceback' not in capfd.readouterr().err


def test_a_data_dir_that_cannot_be_a_folder_is_named_before_preparing(tmp_path, monkeypatch):
  """Found by jaxcnn, in one line, not by the TensorFlow child's traceback from os.makedirs."""
  monkeypatch.setattr(tfds_data, '_run_keeping_error_line',
                      lambda command: pytest.fail(f'started {command}'))
  (tmp_path / 'a_file').write_text('')
  message = "{}data_dir '{}' is not a folder: it, or a folder above it, is a file"
  with pytest.raises(UserError, match=re.escape(message.format('--config.', tmp_path / 'a_file'))):
    tfds_data.ensure_prepared('mnist', str(tmp_path / 'a_file'), str(MNIST_MANUAL_DIR))
  result = subprocess.run(
      [sys.executable, '-m', 'jaxcnn.data.prepare', 'mnist', f'--data_dir={tmp_path}/a_file/tfds',
       f'--manual_dir={MNIST_MANUAL_DIR}'], cwd=REPO_ROOT, capture_output=True, text=True,
      check=False)
  assert (result.returncode, result.stderr) == (
      2, f"error: {message.format('--', tmp_path / 'a_file' / 'tfds')}; give a new or existing "
      'folder\n')


def test_the_prepare_child_error_line_is_kept_and_the_rest_passed_through_as_it_comes(capfd):
  child = ("import sys; sys.stderr.write('50%\\r'); sys.stderr.flush(); "
           "sys.stderr.write('100%\\nwarning: w\\nerror: the bad thing\\n'); sys.exit(2)")
  status, error = tfds_data._run_keeping_error_line([sys.executable, '-c', child])
  assert (status, error) == (2, 'the bad thing')
  assert capfd.readouterr().err == '50%\r100%\nwarning: w\n'


def test_manual_dir_with_every_file_needs_no_network(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, '_hosts_reachable', lambda builder: pytest.fail('probed'))
  builder = tfds_data.get_builder('mnist', str(tmp_path))
  assert tfds_data.check_can_prepare(builder, str(MNIST_MANUAL_DIR)) is True


def test_preparing_by_hand_says_what_it_did_in_one_line(tmp_path):
  command = [sys.executable, '-m', 'jaxcnn.data.prepare', 'mnist', f'--data_dir={tmp_path}',
             f'--manual_dir={MNIST_MANUAL_DIR}', '--offline']
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == f'prepared mnist/3.0.1 in {tmp_path}/mnist/3.0.1\n'  # No TFDS lines.


def test_offline_never_probes_the_network_and_names_the_flag(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, '_hosts_reachable', lambda builder: pytest.fail('probed'))
  builder = tfds_data.get_builder('mnist', str(tmp_path))
  with pytest.raises(DataError, match=r'not downloaded \(offline\); .* point --manual_dir at'):
    tfds_data.check_can_prepare(builder, str(tmp_path / 'empty'), offline=True,
                                flag_prefix='--')
  assert tfds_data.check_can_prepare(builder, str(MNIST_MANUAL_DIR), offline=True) is True
  # So a :smoke run given the files prepares the real dataset instead of a synthetic stand-in.
  assert pipeline._preparable_offline(builder, str(MNIST_MANUAL_DIR))
  assert not pipeline._preparable_offline(builder, str(tmp_path / 'empty'))


def test_unknown_dataset_is_a_config_error(fake_tfds):  # Unknown splits: tests/test_cli.py.
  with pytest.raises(ConfigError, match="unknown dataset 'mnist_v9'"):
    tfds_data.get_builder('mnist_v9')


@pytest.mark.parametrize('name, reason', [
    ('mnist:9.9.9', 'Dataset mnist cannot be loaded at version 9.9.9, only: 3.0.1'),
    ('mnist/3.0.1', 'BuilderConfig 3.0.1 not found'),
    ('mnist:', 'Parsing builder name string mnist: failed'),
])
def test_a_known_dataset_with_a_version_or_config_it_lacks_is_a_config_error(tmp_path, name,
                                                                             reason):
  with pytest.raises(ConfigError, match=re.escape(f'dataset {name!r} cannot be built: {reason}')):
    tfds_data.get_builder(name, str(tmp_path))
  assert tfds_data.get_builder('mnist:3.0.1', str(tmp_path)).name == 'mnist'


def test_a_dataset_without_images_and_labels_is_named_as_such(tmp_path):
  builder = tfds_data.get_builder('celeb_a', str(tmp_path))  # Images, but attributes, no label.
  with pytest.raises(DataError, match="dataset 'celeb_a' is not an image-classification "
                                      "dataset: it has no 'image' and 'label' features"):
    tfds_data.dataset_info(builder)


def test_input_spec_is_the_shape_training_sees_without_reading_images(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, 'read_split', lambda *a, **k: pytest.fail('images were read'))
  data_dir = str(tmp_path)  # Nothing is prepared there: metadata alone gives the answers.
  assert pipeline.input_spec(tiny_config(data_dir=data_dir)) == ((28, 28, 1), 10)
  assert pipeline.input_spec(tiny_config(data_dir=data_dir, image_size=32)) == ((32, 32, 1), 10)
  synthetic = tiny_config(dataset='synthetic', **{'synthetic.image_shape': (20, 24, 3),
                                                  'synthetic.num_classes': 7})
  assert pipeline.input_spec(synthetic) == ((20, 24, 3), 7)
  # ImageNet's images vary in size: the model's input is image_size, or a one-line error.
  imagenet = tiny_config(data_dir=data_dir, dataset='imagenet2012')
  with pytest.raises(ConfigError, match='--config.image_size'):
    pipeline.input_spec(imagenet)
  imagenet.image_size = 160
  assert pipeline.input_spec(imagenet) == ((160, 160, 3), 1000)


def test_decoded_cache_is_written_whole_and_read_back(tmp_path):
  path = str(tmp_path / 'sub' / 'x.npz')
  images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
  tfds_data._save_atomically(path, images=images, labels=np.array([3, 4], np.int32))
  assert os.listdir(tmp_path / 'sub') == ['x.npz']  # No temporary file left behind.
  with np.load(path, allow_pickle=False) as arrays:
    np.testing.assert_array_equal(arrays['images'], images)


def test_recorded_dataset_loads_again_without_tfds_until_it_is_prepared_anew(
    mnist_data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  config = tiny_config(data_dir=str(mnist_data_dir), eval_batch_size=1000)
  first = pipeline.load_data(config, train=False)  # Decodes the test split and records it.

  def no_tfds(*args, **kwargs):
    raise AssertionError('TFDS was asked for a recorded dataset')

  monkeypatch.setattr(tfds_data, 'get_builder', no_tfds)
  pipeline.check_dataset(config)
  again = pipeline.load_data(config, train=False)
  assert (again.name, again.image_shape, again.num_classes, again.class_names,
          again.num_eval_examples, again.placement) == (
              first.name, first.image_shape, first.num_classes, first.class_names,
              10_000, 'device')
  np.testing.assert_array_equal(again.eval.images, first.eval.images)
  np.testing.assert_array_equal(again.eval.labels, first.eval.labels)
  # Another image size was never decoded: only TFDS can provide it.
  with pytest.raises(AssertionError, match='TFDS was asked'):
    pipeline.load_data(tiny_config(data_dir=str(mnist_data_dir), image_size=32), train=False)
  # Preparing the dataset again rewrites its dataset_info.json: the record no longer holds.
  info_file = next(mnist_data_dir.glob('mnist/*/dataset_info.json'))
  original = info_file.read_bytes()
  try:
    info_file.write_bytes(original + b' ')
    with pytest.raises(AssertionError, match='TFDS was asked'):
      pipeline.load_data(config, train=False)
  finally:
    info_file.write_bytes(original)


def test_a_damaged_decoded_cache_is_decoded_again(mnist_data_dir, tmp_path, monkeypatch, capfd):
  """A truncated cache file (a full disk, a crash on a file system without atomic renames) costs
  one decode, on the recorded path and on TFDS's, never the run."""
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  config = tiny_config(data_dir=str(mnist_data_dir), eval_batch_size=1000)
  first = pipeline.load_data(config, train=False)
  (cached,) = (tmp_path / 'cache' / 'decoded').glob('*.npz')
  for _ in range(2):  # The first load finds it on the recorded path, the second on TFDS's.
    cached.write_bytes(cached.read_bytes()[:1000])
    again = pipeline.load_data(config, train=False)
    np.testing.assert_array_equal(again.eval.images, first.eval.images)
    assert f'warning: removing the damaged cache file {cached}' in capfd.readouterr().err
    monkeypatch.setattr(decoded_index, 'lookup', lambda *args: None)
  with np.load(cached, allow_pickle=False) as arrays:  # Written whole again.
    np.testing.assert_array_equal(arrays['images'], first.eval.images)


@pytest.mark.parametrize('placement', ['device', 'stream'])
def test_a_slice_of_train_holds_out_a_validation_set(mnist_data_dir, tmp_path, monkeypatch,
                                                      placement):
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  config = tiny_config(data_dir=str(mnist_data_dir), train_split='train[:59000]',
                       eval_split='train[59000:]', data_placement=placement)
  data = pipeline.load_data(config)
  assert (data.num_train_examples, data.num_eval_examples) == (59_000, 1_000)
  whole = tfds_data.get_builder('mnist', str(mnist_data_dir)).as_data_source(split='train')
  held_out = data.eval.images[0] if placement == 'device' else data.eval[0]['image']
  np.testing.assert_array_equal(held_out, whole[59_000]['image'])  # The 59,001st of train.
  config.eval_split = 'train[:90]%'
  with pytest.raises(ConfigError, match=r"dataset 'mnist/3.0.1' cannot read split "
                                        r"'train\[:90\]%'"):
    pipeline.load_data(config)
  config.eval_split = 'train[59000:59000]'  # A spec TFDS reads, of no example at all.
  with pytest.raises(ConfigError, match=re.escape(
      "split 'train[59000:59000]' of dataset 'mnist/3.0.1' selects no examples; give a split or "
      'slice that holds some (examples per split: test 10000, train 60000)')):
    pipeline.load_data(config)


def test_auto_placement_streams_only_what_device_memory_cannot_hold():
  config = tiny_config(data_placement='auto')
  budget = pipeline.device_data_budget()
  imagenet = types.SimpleNamespace(split_sizes={'train': 1_281_167, 'validation': 50_000})
  config.train_split, config.eval_split = 'train', 'validation'
  assert pipeline._placement(config, imagenet, (224, 224, 3), budget) == 'stream'  # About 200 GB.
  mnist = types.SimpleNamespace(split_sizes={'train': 60_000, 'test': 10_000})
  config.eval_split = 'test'
  assert pipeline._placement(config, mnist, (28, 28, 1), budget) == 'device'  # 55 MB.
  config.data_placement = 'stream'  # Asked for by name, it is never overruled.
  assert pipeline._placement(config, mnist, (28, 28, 1), budget) == 'stream'


def test_every_process_places_data_by_the_least_device_memory_of_them_all(monkeypatch):
  """Processes that decided apart could feed their steps differently: on a host whose device
  holds less, MNIST would stream while the others keep it in device memory."""
  own = pipeline.device_data_budget()
  gathered = []

  def allgather(value):
    gathered.append(value)
    return np.array([value, 40e6], np.float32)  # Another host's device, with 160 MB free.

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(pipeline.multihost_utils, 'process_allgather', allgather)
  assert pipeline.device_data_budget() == pytest.approx(40e6)
  assert gathered == [pytest.approx(own)]
  mnist = types.SimpleNamespace(split_sizes={'train': 60_000, 'test': 10_000})
  assert pipeline._placement(tiny_config(data_placement='auto'), mnist, (28, 28, 1),
                             pipeline.device_data_budget()) == 'stream'


def test_fake_dataset_reads_with_the_real_shape(fake_tfds):
  fake_tfds({'train': 40, 'test': 7})
  info, splits = tfds_data.load_splits('cifar10', ['train', 'test'])
  assert info.image_shape == (32, 32, 3) and info.num_classes == 10
  images, labels = splits['test']
  assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.max() < 10


# ---------------------------------------------------------------- Device-resident splits

def test_epoch_permutation_is_a_deterministic_permutation_per_epoch():
  seed = jnp.int32(3)
  first = np.asarray(device_data.epoch_permutation(seed, jnp.int32(0), 1000))
  np.testing.assert_array_equal(np.sort(first), np.arange(1000))
  np.testing.assert_array_equal(first, device_data.epoch_permutation(seed, jnp.int32(0), 1000))
  assert not np.array_equal(first, device_data.epoch_permutation(seed, jnp.int32(1), 1000))
  assert not np.array_equal(first, device_data.epoch_permutation(jnp.int32(4), jnp.int32(0), 1000))


def test_train_batches_follow_the_permutation():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 10
  split = device_data.pad_split(images, np.arange(10))
  permutation = device_data.epoch_permutation(jnp.int32(0), jnp.int32(0), 10)
  batch = device_data.train_batch(split, permutation, jnp.int32(4), 4)
  np.testing.assert_array_equal(batch['label'], np.asarray(permutation)[4:8])
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], np.asarray(permutation)[4:8] * 10)


def test_eval_split_is_padded_and_masked():
  split = device_data.pad_split(np.ones((10, 2, 2, 1), np.uint8), np.arange(10),
                                pad_to_multiple_of=4)
  assert split.images.shape[0] == 12 and split.num_examples == 10
  batch, mask = device_data.eval_batch(split, jnp.int32(8), 4)
  np.testing.assert_array_equal(mask, [True, True, False, False])
  np.testing.assert_array_equal(batch['label'][:2], [8, 9])


# ---------------------------------------------------------------- Augmentation

@pytest.mark.parametrize('mode', ['constant', 'reflect'])
def test_random_crop_is_a_shifted_window_of_the_padded_image(mode):
  images = jnp.asarray(np.random.default_rng(0).integers(1, 255, (16, 8, 8, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(0), 16)
  out = augment.random_crop_with_padding(images, keys, 2, mode)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode=mode)
  for image, cropped in zip(padded, np.asarray(out)):
    windows = [image[y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
    assert any(np.array_equal(w, cropped) for w in windows)
  shifted = sum(not np.array_equal(a, b) for a, b in zip(np.asarray(out), np.asarray(images)))
  assert shifted >= 10  # 24 of 25 offsets move the image.
  # The images hold no zero: zeros come from the padding alone, and reflection has none.
  assert (np.asarray(out) == 0).any() == (mode == 'constant')


def test_streamed_random_crop_pads_as_the_config_says():
  from jaxcnn.data import streaming  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(1, 255, (8, 8, 3), np.uint8)
  for mode in ('constant', 'reflect'):
    transform = streaming._TrainTransform(  # pylint: disable=protected-access
        streaming.HostAugment((8, 8, 3), crop_padding=2, pad_mode=mode), 'image', 'label')
    crops = [transform.random_map({'image': image, 'label': 0}, np.random.default_rng(seed))
             ['image'] for seed in range(20)]
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode=mode)
    windows = [padded[y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
    assert all(any(np.array_equal(w, crop) for w in windows) for crop in crops)
    assert any((crop == 0).any() for crop in crops) == (mode == 'constant')


def test_random_crop_and_flip_are_deterministic_per_key():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 255, (32, 8, 8, 1)), jnp.uint8)
  keys = lambda seed: augment.example_keys(jax.random.key(seed), 32)
  for fn in (lambda x, k: augment.random_crop_with_padding(x, k, 3),
             augment.random_flip_left_right):
    np.testing.assert_array_equal(fn(images, keys(5)), fn(images, keys(5)))
    assert not np.array_equal(fn(images, keys(5)), fn(images, keys(6)))


def test_flip_mirrors_about_half_of_the_images():
  images = jnp.asarray(np.random.default_rng(2).integers(0, 255, (200, 4, 4, 1)), jnp.uint8)
  out = np.asarray(augment.random_flip_left_right(images, augment.example_keys(jax.random.key(0), 200)))
  mirrored = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)]
  unchanged = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
  assert all(m or u for m, u in zip(mirrored, unchanged))
  assert 70 < sum(mirrored) < 130


def test_random_resized_crop_zooms_into_a_box_of_the_image():
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.integers(0, 255, (16, 24, 24, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(0), 16)
  out = augment.random_resized_crop(images, keys)
  assert out.shape == (16, 24, 24, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0 and float(out.max()) <= 255
  np.testing.assert_array_equal(out, augment.random_resized_crop(images, keys))
  assert not np.array_equal(out, augment.random_resized_crop(
      images, augment.example_keys(jax.random.key(1), 16)))
  # A constant image stays constant, whatever the box; a left/right split image keeps its sides.
  flat = augment.random_resized_crop(jnp.full((4, 24, 24, 1), 77, jnp.uint8), keys[:4])
  np.testing.assert_allclose(flat, 77, atol=1e-3)
  halves = jnp.concatenate([jnp.zeros((8, 24, 12, 1)), jnp.full((8, 24, 12, 1), 255.0)], axis=2)
  cropped = augment.random_resized_crop(halves, keys[:8])
  assert bool(jnp.all(cropped[:, :, 0] <= cropped[:, :, -1]))
  # Most boxes are smaller than the image: the crops differ from the image itself.
  assert sum(not np.allclose(o, i) for o, i in zip(np.asarray(out), np.asarray(images))) >= 12


def test_cutout_zeroes_a_square_clipped_at_the_edges_around_every_pixel_alike():
  images = jnp.ones((2000, 9, 7, 2))
  cut = np.asarray(augment.cutout(images, augment.example_keys(jax.random.key(0), 2000), 4))
  zero = cut[..., 0] == 0
  np.testing.assert_array_equal(zero, cut[..., 1] == 0)  # Every channel of a cut pixel.
  for image in zero:  # One square (rectangle where clipped) of at most 4 x 4 pixels.
    rows, cols = np.nonzero(image.any(1))[0], np.nonzero(image.any(0))[0]
    assert image.sum() == len(rows) * len(cols) and 2 <= len(rows) <= 4 and 2 <= len(cols) <= 4
    assert image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
  # The centre is uniform over the 63 pixels: a pixel away from the edges is in the squares of
  # 4x4 of them, a corner in those of 3x3 (centres up to 2 rows and columns in), within noise.
  assert abs(zero[:, 2:7, 2:5].mean() - 16 / 63) < 0.03
  assert abs(zero[:, 0, 0].mean() - 9 / 63) < 0.03
  # Normalised images: a cut pixel is the training mean. Evaluation leaves every pixel.
  preprocess = augment.Preprocessor(mean=(100.0,), std=(10.0,), cutout=4)
  pixels = jnp.full((8, 9, 7, 1), 120, jnp.uint8)
  trained = np.asarray(preprocess(pixels, jax.random.key(1), train=True))
  assert set(np.unique(trained)) == {0.0, 2.0}
  assert (np.asarray(preprocess(pixels, None, train=False)) == 2.0).all()
  # Cutout draws its own keys: turning it on leaves the crops and flips as they were.
  crops = dict(mean=(100.0,), std=(10.0,), crop_padding=2, flip=True)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 9, 7, 1)), jnp.uint8)
  with_cutout = augment.Preprocessor(**crops, cutout=3)(images, jax.random.key(2), train=True)
  without = augment.Preprocessor(**crops)(images, jax.random.key(2), train=True)
  kept = np.asarray(with_cutout) != 0
  np.testing.assert_array_equal(np.asarray(with_cutout)[kept], np.asarray(without)[kept])


def erased_boxes(erased: np.ndarray) -> list[tuple[int, int, int, int] | None]:
  """(top, left, height, width) of each image's one erased rectangle (None: nothing erased),
  asserting that what is erased is one rectangle across every channel."""
  boxes = []
  for image in erased:
    assert (image == image[..., :1]).all()
    pixels = image[..., 0]
    if not pixels.any():
      boxes.append(None)
      continue
    rows, cols = np.nonzero(pixels.any(1))[0], np.nonzero(pixels.any(0))[0]
    assert pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert pixels.sum() == len(rows) * len(cols)
    boxes.append((rows[0], cols[0], len(rows), len(cols)))
  return boxes


def test_random_erasing_erases_one_box_of_timms_sizes_with_the_probability():
  count, height, width = 3000, 20, 24
  images = jnp.full((count, height, width, 2), 7.0)
  keys = augment.example_keys(jax.random.key(0), count)
  erase = jax.jit(augment.random_erasing, static_argnums=(2, 3))
  out = np.asarray(erase(images, keys, 0.5, 'pixel'))
  boxes = erased_boxes(out != 7.0)
  erased = [box for box in boxes if box is not None]
  assert abs(len(erased) / count - 0.5) < 0.03
  tops, lefts, heights, widths = np.array(erased).T
  fractions = heights * widths / (height * width)
  # Areas of 2% to a third of the image (rounding the sides moves them a little), aspect
  # ratios of 0.3 to 3.3 either way, and the box anywhere it fits.
  assert fractions.min() >= 0.01 and fractions.max() <= 0.4
  assert abs(fractions.mean() - (0.02 + 1 / 3) / 2) < 0.02
  aspects = heights / widths
  assert aspects.min() > 0.2 and aspects.max() < 5 and (aspects < 0.6).any() and (aspects > 1.7).any()
  assert (tops + heights <= height).all() and (lefts + widths <= width).all()
  assert tops.min() == 0 and lefts.min() == 0 and (tops + heights).max() == height
  # 'pixel' fills each pixel and channel with a standard normal.
  noise = out[out != 7.0]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
  # The same keys draw the same boxes in every mode; 'rand' fills a channel with one value,
  # 'const' with zeros (the mean); 0 erases nothing and 1 every image.
  for mode in ('rand', 'const'):
    filled = np.asarray(erase(images, keys, 0.5, mode))
    assert erased_boxes(filled != 7.0) == boxes
  rand = np.asarray(erase(images, keys, 0.5, 'rand'))[:50]
  for image, box in zip(rand, boxes[:50]):
    if box is not None:
      top, left, box_height, box_width = box
      inside = image[top:top + box_height, left:left + box_width]
      assert (inside == inside[0, 0]).all() and inside[0, 0, 0] != inside[0, 0, 1]
  assert (np.asarray(erase(images, keys, 0.5, 'const'))[out != 7.0] == 0).all()
  np.testing.assert_array_equal(erase(images, keys, 0.0, 'pixel'), images)
  assert None not in erased_boxes(np.asarray(erase(images, keys, 1.0, 'pixel')) != 7.0)
  with pytest.raises(ValueError, match="random erasing mode must be one of .*, got 'noise'"):
    augment.random_erasing(images, keys, 0.5, 'noise')


def test_random_erasing_comes_last_in_training_from_a_stream_of_its_own():
  crops = dict(mean=(100.0,), std=(10.0,), crop_padding=2, flip=True, cutout=3)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 9, 7, 1)), jnp.uint8)
  key = jax.random.key(2)
  with_erasing = augment.Preprocessor(**crops, random_erasing=1.0, random_erasing_mode='const')

  @jax.jit
  def both(images, key):
    expected = augment.random_erasing(
        augment.Preprocessor(**crops)(images, key, train=True),
        augment.example_keys(jax.random.fold_in(key, 5), 8), 1.0, 'const')
    return with_erasing(images, key, train=True), expected

  np.testing.assert_array_equal(*both(images, key))
  np.testing.assert_array_equal(with_erasing(images, None, train=False),
                                with_erasing.normalize(images))


def test_augmentation_of_a_slice_equals_the_slice_of_the_augmented_batch():
  """Per-example keys: a device augmenting its shard draws what one device draws for the batch."""
  images = jnp.asarray(np.random.default_rng(4).integers(0, 255, (16, 8, 8, 3)), jnp.uint8)
  preprocess = augment.Preprocessor(mean=(0.0,) * 3, std=(1.0,) * 3, crop_padding=2, flip=True,
                                    inception_crop=True, randaugment_ops=2, trivialaugment=True,
                                    autoaugment='svhn', augmix=True, cutout=3,
                                    random_erasing=0.5)
  key = jax.random.key(9)
  # Compiled (once for the batch, once for a shard): eagerly, each operation compiles on its own.
  augmented = jax.jit(lambda images, first: preprocess(images, key, train=True,
                                                        first_example=first))
  whole = augmented(images, 0)
  for shard in range(4):
    part = augmented(images[4 * shard:4 * shard + 4], 4 * shard)
    np.testing.assert_array_equal(part, whole[4 * shard:4 * shard + 4])


def test_normalisation_uses_the_training_statistics():
  images = np.random.default_rng(3).integers(0, 255, (64, 6, 6, 3)).astype(np.uint8)
  mean, std = augment.channel_stats(images)
  np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0), rtol=1e-9)
  np.testing.assert_allclose(std, images.reshape(-1, 3).std(0), rtol=1e-9)
  normalized = augment.Preprocessor(mean=mean, std=std)(jnp.asarray(images), None, train=False)
  np.testing.assert_allclose(np.asarray(normalized).reshape(-1, 3).mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(normalized).reshape(-1, 3).std(0), 1, atol=1e-4)
  bf16 = augment.Preprocessor(mean=mean, std=std, dtype='bfloat16').normalize(jnp.asarray(images))
  assert bf16.dtype == jnp.bfloat16


def test_streamed_statistics_sample_the_whole_split_not_its_first_images():
  """An image folder is stored sorted by class: its first 1,024 images may all be one class."""
  from jaxcnn.data.synthetic import ArraySource
  images = np.concatenate([np.full((1500, 4, 4, 1), 20, np.uint8),
                           np.full((1500, 4, 4, 1), 230, np.uint8)])
  source = ArraySource(images, np.repeat(np.arange(2), 1500))
  (mean,), (std,) = pipeline._sample_stats(source, (4, 4, 1), 'image')  # pylint: disable=protected-access
  assert mean == pytest.approx(125, abs=10) and std == pytest.approx(105, abs=5)
  indices = pipeline.sample_indices(3000, 1024)
  assert len(set(indices.tolist())) == 1024 and list(indices) == sorted(indices)
  assert list(pipeline.sample_indices(10, 1024)) == list(range(10))


@pytest.mark.parametrize('train_split, eval_split, shared', [
    ('train', 'train[90%:]', 6_000), ('train[:90%]', 'train[90%:]', 0), ('train', 'test', 0),
    ('train[:50%]+test', 'test[:100]+train[40%:60%]', 100 + 6_000), ('train', 'train', 60_000),
    # Specs TFDS cannot read: reading them later is a one-line error, not this count's.
    ('train', 'train[50000:70000]', 0), ('train', 'train[90%:', 0), ('train', 'test[:20000]', 0)])
def test_examples_shared_by_the_train_and_eval_splits_are_counted(train_split, eval_split, shared):
  info = tfds_data.DatasetInfo(name='mnist', image_shape=(28, 28, 1), num_classes=10,
                               class_names=None, split_sizes={'train': 60_000, 'test': 10_000},
                               image_key='image', label_key='label')
  assert tfds_data.shared_examples(info, train_split, eval_split) == shared
  no_sizes = dataclasses.replace(info, split_sizes={})  # A mocked dataset: nothing known.
  assert tfds_data.shared_examples(no_sizes, train_split, eval_split) == 0


def test_counting_shared_examples_of_different_splits_needs_no_tfds():
  """A run that reads its decoded cache never imports TFDS; the check must not either."""
  code = ('import sys; from jaxcnn.data import tfds_data; '
          "info = tfds_data.DatasetInfo('mnist', (28, 28, 1), 10, None, "
          "{'train': 60000, 'test': 10000}, 'image', 'label'); "
          "print(tfds_data.shared_examples(info, 'train[:90%]', 'test'), "
          "'tensorflow_datasets' in sys.modules)")
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
  assert result.stdout.split() == ['0', 'False']


def test_training_warns_of_an_eval_split_inside_the_train_split(mnist_data_dir, tmp_path, capsys):
  trainer.train_and_evaluate(tiny_config(num_train_steps=1, data_dir=str(mnist_data_dir),
                                         eval_split='train[99%:]'), str(tmp_path))
  warnings = [line for line in capsys.readouterr().err.splitlines() if 'shares' in line]
  assert warnings == [
      "warning: eval_split 'train[99%:]' shares 600 examples with train_split 'train': its "
      "accuracy is partly on training data; hold them out of train_split (e.g. 'train[:90%]' "
      "beside 'train[90%:]')"]
