"""Runs a jaxcnn command line on fake TFDS data, for tests that need a process of its own.

  python tests/fake_tfds_run.py train.py --config tests/tiny_config.py [flags...]
  python tests/fake_tfds_run.py -m jaxcnn.evaluate --workdir DIR

The fake splits have the sizes in $FAKE_TFDS_SIZES (JSON, default {"train": 512, "test": 200}).
"""

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import REPO_ROOT, mock_tfds  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  sizes = json.loads(os.environ.get('FAKE_TFDS_SIZES', '{"train": 512, "test": 200}'))
  with mock_tfds(sizes):
    if sys.argv[1] == '-m':
      sys.argv = [sys.argv[2]] + sys.argv[3:]
      runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
    else:
      script = os.path.join(REPO_ROOT, sys.argv[1])
      sys.argv = [script] + sys.argv[2:]
      runpy.run_path(script, run_name='__main__')
