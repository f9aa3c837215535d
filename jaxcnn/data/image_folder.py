"""A folder of the user's own images as a TFDS dataset: `ROOT/<split>/<class>/*.png|jpg`.

The layout is the common ImageFolder one: each subfolder of ROOT is a split (train, test, ...),
each subfolder of a split is a class, and the classes are the union of all splits' class folders,
sorted by name. The good images are written once as a TFDS dataset (ArrayRecord files, with
TFDS's dataset-writing API) so that they flow through the same pipeline as any TFDS dataset:
device memory or Grain streaming, checkpointed positions, evaluate and predict. Preparing runs in
a TensorFlow subprocess like every TFDS preparation. Before it, every image is decoded once, and
each that cannot be is named in a warning and left out. The prepared copy is keyed by the
folder's listing (names, sizes and modification times, which cost one `stat` per file), so a
changed folder is prepared afresh, and an unchanged one is neither decoded nor warned about again.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

from PIL import Image

from jaxcnn.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
_LISTING = 'listing.json'
# How the prepared copy is written; part of its key, so that a copy written otherwise by an
# earlier jaxcnn is prepared afresh. Version 2: in TFDS's shuffled order, not class by class.
_COPY_FORMAT = 'jaxcnn image folder copy, version 2\n'


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The images of an image folder, by split, as (path, class index) pairs, and those of them
  that were found unreadable (`without_unreadable` decodes them; `list_folder` does not)."""
  root: str
  class_names: tuple[str, ...]
  splits: dict[str, list[tuple[str, int]]]
  unreadable: tuple[str, ...]

  def fingerprint(self) -> str:
    """Changes whenever an image is added, removed, replaced or relabelled (or jaxcnn's way of
    writing the copy changes)."""
    digest = hashlib.sha1(_COPY_FORMAT.encode())
    for split in sorted(self.splits):
      for path, label in self.splits[split]:
        stat = os.stat(path)
        digest.update(f'{split}|{os.path.relpath(path, self.root)}|{label}|{stat.st_size}|'
                      f'{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:16]


def _is_readable(path: str) -> str | None:
  """None if `path` decodes as an image, else why not."""
  try:
    with Image.open(path) as image:
      image.load()
    return None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds for bad files)
    return f'{type(e).__name__}: {" ".join(str(e).split())}'


def split_folders(root: str) -> list[str]:
  """The split names of the image folder `root`: its subfolders, sorted."""
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def list_folder(root: str) -> FolderListing:
  """Lists the image files of `root` by split and class, without opening any of them."""
  if not os.path.isdir(root):
    raise ConfigError(f"config key 'image_folder' ({root!r}) is not a folder; it must hold "
                      'ROOT/<split>/<class>/<images>, e.g. ROOT/train/cat/1.jpg')
  splits = split_folders(root)
  class_names = sorted({c for s in splits for c in os.listdir(os.path.join(root, s))
                        if os.path.isdir(os.path.join(root, s, c))})
  if not splits or not class_names:
    raise ConfigError(f'image folder {root!r} has no ROOT/<split>/<class>/ subfolders; '
                      'expected e.g. ROOT/train/cat/1.jpg and ROOT/test/cat/2.jpg')
  listing = {}
  for split in splits:
    examples = []
    for label, name in enumerate(class_names):
      folder = os.path.join(root, split, name)
      if os.path.isdir(folder):
        examples += [(os.path.join(folder, file), label) for file in sorted(os.listdir(folder))
                     if file.lower().endswith(IMAGE_EXTENSIONS)]
    if examples:
      listing[split] = examples
  if not listing:
    raise DataError(f'image folder {root!r} has no images with extensions '
                    f'{", ".join(IMAGE_EXTENSIONS)}')
  return FolderListing(root=os.path.abspath(root), class_names=tuple(class_names),
                       splits=listing, unreadable=())


def without_unreadable(listing: FolderListing) -> FolderListing:
  """`listing` without the images that cannot be decoded, each named in a warning."""
  splits, unreadable = {}, []
  for split, examples in listing.splits.items():
    readable = []
    for path, label in examples:
      problem = _is_readable(path)
      if problem:
        unreadable.append(path)
        print(f'warning: skipping unreadable image {path}: {problem}', file=sys.stderr,
              flush=True)
      else:
        readable.append((path, label))
    if readable:
      splits[split] = readable
  if not splits:
    raise DataError(f'image folder {listing.root!r} has no readable images')
  return dataclasses.replace(listing, splits=splits, unreadable=tuple(unreadable))


