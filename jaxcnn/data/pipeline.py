"""From a config to training and evaluation data: which dataset, what size, and where it lives.

Small datasets go to device memory (`device_data`), large ones stream through Grain
(`streaming`); `config.data_placement` forces either, and 'auto' chooses by size. Besides TFDS
names, `dataset` may be `imagefolder` (the user's own images, `image_folder.py`) or `synthetic`
(no data at all; also used by `:smoke` configs whose dataset is not prepared).
"""

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxcnn import files
from jaxcnn.data import decoded_index, device_data, image_folder, synthetic, tfds_data
from jaxcnn.data.augment import channel_stats
from jaxcnn.data.image_ops import CENTRE_CROP_FRACTION, resize_and_center_crop
from jaxcnn.errors import ConfigError, DataError, UserError

SYNTHETIC = 'synthetic'
IMAGE_FOLDER = 'imagefolder'
# Without a device memory figure (CPU), datasets up to this size are kept in memory.
_HOST_DEVICE_BYTES = 4 << 30
# A device keeps a dataset if it takes at most this fraction of the device's memory.
_DEVICE_MEMORY_FRACTION = 0.25
_STATS_SAMPLE = 1024

T = TypeVar('T')


@dataclasses.dataclass
class Data:
  """A dataset ready for the feeds: its description, statistics, and both splits.

  `train` and `eval` are host `DeviceSplit`s for `placement='device'` and random-access data
  sources (`tfds.data_source`) for `placement='stream'`.
  """
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...]
  num_train_examples: int
  num_eval_examples: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  placement: str
  train: object
  eval: object
  image_key: str = 'image'
  label_key: str = 'label'


def check_dataset(config) -> tfds_data.DatasetInfo | None:
  """Fails at once, before any work, on a dataset that cannot exist; returns a TFDS dataset's
  metadata (None for an image folder or synthetic data)."""
  if config.dataset == IMAGE_FOLDER:
    if not config.image_folder and not config.synthetic_if_unprepared:
      raise ConfigError("dataset 'imagefolder' needs --config.image_folder=ROOT, a folder of "
                        'ROOT/<split>/<class>/<images>')
    if config.image_folder and os.path.isdir(config.image_folder):
      # Before the folder is read and written as a dataset, which takes a while.
      splits = image_folder.split_folders(config.image_folder)
      for key in ('train_split', 'eval_split'):
        # A TFDS split spec of the folders: 'train', or 'train[:90%]' to hold out a part.
        missing = [name for name in tfds_data.split_names(config[key]) if name not in splits]
        if missing:
          raise ConfigError(f'image folder {config.image_folder!r} has no split folder '
                            f'{missing[0]!r} (config key {key!r} is {config[key]!r}); it has: '
                            f'{", ".join(splits) or "none"}')
  elif config.dataset != SYNTHETIC:
    recorded = decoded_index.lookup(config.dataset, config.data_dir)
    # TFDS's metadata names the splits of a dataset, prepared or not.
    info = (tfds_data.info_from_json(recorded.info) if recorded else
            tfds_data.dataset_info(tfds_data.get_builder(config.dataset, config.data_dir)))
    _check_splits(config, info)
    return info
  return None


def _check_splits(config, info: tfds_data.DatasetInfo) -> None:
  for split in (config.train_split, config.eval_split):
    tfds_data.check_split(info, split)


def warn_of_shared_examples(config, info: tfds_data.DatasetInfo) -> None:
  """Warns (on process 0) where `eval_split` reads examples that `train_split` trains on: the
  accuracy it reports would be partly on training data."""
  shared = tfds_data.shared_examples(info, config.train_split, config.eval_split)
  if shared and jax.process_index() == 0:
    print(f'warning: eval_split {config.eval_split!r} shares {shared:,} examples with '
          f'train_split {config.train_split!r}: its accuracy is partly on training data; hold '
          "them out of train_split (e.g. 'train[:90%]' beside 'train[90%:]')",
          file=sys.stderr, flush=True)


