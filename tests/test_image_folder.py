"""A folder of the user's own images, prepared through TFDS, with a corrupt file among them."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxcnn import cli, trainer
from jaxcnn.data import image_folder
from jaxcnn.errors import ConfigError, DataError, UserError

from conftest import REPO_ROOT, learnable_images


def make_folder(root, counts, size=24, seed=0):
  """ROOT/<split>/<class>/*.png|jpg of learnable images in two classes, 'cat' and 'dog'."""
  for split_index, (split, count) in enumerate(counts.items()):
    images, labels = learnable_images(count, (size, size, 3), 2, seed + split_index)
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = os.path.join(root, split, ('cat', 'dog')[label])
      os.makedirs(folder, exist_ok=True)
      # Mixed sizes, formats and modes, as real folders have.
      picture = Image.fromarray(image).resize((size + 8 * (i % 3), size))
      if i % 4 == 1:
        picture.convert('L').save(os.path.join(folder, f'{i}.png'))
      else:
        picture.save(os.path.join(folder, f'{i}.{"jpg" if i % 2 else "png"}'), quality=95)


def test_listing_names_files_and_the_check_skips_unreadable_images(tmp_path, capfd):
  make_folder(tmp_path, {'train': 12, 'test': 4})
  broken = tmp_path / 'train' / 'cat' / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8 not really a jpeg')
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  pixels = np.full((8, 8), 100, np.uint8)
  for name in ('scan.tif', 'scan.TIFF', 'frame.pgm', 'frame.ppm'):  # torchvision's too.
    Image.fromarray(pixels).convert('RGB' if name.endswith('ppm') else 'L').save(
        tmp_path / 'train' / 'dog' / name)
  listed = image_folder.list_folder(str(tmp_path))
  assert listed.class_names == ('cat', 'dog')
  assert sorted(listed.splits) == ['test', 'train']
  assert len(listed.splits['train']) == 17 and len(listed.splits['test']) == 4
  assert capfd.readouterr().err == ''  # Listing opens no file.
  listing = image_folder.without_unreadable(listed)
  assert len(listing.splits['train']) == 16 and listing.splits['test'] == listed.splits['test']
  assert (str(broken), 0) in listed.splits['train']
  assert (str(broken), 0) not in listing.splits['train']
  assert listing.unreadable == (str(broken),)
  assert f'warning: skipping unreadable image {broken}:' in capfd.readouterr().err
  (tmp_path / 'only_broken' / 'train' / 'cat').mkdir(parents=True)
  (tmp_path / 'only_broken' / 'train' / 'cat' / 'a.png').write_bytes(b'\x89PNG')
  with pytest.raises(DataError, match="image folder '.*only_broken' has no readable images"):
    image_folder.without_unreadable(image_folder.list_folder(str(tmp_path / 'only_broken')))


def test_a_folder_without_the_layout_is_a_config_error(tmp_path):
  (tmp_path / 'just_images').mkdir()
  with pytest.raises(ConfigError, match='ROOT/<split>/<class>'):
    image_folder.list_folder(str(tmp_path / 'just_images'))
  with pytest.raises(ConfigError, match="'image_folder'"):
    image_folder.list_folder(str(tmp_path / 'missing'))


def test_layout_mistakes_are_named_and_hidden_folders_and_subfolders_are_handled(tmp_path):
  root = tmp_path / 'images'
  make_folder(root, {'train': 8, 'test': 4})
  # Tools' hidden folders are neither splits nor classes.
  (root / '.ipynb_checkpoints' / 'cat').mkdir(parents=True)
  (root / 'train' / '.ipynb_checkpoints').mkdir()
  # A class's images may be sorted into subfolders of its folder.
  nested = root / 'train' / 'dog' / '2024' / 'march'
  nested.mkdir(parents=True)
  Image.new('RGB', (24, 24)).save(nested / 'deep.png')
  listed = image_folder.list_folder(str(root))
  assert listed.class_names == ('cat', 'dog') and sorted(listed.splits) == ['test', 'train']
  assert image_folder.split_folders(str(root)) == ['test', 'train']
  assert (str(nested / 'deep.png'), 1) in listed.splits['train']

  (root / 'test' / 'bird').mkdir()  # A class with no image anywhere: an output never trained.
  with pytest.raises(DataError, match="has class folders with no image in any split: bird; "):
    image_folder.list_folder(str(root))

  # image_folder pointed at a split folder: its class folders look like splits without classes.
  with pytest.raises(ConfigError, match="its folders cat, dog hold images themselves, as class "
                                        'folders do: point image_folder at a folder holding '
                                        'split folders'):
    image_folder.list_folder(str(root / 'test'))


def test_the_check_names_loose_images_and_missing_classes_and_skips_broken_links(tmp_path,
                                                                                  capfd):
  root = tmp_path / 'images'
  for split, classes in (('train', ('cat', 'dog')), ('test', ('cat',))):
    for name in classes:
      (root / split / name).mkdir(parents=True)
      Image.new('RGB', (20, 30)).save(root / split / name / 'a.png')
  Image.new('L', (20, 30)).save(root / 'train' / 'loose.png')
  os.symlink(tmp_path / 'moved_away.jpg', root / 'train' / 'cat' / 'link.jpg')
  listed = image_folder.list_folder(str(root))
  assert listed.fingerprint()  # A broken link does not stop the listing.
  checked = image_folder.without_unreadable(listed)
  err = capfd.readouterr().err
  assert (f'warning: leaving out the images directly in {root}/train, outside any class folder '
          f'(1, e.g. {root}/train/loose.png)') in err
  assert f'warning: skipping unreadable image {root}/train/cat/link.jpg: FileNotFoundError' in err
  assert ("warning: image folder split 'test' has no readable images of classes dog, which "
          'other splits have') in err
  assert checked.unreadable == (str(root / 'train' / 'cat' / 'link.jpg'),)
  assert checked.image_size == (30, 20)  # (height, width) when every image has it.
  Image.new('RGB', (21, 30)).save(root / 'train' / 'dog' / 'b.png')
  assert image_folder.without_unreadable(image_folder.list_folder(str(root))).image_size is None


def test_images_of_one_size_train_at_their_size_and_a_split_without_images_is_named(tmp_path):
  from jaxcnn.data import pipeline
  root = tmp_path / 'images'
  pixels = np.random.default_rng(0).integers(0, 256, (18, 26, 3), np.uint8)
  for split in ('train', 'test'):
    (root / split / 'cat').mkdir(parents=True)
    Image.fromarray(pixels).save(root / split / 'cat' / 'photo.jpg', quality=90)  # Own bytes.
    Image.fromarray(pixels[..., 0]).save(root / split / 'cat' / 'grey.png')  # Made RGB.
  (root / 'val' / 'cat').mkdir(parents=True)
  (root / 'val' / 'cat' / 'broken.png').write_bytes(b'\x89PNG')
  config = cli.load_config_file(f'{REPO_ROOT}/configs/imagefolder.py')
  config.image_folder, config.data_dir, config.image_size = str(root), str(tmp_path / 'tfds'), 0
  assert pipeline.input_spec(config) == ((18, 26, 3), 1)  # Not 'varied sizes'.
  builder = image_folder.ensure_prepared(str(root), config.data_dir)
  source = builder.as_data_source(split='test')
  assert {source[i]['image'].shape for i in range(2)} == {(18, 26, 3)}
  # 'val' holds only an unreadable image: named as such, whether or not the folder was prepared.
  config.eval_split = 'val'
  message = f"image folder split '{root}/val' has no readable image in a class folder"
  with pytest.raises(DataError, match=re.escape(message)):
    pipeline.input_spec(config)
  (root / 'val' / 'cat' / 'broken.png').unlink()
  (root / 'val' / 'cat' / 'notes.txt').write_text('not an image')
  with pytest.raises(DataError, match=re.escape(message)):
    pipeline.load_data(config)
  # data_dir is checked before anything is prepared in it.
  (tmp_path / 'a_file').write_text('')
  config.eval_split, config.data_dir = 'test', str(tmp_path / 'a_file')
  with pytest.raises(UserError, match="--config.data_dir '.*a_file' is not a folder: it, or a "
                                      'folder above it, is a file'):
    pipeline.load_data(config)


def test_device_resident_inception_crops_are_drawn_from_the_whole_shorter_side(tmp_path):
  """Decoded as the evaluation's centre crop, every training crop missed an eighth of each side
  of the image, which streamed training crops from whole."""
  from jaxcnn.data import image_ops, pipeline
  pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
  for split in ('train', 'test'):
    (tmp_path / 'images' / split / 'cat').mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / 'images' / split / 'cat' / 'photo.png')
  config = cli.load_config_file(f'{REPO_ROOT}/configs/imagefolder.py')
  config.image_folder, config.data_dir = str(tmp_path / 'images'), str(tmp_path / 'tfds')
  config.image_size, config.data_placement = 32, 'device'
  evaluation_view = image_ops.resize_and_center_crop(pixels, 32, 32)  # The centre 0.875.
  for inception_crop, training_view in (
      (False, evaluation_view), (True, image_ops.resize_and_center_crop(pixels, 32, 32, 1.0))):
    config.augment.inception_crop = inception_crop
    data = pipeline.load_data(config)
    assert data.placement == 'device'
    np.testing.assert_array_equal(data.train.images[0], training_view)
    np.testing.assert_array_equal(data.eval.images[0], evaluation_view)
  assert not np.array_equal(training_view, evaluation_view)


def test_a_missing_split_folder_is_named_before_the_folder_is_read(tmp_path, monkeypatch):
  from jaxcnn.data import pipeline
  make_folder(tmp_path / 'images', {'train': 4, 'val': 2})
  config = cli.load_config_file(f'{REPO_ROOT}/configs/imagefolder.py')
  config.image_folder = str(tmp_path / 'images')
  monkeypatch.setattr(image_folder, 'list_folder', None)  # Not even listed, let alone prepared.
  with pytest.raises(ConfigError, match=r"image folder '.*images' has no split folder 'test' "
                                        r"\(config key 'eval_split' is 'test'\); it has: train, "
                                        'val'):
    pipeline.check_dataset(config)
  # TFDS split specs of the folders: a slice of one, or several joined.
  config.train_split, config.eval_split = 'train[:75%]+val', 'train[75%:]'
  pipeline.check_dataset(config)
  config.eval_split = 'train[75%:]+tset'
  with pytest.raises(ConfigError, match="no split folder 'tset' .*'train\\[75%:\\]\\+tset'"):
    pipeline.check_dataset(config)


def test_training_on_an_image_folder(tmp_path, monkeypatch, capfd):
  monkeypatch.setenv('JAXCNN_CACHE_DIR', str(tmp_path / 'cache'))
  root = tmp_path / 'images'
  make_folder(root, {'train': 256, 'test': 37})
  (root / 'test' / 'dog' / 'truncated.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00')
  config = cli.load_config_file(f'{REPO_ROOT}/configs/imagefolder.py')
  config.image_folder = str(root)
  config.data_dir = str(tmp_path / 'tfds')
  config.image_size = 24
  config.model = 'bn_cnn'
  config.optimizer = 'adamw'
  config.learning_rate = 3e-3
  config.num_train_steps = 40
  config.batch_size = 32
  config.eval_batch_size = 16
  config.num_devices = 1
  config.augment.flip = False  # The label is the side of the bright square: flips would swap it.
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  err = capfd.readouterr().err
  assert f'skipping unreadable image {root}/test/dog/truncated.png' in err
  for noise in ('oneDNN', 'absl::InitializeLog', 'Variant folder'):  # TensorFlow's and TFDS's.
    assert noise not in err
  assert result['test/num_examples'] == 37  # Every readable test image, the corrupt one left out.
  assert result['test/accuracy'] > 0.9
  # The prepared copy is reused while the folder is unchanged.
  directory = image_folder.dataset_dir(str(root), config.data_dir,
                                       image_folder.list_folder(str(root)).fingerprint())
  assert os.path.isdir(directory)
  config.num_train_steps = 40
  again = trainer.train_and_evaluate(config, str(tmp_path / 'run2'))
  output = capfd.readouterr()
  assert 'preparing image folder' not in output.out
  assert 'unreadable' not in output.err  # Said once, when the folder was prepared.
  np.testing.assert_allclose(again['test/accuracy'], result['test/accuracy'])

  # A class renamed so that it sorts first renumbers the classes: the trained run is neither
  # resumed nor evaluated on them (it took 'ant' images for its 'cat' output).
  for split in ('train', 'test'):
    os.rename(root / split / 'dog', root / split / 'ant')
  changed = "the classes of the data have changed since the run in '.*run' was trained: it " \
            'learned cat, dog; the data now has ant, cat'
  config.num_train_steps = 60
  with pytest.raises(UserError, match=changed):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  evaluation = subprocess.run(
      [sys.executable, '-m', 'jaxcnn.evaluate', '--workdir', str(tmp_path / 'run')],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'JAXCNN_CACHE_DIR': str(tmp_path / 'cache')})
  assert evaluation.returncode == 2, evaluation.stderr
  assert re.fullmatch(f'error: {changed}.*\n', evaluation.stderr), evaluation.stderr


def test_rgb_jpegs_are_stored_as_their_own_bytes_and_the_rest_as_rgb(tmp_path, capfd):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  files = {'cat/photo.jpg': rng.integers(0, 256, (30, 40, 3), np.uint8),
           'dog/grey.jpg': rng.integers(0, 256, (30, 40), np.uint8),
           'dog/drawing.png': rng.integers(0, 256, (30, 40, 3), np.uint8)}
  for name, pixels in files.items():
    (tmp_path / 'images' / 'train' / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(tmp_path / 'images' / 'train' / name, quality=90)
  builder = image_folder.ensure_prepared(str(tmp_path / 'images'), str(tmp_path / 'tfds'))
  output = capfd.readouterr().out
  assert output.startswith('preparing image folder') and 'Downloading' not in output  # No TFDS.
  listing = image_folder.list_folder(str(tmp_path / 'images')).splits['train']
  stored = builder.as_data_source(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  decoded = builder.as_data_source(split='train')
  assert len(decoded) == len(listing)
  for path, label in listing:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert('RGB'))
    # The copy is in TFDS's shuffled order: find the file's example by its pixels.
    (i,) = [i for i in range(len(decoded)) if np.array_equal(decoded[i]['image'], pixels)]
    assert decoded[i]['label'] == label
    with open(path, 'rb') as f:  # Only the RGB JPEG's bytes are kept as they are.
      assert (stored[i]['image'] == f.read()) == path.endswith('photo.jpg'), path


def test_a_slice_of_a_split_holds_every_class(tmp_path, capsys):
  """The copy is shuffled as TFDS shuffles its own datasets, so `train[75%:]` holds out examples
  of every class, not the last class's images as the folder lists them."""
  make_folder(tmp_path / 'images', {'train': 32})
  builder = image_folder.ensure_prepared(str(tmp_path / 'images'), str(tmp_path / 'tfds'))
  listed = [label for _, label in image_folder.list_folder(str(tmp_path / 'images')).splits['train']]
  assert listed == sorted(listed)  # Class by class.
  for split in ('train[:75%]', 'train[75%:]'):
    source = builder.as_data_source(split=split)
    assert {int(source[i]['label']) for i in range(len(source))} == {0, 1}, split
  whole = builder.as_data_source(split='train')
  assert sorted(int(whole[i]['label']) for i in range(len(whole))) == listed
  # Slices that overlap are warned of, as for a TFDS dataset, once the folder's sizes are known.
  from jaxcnn.data import pipeline  # pylint: disable=g-import-not-at-top
  config = cli.load_config_file(f'{REPO_ROOT}/configs/imagefolder.py')
  config.image_folder, config.data_dir = str(tmp_path / 'images'), str(tmp_path / 'tfds')
  for eval_split, warning in (('train[50%:]', "warning: eval_split 'train[50%:]' shares 8 "
                               "examples with train_split 'train[:75%]'"), ('train[75%:]', '')):
    config.train_split, config.eval_split = 'train[:75%]', eval_split
    pipeline.load_data(config)
    assert capsys.readouterr().err.startswith(warning)


def test_predict_reads_an_image_as_evaluation_does(tmp_path):
  """Predict reads an image as evaluation does: the same resize of the shorter side and centre
  crop (which tests/test_streaming.py checks against an independent resize and crop)."""
  from jaxcnn.data import streaming
  from jaxcnn.predict import load_image
  pixels = np.random.default_rng(0).integers(0, 256, (80, 120, 3), np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'wide.png')
  evaluated = streaming._EvalTransform((64, 64, 3), 'image', 'label').map(  # pylint: disable=protected-access
      {'image': pixels, 'label': 0})['image']
  np.testing.assert_array_equal(load_image(str(tmp_path / 'wide.png'), (64, 64, 3)), evaluated)
  grey = load_image(str(tmp_path / 'wide.png'), (28, 28, 1))
  assert grey.shape == (28, 28, 1) and grey.dtype == np.uint8


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped(tmp_path):
  """PIL's own conversion of a 16-bit PNG clips every value above 255 to white."""
  from jaxcnn.data import image_ops
  from jaxcnn.predict import load_image
  wide = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 to 65,520.
  Image.fromarray(wide).save(tmp_path / 'deep.png')
  expected = np.round(wide / 257).astype(np.uint8)
  with Image.open(tmp_path / 'deep.png') as image:
    assert image.mode == 'I;16'
    rgb = image_ops.to_uint8(image, 'RGB')  # As an image folder stores it.
  np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))
  np.testing.assert_array_equal(load_image(str(tmp_path / 'deep.png'), (8, 8, 1))[..., 0],
                                expected)
  Image.fromarray(wide).save(tmp_path / 'deep.pgm')  # PIL opens a 16-bit PGM as 32-bit 'I'.
  with Image.open(tmp_path / 'deep.pgm') as image:
    assert image.mode == 'I'
    np.testing.assert_array_equal(image_ops.to_uint8(image, 'L'), expected)
  shallow = Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8), 'I')  # 8-bit values.
  np.testing.assert_array_equal(image_ops.to_uint8(shallow, 'L'), np.arange(64).reshape(8, 8))


def test_runs_started_together_on_a_new_folder_prepare_it_once(tmp_path, capfd):
  """Both wrote it before, and the second failed on TFDS's final rename."""
  import threading  # pylint: disable=g-import-not-at-top
  make_folder(tmp_path / 'images', {'train': 8, 'test': 4})
  start = threading.Barrier(2)
  builders, errors = [], []

  def run():
    start.wait()
    try:
      builders.append(image_folder.ensure_prepared(str(tmp_path / 'images'),
                                                   str(tmp_path / 'tfds')))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors and len(builders) == 2
  assert [b.info.splits['train'].num_examples for b in builders] == [8, 8]
  assert capfd.readouterr().out.count('preparing image folder') == 1
