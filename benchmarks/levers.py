"""A/B runs of two speed levers on this machine's device, in one invocation, as JSON.

  python benchmarks/levers.py [--steps 1000] [--repeats 5] [--spc 1,5,25,100]
      [--placements device,stream] [--mnist_dir ../shared/datasets/mnist] [--data_dir DIR]
      [--output PATH]

* Steps per compiled call (`config.steps_per_call`: a `lax.scan` of K train steps per call):
  `configs/mnist.py`'s network and batch on synthetic data in device memory
  (`measure.measure_throughput`), images/s for each K, and each K's ratio to the backend's
  default (`trainer.default_steps_per_call`: 25 on accelerators, 1 on the CPU, where a scan runs
  each step far slower). A call costs a dispatch from Python, which an accelerator feels when a
  step is short.
* Where the data lives (`config.data_placement`): `configs/mnist.py:speedrun` trained to its end
  with MNIST held in device memory (augmentation inside the compiled step) and streamed through
  Grain, the training and data-waiting seconds and the final test accuracy of each, and each one's
  training seconds against the device-memory run's.

`--quick` (few steps, `configs/mnist.py:smoke` for the placements) is a smoke check, not a
measurement. The GPU machine's call: `python3 benchmarks/levers.py --output $OUT/levers.json`
after `source .device/env.sh` (benchmarks/on_device.sh says how to stage that).
"""

import datetime
import os
import sys
import tempfile

import jax
from absl import app, flags

from jaxcnn import cli
from jaxcnn.trainer import default_steps_per_call, train_and_evaluate
from measure import REPO_ROOT, device_description, emit_json, measure_throughput

_STEPS = flags.DEFINE_integer('steps', 1000, 'Train steps per timed repeat of a throughput.',
                              lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats of a throughput; the median counts.',
                                lower_bound=1)
_SPC = flags.DEFINE_list('spc', ['1', '5', '25', '100'], 'Steps per compiled call to compare.')
_PLACEMENTS = flags.DEFINE_list('placements', ['device', 'stream'],
                                'Data placements to compare (device, stream).')
_MNIST_DIR = flags.DEFINE_string(
    'mnist_dir', os.path.join(REPO_ROOT, '..', 'shared', 'datasets', 'mnist'),
    'The official MNIST files, for TFDS to prepare MNIST from if it is not prepared yet.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: TFDS\'s own).')
_QUICK = flags.DEFINE_bool('quick', False, 'Few steps and the smoke config: a smoke check.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON here.')

PLACEMENTS = ('device', 'stream')


def _config(variant: str):
  return cli.load_config_file(os.path.join(REPO_ROOT, f'configs/mnist.py{variant}'))


def steps_per_call(values: list[int], steps: int, repeats: int, variant: str = '') -> dict:
  """Images/s of `configs/mnist.py<variant>` at each number of steps per compiled call, and each
  one's ratio to the backend's default number."""
  default = default_steps_per_call(jax.default_backend())
  runs = {}
  for value in dict.fromkeys([*values, default]):  # The default is the reference, measured too.
    config = _config(variant)
    config.steps_per_call = value
    runs[str(value)] = measure_throughput(config, steps, repeats)
  reference = runs[str(default)]['examples_per_sec']
  return {'default': default,
          'runs': {k: {**run, 'ratio_to_default': run['examples_per_sec'] / reference}
                   for k, run in runs.items()}}


def data_placement(placements: list[str], variant: str, mnist_dir: str,
                   data_dir: str | None = None, num_train_steps: int = 0) -> dict:
  """A whole training run of `configs/mnist.py<variant>` with its data in each placement: the
  seconds it trained and waited for data, its final test accuracy, and its training seconds
  against the first placement's."""
  runs = {}
  for placement in placements:
    config = _config(variant)
    config.data_placement, config.manual_dir, config.data_dir = placement, mnist_dir, data_dir
    if num_train_steps:
      config.num_train_steps = num_train_steps
    with tempfile.TemporaryDirectory() as workdir:
      result = train_and_evaluate(config, workdir)  # Its final metrics hold the phases' seconds.
    runs[placement] = {'train_seconds': result['time/train_seconds'],
                       'data_seconds': result['time/data_seconds'],
                       'compile_seconds': result['time/compile_seconds'],
                       'test_accuracy': result['test/accuracy'], 'steps': result['step']}
  reference = runs[placements[0]]['train_seconds']
  for run in runs.values():
    run[f'train_seconds_ratio_to_{placements[0]}'] = run['train_seconds'] / reference
  return {'config': f'configs/mnist.py{variant}', 'runs': runs}


def check_choices(values: list[str], placements: list[str]) -> list[int]:
  """The steps-per-call values as numbers; a one-line UsageError for a bad one or placement."""
  numbers = []
  for value in values:
    if not value.isdigit() or int(value) < 1:
      raise app.UsageError(f'--spc {value!r} is not a number of steps of at least 1')
    numbers.append(int(value))
  unknown = [p for p in placements if p not in PLACEMENTS]
  if unknown or not placements:
    raise app.UsageError(f'--placements {",".join(placements)!r}: choose from '
                         f'{", ".join(PLACEMENTS)}')
  return numbers


def main(argv):
  del argv
  values = check_choices(_SPC.value, _PLACEMENTS.value)
  quick = _QUICK.value
  steps, repeats = (4, 1) if quick else (_STEPS.value, _REPEATS.value)
  result = {**device_description(),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': ' '.join(['python'] + sys.argv), 'quick': quick,
            'steps_per_call': steps_per_call(values, steps, repeats),
            'data_placement': data_placement(_PLACEMENTS.value,
                                             ':smoke' if quick else ':speedrun',
                                             _MNIST_DIR.value, _DATA_DIR.value,
                                             8 if quick else 0)}
  emit_json(result, _OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
