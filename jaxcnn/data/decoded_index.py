"""Where a TFDS dataset's decoded splits are, so that later runs read them without TFDS.

Importing TensorFlow Datasets and building a dataset's builder takes 0.65 s on the 2-core CI
machine, a sixth of a one-epoch LeNet-5 run. Once a run has decoded a device-resident split into
the `.npz` cache (see `tfds_data.read_split`), it records here, per dataset name and data_dir, the
dataset's `DatasetInfo`, the prepared directory and a digest of its `dataset_info.json`, and the
cached file of each split. A later run with the same name and data_dir finds them here and reads
the arrays directly, as long as the prepared dataset is unchanged (same `dataset_info.json`, which
TFDS rewrites whenever it prepares the dataset again) and the files are still there; otherwise it
takes the TFDS path, which records the entry afresh.
"""

import dataclasses
import hashlib
import json
import os

from jaxcnn import caches, files

_VERSION = 2  # 2: split keys name the crop fraction the split was decoded with.


@dataclasses.dataclass(frozen=True)
class Entry:
  """A dataset's recorded description and decoded split files."""
  info: dict  # The fields of `tfds_data.DatasetInfo`.
  prepared_dir: str
  dataset_info_digest: str
  split_files: dict[str, str]  # split_key(split, image_shape, crop_fraction) -> .npz path

  def split_file(self, split: str, image_shape, crop_fraction: float) -> str | None:
    """The cached `.npz` of `split` decoded at `image_shape` with `crop_fraction`
    (`tfds_data.read_split`), if it was recorded and still exists."""
    path = self.split_files.get(split_key(split, image_shape, crop_fraction))
    return path if path and os.path.isfile(path) else None


def split_key(split: str, image_shape, crop_fraction: float) -> str:
  return f'{split}@{"x".join(str(int(d)) for d in image_shape)}/{float(crop_fraction):g}'


def _index_path(name: str, data_dir: str | None, cache_dir: str) -> str:
  # TFDS resolves an unset data_dir from $TFDS_DATA_DIR, so that is part of the key too.
  where = (os.path.realpath(data_dir) if data_dir
           else f'default:{os.environ.get("TFDS_DATA_DIR", "")}')
  digest = hashlib.sha1(repr((name, where)).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, 'decoded', f'index-{digest}.json')


def _file_digest(path: str) -> str | None:
  try:
    with open(path, 'rb') as f:
      return hashlib.sha1(f.read()).hexdigest()
  except OSError:
    return None


def lookup(name: str, data_dir: str | None, cache_dir: str | None = None) -> Entry | None:
  """The entry of (`name`, `data_dir`) if one was recorded and its prepared dataset is unchanged."""
  path = _index_path(name, data_dir, cache_dir or caches.cache_dir())
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    if record.pop('version', None) != _VERSION:
      return None
    entry = Entry(**record)
  except (OSError, ValueError, TypeError):
    return None  # Absent, unreadable or from another version: the TFDS path rebuilds it.
  current = _file_digest(os.path.join(entry.prepared_dir, 'dataset_info.json'))
  return entry if current == entry.dataset_info_digest else None


def record(name: str, data_dir: str | None, *, info: dict, prepared_dir: str,
           split_files: dict[str, str], cache_dir: str | None = None) -> None:
  """Records (`name`, `data_dir`)'s info and split files, adding to what is recorded already for
  the same prepared dataset. Written atomically; a read-only cache records nothing."""
  cache_dir = cache_dir or caches.cache_dir()
  digest = _file_digest(os.path.join(prepared_dir, 'dataset_info.json'))
  if digest is None:
    return
  previous = lookup(name, data_dir, cache_dir)
  if previous and previous.prepared_dir == prepared_dir:
    split_files = {**previous.split_files, **split_files}
  text = json.dumps({'version': _VERSION, 'info': info, 'prepared_dir': prepared_dir,
                     'dataset_info_digest': digest, 'split_files': split_files})
  try:
    files.write_text_atomically(_index_path(name, data_dir, cache_dir), text)
  except OSError:
    pass  # Unrecorded, the next run only takes the TFDS path again.