def input_spec(config) -> tuple[tuple[int, int, int], int]:
  """The image shape the model sees and the number of classes, without reading any image.

  For a model built without its data (throughput benchmarks, `jaxcnn.summary --config`): the
  config's synthetic shape, or the dataset's metadata with `image_size` applied as `load_data`
  applies it. An image folder is listed and prepared, as training would; where none is given,
  the shape is that of the synthetic stand-in a smoke run trains on.
  """
  if config.dataset == IMAGE_FOLDER and not config.image_folder:
    return _folder_stand_in_shape(config), config.synthetic.num_classes
  check_dataset(config)
  if config.dataset == SYNTHETIC:
    return tuple(config.synthetic.image_shape), config.synthetic.num_classes
  if config.dataset == IMAGE_FOLDER:
    builder = image_folder.ensure_prepared(config.image_folder, config.data_dir,
                                           splits=(config.train_split, config.eval_split))
  else:
    builder = tfds_data.get_builder(config.dataset, config.data_dir)
  info = tfds_data.dataset_info(builder)
  return _image_shape(config, info), info.num_classes


def load_data(config, train: bool = True, flag_prefix: str = '--config.') -> Data:
  """Prepares (if needed) and loads the config's dataset for training and evaluation.

  A device-resident TFDS dataset that an earlier run decoded is read from the decoded cache
  without TFDS (see `decoded_index`).

  With `train=False` only the evaluation split is read (for evaluating a trained run, which
  normalises with its own statistics): `train`, `mean` and `std` are then None.

  In a multi-process run process 0 loads first (preparing and decoding what is needed), then the
  others, which find that work done where the data_dir is shared.

  `flag_prefix` begins the flags that set `data_dir` and `manual_dir` in the command the user
  ran (`--config.` for train.py, `--` for evaluate), for the messages.
  """
  check_dataset(config)
  if config.dataset == SYNTHETIC:
    return _synthetic(config, tuple(config.synthetic.image_shape), config.synthetic.num_classes,
                      name=SYNTHETIC)
  # Decided before process 0 loads alone: a collective between processes, where there are several.
  budget = device_data_budget() if config.data_placement == 'auto' else None
  return process_0_first(lambda: _load(config, train, flag_prefix, budget))


def device_data_budget() -> float:
  """The bytes of data that `data_placement='auto'` keeps in device memory: a fraction of the
  first local device's memory (a fixed size for a CPU, which reports none).

  In a multi-process run, the least of every process's: hosts may differ in what their devices
  hold free, and all processes must feed their steps the same way.
  """
  stats = jax.local_devices()[0].memory_stats() or {}
  budget = (stats['bytes_limit'] * _DEVICE_MEMORY_FRACTION if 'bytes_limit' in stats
            else _HOST_DEVICE_BYTES)
  if jax.process_count() > 1:
    budget = float(np.min(multihost_utils.process_allgather(np.float32(budget))))
  return budget


