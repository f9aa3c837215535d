"""A run's directory: its resolved config, its dataset record and its metrics.

  <workdir>/config.json       the config the run was started with
  <workdir>/dataset.json      name, image shape, classes, training-set size, normalisation stats
  <workdir>/model_source.json a user model's source file and its digest (zoo models: none)
  <workdir>/metrics.jsonl     one JSON record per logged step (see jaxcnn.metrics)
  <workdir>/events.out.*      TensorBoard event files
  <workdir>/checkpoints/      Orbax checkpoints (see jaxcnn.checkpoint)
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os

import ml_collections

from jaxcnn import files
from jaxcnn.errors import UserError
from jaxcnn.metrics import METRICS_FILE, DamagedMetrics, read_metrics

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
MODEL_SOURCE_FILE = 'model_source.json'


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
  """What evaluation and prediction need to know of the data a run was trained on."""
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...]
  num_train_examples: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


def new_workdir(dataset: str, model: str, root: str = 'runs') -> str:
  """Creates and returns a fresh directory `runs/<dataset>-<model>-<date>-<time>[-N]` for a run
  given no workdir (created here, so that two runs started in the same second never share it)."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  base = os.path.join(root, f'{dataset.replace("/", "_")}-{model.replace(":", "_")}-{stamp}')
  path, n = base, 1
  while True:
    try:
      os.makedirs(path)
      return path
    except FileExistsError:
      n += 1
      path = f'{base}-{n}'
    except OSError as e:  # `root` is a file, or not writable.
      raise UserError(f'cannot create a folder for the run in {root!r}: {e.strerror}; give one '
                      'with --workdir') from None


@contextlib.contextmanager
def in_use(path: str, enabled: bool = True):
  """Marks the workdir `path` as in use by this run while the block runs (an advisory lock on the
  folder itself, released when the process ends however it ends).

  Raises:
    UserError: another run holds it: two runs in one workdir would interleave their metrics and
      overwrite each other's checkpoints.
  """
  if not enabled:
    yield
    return
  descriptor = os.open(path, os.O_RDONLY)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f'--workdir {path!r} is in use by another run; wait for it to end, or give '
                      'another --workdir') from None
    yield
  finally:
    os.close(descriptor)  # Releases the lock.


def remove_if_empty(path: str) -> None:
  """Removes the folder `path` if it holds nothing (a run that ended before writing anything)."""
  try:
    os.rmdir(path)
  except OSError:  # Not empty, or already gone.
    pass


