"""A folder of the user's own images as a TFDS dataset: `ROOT/<split>/<class>/*.png|jpg`.

The layout is the common ImageFolder one: each subfolder of ROOT is a split (train, test, ...),
each subfolder of a split is a class (its images may be in subfolders of it, at any depth), and
the classes are the union of all splits' class folders, sorted by name; hidden folders are
neither. The good images are written once as a TFDS dataset (ArrayRecord files, with TFDS's
dataset-writing API) so that they flow through the same pipeline as any TFDS dataset:
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

from jaxcnn import files
from jaxcnn.errors import ConfigError, DataError

# torchvision's ImageFolder's, and GIF: every format PIL decodes that such folders hold.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.pgm',
                    '.ppm')
_LISTING = 'listing.json'
# How the prepared copy is written; part of its key, so that a copy written otherwise by an
# earlier jaxcnn is prepared afresh. Version 2: in TFDS's shuffled order, not class by class.
# Version 3: images of one size are stored with that fixed shape; images in subfolders of a class
# folder belong to the class. Version 4: 16-bit grey images are scaled to 8 bits, not clipped.
_COPY_FORMAT = 'jaxcnn image folder copy, version 4\n'


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The images of an image folder, by split, as (path, class index) pairs, and those of them
  that were found unreadable (`without_unreadable` decodes them; `list_folder` does not).
  `image_size` is (height, width) when `without_unreadable` found every image to have it."""
  root: str
  class_names: tuple[str, ...]
  splits: dict[str, list[tuple[str, int]]]
  unreadable: tuple[str, ...]
  image_size: tuple[int, int] | None = None

  def fingerprint(self) -> str:
    """Changes whenever an image is added, removed, replaced or relabelled (or jaxcnn's way of
    writing the copy changes)."""
    digest = hashlib.sha1(_COPY_FORMAT.encode())
    for split in sorted(self.splits):
      for path, label in self.splits[split]:
        try:
          stat = os.stat(path)
        except OSError:  # A broken link: `without_unreadable` skips it, naming it.
          stat = os.lstat(path)
        digest.update(f'{split}|{os.path.relpath(path, self.root)}|{label}|{stat.st_size}|'
                      f'{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:16]


def _is_readable(path: str) -> tuple[str | None, tuple[int, int] | None]:
  """(None, (height, width)) if `path` decodes as an image, else (why not, None)."""
  try:
    with Image.open(path) as image:
      image.load()
      return None, (image.height, image.width)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds for bad files)
    return f'{type(e).__name__}: {" ".join(str(e).split())}', None


def _subfolders(folder: str) -> list[str]:
  """The subfolders of `folder`, sorted, without hidden ones (`.ipynb_checkpoints`, `.git`):
  tools make those beside a user's images, and they are neither splits nor classes."""
  return sorted(d for d in os.listdir(folder)
                if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))


