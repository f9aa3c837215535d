"""The config file through which a run's `config.json` is read: `config_flags` reads only Python.

  python train.py --config runs/RUN/config.json --workdir runs/RUN

is read as `--config jaxcnn/config_from_json.py:runs/RUN/config.json` (see `jaxcnn.cli`).
"""

from jaxcnn.config import config_from_json


def get_config(path: str):
  """The config recorded in the `config.json` at `path`."""
  return config_from_json(path)