def _load(config, train: bool, flag_prefix: str, budget: float | None) -> Data:
  """`load_data` of an image folder or a TFDS dataset."""
  if config.dataset == IMAGE_FOLDER:
    if not config.image_folder:
      shape = _folder_stand_in_shape(config)
      print(f'no image_folder given: using synthetic data of shape {shape} '
            '(synthetic_if_unprepared)', flush=True)
      return _synthetic(config, shape, config.synthetic.num_classes, name='synthetic imagefolder')
    builder = image_folder.ensure_prepared(config.image_folder, config.data_dir,
                                           _splits_read(config, train), flag_prefix)
  else:
    recorded = _read_recorded(config, train, budget)
    if recorded is not None:
      return recorded
    builder = tfds_data.get_builder(config.dataset, config.data_dir)
    if (config.synthetic_if_unprepared and not builder.is_prepared()
        and not _preparable_offline(builder, config.manual_dir)):
      info = tfds_data.dataset_info(builder)
      shape = _image_shape(config, info)
      print(f'{config.dataset} is not prepared: using synthetic data of its shape {shape} '
            '(synthetic_if_unprepared)', flush=True)
      return _synthetic(config, shape, info.num_classes, name=f'synthetic {config.dataset}')
    builder = tfds_data.ensure_prepared(config.dataset, config.data_dir, config.manual_dir,
                                        flag_prefix)
  info = tfds_data.dataset_info(builder)
  _check_splits(config, info)
  if train and config.dataset == IMAGE_FOLDER:  # A TFDS dataset's were checked before loading.
    warn_of_shared_examples(config, info)
  splits = _splits_read(config, train)
  if info.split_sizes:  # A slice's spec is checked by TFDS itself (mocked datasets have none).
    for split in splits:
      if tfds_data.split_num_examples(builder, split) == 0:
        sizes = ', '.join(f'{name} {size}' for name, size in sorted(info.split_sizes.items()))
        raise ConfigError(f'split {split!r} of dataset {info.name!r} selects no examples; give '
                          f'a split or slice that holds some (examples per split: {sizes})')
  shape = _image_shape(config, info)
  placement = _placement(config, info, shape, budget)
  common = _common(info, shape, placement)
  if placement == 'device':
    data = _device_resident(config, common, lambda split, crop_fraction: tfds_data.read_split(
        builder, split, shape, crop_fraction=crop_fraction), train)
    if config.dataset != IMAGE_FOLDER and info.split_sizes:
      # Only splits that read_split could cache (mocked datasets record no sizes, so none).
      decoded_index.record(
          config.dataset, config.data_dir, info=tfds_data.info_to_json(info),
          prepared_dir=os.fspath(builder.data_dir),
          split_files={decoded_index.split_key(split, shape, crop_fraction):
                       tfds_data.split_cache_file(builder, split, shape,
                                                  crop_fraction=crop_fraction)
                       for split, crop_fraction in _decoded_splits(config, train)})
    return data
  evaluation = builder.as_data_source(split=config.eval_split)
  if not train:
    return Data(**common, num_train_examples=0, num_eval_examples=len(evaluation), mean=None,
                std=None, train=None, eval=evaluation)
  train_source = builder.as_data_source(split=config.train_split)
  mean, std = _sample_stats(train_source, shape, info.image_key)
  return Data(**common, num_train_examples=len(train_source), num_eval_examples=len(evaluation),
              mean=mean, std=std, train=train_source, eval=evaluation)


def process_0_first(work: Callable[[], T]) -> T:
  """`work()` on process 0 first, then on the other processes of a multi-process run.

  Run at once, the processes would all prepare (and decode) the same folder of a shared data_dir;
  after process 0 the others find it done (or do their own, where each host has its own
  data_dir). Every process takes part whatever its own work will find, so that none waits for
  another at a different point. A user error on process 0 is raised after the others are let go,
  so that they meet it themselves rather than wait for a process that has ended.
  """
  if jax.process_count() == 1:
    return work()
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = work()
    except UserError as e:
      error = e
  multihost_utils.sync_global_devices('jaxcnn_data_loaded_by_process_0')
  if error is not None:
    raise error
  return result if jax.process_index() == 0 else work()


def _training_crop_fraction(config) -> float:
  """The share of each image's shorter side that device-resident training data keeps where
  images must be resized: the evaluation's centre, as streamed training takes it, unless the
  images are Inception-cropped. Those crops are drawn from the whole shorter side, as streamed ones
  are from the whole image; drawn from the evaluation's centre, they left an eighth of each side
  out of every crop, and a crop of the whole area was the evaluation's view."""
  return 1.0 if config.augment.inception_crop else CENTRE_CROP_FRACTION


def _decoded_splits(config, train: bool) -> tuple[tuple[str, float], ...]:
  """The (split, crop fraction) pairs of device-resident data: the evaluation split's, and with
  `train` the training split's."""
  evaluation = (config.eval_split, CENTRE_CROP_FRACTION)
  if not train:
    return (evaluation,)
  return ((config.train_split, _training_crop_fraction(config)), evaluation)


