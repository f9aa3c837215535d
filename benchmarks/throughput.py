"""Training throughput of a config on this machine's devices, as JSON.

  python benchmarks/throughput.py --config configs/mnist.py [--steps 100] [--repeats 5]
      [--config.batch_size=256 ...]

Runs the config's real compiled train function (model, optimizer, augmentation, parallel
strategy, steps per call) on synthetic uint8 images of the dataset's shape held in device memory,
so the input pipeline is not measured and no dataset needs to be prepared (nor, for
`configs/imagefolder.py`, an image folder given). Prints one JSON object: the compile time, and
the median (with min and max) of `--repeats` timings of `--steps` steps.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from jaxcnn import cli
from measure import device_description, measure_throughput

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file to measure.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 100, 'Train steps per timed repeat.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.',
                                lower_bound=1)


def main(argv):
  del argv
  result = measure_throughput(_CONFIG.value, _STEPS.value, _REPEATS.value)
  print(json.dumps({**device_description(), **result,
                    'command': ' '.join(['python'] + sys.argv)}, indent=2))


if __name__ == '__main__':
  cli.run(main, config_flag='config')
