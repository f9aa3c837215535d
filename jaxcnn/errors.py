"""Errors that end a run with a one-line message instead of a traceback.

Anything raised as a `UserError` is reported by the command-line entry points as a single line
(`error: ...`) with exit status 2: a mistyped key, an unknown model, a dataset that cannot be
found. A run that diverges ends with one line and exit status 1. Bugs in jaxcnn itself are
neither, and keep their tracebacks.
"""


class JaxcnnError(Exception):
  """An expected way for a run to end early, reported in one line with `exit_status`."""
  exit_status = 1
  label = 'error'  # The word before the message.


class UserError(JaxcnnError):
  """A mistake in what the user asked for; the message says what was wrong and what is accepted."""
  exit_status = 2


class ConfigError(UserError):
  """A config key or value that is not accepted."""


class DataError(UserError):
  """A dataset that cannot be found, prepared or read."""


class TrainingDiverged(JaxcnnError):
  """The loss or the gradient norm stopped being finite."""


class TrainingInterrupted(JaxcnnError):
  """SIGTERM or SIGINT stopped the run (with a checkpoint, once training had begun); exit status
  128 + signal."""
  label = 'stopped'

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.exit_status = 128 + int(signal_number)