def _images_in(folder: str, recursive: bool) -> list[str]:
  """The image files in `folder` (and with `recursive` in its subfolders, at any depth, as
  torchvision's ImageFolder finds them), sorted by path; hidden folders are left out."""
  found = []
  for parent, folders, names in os.walk(folder, followlinks=True):
    folders[:] = sorted(f for f in folders if not f.startswith('.')) if recursive else []
    found += [os.path.join(parent, name) for name in sorted(names)
              if name.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def split_folders(root: str) -> list[str]:
  """The split names of the image folder `root`: its subfolders, sorted."""
  return _subfolders(root)


def list_folder(root: str) -> FolderListing:
  """Lists the image files of `root` by split and class, without opening any of them.

  A class's images may be in subfolders of its folder. Raises a ConfigError for a folder without
  the layout, and a DataError for a class that has no image in any split.
  """
  if not os.path.isdir(root):
    raise ConfigError(f"config key 'image_folder' ({root!r}) is not a folder; it must hold "
                      'ROOT/<split>/<class>/<images>, e.g. ROOT/train/cat/1.jpg')
  splits = split_folders(root)
  class_names = sorted({c for s in splits for c in _subfolders(os.path.join(root, s))})
  if not splits or not class_names:
    holding_images = [s for s in splits if _images_in(os.path.join(root, s), recursive=False)]
    hint = (f"; its folders {', '.join(holding_images)} hold images themselves, as class folders "
            'do: point image_folder at a folder holding split folders such as train/ and test/'
            if holding_images else '')
    raise ConfigError(f'image folder {root!r} has no ROOT/<split>/<class>/ subfolders; '
                      f'expected e.g. ROOT/train/cat/1.jpg and ROOT/test/cat/2.jpg{hint}')
  listing = {}
  for split in splits:
    listing[split] = [(path, label) for label, name in enumerate(class_names)
                      if os.path.isdir(os.path.join(root, split, name))
                      for path in _images_in(os.path.join(root, split, name), recursive=True)]
  if not any(listing.values()):
    raise DataError(f'image folder {root!r} has no images with extensions '
                    f'{", ".join(IMAGE_EXTENSIONS)}')
  labels_found = {label for examples in listing.values() for _, label in examples}
  empty = [name for label, name in enumerate(class_names) if label not in labels_found]
  if empty:
    # Such a class would be an output the model is never shown an example of.
    raise DataError(f'image folder {root!r} has class folders with no image in any split: '
                    f'{", ".join(empty)}; add images to them or remove them')
  return FolderListing(root=os.path.abspath(root), class_names=tuple(class_names),
                       splits={split: examples for split, examples in listing.items() if examples},
                       unreadable=())


def check_split_has_images(root: str, split_spec: str, prepared_splits) -> None:
  """Raises a DataError if a split folder named in `split_spec` (a TFDS split spec of the
  folder's splits) holds no image that was prepared, naming the folder."""
  from jaxcnn.data.tfds_data import split_names  # pylint: disable=g-import-not-at-top
  for name in split_names(split_spec):
    if name not in prepared_splits:
      folder = os.path.join(root, name)
      raise DataError(f'image folder split {folder!r} has no readable image in a class folder '
                      f'(ROOT/{name}/<class>/*.png|jpg; images that could not be decoded were '
                      'named in warnings when the folder was prepared)')


def without_unreadable(listing: FolderListing) -> FolderListing:
  """`listing` without the images that cannot be decoded, each named in a warning, and with
  `image_size` set if all the others have one size. Warns of images outside class folders and
  of splits that lack classes, which would otherwise pass unseen."""
  for split in listing.splits:
    loose = _images_in(os.path.join(listing.root, split), recursive=False)
    if loose:
      print(f'warning: leaving out the images directly in {os.path.join(listing.root, split)}, '
            f'outside any class folder ({len(loose)}, e.g. {loose[0]})', file=sys.stderr,
            flush=True)
  splits, unreadable, sizes = {}, [], set()
  for split, examples in listing.splits.items():
    readable = []
    for path, label in examples:
      problem, size = _is_readable(path)
      if problem:
        unreadable.append(path)
        print(f'warning: skipping unreadable image {path}: {problem}', file=sys.stderr,
              flush=True)
      else:
        readable.append((path, label))
        sizes.add(size)
    if readable:
      splits[split] = readable
  if not splits:
    raise DataError(f'image folder {listing.root!r} has no readable images')
  if len(splits) > 1:
    for split, examples in splits.items():
      labels = {label for _, label in examples}
      lacking = [name for label, name in enumerate(listing.class_names) if label not in labels]
      if lacking:
        print(f'warning: image folder split {split!r} has no readable images of classes '
              f'{", ".join(lacking)}, which other splits have', file=sys.stderr, flush=True)
  return dataclasses.replace(listing, splits=splits, unreadable=tuple(unreadable),
                             image_size=sizes.pop() if len(sizes) == 1 else None)


def dataset_dir(root: str, data_dir: str | None, fingerprint: str) -> str:
  """Where the prepared copy of `root` lives: under the TFDS data_dir, keyed by its contents."""
  name = os.path.basename(os.path.normpath(root)) or 'images'
  return os.path.join(_data_dir_or_default(data_dir), 'jaxcnn_image_folders',
                      f'{name}-{fingerprint}')


def _data_dir_or_default(data_dir: str | None) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return data_dir or tfds.core.constants.get_default_data_dir()


def ensure_prepared(root: str, data_dir: str | None = None, splits: tuple[str, ...] = (),
                    flag_prefix: str = '--config.'):
  """Returns a TFDS builder of the image folder `root`, preparing it first if needed.

  Raises a DataError if a split folder named in `splits` (TFDS split specs) has no readable image.
  `flag_prefix` begins the flags of the command the user ran (`--config.` or `--`), for messages.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  listing = list_folder(root)
  for spec in splits:  # Before a folder that cannot be trained on is prepared.
    check_split_has_images(root, spec, listing.splits)
  directory = dataset_dir(root, data_dir, listing.fingerprint())
  if not _find_builder_dir(directory):
    files.make_writable_folder(_data_dir_or_default(data_dir), f'{flag_prefix}data_dir')
    os.makedirs(directory, exist_ok=True)
    # Runs started together on a new folder (a sweep): one prepares it while the others wait,
    # then find it prepared. Both writing it, one failed on TFDS's final rename.
    with files.exclusive_lock(os.path.join(directory, '.preparing')):
      if not _find_builder_dir(directory):
        _prepare(root, without_unreadable(listing), directory)
  builder = tfds.builder_from_directory(_find_builder_dir(directory))
  for spec in splits:  # Those whose images were all unreadable.
    check_split_has_images(root, spec, builder.info.splits)
  return builder


def _prepare(root: str, listing: FolderListing, directory: str) -> None:
  """Writes the readable images of `listing` as a TFDS dataset in `directory`, in a child
  process that runs TensorFlow on the CPU."""
  listing_path = os.path.join(directory, _LISTING)
  files.write_text_atomically(listing_path, json.dumps(dataclasses.asdict(listing)))
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


def _find_builder_dir(directory: str) -> str | None:
  """The folder holding the prepared dataset's dataset_info.json, if it was completed."""
  for parent, folders, names in os.walk(directory):
    folders[:] = [f for f in folders if not f.startswith('incomplete')]  # TFDS's unfinished ones.
    if 'dataset_info.json' in names:
      return parent
  return None


def _write_dataset(listing_path: str, directory: str) -> None:
  """Writes the listed images as an ArrayRecord TFDS dataset (runs in the prepare subprocess)."""
  from jaxcnn.data import image_ops  # pylint: disable=g-import-not-at-top
  from jaxcnn.data.tfds_data import (  # pylint: disable=g-import-not-at-top
      tfds_for_preparing, without_tfds_announcements)
  tfds = tfds_for_preparing()
  with open(listing_path, encoding='utf-8') as f:
    listing = json.load(f)
  # Images of one size get it as their fixed shape, so that they can be trained on at their own
  # size (image_size=0), as TFDS's own datasets of fixed-size images are.
  height, width = listing['image_size'] or (None, None)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(height, width, 3)),
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
          yield i, {'image': image_ops.to_uint8(image, 'RGB'), 'label': label}

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
