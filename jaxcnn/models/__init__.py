"""The model zoo: every network jaxcnn trains, by name.

`create_model(name, ...)` builds a Flax NNX module from a zoo name. Every zoo constructor takes
keyword arguments `num_classes`, `input_shape` (H, W, C), `dtype` (the compute dtype; parameters
stay float32) and `rngs`; models with BatchNorm also take `axis_name`, the mesh axis over which
their batch statistics are averaged when the step runs per device.

The zoo, by family (parameter counts in each module's docstring):

  small_cnns.py   lenet5, keras_cnn, simple_cnn, bn_cnn         MNIST-size CNNs
  resnet.py       resnet18, resnet34, resnet50, resnet101,      ResNet v1.5 for ImageNet
                  resnet152
                  resnext50_32x4d, resnext101_32x8d,            ResNeXt, torchvision's
                  resnext101_64x4d
                  wide_resnet50_2, wide_resnet101_2             torchvision's wide ResNets
                  cifar_resnet20, cifar_resnet32, cifar_resnet56  He et al.'s CIFAR ResNets
  wide_resnet.py  wrn16_8, wrn28_10                             wide ResNets
  convnext.py     convnext_tiny, convnext_small, convnext_base,  ConvNeXt, torchvision's
                  convnext_large
  efficientnet.py efficientnet_b0 ... efficientnet_b7            EfficientNet, torchvision's
  mobilenet.py    mobilenet_v2                                  MobileNetV2, torchvision's
  vgg.py          vgg11_bn, vgg16_bn                            VGG-BN, CIFAR variant
  airbench.py     airbench                                      airbench94-style fast CIFAR net

A user's own model is named `package.module:ClassName` (any importable module; the attribute may
also be a function that returns a module). It is built with those of the keyword arguments above
that its constructor accepts, so a model that has no BatchNorm need not take `axis_name`.

Any other argument of a constructor (bn_cnn's `widths`, wrn16_8's `dropout_rate`, a user model's
own) is set by `model_kwargs`, the config key of that name; `model_arguments` lists what a model
takes.
"""

import functools
import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import tree_paths
from jaxcnn.errors import ConfigError
from jaxcnn.models import airbench, convnext, efficientnet, mobilenet, resnet, vgg, wide_resnet
from jaxcnn.models.small_cnns import BNCNN, KerasCNN, LeNet5, SimpleCNN

