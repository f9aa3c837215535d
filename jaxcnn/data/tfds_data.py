"""TFDS datasets: find, prepare (in a TensorFlow subprocess) and read (without TensorFlow).

Preparing runs `python -m jaxcnn.data.prepare` in a child process with every GPU hidden; this
process only reads the prepared ArrayRecord files through `tfds.data_source`, so training never
imports TensorFlow. Decoded splits are cached as uint8 `.npz` arrays (no pickle) so that the PNG
decoding, about 10 s for MNIST on two cores, happens once per machine.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.parse
from collections.abc import Sequence

import numpy as np

from jaxcnn import caches, files
from jaxcnn.data.image_ops import CENTRE_CROP_FRACTION, resize_and_center_crop
from jaxcnn.errors import ConfigError, DataError

# How long each dataset host gets to answer before we call the machine offline. The whole check
# must end well inside the 10 s in which an unpreparable dataset is reported.
_NETWORK_PROBE_SECONDS = 3.0
_DECODE_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the pipeline need to know about an image-classification dataset."""
  name: str  # TFDS name with version, e.g. 'mnist/3.0.1'.
  image_shape: tuple  # (H, W, C); H and W are None when images vary in size.
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  image_key: str = 'image'
  label_key: str = 'label'


def split_names(split: str) -> list[str]:
  """The named splits a TFDS split spec reads: 'train' and 'train[:90%]' read 'train', and
  'train+test[:50%]' reads 'train' and 'test'."""
  return [part.split('[', 1)[0].strip() for part in split.split('+')]


def reads_known_splits(info: DatasetInfo, split: str) -> bool:
  """Whether the split spec `split` reads only splits that `info` records."""
  return all(name in info.split_sizes for name in split_names(split))


def check_split(info: DatasetInfo, split: str) -> None:
  """Raises a ConfigError unless the split spec `split` reads only splits the dataset has
  (datasets whose splits are unknown, as mocked ones, accept any)."""
  if info.split_sizes and not reads_known_splits(info, split):
    raise ConfigError(f'dataset {info.name!r} has no split {split!r}; it has: '
                      f'{", ".join(sorted(info.split_sizes))} (and TFDS slices of them, e.g. '
                      "'train[:90%]' and 'train[90%:]' to hold out a tenth of train)")


def split_size_bound(info: DatasetInfo, split: str) -> int:
  """At most how many examples the split spec `split` reads: its named splits' sizes."""
  return sum(info.split_sizes.get(name, 0) for name in split_names(split))


def shared_examples(info: DatasetInfo, split_a: str, split_b: str) -> int:
  """How many examples both split specs read (e.g. 6,000 of MNIST's 'train' and 'train[90%:]');
  0 where the dataset records no split sizes, or where TFDS cannot read a spec (reading it later
  names the spec in a one-line error)."""
  if not (info.split_sizes and reads_known_splits(info, split_a)
          and reads_known_splits(info, split_b)):
    return 0
  if not set(split_names(split_a)) & set(split_names(split_b)):
    return 0  # Without importing TFDS (a quarter second), which a cached run never needs.
  tfds = import_tfds()
  # TFDS resolves a spec's percentages and its rounding against the splits' SplitInfo objects.
  split_infos = {name: types.SimpleNamespace(num_examples=size)
                 for name, size in info.split_sizes.items()}

  def ranges(spec):
    return [(part.splitname, part.from_ or 0,
             info.split_sizes[part.splitname] if part.to is None else part.to)
            for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(split_infos)]

  try:
    ranges_a, ranges_b = ranges(split_a), ranges(split_b)
  except (ValueError, AssertionError):  # A slice out of range, or not a spec TFDS parses.
    return 0
  return sum(max(0, min(end_a, end_b) - max(start_a, start_b))
             for name_a, start_a, end_a in ranges_a
             for name_b, start_b, end_b in ranges_b if name_a == name_b)


