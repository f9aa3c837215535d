"""A config that trains in seconds on the fake dataset of tests/conftest.py (for subprocesses).

`tests/tiny_config.py:NAME` picks the model (default lenet5).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # pylint: disable=g-import-not-at-top


def get_config(model: str = 'lenet5'):
  return tiny_config(model=model)
