"""Prepares a TFDS dataset: `python -m jaxcnn.data.prepare DATASET [--data_dir D] [--manual_dir M]`.

This is the only place in jaxcnn where TensorFlow runs (TFDS's extractors need it). It runs in a
process of its own with every GPU hidden from it, so TensorFlow can never take GPU memory from JAX,
and the training process that reads the prepared files never imports TensorFlow. Training runs it
by itself when a dataset is not prepared yet; run it by hand to prepare on another machine.
"""

import os
import re

# Hide GPUs before anything below can import TensorFlow.
os.environ['CUDA_VISIBLE_DEVICES'] = ''
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Preparing does no arithmetic that oneDNN would speed up; without it TensorFlow does not print
# its notice about oneDNN's rounding at every start.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags  # pylint: disable=g-import-not-at-top

from jaxcnn import cli, files  # pylint: disable=g-import-not-at-top
from jaxcnn.data import tfds_data  # pylint: disable=g-import-not-at-top
from jaxcnn.errors import DataError  # pylint: disable=g-import-not-at-top

_DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS data_dir (default: TFDS's own).")
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with the already downloaded files (default: '
    '<data_dir>/downloads/manual).')
_OFFLINE = flags.DEFINE_bool('offline', False, 'Take every file from manual_dir; no network.')


def prepare(name: str, data_dir: str | None, manual_dir: str | None, offline: bool) -> None:
  """Downloads `name` (or takes its files from manual_dir) and writes it as ArrayRecord files."""
  tfds = tfds_data.tfds_for_preparing()
  from tensorflow_datasets.core.download import (  # pylint: disable=g-import-not-at-top
      download_manager)
  builder = tfds_data.get_builder(name, data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                 try_download_gcs=not offline)
  try:
    with tfds_data.without_tfds_announcements():
      builder.download_and_prepare(file_format='array_record', download_config=download_config)
  except download_manager.NonMatchingChecksumError as e:
    raise DataError(_describe_checksum_error(name, str(e))) from None
  print(f'prepared {builder.info.full_name} in {builder.data_dir}', flush=True)


def _describe_checksum_error(name: str, message: str) -> str:
  """TFDS's NonMatchingChecksumError (a paragraph) as one line that names the file to replace."""
  match = re.match(r'Artifact (\S+), downloaded to (.+), has wrong checksum:\s*'
                   r'\* Expected: UrlInfo\(size=([^,]+),.*?\* Got: UrlInfo\(size=([^,]+),',
                   message, re.S)
  if not match:
    return f'preparing dataset {name!r}: {" ".join(message.split())}'
  url, path, expected, got = match.groups()
  return (f'{path} is not the file dataset {name!r} is made from: it has {got} where the '
          f'official file has {expected}, and its checksum differs; replace it with a fresh '
          f'download of {url}')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m jaxcnn.data.prepare DATASET [--data_dir D] '
                         '[--manual_dir M] [--offline]')
  name = argv[1]
  builder = tfds_data.get_builder(name, _DATA_DIR.value)
  if builder.is_prepared():
    print(f'{builder.info.full_name} is already prepared in {builder.data_dir}')
    return
  offline = tfds_data.check_can_prepare(builder, _MANUAL_DIR.value, offline=_OFFLINE.value,
                                        flag_prefix='--')
  files.make_writable_folder(os.fspath(builder.data_dir_root), '--data_dir')
  prepare(name, _DATA_DIR.value, _MANUAL_DIR.value, offline)


if __name__ == '__main__':
  cli.run(main)