def _device_resident(config, common: dict, read_split, train: bool) -> Data:
  """Data with both splits in memory, read by `read_split(split, crop_fraction) -> (images,
  labels)`."""
  eval_images, eval_labels = read_split(config.eval_split, CENTRE_CROP_FRACTION)
  evaluation = device_data.pad_split(eval_images, eval_labels,
                                     pad_to_multiple_of=config.eval_batch_size)
  if not train:
    return Data(**common, num_train_examples=0, num_eval_examples=len(eval_labels), mean=None,
                std=None, train=None, eval=evaluation)
  train_images, train_labels = read_split(config.train_split, _training_crop_fraction(config))
  mean, std = channel_stats(train_images)
  return Data(**common, num_train_examples=len(train_labels),
              num_eval_examples=len(eval_labels), mean=mean, std=std,
              train=device_data.pad_split(train_images, train_labels), eval=evaluation)


def _read_recorded(config, train: bool, budget: float | None) -> Data | None:
  """The device-resident Data of a TFDS dataset that an earlier run decoded and recorded in
  `decoded_index`, read without importing TFDS; None where the TFDS path must run."""
  entry = decoded_index.lookup(config.dataset, config.data_dir)
  if entry is None:
    return None
  info = tfds_data.info_from_json(entry.info)
  splits = _splits_read(config, train)
  if not all(tfds_data.reads_known_splits(info, split) for split in splits):
    return None  # The TFDS path names the splits that exist.
  shape = _image_shape(config, info)
  paths = {(split, crop_fraction): entry.split_file(split, shape, crop_fraction)
           for split, crop_fraction in _decoded_splits(config, train)}
  if _placement(config, info, shape, budget) != 'device' or None in paths.values():
    return None
  arrays = {decoded: files.load_arrays(path) for decoded, path in paths.items()}
  if None in arrays.values():  # Damaged, and removed: the TFDS path decodes it again.
    return None

  def read_split(split, crop_fraction):
    decoded = arrays[split, crop_fraction]
    return decoded['images'], decoded['labels']

  return _device_resident(config, _common(info, shape, 'device'), read_split, train)


def _splits_read(config, train: bool) -> tuple[str, ...]:
  """The splits `load_data` reads: the evaluation split, and with `train` the training split."""
  return (config.train_split, config.eval_split) if train else (config.eval_split,)


def _common(info, shape, placement) -> dict:
  """The fields of Data that describe the dataset."""
  return dict(name=info.name, image_shape=shape, num_classes=info.num_classes,
              class_names=info.class_names, placement=placement, image_key=info.image_key,
              label_key=info.label_key)


def _image_shape(config, info) -> tuple[int, int, int]:
  """The size the model sees: `image_size` if set, else the dataset's own (fixed) size."""
  channels = info.image_shape[-1]
  if config.image_size > 0:
    return (config.image_size, config.image_size, channels)
  if None in info.image_shape:
    raise ConfigError(f'dataset {info.name!r} has images of varied sizes; set '
                      '--config.image_size to the size to train at (e.g. 224)')
  return tuple(info.image_shape)


def _preparable_offline(builder, manual_dir: str | None) -> bool:
  """Whether every file of the dataset is in manual_dir, so that it can be prepared here."""
  try:
    return tfds_data.check_can_prepare(builder, manual_dir, offline=True)
  except DataError:
    return False


def _folder_stand_in_shape(config) -> tuple[int, int, int]:
  """The shape of the synthetic data that stands in for an image folder that was not given."""
  return (config.image_size or 64,) * 2 + (3,)


def _placement(config, info, shape, budget: float | None) -> str:
  """'device' or 'stream': the config's, or for 'auto' whether the two splits fit in `budget`
  bytes (`device_data_budget()`)."""
  if config.data_placement != 'auto':
    return config.data_placement
  if not info.split_sizes:  # Sizes unknown (a mocked dataset): small by construction.
    return 'device'
  size = sum(tfds_data.split_size_bound(info, s) for s in (config.train_split, config.eval_split))
  size *= int(np.prod(shape))
  return 'device' if size <= budget else 'stream'