def make_workdir(path: str) -> None:
  """Creates the workdir `path` if needed, or raises a UserError saying why it cannot be one."""
  files.make_writable_folder(path, '--workdir')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the run's resolved config as `config.json` (read back by `read_config`)."""
  files.write_text_atomically(os.path.join(workdir, CONFIG_FILE),
                              config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with, as a locked ConfigDict."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f'{workdir!r} is not a jaxcnn run directory: it has no {CONFIG_FILE}')
  from jaxcnn.config import config_from_json  # pylint: disable=g-import-not-at-top  (models: jax)
  config = config_from_json(path)
  config.lock()
  return config


def write_model_source(workdir: str, digest: dict[str, str] | None) -> None:
  """Records `models.source_digest` of the run's model as `model_source.json` (none for a zoo
  model)."""
  path = os.path.join(workdir, MODEL_SOURCE_FILE)
  if digest is None:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return
  files.write_text_atomically(path, json.dumps(digest, indent=2) + '\n')


def changed_model_source(workdir: str, digest: dict[str, str] | None) -> str | None:
  """A warning where the file that defines the run's user model differs from the one the run
  last trained with (`digest` is the model's `models.source_digest` now); else None.

  A change that keeps the shapes of the model's arrays (an activation, a dropout rate) is
  otherwise silent: the checkpoint restores, and the model computes with the new code.
  """
  try:
    with open(os.path.join(workdir, MODEL_SOURCE_FILE), encoding='utf-8') as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return None  # Nothing recorded: a zoo model, or a run of an earlier jaxcnn.
  if (digest is None or not isinstance(recorded, dict) or recorded.get('model') != digest['model']
      or recorded.get('sha256') == digest['sha256']):
    return None
  return (f"warning: {digest['file']}, which defines model {digest['model']!r}, has changed since "
          f'the run in {workdir} last trained: its checkpoint now runs in the new code')


def write_dataset(workdir: str, record: DatasetRecord) -> None:
  """Records what the run was trained on as `dataset.json` (read back by `read_dataset`)."""
  files.write_text_atomically(os.path.join(workdir, DATASET_FILE),
                              json.dumps(dataclasses.asdict(record), indent=2) + '\n')


def read_dataset(workdir: str) -> DatasetRecord:
  """The `DatasetRecord` of a run, or a UserError if it has none or it cannot be read."""
  path = os.path.join(workdir, DATASET_FILE)
  if not os.path.isfile(path):
    raise UserError(f'{workdir!r} has no {DATASET_FILE}; was the run started?')
  try:
    return _load_dataset_record(path)
  except ValueError as e:
    raise UserError(f'{path!r} is not the dataset record of a jaxcnn run: {e}') from None


def _load_dataset_record(path: str) -> DatasetRecord:
  """The `DatasetRecord` in the file `path`; a ValueError saying why if it holds none."""
  try:
    with open(path, encoding='utf-8') as f:
      fields = json.load(f)
  except OSError as e:
    raise ValueError(e.strerror) from None
  names = [field.name for field in dataclasses.fields(DatasetRecord)]
  if not (isinstance(fields, dict) and sorted(fields) == sorted(names)):
    raise ValueError(f'that is a JSON object of {", ".join(names)}')
  return DatasetRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def check_same_classes(workdir: str, class_names: tuple[str, ...]) -> None:
  """Refuses data whose classes are not those the run in `workdir` was trained on, in the same
  order (an image folder's classes are its sorted folder names, so renaming, adding or removing
  one renumbers the others): the model's outputs would be read as the wrong classes."""
  recorded = read_dataset(workdir).class_names
  if tuple(recorded) == tuple(class_names):
    return

  def listed(names):
    return ', '.join(names[:10]) + (f', ... ({len(names)} in all)' if len(names) > 10 else '')
  raise UserError(f'the classes of the data have changed since the run in {workdir!r} was '
                  f'trained: it learned {listed(tuple(recorded))}; the data now has '
                  f'{listed(tuple(class_names))}. Restore the data as it was, or train a new '
                  '--workdir')


def find_runs(root: str) -> list[str]:
  """The run folders (those holding a `config.json`) directly under `root`, sorted by name."""
  if not os.path.isdir(root):
    return []
  return sorted(os.path.join(root, name) for name in os.listdir(root)
                if os.path.isfile(os.path.join(root, name, CONFIG_FILE)))


def check_can_hold_run(path: str) -> None:
  """Refuses a workdir that holds a file of a run's name that is not a jaxcnn run's, which the
  run would overwrite (a new run in a folder of other files, or one with `--workdir` mistyped),
  and a folder of runs that is not a run itself.

  Files of other names are left alone: a run writes only its own.
  """
  def refuse(name, why):
    raise UserError(f'--workdir {path!r} holds a {name} that is not a jaxcnn run\'s ({why}), '
                    'which the run would overwrite; give a new or empty folder, or the workdir of '
                    'a jaxcnn run to resume it')

  config_path = os.path.join(path, CONFIG_FILE)
  runs = [] if os.path.isfile(config_path) else [os.path.basename(run) for run in find_runs(path)]
  if runs:  # `--workdir runs` for `--workdir runs/NAME`: the run would be mixed in with those.
    raise UserError(f'--workdir {path!r} holds other runs ({", ".join(runs[:3])}'
                    f'{", ..." if len(runs) > 3 else ""}) and is not one itself; give the run '
                    f'a folder of its own, e.g. --workdir {os.path.join(path, "NAME")}')
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding='utf-8') as f:
        values = json.load(f)
    except (OSError, ValueError) as e:
      refuse(CONFIG_FILE, f'not JSON: {e}')
    if not (isinstance(values, dict) and {'dataset', 'model', 'batch_size'} <= values.keys()):
      refuse(CONFIG_FILE, 'no dataset, model and batch_size keys')
  if os.path.isfile(os.path.join(path, DATASET_FILE)):
    try:
      _load_dataset_record(os.path.join(path, DATASET_FILE))
    except ValueError as e:
      refuse(DATASET_FILE, str(e))
  if os.path.isfile(os.path.join(path, METRICS_FILE)):
    try:
      read_metrics(path)
    except DamagedMetrics as e:
      refuse(METRICS_FILE, e.reason)


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops metric records after `last_step` (a resumed run logs those steps again) and the
  end-of-run times of an earlier process."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return
  kept = [record for record in read_metrics(workdir)  # Less a last line cut short by a kill.
          if record['step'] <= last_step
          # An earlier process's end-of-run times: the resumed run writes the run's own.
          and not all(key == 'step' or key.startswith('time/') for key in record)]
  files.write_text_atomically(path, ''.join(json.dumps(record) + '\n' for record in kept))
