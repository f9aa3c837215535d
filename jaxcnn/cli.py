"""What every jaxcnn command line shares: flag parsing and one-line errors for the user's mistakes.

A `UserError` (or a flag that does not parse) ends the process with one line on stderr,
`error: <what was wrong and what is accepted>`, and exit status 2, as command-line tools do for
usage errors; a diverged run ends the same way with status 1. Anything else is a bug and keeps
its traceback.
"""

import ast
import atexit
import difflib
import gc
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxcnn.errors import JaxcnnError, UserError

USAGE_ERROR_STATUS = 2
_HELP_FLAGS = ('-h', '--help', '-?', '--helpshort', '--helpfull', '--helpxml')


def exit_with_error(message: str, status: int = USAGE_ERROR_STATUS, label: str = 'error') -> None:
  """Prints `<label>: message` as one line on stderr and exits with `status`."""
  print(f'{label}: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(status)


def run(main: Callable[[Sequence[str]], object], config_flag: str | None = None,
        config_required: bool = True) -> None:
  """Runs `main` under absl, turning user errors into one-line messages with exit status 2.

  Args:
    main: the absl main function.
    config_flag: the name of a `config_flags.DEFINE_config_file` flag, if the command has one, so
      that a mistyped `--config.KEY` is reported with the keys that exist.
    config_required: whether the command needs a config file (without a default, a missing
      `--config` is then a one-line error).
  """

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      asks_for_help = any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:])
      given = config_flag and _config_file_argument(argv, config_flag) is not None
      if config_flag and (given or config_required) and not asks_for_help:
        _check_config_file(argv, config_flag)
      remaining = flags.FLAGS(_read_json_through_loader(argv, config_flag) if given else argv)
      if given and not isinstance(flags.FLAGS[config_flag].value, ml_collections.ConfigDict):
        # config_flags keeps a config file's import error for later; raise it now instead.
        load_config_file(_config_file_argument(argv, config_flag))
      if not flags.FLAGS['verbosity'].present:  # Library INFO logs are noise to a user.
        logging.set_verbosity(logging.WARNING)
      return remaining
    except UserError as e:
      exit_with_error(str(e))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
            SyntaxError, ImportError) as e:
      exit_with_error(describe_flag_error(e, argv, config_flag))

  def guarded_main(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except JaxcnnError as e:
      exit_with_error(str(e), e.exit_status, e.label)
    except app.UsageError as e:
      exit_with_error(str(e))
    except KeyboardInterrupt:
      exit_with_error('interrupted by SIGINT', 128 + signal.SIGINT, 'stopped')

  # Python's shutdown runs full garbage collections over every object that JAX, Flax and Orbax
  # made (about 170,000): 0.4 to 0.5 s at the end of every run on a 2-core CPU. Frozen objects are
  # skipped by those collections; the process's memory goes back to the system all the same.
  atexit.register(gc.freeze)
  app.run(guarded_main, flags_parser=parse_flags)


def describe_flag_error(error: Exception, argv: Sequence[str], config_flag: str | None) -> str:
  """Turns what absl or ml_collections raised while parsing `argv` into a one-line message."""
  if config_flag:
    match = re.match(rf'flag --{config_flag}\.([\w.]+)=', str(error))
    if match:
      key, rest = match.group(1), str(error)[match.end():]
      # absl quotes the value as given, and a value may hold ': ' itself (a dict of model_kwargs).
      value = _override_value(argv, f'--{config_flag}.{key}')
      if value is not None and rest.startswith(f'{value}: '):
        reason = rest[len(value) + 2:]
      else:
        value, _, reason = rest.partition(': ')
      if 'Non-boolean argument' in reason:  # absl's reason is then the repr of a tuple.
        reason = 'it takes true or false'
      elif 'as a ConfigDict' in reason:  # ast.literal_eval's error, which names no node.
        reason = ("it takes a dict of Python literals (numbers, strings, True, False, None and "
                  "tuples of them), e.g. \"{'widths': (32, 64, 128)}\"")
      return f'invalid value {value!r} for config key {key!r}: {_first_line(reason)}'
    if isinstance(error, (AttributeError, KeyError)):
      try:
        unknown = _unknown_override(argv, config_flag)
      except UserError as e:  # The config file itself is at fault.
        return str(e)
      if unknown:
        return unknown
  text = str(error)
  if 'Traceback (most recent call last)' in text:
    # config_flags quotes the traceback of what the config file raised: its last line says what.
    return f'{_first_line(text)} {text.strip().splitlines()[-1]}'
  return _first_line(text) or type(error).__name__


def _override_value(argv: Sequence[str], flag: str) -> str | None:
  """The value of the last `flag=VALUE` or `flag VALUE` in `argv`, or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == flag and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(f'{flag}='):
      value = arg.split('=', 1)[1]
  return value


def _check_config_file(argv: Sequence[str], config_flag: str) -> None:
  spec = _config_file_argument(argv, config_flag)
  if spec is None:
    raise UserError(f'--{config_flag} is required, e.g. --{config_flag} configs/mnist.py')
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} does not exist')
  if path.endswith('.json') and variant:
    raise UserError(f"config file {path!r} is a run's config.json, which has no variants; "
                    f"give it without ':{variant}'")


def _config_file_argument(argv: Sequence[str], config_flag: str) -> str | None:
  """The `path.py[:variant]` given on the command line (the last one, as absl takes the last of
  a flag given twice), else the flag's default (or None)."""
  given = _override_value(argv, f'--{config_flag}')
  if given is not None:
    return given
  flag = flags.FLAGS[config_flag]
  return None if flag.default is None else config_flags.get_config_filename(flag)


_JSON_LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config_from_json.py')


def _read_json_through_loader(argv: list[str], config_flag: str) -> list[str]:
  """`--config RUN/config.json` becomes `--config jaxcnn/config_from_json.py:RUN/config.json`:
  `config_flags` loads only Python config files."""
  spec = _config_file_argument(argv, config_flag)
  if not spec.endswith('.json'):
    return argv
  flag = f'--{config_flag}'
  through_loader = f'{_JSON_LOADER}:{spec}'
  rewritten = list(argv)
  for i, arg in enumerate(argv):
    if arg == f'{flag}={spec}':
      rewritten[i] = f'{flag}={through_loader}'
    elif i and argv[i - 1] == flag and arg == spec:
      rewritten[i] = through_loader
  return rewritten


def load_config_file(spec: str):
  """Loads `path.py[:variant]` the way `config_flags` does: `get_config(variant)` or `get_config()`
  (or a run's `config.json`)."""
  if spec.endswith('.json'):
    # Imported here: the TensorFlow process that prepares datasets uses this module without jax.
    from jaxcnn.config import config_from_json  # pylint: disable=g-import-not-at-top
    return config_from_json(spec)
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_jaxcnn_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'config file {path!r} defines no get_config() function')
  config = module.get_config(variant) if variant else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'get_config() of config file {path!r} returned a {type(config).__name__}, '
                    'not an ml_collections.ConfigDict')
  return config