def sample_indices(num_examples: int, count: int) -> np.ndarray:
  """`count` example indices (all of them, if fewer) drawn from the whole split without
  replacement, with a fixed seed, in increasing order.

  Not the first `count`: an image folder's examples are stored sorted by class, so its first
  images would describe one class.
  """
  if count >= num_examples:
    return np.arange(num_examples)
  return np.sort(np.random.default_rng(0).choice(num_examples, count, replace=False))


def training_sample(data: Data, count: int) -> np.ndarray:
  """`count` of `data`'s training images (`sample_indices`; all, if fewer), uint8 at the model's
  input size: from memory, or for streamed data decoded and centre-cropped as evaluation views
  them."""
  indices = sample_indices(data.num_train_examples, count)
  if data.placement == 'device':
    return np.asarray(data.train.images[indices])
  return _decode_examples(data.train, indices, data.image_shape, data.image_key)


def _decode_examples(source, indices: np.ndarray, shape, image_key: str) -> np.ndarray:
  height, width, _ = shape
  return np.stack([resize_and_center_crop(np.asarray(example[image_key]), height, width)
                   for example in source.__getitems__(indices.tolist())])


def _sample_stats(source, shape, image_key: str):
  """Channel statistics of a sample of the training images, for data never held in memory."""
  indices = sample_indices(len(source), _STATS_SAMPLE)
  return channel_stats(_decode_examples(source, indices, shape, image_key))


def is_synthetic(dataset_name: str) -> bool:
  """Whether a `Data.name` (as recorded in a run's dataset.json) is synthetic data: 'synthetic',
  or 'synthetic <dataset>' standing in for a dataset that was not prepared."""
  return dataset_name.split()[0] == SYNTHETIC


def _synthetic(config, shape, num_classes: int, name: str) -> Data:
  """Synthetic data of two splits: `train_split` names the training images, and `eval_split`
  the evaluation images, or the training images again where it names the same split."""
  spec = config.synthetic
  train_images, train_labels = synthetic.synthetic_split(spec.num_train, shape, num_classes, 0)
  if config.eval_split == config.train_split:
    eval_images, eval_labels = train_images, train_labels
  else:
    eval_images, eval_labels = synthetic.synthetic_split(spec.num_eval, shape, num_classes, 1)
  mean, std = channel_stats(train_images)
  common = dict(name=name, image_shape=tuple(shape), num_classes=num_classes,
                class_names=tuple(str(i) for i in range(num_classes)),
                num_train_examples=spec.num_train, num_eval_examples=len(eval_labels),
                mean=mean, std=std)
  if config.data_placement == 'stream':  # Through Grain, as the dataset it stands in for.
    return Data(**common, placement='stream',
                train=synthetic.ArraySource(train_images, train_labels),
                eval=synthetic.ArraySource(eval_images, eval_labels))
  return Data(**common, placement='device',
              train=device_data.pad_split(train_images, train_labels),
              eval=device_data.pad_split(eval_images, eval_labels,
                                         pad_to_multiple_of=config.eval_batch_size))


def usable_cpu_cores() -> int:
  """The CPU cores this process may run on: its affinity (taskset, a cgroup's cpuset), which
  os.cpu_count() ignores, where the system tells it; else every core of the machine."""
  if hasattr(os, 'sched_getaffinity'):
    return max(1, len(os.sched_getaffinity(0)))
  return os.cpu_count() or 1


def default_data_workers() -> int:
  """Grain worker processes: one per CPU core this process may use, at most 16 (decoding is
  per-core work); none when the CPU itself trains, whose cores the workers would only take from
  it (a 60-step streamed MNIST run on 2 cores trained in 8.5 s without workers and 20.7 s
  with 2)."""
  if jax.default_backend() == 'cpu':
    return 0
  return max(1, min(usable_cpu_cores(), 16))
