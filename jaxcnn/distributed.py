"""Multi-host runs through JAX's own distributed runtime (`jax.distributed`).

Every process runs the same command; process 0 is the coordinator. The processes are named on
the command line (`--coordinator_address`, `--num_processes`, `--process_id`) or detected from the
cluster's environment (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS), as
`jax.distributed.initialize()` does. This must run before anything touches a JAX device.
"""

import errno
import os
import socket
import sys
import threading

import jax

from jaxcnn.errors import ConfigError

DEFAULT_JOIN_TIMEOUT_S = 300  # JAX's own default.
# JAX takes its deadline as a 32-bit number of seconds; a week is more than any cluster waits.
MAX_JOIN_TIMEOUT_S = 7 * 24 * 3600
# JAX's own deadline, set this much later than ours: when it passes first, JAX ends the process
# with a C++ abort and a stack trace.
_JAX_DEADLINE_MARGIN_S = 60


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
               process_id: int | None = None,
               join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S) -> None:
  """Joins this process to a multi-process run, if it is one; a single process does nothing.

  A process that is still waiting for the others after `join_timeout_s` seconds ends with a
  one-line error and exit status 2.
  """
  if not 1 <= join_timeout_s <= MAX_JOIN_TIMEOUT_S:
    raise ConfigError(f'--join_timeout must be a number of seconds from 1 to '
                      f'{MAX_JOIN_TIMEOUT_S} (a week), got {join_timeout_s}')
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if any(value is not None for value in given.values()):
    missing = [f'--{name}' for name, value in given.items() if value is None]
    if missing:
      raise ConfigError(f'a multi-process run needs --coordinator_address, --num_processes and '
                        f'--process_id; missing {", ".join(missing)}')
    if num_processes < 1:
      raise ConfigError(f'--num_processes must be a positive number of processes, got '
                        f'{num_processes}')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id ({process_id}) must be in [0, --num_processes '
                        f'({num_processes}))')
    host, _, port = coordinator_address.rpartition(':')
    if not (host and port.isdigit() and 0 < int(port) < 65536):
      raise ConfigError(f'--coordinator_address {coordinator_address!r} must be HOST:PORT, the '
                        'address of process 0 and a free port on it, e.g. node0:12355')
    _check_host_resolves(coordinator_address, host)
    if process_id == 0:  # JAX starts its coordinator there, even for a run of one process.
      _check_port_is_free(coordinator_address, int(port))
    if num_processes > 1:
      print(f'process {process_id} of {num_processes}: joining the run at {coordinator_address} '
            f'(waiting up to {join_timeout_s} s for every process to join; --join_timeout)',
            flush=True)
    _join(join_timeout_s, coordinator_address=coordinator_address,
          num_processes=num_processes, process_id=process_id)
  elif _cluster_environment():
    _join(join_timeout_s)


def _check_host_resolves(address: str, host: str) -> None:
  """Raises ConfigError if `host` (of `address`, HOST:PORT; an IPv6 host may be in brackets)
  does not resolve: JAX would only say so when the join timeout passed."""
  name = host[1:-1] if host.startswith('[') and host.endswith(']') else host
  try:
    socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
  except (socket.gaierror, UnicodeError) as e:
    reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
    raise ConfigError(f'--coordinator_address {address!r}: host {name!r} does not resolve '
                      f"({reason}); give the name or IP address of process 0's host") from None


def _check_port_is_free(address: str, port: int) -> None:
  """Raises ConfigError if another program listens on `port` here, where process 0's
  coordinator is to listen: JAX's coordinator, failing to, crashes the process (a segfault and
  pages of log). Another program may still take the port between this check and JAX's."""
  if 'JAX_COORDINATOR_BIND_ADDRESS' in os.environ:
    return  # JAX listens where that says, not on the port of `address`.
  # JAX's coordinator (jax/_src/distributed.py, `coordinator_bind_address`) listens on
  # '[::]:PORT', every interface, so a program on any of them takes the port from it: the probe
  # listens on the wildcard address of IPv4 and of IPv6 (where the host has it), and closes at
  # once. SO_REUSEADDR as gRPC sets it, so that a recent run's connections left in TIME_WAIT on
  # the port are no conflict; no SO_REUSEPORT, which would share the port with a listener.
  families = [(socket.AF_INET, '0.0.0.0')]
  if socket.has_ipv6:
    families.append((socket.AF_INET6, '::'))
  for family, wildcard in families:
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # This host has no such family (IPv6 turned off); JAX cannot listen on it either.
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:  # Only IPv6 here: IPv4 was probed on its own.
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
      try:
        probe.bind((wildcard, port))
        probe.listen()
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise ConfigError(f'--coordinator_address {address!r}: port {port} is already in use '
                            "on this host (process 0's coordinator listens on it); choose a free "
                            'port') from None
        if e.errno == errno.EACCES:
          raise ConfigError(f'--coordinator_address {address!r}: port {port} may not be '
                            "listened on by this user (process 0's coordinator listens on it); "
                            'choose a free port above 1023') from None
        # Anything else (no IPv6 address configured, ...) is for JAX to meet and report.


def _join(timeout_s: int, **arguments) -> None:
  """`jax.distributed.initialize(**arguments)`, given up after `timeout_s` in one line.

  JAX's own deadline ends the process with a C++ abort and a stack trace, so JAX is given a later
  one and joins in a thread that this one stops waiting for. Its wait cannot be cancelled, and
  Python's shutdown would wait on JAX's coordination service (with pages of C++ log lines) before
  exiting: so the process ends at once. Nothing has been written by then.
  """
  finished = threading.Event()
  failure = []

  def join():
    try:
      jax.distributed.initialize(**arguments,
                                 initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the caller)
      failure.append(e)
    finally:
      finished.set()

  threading.Thread(target=join, name='jax-distributed-join', daemon=True).start()
  if not finished.wait(timeout_s):
    who = (f'process {arguments["process_id"]} of {arguments["num_processes"]}'
           if 'process_id' in arguments else 'this process')
    print(f'error: {who} waited {timeout_s} s and not every process joined the run; start the '
          'same command on every host with its own --process_id, the same --num_processes and '
          "process 0's HOST:PORT as --coordinator_address (or a longer --join_timeout)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # pylint: disable=protected-access
  if failure:
    raise failure[0]
