"""Errors that are the user's to fix.

Anything raised as a `UserError` is reported by the command-line entry points as a single line
(`error: ...`) with exit status 2 and no traceback: a mistyped key, an unknown model, a dataset that
cannot be found. Bugs in jaxcnn itself are not `UserError`s and keep their tracebacks.
"""


class UserError(Exception):
  """A mistake in what the user asked for; the message says what was wrong and what is accepted."""


class ConfigError(UserError):
  """A config key or value that is not accepted."""


class DataError(UserError):
  """A dataset that cannot be found, prepared or read."""