def split_num_examples(builder, split: str) -> int:
  """The examples of the split spec `split` (a slice such as 'train[:90%]' included), as TFDS
  resolves it; a ConfigError for a spec TFDS cannot read."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, AssertionError) as e:
    raise ConfigError(f'dataset {builder.info.full_name!r} cannot read split {split!r}: '
                      f'{" ".join(str(e).split())}') from None


@contextlib.contextmanager
def without_tfds_announcements():
  """Runs a TFDS preparation without the two lines it prints on stdout ("Downloading and
  preparing dataset Unknown size ...", for datasets made from local files): the caller says in
  one line what it prepared."""
  with contextlib.redirect_stdout(io.StringIO()):
    yield


def import_tfds():
  """Imports tensorflow_datasets lazily (it is slow to import and only the data path needs it),
  without its warning about datasets not prepared yet."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger('absl')
  if _not_yet_prepared_warning not in absl_logger.filters:
    absl_logger.addFilter(_not_yet_prepared_warning)
  return tfds


def tfds_for_preparing():
  """`import_tfds()` for a process that prepares a dataset: TensorFlow (which TFDS's writers need)
  kept off every GPU, whose memory is JAX's, and no progress bars in a log file, where they make
  pages of blank lines."""
  os.environ['CUDA_VISIBLE_DEVICES'] = ''  # Before TensorFlow starts, which may be now.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tfds = import_tfds()
  if not sys.stdout.isatty():
    tfds.disable_progress_bar()
  return tfds


def _not_yet_prepared_warning(record: logging.LogRecord) -> bool:
  """Drops TFDS's 'Variant folder .../mnist/3.0.1 has no dataset_info.json': TFDS says it of
  every dataset not prepared yet, which jaxcnn then prepares or reports in its own words."""
  return not (record.pathname.endswith(os.path.join('core', 'utils', 'file_utils.py'))
              and str(record.msg).startswith('Variant folder'))


def get_builder(name: str, data_dir: str | None = None):
  """Returns the TFDS builder of `name`, or raises a ConfigError if TFDS knows no such dataset."""
  tfds = import_tfds()
  try:
    tfds.builder_cls(name.split('/')[0].split(':')[0])
  # ValueError: a name TFDS cannot parse, such as 'cifar-10'.
  except (tfds.core.registered.DatasetNotFoundError, ValueError):
    raise ConfigError(f'unknown dataset {name!r}: not a TFDS dataset name '
                      '(e.g. mnist, fashion_mnist, cifar10; see tfds.list_builders())') from None
  # TFDS makes an empty temporary folder for every builder of a dataset not prepared yet (to
  # fetch metadata from its bucket) and never removes it: give it one that is removed.
  with tempfile.TemporaryDirectory(prefix='jaxcnn-tfds-') as scratch:
    default_tempdir, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      return tfds.builder(name, data_dir=data_dir)
    except (AssertionError, ValueError) as e:  # An unknown version or config of a known dataset.
      # TFDS's first sentence says what, after the arguments it was given.
      reason = ' '.join(str(e).split()).split('}": ')[-1].split('. ')[0].rstrip('.')
      raise ConfigError(f'dataset {name!r} cannot be built: {reason}; give the dataset by name '
                        '(e.g. mnist) or as name:version (e.g. mnist:3.0.1)') from None
    finally:
      tempfile.tempdir = default_tempdir


def default_manual_dir(builder) -> str:
  """TFDS's manual_dir for this builder: `<data_dir>/downloads/manual`."""
  return os.path.join(os.fspath(builder.data_dir_root), 'downloads', 'manual')


def expected_download_files(builder) -> list[str]:
  """Names of the files TFDS downloads for this dataset (and accepts from manual_dir)."""
  url_infos = getattr(type(builder), 'url_infos', None) or {}
  return sorted({info.filename or os.path.basename(urllib.parse.urlparse(url).path)
                 for url, info in url_infos.items()})


def _hosts_reachable(builder) -> bool:
  url_infos = getattr(type(builder), 'url_infos', None) or {}
  hosts = {urllib.parse.urlparse(url).hostname for url in url_infos} or {'storage.googleapis.com'}
  for host in sorted(h for h in hosts if h):
    try:
      with socket.create_connection((host, 443), timeout=_NETWORK_PROBE_SECONDS):
        pass
    except OSError:
      return False
  return True


def check_can_prepare(builder, manual_dir: str | None, offline: bool = False,
                      flag_prefix: str = '--config.') -> bool:
  """Raises a DataError at once if `builder` can be neither taken from manual_dir nor downloaded
  (with `offline`, if not every file is in manual_dir). `flag_prefix` begins the flags of the
  command the user ran (`--config.manual_dir`, or `--manual_dir`), for the message.

  Returns:
    True if every file is in manual_dir, so that preparing needs no network at all.
  """
  manual_dir = manual_dir or default_manual_dir(builder)
  expected = expected_download_files(builder)
  missing = [f for f in expected if not os.path.isfile(os.path.join(manual_dir, f))]
  if expected and not missing:
    return True
  if not expected and getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    if os.path.isdir(manual_dir) and os.listdir(manual_dir):
      return True
    raise DataError(
        f'dataset {builder.name!r} must be downloaded by hand into manual_dir {manual_dir} '
        f'(or set {flag_prefix}manual_dir): '
        f'{" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
  if not offline and _hosts_reachable(builder):
    return False
  files = ', '.join(missing) if missing else '(the files listed in its TFDS checksums)'
  why = 'not downloaded (offline)' if offline else 'cannot be downloaded (no network)'
  raise DataError(
      f'dataset {builder.name!r} is not prepared in {builder.data_dir_root} and {why}; put these '
      f'files in manual_dir {manual_dir} or point {flag_prefix}manual_dir at a folder holding '
      f'them: {files}')


def ensure_prepared(name: str, data_dir: str | None = None, manual_dir: str | None = None,
                    flag_prefix: str = '--config.'):
  """Returns the builder of `name`, preparing the dataset first if it is not prepared yet.
  `flag_prefix` begins the flags of the command the user ran, for the messages."""
  builder = get_builder(name, data_dir)
  if builder.is_prepared():
    return builder
  offline = check_can_prepare(builder, manual_dir, flag_prefix=flag_prefix)
  if importlib.util.find_spec('tensorflow') is None:
    raise DataError(
        f'dataset {name!r} is not prepared in {builder.data_dir_root}, and preparing it needs '
        "TensorFlow (CPU), which is not installed: pip install 'jaxcnn[prepare]', or prepare it "
        f'elsewhere with python -m jaxcnn.data.prepare and point {flag_prefix}data_dir at it')
  files.make_writable_folder(os.fspath(builder.data_dir_root), f'{flag_prefix}data_dir')
  command = [sys.executable, '-m', 'jaxcnn.data.prepare', name,
             f'--data_dir={builder.data_dir_root}']
  if manual_dir:
    command.append(f'--manual_dir={manual_dir}')
  if offline:
    command.append('--offline')
  print(f'preparing {name} in {builder.data_dir_root} (one time, TensorFlow on CPU)', flush=True)
  status, child_error = _run_keeping_error_line(command)
  if status != 0:  # The child's one-line error for a user's mistake is said once, by us.
    raise DataError(child_error or f'preparing dataset {name!r} failed (exit status {status}); '
                    'its output is above')
  builder = get_builder(name, data_dir)
  if not builder.is_prepared():
    raise DataError(f'dataset {name!r} was prepared but TFDS does not find it in '
                    f'{builder.data_dir_root}')
  return builder


def _run_keeping_error_line(command: list[str]) -> tuple[int, str | None]:
  """Runs a jaxcnn command, passing its stderr through as it comes (progress bars included),
  except an `error: ...` line, which is returned with the exit status instead of printed."""
  prefix = b'error: '
  child = subprocess.Popen(command, stderr=subprocess.PIPE)
  error, pending, mid_line = None, b'', False  # pending: the unprinted start of a line.
  for chunk in iter(lambda: os.read(child.stderr.fileno(), 65536), b''):
    *lines, pending = (pending + chunk).split(b'\n')
    for line in lines:
      if not mid_line and line.startswith(prefix):
        error = line[len(prefix):].decode(errors='replace').strip()
      else:
        sys.stderr.buffer.write(line + b'\n')
      mid_line = False
    if pending and (mid_line or not (pending.startswith(prefix) or prefix.startswith(pending))):
      sys.stderr.buffer.write(pending)  # Cannot be an error line: show it now.
      pending, mid_line = b'', True
    sys.stderr.flush()
  if pending.startswith(prefix) and not mid_line:
    error = pending[len(prefix):].decode(errors='replace').strip()
  elif pending:
    sys.stderr.buffer.write(pending)
  child.stderr.close()
  return child.wait(), error


def dataset_info(builder) -> DatasetInfo:
  """Reads image shape, classes and split sizes from the builder's `DatasetInfo`."""
  info = builder.info
  image_key, label_key = info.supervised_keys or ('image', 'label')
  if image_key not in info.features or label_key not in info.features:
    raise DataError(f'dataset {builder.name!r} is not an image-classification dataset: it has no '
                    f'{image_key!r} and {label_key!r} features (it has: '
                    f'{", ".join(info.features)})')
  image_feature = info.features[image_key]
  label_feature = info.features[label_key]
  shape = tuple(image_feature.shape)
  if len(shape) != 3 or shape[-1] is None:
    raise DataError(f'dataset {builder.name!r} has images of shape {shape}; jaxcnn needs '
                    '(height, width, channels) images with a known number of channels')
  return DatasetInfo(
      name=info.full_name,
      image_shape=shape,
      num_classes=int(label_feature.num_classes),
      class_names=tuple(label_feature.names),
      split_sizes={name: int(split.num_examples) for name, split in info.splits.items()},
      image_key=image_key,
      label_key=label_key,
  )


def info_to_json(info: DatasetInfo) -> dict:
  """`info` as JSON-serialisable fields."""
  return dataclasses.asdict(info)


def info_from_json(fields: dict) -> DatasetInfo:
  """The inverse of `info_to_json`."""
  return DatasetInfo(**{**fields, 'image_shape': tuple(fields['image_shape']),
                        'class_names': tuple(fields['class_names'])})


def split_cache_file(builder, split: str, image_shape, cache_dir: str | None = None,
                     crop_fraction: float = CENTRE_CROP_FRACTION) -> str:
  """The `.npz` in which `read_split` caches `split` decoded at `image_shape` with
  `crop_fraction`."""
  return _cache_path(builder, split, tuple(image_shape), cache_dir or caches.cache_dir(),
                     crop_fraction)


def read_split(builder, split: str, image_shape=None, cache_dir: str | None = None,
               crop_fraction: float = CENTRE_CROP_FRACTION) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, H, W, C], labels int32 [N]) of a prepared split, in file order.

  With `image_shape`, images of another size are resized so that `crop_fraction` of their shorter
  side fills it, and centre-cropped to it (`image_ops.resize_and_center_crop`).
  """
  info = dataset_info(builder)
  image_shape = tuple(image_shape or info.image_shape)
  if None in image_shape:
    raise ConfigError(f'dataset {info.name!r} has images of varied sizes; set '
                      '--config.image_size to the size to train at')
  check_split(info, split)
  # Only splits whose size TFDS records can be fingerprinted, and so cached (mocked ones cannot).
  cache_path = (split_cache_file(builder, split, image_shape, cache_dir, crop_fraction)
                if info.split_sizes else None)
  arrays = files.load_arrays(cache_path) if cache_path and os.path.isfile(cache_path) else None
  if arrays is not None:
    return arrays['images'], arrays['labels']
  images, labels = _decode_split(builder, split, info, image_shape, crop_fraction)
  if cache_path:
    _save_atomically(cache_path, images=images, labels=labels)
  return images, labels


def _cache_path(builder, split: str, image_shape, cache_dir: str, crop_fraction: float) -> str:
  # The key names the prepared files, so a re-prepared or relocated dataset is decoded afresh.
  info = builder.info
  key = repr((os.path.realpath(os.fspath(builder.data_dir)), split, tuple(image_shape),
              float(crop_fraction), int(info.splits[split].num_examples),
              int(info.splits[split].num_bytes)))
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  return os.path.join(cache_dir, 'decoded', f'{info.full_name.replace("/", "-")}-{split}-{digest}.npz')


def _decode_split(builder, split: str, info: DatasetInfo, image_shape,
                  crop_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  source = builder.as_data_source(split=split)
  n = len(source)
  height, width, _ = image_shape
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  start = time.time()
  print(f'decoding {info.name} {split} ({n} images, once; cached afterwards)', flush=True)
  for begin in range(0, n, _DECODE_CHUNK):
    indices = list(range(begin, min(begin + _DECODE_CHUNK, n)))
    for i, example in zip(indices, source.__getitems__(indices)):
      images[i] = resize_and_center_crop(np.asarray(example[info.image_key]), height, width,
                                         crop_fraction)
      labels[i] = example[info.label_key]
  print(f'decoded {info.name} {split} in {time.time() - start:.1f}s', flush=True)
  return images, labels


def _save_atomically(path: str, **arrays: np.ndarray) -> None:
  """Writes an .npz so that readers see either no file or the whole file."""
  try:
    files.write_atomically(path, lambda f: np.savez(f, **arrays))
  except OSError as e:  # A read-only cache only costs the decoding next time.
    print(f'warning: cannot cache decoded data in {os.path.dirname(path)}: {e}', file=sys.stderr)


def load_splits(name: str, splits: Sequence[str], data_dir: str | None = None,
                manual_dir: str | None = None, image_shape=None,
                ) -> tuple[DatasetInfo, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Prepares `name` if needed and reads `splits` into memory as uint8 images and int32 labels."""
  builder = ensure_prepared(name, data_dir, manual_dir)
  info = dataset_info(builder)
  return info, {split: read_split(builder, split, image_shape) for split in splits}
