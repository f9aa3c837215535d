"""Multi-host runs through JAX's own distributed runtime (`jax.distributed`).

Every process runs the same command; process 0 is the coordinator. The processes are named on
the command line (`--coordinator_address`, `--num_processes`, `--process_id`) or detected from the
cluster's environment (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS), as
`jax.distributed.initialize()` does. This must run before anything touches a JAX device.
"""

import os

import jax

from jaxcnn.errors import ConfigError


def _cluster_environment() -> bool:
  """Whether the environment describes a multi-process job that JAX can join by itself."""
  def count(name):
    try:
      return int(os.environ.get(name, '1'))
    except ValueError:
      return 1
  return (count('SLURM_NTASKS') > 1 or count('OMPI_COMM_WORLD_SIZE') > 1
          or bool(os.environ.get('JAX_COORDINATOR_ADDRESS')))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a multi-process run, if it is one; a single process does nothing."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if any(value is not None for value in given.values()):
    missing = [f'--{name}' for name, value in given.items() if value is None]
    if missing:
      raise ConfigError(f'a multi-process run needs --coordinator_address, --num_processes and '
                        f'--process_id; missing {", ".join(missing)}')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id ({process_id}) must be in [0, --num_processes '
                        f'({num_processes}))')
    host, _, port = coordinator_address.rpartition(':')
    if not (host and port.isdigit() and 0 < int(port) < 65536):
      raise ConfigError(f'--coordinator_address {coordinator_address!r} must be HOST:PORT, the '
                        'address of process 0 and a free port on it, e.g. node0:12355')
    if num_processes > 1:
      print(f'process {process_id} of {num_processes}: joining the run at {coordinator_address} '
            '(JAX waits up to 5 minutes for every process to join)', flush=True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_environment():
    jax.distributed.initialize()
