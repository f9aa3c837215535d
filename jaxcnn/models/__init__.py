"""The model zoo: every network jaxcnn trains, by name.

`create_model(name, ...)` builds a Flax NNX module from a zoo name. Every zoo constructor takes
keyword arguments `num_classes`, `input_shape` (H, W, C), `dtype` (the compute dtype; parameters
stay float32) and `rngs`; models with BatchNorm also take `axis_name`, the mesh axis over which
their batch statistics are averaged when the step runs per device.
"""

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.errors import ConfigError
from jaxcnn.models.small_cnns import BNCNN, KerasCNN, LeNet5, SimpleCNN

MODELS: dict[str, Callable[..., nnx.Module]] = {
    'bn_cnn': BNCNN,
    'keras_cnn': KerasCNN,
    'lenet5': LeNet5,
    'simple_cnn': SimpleCNN,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_names() -> list[str]:
  """The names `create_model` accepts, sorted."""
  return sorted(MODELS)


def get_model_constructor(name: str) -> Callable[..., nnx.Module]:
  """Returns the constructor registered as `name`, or raises a ConfigError naming the choices."""
  try:
    return MODELS[name]
  except KeyError:
    raise ConfigError(
        f"unknown model {name!r}; choose one of: {', '.join(model_names())}") from None


def create_model(name: str, *, num_classes: int, input_shape: Sequence[int],
                 dtype: str = 'float32', seed: int = 0, axis_name: str | None = None) -> nnx.Module:
  """Builds zoo model `name` for images of `input_shape` and `num_classes` classes.

  Parameters are initialised from `seed`; the model's dropout stream is reseeded at every step by
  the train step, so it needs no seed of its own here.
  """
  constructor = get_model_constructor(name)
  kwargs = dict(num_classes=num_classes, input_shape=tuple(input_shape), dtype=DTYPES[dtype],
                rngs=nnx.Rngs(params=seed, dropout=seed))
  if axis_name is not None and _accepts(constructor, 'axis_name'):
    kwargs['axis_name'] = axis_name
  return constructor(**kwargs)


def _accepts(constructor: Callable[..., object], keyword: str) -> bool:
  """Whether `constructor` (a class, function or partial of either) takes `keyword`."""
  if isinstance(constructor, functools.partial):
    constructor = constructor.func
  if inspect.isclass(constructor):  # NNX's metaclass hides the signature of the class itself.
    constructor = constructor.__init__
  return keyword in inspect.signature(constructor).parameters


def count_params(module_or_state) -> int:
  """The number of scalar parameters (`nnx.Param` values) of a module or a state."""
  if isinstance(module_or_state, nnx.Module):
    module_or_state = nnx.state(module_or_state, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(module_or_state))