def _unknown_override(argv: Sequence[str], config_flag: str) -> str | None:
  """Names the `--config.KEY` override whose key does not exist, with close matches."""
  config = load_config_file(_config_file_argument(argv, config_flag))
  for arg in argv:
    match = re.match(rf'--{config_flag}\.([\w.]+)(=|$)', arg)
    if not match:
      continue
    key = match.group(1)
    try:
      _lookup(config, key)
    except (AttributeError, KeyError):
      if key.startswith('model_kwargs.') and key.count('.') == 1:
        # The model's arguments are the config's own: only those it sets can be overridden.
        # A dict given whole replaces the config's, so the suggestion holds those too.
        name, value = key.split('.')[1], arg.partition('=')[2]
        given = dict(config.model_kwargs.items())
        whole = ''.join(f'{k!r}: {v!r}, ' for k, v in given.items()) + (
            f'{name!r}: {_as_literal(value)!r}' if value else f'{name!r}: VALUE')
        return (f'config key {key!r} is not among the model_kwargs this config sets '
                f"({', '.join(given) or 'none'}); give it as --{config_flag}.model_kwargs="
                f'"{{{whole}}}"')
      known = _keys(config)
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
          f"; known keys: {', '.join(known)}")
      return f'unknown config key {key!r}{hint}'
  return None


def _as_literal(text: str):
  """A command-line value as the Python literal it reads as (`8,16,32` is the tuple (8, 16,
  32)), or as the string itself (`B`)."""
  try:
    return ast.literal_eval(text)
  except Exception:  # pylint: disable=broad-except  (ValueError, SyntaxError, TypeError: {[1]: 2})
    return text


def _lookup(config, dotted_key: str):
  value = config
  for part in dotted_key.split('.'):
    value = value[part]
  return value


def _keys(config, prefix: str = '') -> list[str]:
  """Every dotted key of a ConfigDict, nested ones included."""
  keys = []
  try:
    items = config.items()
  except AttributeError:
    return keys
  for name, value in items:
    keys.append(prefix + name)
    if hasattr(value, 'items'):
      keys.extend(_keys(value, prefix + name + '.'))
  return sorted(keys)


def _first_line(text: str) -> str:
  return text.strip().splitlines()[0] if text.strip() else ''