# By family; `model_names()` lists them sorted.
MODELS: dict[str, Callable[..., nnx.Module]] = {
    'bn_cnn': BNCNN,
    'keras_cnn': KerasCNN,
    'lenet5': LeNet5,
    'simple_cnn': SimpleCNN,
    'resnet18': resnet.resnet18,
    'resnet34': resnet.resnet34,
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'resnet152': resnet.resnet152,
    'resnext50_32x4d': resnet.resnext50_32x4d,
    'resnext101_32x8d': resnet.resnext101_32x8d,
    'resnext101_64x4d': resnet.resnext101_64x4d,
    'wide_resnet50_2': resnet.wide_resnet50_2,
    'wide_resnet101_2': resnet.wide_resnet101_2,
    'cifar_resnet20': resnet.cifar_resnet20,
    'cifar_resnet32': resnet.cifar_resnet32,
    'cifar_resnet56': resnet.cifar_resnet56,
    'wrn16_8': wide_resnet.wrn16_8,
    'wrn28_10': wide_resnet.wrn28_10,
    'convnext_tiny': convnext.convnext_tiny,
    'convnext_small': convnext.convnext_small,
    'convnext_base': convnext.convnext_base,
    'convnext_large': convnext.convnext_large,
    'efficientnet_b0': efficientnet.efficientnet_b0,
    'efficientnet_b1': efficientnet.efficientnet_b1,
    'efficientnet_b2': efficientnet.efficientnet_b2,
    'efficientnet_b3': efficientnet.efficientnet_b3,
    'efficientnet_b4': efficientnet.efficientnet_b4,
    'efficientnet_b5': efficientnet.efficientnet_b5,
    'efficientnet_b6': efficientnet.efficientnet_b6,
    'efficientnet_b7': efficientnet.efficientnet_b7,
    'mobilenet_v2': mobilenet.mobilenet_v2,
    'vgg11_bn': vgg.vgg11_bn,
    'vgg16_bn': vgg.vgg16_bn,
    'airbench': airbench.AirBench,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# The constructor arguments that jaxcnn passes itself, from the data, the config and the strategy.
PASSED_ARGUMENTS = ('num_classes', 'input_shape', 'dtype', 'rngs', 'axis_name')


def model_names() -> list[str]:
  """The zoo names `create_model` accepts, sorted.

  It also accepts `package.module:ClassName`, a user's own model (see the module docstring).
  """
  return sorted(MODELS)


def get_model_constructor(name: str) -> Callable[..., nnx.Module]:
  """Returns the constructor of zoo model `name` or of user model `package.module:ClassName`.

  Raises:
    ConfigError: naming `name` and the choices, or what is wrong with a user model's name.
  """
  if ':' in name:
    return _import_user_model(name)
  try:
    return MODELS[name]
  except KeyError:
    raise ConfigError(
        f"unknown model {name!r}; choose one of: {', '.join(model_names())}, "
        "or name your own as 'package.module:ClassName'") from None


def model_arguments(name: str) -> dict[str, object] | None:
  """The constructor arguments of model `name` that `model_kwargs` may set, with their defaults
  (`inspect.Parameter.empty` for one without); None where the constructor takes `**kwargs`.

  Those jaxcnn passes itself are left out, and so are those a zoo entry binds (wrn16_8's depth:
  that is what its name says).
  """
  constructor = get_model_constructor(name)
  parameters = _parameters(constructor)
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return None
  bound = _bound_keywords(constructor)
  return {p.name: p.default for p in parameters
          if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
          and p.name not in PASSED_ARGUMENTS and p.name not in bound}


def check_model_kwargs(name: str, model_kwargs: Mapping[str, object]) -> None:
  """Raises a one-line ConfigError for a key of `model_kwargs` that model `name` does not take,
  or that jaxcnn sets itself."""
  for key in model_kwargs:
    if key in PASSED_ARGUMENTS:
      raise ConfigError(f"config key 'model_kwargs' sets {key!r}, which jaxcnn passes to every "
                        'model itself (from the data, dtype, seed and parallel keys)')
  settable = model_arguments(name)
  if settable is None:
    return
  unknown = [key for key in model_kwargs if key not in settable]
  if unknown:
    takes = (', '.join(key if default is inspect.Parameter.empty else f'{key} (default {default!r})'
                       for key, default in settable.items()) or 'none')
    raise ConfigError(f"config key 'model_kwargs' sets {unknown[0]!r}, which model {name!r} does "
                      f'not take; it takes: {takes}')


def describe_kwargs(model_kwargs: Mapping[str, object]) -> str:
  """`model_kwargs` as a message shows them, ' with widths=(8, 16)' ('' for none)."""
  if not model_kwargs:
    return ''
  return ' with ' + ', '.join(f'{key}={value!r}' for key, value in model_kwargs.items())


class ImagesTooSmall(ConfigError):
  """A zoo model cannot be built for images this small; `size_flag` is the flag that sets the
  image size in the command the user ran."""

  def __init__(self, model: str, input_shape, reason: str,
               size_flag: str = '--config.image_size', model_kwargs: Mapping | None = None):
    self.model, self.input_shape, self.reason = model, tuple(input_shape), reason
    self.model_kwargs = dict(model_kwargs or {})
    # With model_kwargs, the arguments themselves may be what fails (widths='wide').
    remedy = (f'larger images ({size_flag}) or other model_kwargs' if self.model_kwargs else
              f'larger images ({size_flag})')
    super().__init__(f'model {model!r}{describe_kwargs(self.model_kwargs)} cannot be built for '
                     f'{"x".join(map(str, input_shape))} images ({reason}); it needs {remedy}')

  def with_flag(self, size_flag: str) -> 'ImagesTooSmall':
    return ImagesTooSmall(self.model, self.input_shape, self.reason, size_flag, self.model_kwargs)


def create_model(name: str, *, num_classes: int, input_shape: Sequence[int],
                 dtype: str = 'float32', seed: int = 0, axis_name: str | None = None,
                 model_kwargs: Mapping[str, object] | None = None,
                 warn: bool = True) -> nnx.Module:
  """Builds model `name` (a zoo name or `package.module:ClassName`) for `input_shape` images.

  Parameters are initialised from `seed`; the model's dropout stream is reseeded at every step by
  the train step, so it needs no seed of its own here. The constructor receives those of
  `num_classes`, `input_shape`, `dtype`, `rngs` and `axis_name` (when not None) that it accepts,
  and `model_kwargs` (the config key's values, see `check_model_kwargs`).

  The initialisers run as one compiled program: run eagerly, each parameter's initialiser would
  be compiled on its own, seconds of start-up for a small CNN on a CPU.

  A user's model is checked first: a one-line ConfigError for a constructor or `__call__` that
  jaxcnn cannot call, and (with `warn`) a warning of what it would silently ignore.
  """
  constructor = get_model_constructor(name)
  model_kwargs = dict(model_kwargs or {})
  check_model_kwargs(name, model_kwargs)
  kwargs = dict(num_classes=num_classes, input_shape=tuple(input_shape), dtype=DTYPES[dtype],
                rngs=None, axis_name=axis_name)
  names = [k for k in kwargs if (k != 'axis_name' or axis_name is not None)
           and _accepts(constructor, k)]
  user_model = name not in MODELS
  if user_model:
    _check_constructor(name, constructor, names + list(model_kwargs))
    if warn and dtype != 'float32' and 'dtype' not in names:
      _warn(f'model {name!r} takes no dtype argument, so it computes in its own dtype, not in '
            f'the config\'s {dtype}')
    if warn and 'rngs' not in names:
      _warn(f'model {name!r} takes no rngs argument, so its initialisation does not follow the '
            'config\'s seed')

  def build() -> nnx.Module:
    # The Rngs are made inside each trace: NNX refuses to advance them from another one. Streams
    # other than these two (a user's model calling `rngs()`, say) draw from the default one,
    # whose keys are not those of `params` (the same seed would give the same keys).
    rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 1), params=seed, dropout=seed)
    model = constructor(**{k: rngs if k == 'rngs' else kwargs[k] for k in names}, **model_kwargs)
    if not isinstance(model, nnx.Module):
      raise ConfigError(f'model {name!r} built a {type(model).__name__}, not an nnx.Module; name '
                        "an nnx.Module subclass or a function that returns one")
    return model

  def build_and_apply():
    # The model applied to a batch of two, abstractly, to check what it returns: a copy in
    # evaluation mode, which neither updates statistics nor needs the mapped axis of axis_name.
    model = build()
    if user_model:
      _check_call(name, model, warn)
    probe = nnx.merge(*nnx.split(model))
    images = jnp.zeros((2, *input_shape), DTYPES[dtype])
    if axis_name is None:
      # Training mode too, where mistakes of its own show (a Dropout without rngs): here, not
      # at the first step. (With axis_name, BatchNorm would need the mapped axis to train.)
      probe.train()
      probe(images)
    probe.eval()
    return model, probe(images)

  try:
    abstract_model, logits = nnx.eval_shape(build_and_apply)
  except (ZeroDivisionError, ValueError, TypeError) as e:
    if user_model:
      raise  # A user's model: its own traceback says more than we could.
    if isinstance(e, ZeroDivisionError):
      reason = 'its downsampling leaves nothing of them'
    else:
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
    raise ImagesTooSmall(name, input_shape, reason, model_kwargs=model_kwargs) from None
  if not isinstance(logits, jax.ShapeDtypeStruct):  # A tuple or dict of outputs, say.
    raise ConfigError(f'model {name!r} returns a {type(logits).__name__}; it must return one '
                      f'array of logits of shape (batch, num_classes)')
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    # Integer outputs have no gradient: the run would train nothing.
    raise ConfigError(f'model {name!r} returns logits of dtype {logits.dtype}; they must be '
                      'floating point (float32 or bfloat16)')
  if tuple(logits.shape) != (2, num_classes):
    raise ConfigError(f'model {name!r} returns outputs of shape {tuple(logits.shape)} for a batch '
                      f'of 2 images; it must return logits of shape (batch, num_classes) = '
                      f'(2, {num_classes})')
  graphdef, _ = nnx.split(abstract_model)
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())


