"""The training state as a plain pytree, and the static model definition it is merged with.

The NNX model is split once, at set-up, into a static `ModelDef` (the graph definition and the
model's RNG streams) and array states. The train step is a pure function of the `TrainState`: it
merges the model inside `jit`, so no Python object graph is walked per step (flax#4045), and
gradients are taken with respect to `params` alone.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and nothing else.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: the `nnx.Param` variables, which the optimizer updates.
    model_state: every other model variable except RNG streams (BatchNorm statistics, ...).
    opt_state: the Optax optimizer state.
    ema_params, ema_model_state: exponential moving averages of `params` and `model_state`
      (floating values in float32, whatever the weights' dtype: a bfloat16 average would stop
      moving once the decay passes about 0.9), or None when the run keeps no average.
  """
  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState
  ema_params: nnx.State | None = None
  ema_model_state: nnx.State | None = None

  def averaged(self) -> 'TrainState':
    """This state with the moving averages in place of the weights (for evaluation), in the
    weights' own dtypes."""
    cast = lambda average, weight: average.astype(weight.dtype)
    return self.replace(params=jax.tree.map(cast, self.ema_params, self.params),
                        model_state=jax.tree.map(cast, self.ema_model_state, self.model_state))


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The static half of a split model: its graph and its RNG streams.

  The RNG streams (dropout, ...) are reseeded inside every step from (seed, step), so they are
  not part of the training state and never need saving.
  """
  graphdef: nnx.GraphDef
  rng_state: nnx.State

  def merge(self, params: nnx.State, model_state: nnx.State) -> nnx.Module:
    """Rebuilds the module inside a trace. `copy=True` gives the variables the current trace,
    which BatchNorm needs to update its statistics under `jax.grad`."""
    return nnx.merge(self.graphdef, params, self.rng_state, model_state, copy=True)

  def reseed(self, model: nnx.Module, key: jax.Array) -> None:
    """Gives every RNG stream of `model` a key derived from `key` (one per stream name)."""
    tags = sorted({variable.tag for variable in jax.tree.leaves(
        self.rng_state, is_leaf=lambda x: isinstance(x, nnx.Variable))})
    if tags:
      nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})

  @staticmethod
  def split_state(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(params, model_state) of a module, leaving its RNG streams out."""
    _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return params, model_state


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       ema: bool = False) -> tuple[ModelDef, TrainState]:
  """Splits `model` once into its static definition and an initial `TrainState`.

  With `ema`, the state also holds moving averages of the weights, starting at the weights.
  """
  graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return (ModelDef(graphdef=graphdef, rng_state=rng_state),
          initial_train_state(tx, params, model_state, ema=ema))


def initial_train_state(tx: optax.GradientTransformation, params: nnx.State,
                        model_state: nnx.State, ema: bool = False) -> TrainState:
  """The state at step 0 with these weights: the optimizer's state initialised for them and,
  with `ema`, moving averages starting at them."""
  def initial_state(params: nnx.State, model_state: nnx.State) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params))

  # One compiled program: run eagerly, the optimizer's initialisers compile a small program per
  # parameter shape: 0.34 s of start-up for LeNet-5 on a 2-core CPU, against 0.13 s for this.
  state = jax.jit(initial_state)(params, model_state)
  if ema:  # Copies with buffers of their own: the train step donates every buffer of the state.
    state = state.replace(ema_params=jax.tree.map(_average_start, params),
                          ema_model_state=jax.tree.map(_average_start, model_state))
  return state


def _average_start(value: jax.Array) -> jax.Array:
  """A moving average's first value: a float32 copy of a floating `value`, else a copy."""
  dtype = jnp.float32 if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype
  return jnp.array(value, dtype=dtype, copy=True)  # Its own buffer: the step donates both.
