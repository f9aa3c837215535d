"""Trains and evaluates a CNN.

  python train.py --config configs/mnist.py [--workdir DIR] [--config.KEY=VALUE ...]

Without --workdir every run gets a new directory under runs/. A multi-host run starts the same
command on every host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or
under SLURM / Open MPI, which JAX detects by itself). All the work is done by
`jaxcnn.trainer.train_and_evaluate`; this file only parses the command line.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxcnn import cli, distributed
from jaxcnn.errors import UserError
from jaxcnn.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/mnist.py or configs/mnist.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for the config, metrics, TensorBoard files and checkpoints of '
    'the run (default: a new directory under runs/).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_JOIN_TIMEOUT = flags.DEFINE_integer(
    'join_timeout', distributed.DEFAULT_JOIN_TIMEOUT_S,
    'Seconds each process of a multi-process run waits for all to join before giving up.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _WORKDIR.value == '':  # As from --workdir=$DIR with DIR unset: not a new folder in runs/.
    raise UserError("--workdir is empty; give a folder, or leave --workdir out for a new one "
                    'under runs/')
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _JOIN_TIMEOUT.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main, config_flag='config')