def _import_user_model(spec: str) -> Callable[..., nnx.Module]:
  """Imports `package.module:Name` and checks that it is an nnx.Module subclass or a callable.

  The module is looked for on `sys.path` and, after it, in the current directory: `python
  train.py` puts the script's folder on the path, not the current one, as `python -m` does.
  """
  module_name, _, attribute = spec.partition(':')
  if not module_name or module_name.startswith('.') or not attribute:  # No relative imports.
    raise ConfigError(f"invalid model {spec!r}: write your own model as 'package.module:ClassName'")
  if os.getcwd() not in sys.path and '' not in sys.path:
    sys.path.append(os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:  # The module, or one that it imports, is missing.
    # The module or its package (not one of its own imports) is what is missing.
    own = e.name is not None and f'{module_name}.'.startswith(f'{e.name}.')
    where = (' (it must be importable: installed, on PYTHONPATH, or in the current directory)'
             if own else '')
    raise ConfigError(f'model {spec!r}: cannot import module {module_name!r}: {e}{where}'
                      ) from None
  try:
    constructor = functools.reduce(getattr, attribute.split('.'), module)
  except AttributeError:
    raise ConfigError(f'model {spec!r}: module {module_name!r} has no attribute '
                      f'{attribute!r}') from None
  if inspect.isclass(constructor):
    if not issubclass(constructor, nnx.Module):
      raise ConfigError(f'model {spec!r}: class {attribute!r} is not an nnx.Module subclass')
  elif isinstance(constructor, nnx.Module):
    raise ConfigError(f'model {spec!r}: {attribute!r} is a built {type(constructor).__name__}; '
                      'name its class, or a function that builds one, for jaxcnn to build')
  elif not callable(constructor):
    raise ConfigError(f'model {spec!r}: {attribute!r} (a {type(constructor).__name__}) is neither '
                      'an nnx.Module subclass nor a function that builds one')
  return constructor


def source_digest(name: str) -> dict[str, str] | None:
  """Where user model `name` is defined and a digest of that file, `{'model', 'file', 'sha256'}`,
  to tell later whether its code changed; None for a zoo model (its code is jaxcnn's) or where
  the file cannot be read (a model built in a notebook)."""
  if name in MODELS:
    return None
  constructor = get_model_constructor(name)
  if isinstance(constructor, functools.partial):
    constructor = constructor.func
  try:
    path = inspect.getsourcefile(constructor)
    with open(path, 'rb') as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  except (TypeError, OSError):
    return None
  return {'model': name, 'file': os.path.abspath(path), 'sha256': digest}


def _parameters(constructor: Callable[..., object]) -> list[inspect.Parameter]:
  """The parameters a class, function or partial of either is still called with: less `self`,
  and less those a partial binds by position (those it binds by keyword may be given again)."""
  bound = 0
  if isinstance(constructor, functools.partial):
    bound, constructor = len(constructor.args), constructor.func
  if inspect.isclass(constructor):  # NNX's metaclass hides the signature of the class itself.
    bound, constructor = bound + 1, constructor.__init__  # self
  return list(inspect.signature(constructor).parameters.values())[bound:]


def _bound_keywords(constructor: Callable[..., object]) -> set[str]:
  """The keyword arguments a partial binds (which may still be given again); none otherwise."""
  return set(constructor.keywords) if isinstance(constructor, functools.partial) else set()


def _required(parameters: list[inspect.Parameter]) -> list[str]:
  """The names of `parameters` that have no default."""
  return [p.name for p in parameters if p.default is inspect.Parameter.empty
          and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _check_constructor(name: str, constructor: Callable[..., object], passed: list[str]) -> None:
  """Refuses a user model whose constructor requires arguments that jaxcnn does not pass."""
  bound = _bound_keywords(constructor)
  missing = [p for p in _required(_parameters(constructor)) if p not in passed and p not in bound]
  if missing:
    raise ConfigError(
        f'model {name!r} requires {", ".join(map(repr, missing))}, which jaxcnn does not pass: it '
        'passes those of num_classes, input_shape, dtype, rngs and (under shard_map and pmap) '
        'axis_name that the constructor takes; set the others in the config key model_kwargs '
        "(--config.model_kwargs=\"{'name': value}\"), or give them defaults")


def _check_call(name: str, model: nnx.Module, warn: bool) -> None:
  """Refuses a model that cannot be called as `model(images)`, and warns of a flag of its
  `__call__` that jaxcnn never passes (a linen-style `train=False` would keep its default; NNX's
  own `deterministic=None` follows `model.train()` and `model.eval()`, and is fine)."""
  how = ('jaxcnn calls model(images) and switches between training and evaluation with '
         'model.train() and model.eval()')
  if not callable(model):
    raise ConfigError(f'model {name!r}: a {type(model).__name__} has no __call__; {how}')
  parameters = list(inspect.signature(model.__call__).parameters.values())  # Bound: no self.
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.VAR_POSITIONAL)
  if not parameters or parameters[0].kind not in positional:
    raise ConfigError(f'model {name!r}: its __call__ takes no images as its first argument; {how}')
  required = _required(parameters[1:])
  if required:
    raise ConfigError(f'model {name!r}: its __call__ requires {", ".join(map(repr, required))}; '
                      f'{how}')
  flags = [p.name for p in parameters[1:] if isinstance(p.default, bool)]
  if flags and warn:
    _warn(f'model {name!r}: its __call__ takes {", ".join(map(repr, flags))}, which jaxcnn never '
          f'passes: {how}')


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f'warning: {message}', file=sys.stderr, flush=True)


def _accepts(constructor: Callable[..., object], keyword: str) -> bool:
  """Whether `constructor` (a class, function or partial of either) takes `keyword`."""
  return any(p.name == keyword and p.kind is not inspect.Parameter.POSITIONAL_ONLY
             or p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(constructor))


def parameter_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The shape of every `nnx.Param` of `model` (abstract or not) by dotted path
  (`stages.0.conv1.kernel`), in the order NNX keeps its state."""
  return {tree_paths.dotted(path): tuple(param.get_value().shape)
          for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(module_or_state) -> int:
  """The number of scalar parameters (`nnx.Param` values) of a module or a state."""
  if isinstance(module_or_state, nnx.Module):
    module_or_state = nnx.state(module_or_state, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(module_or_state))