def dataset_dir(root: str, data_dir: str | None, fingerprint: str) -> str:
  """Where the prepared copy of `root` lives: under the TFDS data_dir, keyed by its contents."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base = data_dir or tfds.core.constants.get_default_data_dir()
  name = os.path.basename(os.path.normpath(root)) or 'images'
  return os.path.join(base, 'jaxcnn_image_folders', f'{name}-{fingerprint}')


def ensure_prepared(root: str, data_dir: str | None = None):
  """Returns a TFDS builder of the image folder `root`, preparing it first if needed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  listing = list_folder(root)
  directory = dataset_dir(root, data_dir, listing.fingerprint())
  if not _find_builder_dir(directory):
    listing = without_unreadable(listing)
    os.makedirs(directory, exist_ok=True)
    listing_path = os.path.join(directory, _LISTING)
    with open(listing_path, 'w', encoding='utf-8') as f:
      json.dump(dataclasses.asdict(listing), f)
    print(f'preparing image folder {root} ({sum(map(len, listing.splits.values()))} images, '
          f'{len(listing.class_names)} classes) in {directory} (one time, TensorFlow on CPU)',
          flush=True)
    # TensorFlow's start-up notices (oneDNN, absl logging) are noise to a user.
    quiet = {'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0'}
    result = subprocess.run([sys.executable, '-m', 'jaxcnn.data.image_folder', listing_path,
                             directory], env={**quiet, **os.environ}, check=False)
    if result.returncode != 0:
      raise DataError(f'preparing image folder {root!r} failed (exit status '
                      f'{result.returncode}); its output is above')
  return tfds.builder_from_directory(_find_builder_dir(directory))


def _find_builder_dir(directory: str) -> str | None:
  """The folder holding the prepared dataset's dataset_info.json, if it was completed."""
  for parent, folders, files in os.walk(directory):
    folders[:] = [f for f in folders if not f.startswith('incomplete')]  # TFDS's unfinished ones.
    if 'dataset_info.json' in files:
      return parent
  return None


def _write_dataset(listing_path: str, directory: str) -> None:
  """Writes the listed images as an ArrayRecord TFDS dataset (runs in the prepare subprocess)."""
  os.environ['CUDA_VISIBLE_DEVICES'] = ''
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jaxcnn.data.tfds_data import (  # pylint: disable=g-import-not-at-top
      import_tfds, without_tfds_announcements)
  tfds = import_tfds()
  tf.config.set_visible_devices([], 'GPU')
  if not sys.stdout.isatty():  # Progress bars make pages of blank lines in a log file.
    tfds.disable_progress_bar()
  with open(listing_path, encoding='utf-8') as f:
    listing = json.load(f)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(names=listing['class_names']),
  })

  def examples(split):
    for i, (path, label) in enumerate(listing['splits'][split]):
      with Image.open(path) as image:
        if image.format == 'JPEG' and image.mode == 'RGB':
          # Stored as the file's own bytes: re-encoded as PNG (TFDS's default for arrays), a
          # photo takes 2.5-5x the space and decodes 1.4-3x slower, for the same pixels.
          yield i, {'image': path, 'label': label}
        else:  # Grey, palette, CMYK or alpha images, and other formats, become RGB PNGs.
          yield i, {'image': np.asarray(image.convert('RGB')), 'label': label}

  with without_tfds_announcements():
    tfds.dataset_builders.store_as_tfds_dataset(
        name='image_folder', version='1.0.0', features=features,
        split_datasets={split: examples(split) for split in listing['splits']},
        # Shuffled (deterministically, by key) as TFDS prepares its own datasets: listed class
        # by class, a slice such as 'train[90%:]' would hold out only the last classes.
        data_dir=directory, file_format='array_record', disable_shuffling=False,
        description=f'The images of {listing["root"]}.')


if __name__ == '__main__':
  _write_dataset(sys.argv[1], sys.argv[2])
