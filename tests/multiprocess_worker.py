"""One process of a multi-process run on localhost, for test_parallel.py.

  python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID DEVICES STRATEGY WORKDIR

Trains the tiny config on fake data over DEVICES CPU devices per process; process 0 prints the
final metrics as JSON on its last line.
"""

import json
import os
import sys

coordinator, num_processes, process_id, devices, strategy, workdir = sys.argv[1:]
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
sys.path.insert(0, os.path.dirname(__file__))

from conftest import mock_tfds, tiny_config  # pylint: disable=g-import-not-at-top
from jaxcnn import distributed, trainer  # pylint: disable=g-import-not-at-top

distributed.initialize(coordinator, int(num_processes), int(process_id))
with mock_tfds({'train': 512, 'test': 200}):
  config = tiny_config(model='bn_cnn', parallel=strategy, num_devices=-1,
                       **{'augment.crop_padding': 2})
  result = trainer.train_and_evaluate(config, workdir)
if int(process_id) == 0:
  print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
