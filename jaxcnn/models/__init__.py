"""The model zoo: every network jaxcnn trains, by name.

`create_model(name, ...)` builds a Flax NNX module from a zoo name. Every zoo constructor takes
keyword arguments `num_classes`, `input_shape` (H, W, C), `dtype` (the compute dtype; parameters
stay float32) and `rngs`; models with BatchNorm also take `axis_name`, the mesh axis over which
their batch statistics are averaged when the step runs per device.

The zoo, by family (parameter counts in each module's docstring):

  small_cnns.py   lenet5, keras_cnn, simple_cnn, bn_cnn         MNIST-size CNNs
  resnet.py       resnet18, resnet34, resnet50, resnet101,      ResNet v1.5 for ImageNet
                  resnet152
                  cifar_resnet20, cifar_resnet32, cifar_resnet56  He et al.'s CIFAR ResNets
  wide_resnet.py  wrn16_8, wrn28_10                             wide ResNets
  vgg.py          vgg11_bn, vgg16_bn                            VGG-BN, CIFAR variant
  airbench.py     airbench                                      airbench94-style fast CIFAR net

A user's own model is named `package.module:ClassName` (any importable module; the attribute may
also be a function that returns a module). It is built with those of the keyword arguments above
that its constructor accepts, so a model that has no BatchNorm need not take `axis_name`.
"""

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.errors import ConfigError
from jaxcnn.models import airbench, resnet, vgg, wide_resnet
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
    'cifar_resnet20': resnet.cifar_resnet20,
    'cifar_resnet32': resnet.cifar_resnet32,
    'cifar_resnet56': resnet.cifar_resnet56,
    'wrn16_8': wide_resnet.wrn16_8,
    'wrn28_10': wide_resnet.wrn28_10,
    'vgg11_bn': vgg.vgg11_bn,
    'vgg16_bn': vgg.vgg16_bn,
    'airbench': airbench.AirBench,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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


class ImagesTooSmall(ConfigError):
  """A zoo model cannot be built for images this small; `size_flag` is the flag that sets the
  image size in the command the user ran."""

  def __init__(self, model: str, input_shape, reason: str,
               size_flag: str = '--config.image_size'):
    self.model, self.input_shape, self.reason = model, tuple(input_shape), reason
    super().__init__(f'model {model!r} cannot be built for {"x".join(map(str, input_shape))} '
                     f'images ({reason}); it needs larger images ({size_flag})')

  def with_flag(self, size_flag: str) -> 'ImagesTooSmall':
    return ImagesTooSmall(self.model, self.input_shape, self.reason, size_flag)


def create_model(name: str, *, num_classes: int, input_shape: Sequence[int],
                 dtype: str = 'float32', seed: int = 0, axis_name: str | None = None) -> nnx.Module:
  """Builds model `name` (a zoo name or `package.module:ClassName`) for `input_shape` images.

  Parameters are initialised from `seed`; the model's dropout stream is reseeded at every step by
  the train step, so it needs no seed of its own here. The constructor receives those of
  `num_classes`, `input_shape`, `dtype`, `rngs` and `axis_name` (when not None) that it accepts.

  The initialisers run as one compiled program: run eagerly, each parameter's initialiser would
  be compiled on its own, seconds of start-up for a small CNN on a CPU.
  """
  constructor = get_model_constructor(name)
  kwargs = dict(num_classes=num_classes, input_shape=tuple(input_shape), dtype=DTYPES[dtype],
                rngs=None, axis_name=axis_name)
  names = [k for k in kwargs if (k != 'axis_name' or axis_name is not None)
           and _accepts(constructor, k)]

  def build() -> nnx.Module:
    # The Rngs are made inside each trace: NNX refuses to advance them from another one.
    model = constructor(**{k: nnx.Rngs(params=seed, dropout=seed) if k == 'rngs' else kwargs[k]
                           for k in names})
    if not isinstance(model, nnx.Module):
      raise ConfigError(f'model {name!r} built a {type(model).__name__}, not an nnx.Module; name '
                        "an nnx.Module subclass or a function that returns one")
    return model

  def build_and_apply():
    # The model applied to a batch of two, abstractly, to check what it returns: a copy in
    # evaluation mode, which neither updates statistics nor needs the mapped axis of axis_name.
    model = build()
    probe = nnx.merge(*nnx.split(model))
    probe.eval()
    return model, probe(jnp.zeros((2, *input_shape), DTYPES[dtype]))

  try:
    abstract_model, logits = nnx.eval_shape(build_and_apply)
  except (ZeroDivisionError, ValueError, TypeError) as e:
    if name not in MODELS:
      raise  # A user's model: its own traceback says more than we could.
    if isinstance(e, ZeroDivisionError):
      reason = 'its downsampling leaves nothing of them'
    else:
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
    raise ImagesTooSmall(name, input_shape, reason) from None
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
  """Imports `package.module:Name` and checks that it is an nnx.Module subclass or a callable."""
  module_name, _, attribute = spec.partition(':')
  if not module_name or module_name.startswith('.') or not attribute:  # No relative imports.
    raise ConfigError(f"invalid model {spec!r}: write your own model as 'package.module:ClassName'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:  # The module, or one that it imports, is missing.
    raise ConfigError(f'model {spec!r}: cannot import module {module_name!r}: {e}') from None
  try:
    constructor = functools.reduce(getattr, attribute.split('.'), module)
  except AttributeError:
    raise ConfigError(f'model {spec!r}: module {module_name!r} has no attribute '
                      f'{attribute!r}') from None
  if inspect.isclass(constructor):
    if not issubclass(constructor, nnx.Module):
      raise ConfigError(f'model {spec!r}: class {attribute!r} is not an nnx.Module subclass')
  elif not callable(constructor):
    raise ConfigError(f'model {spec!r}: {attribute!r} (a {type(constructor).__name__}) is neither '
                      'an nnx.Module subclass nor a function that builds one')
  return constructor


def _accepts(constructor: Callable[..., object], keyword: str) -> bool:
  """Whether `constructor` (a class, function or partial of either) takes `keyword`."""
  if isinstance(constructor, functools.partial):
    constructor = constructor.func
  if inspect.isclass(constructor):  # NNX's metaclass hides the signature of the class itself.
    constructor = constructor.__init__
  parameters = inspect.signature(constructor).parameters
  return keyword in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def count_params(module_or_state) -> int:
  """The number of scalar parameters (`nnx.Param` values) of a module or a state."""
  if isinstance(module_or_state, nnx.Module):
    module_or_state = nnx.state(module_or_state, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(module_or_state))
