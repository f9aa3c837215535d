"""Optax optimizers and learning-rate schedules from the config."""

import math
import re

import jax
import jax.numpy as jnp
import optax

from jaxcnn import tree_paths
from jaxcnn.errors import ConfigError

OPTIMIZERS = ('adam', 'adamw', 'lamb', 'lars', 'momentum', 'nesterov', 'sgd')
# Those whose weight decay is decoupled from the gradient, and those that apply weight_decay
# themselves (LARS before its trust ratio); the others get it as an L2 term of the gradient.
DECOUPLED_WEIGHT_DECAY = ('adamw', 'lamb')
OWN_WEIGHT_DECAY = DECOUPLED_WEIGHT_DECAY + ('lars',)
SCHEDULES = ('constant', 'cosine', 'linear', 'onecycle', 'step')


# Keys that only some optimizers or schedules read: (the key that chooses, the choices that read).
_READ_ONLY_BY = {
    'momentum': ('optimizer', ('lars', 'momentum', 'nesterov')),
    'beta1': ('optimizer', ('adam', 'adamw', 'lamb')),
    'beta2': ('optimizer', ('adam', 'adamw', 'lamb')),
    'lr_decay_epochs': ('lr_schedule', ('step',)),
    'lr_decay_factor': ('lr_schedule', ('step',)),
}


def unread_settings(config, defaults) -> list[str]:
  """One warning for each key that `config` sets away from its value in `defaults` but that its
  optimizer or schedule never reads, e.g. momentum with 'adamw': a setting with no effect."""
  warnings = []
  for key, (chooser, readers) in _READ_ONLY_BY.items():
    value, default = config[key], defaults[key]
    if isinstance(value, (list, tuple)):  # config.json gives lists back for tuples.
      value, default = list(value), list(default)
    if config[chooser] not in readers and value != default:
      read_with = ' or '.join(repr(reader) for reader in readers)
      as_given = ','.join(f'{v:g}' for v in value) if isinstance(value, list) else f'{value:g}'
      warnings.append(f'{key}={as_given} has no effect with {chooser} {config[chooser]!r}: '
                      f'it is read only with {chooser} {read_with}')
  return warnings


def epochs_in_steps(epochs: float, steps_per_epoch: int, rounding=math.floor) -> int:
  """`epochs` of `steps_per_epoch` steps as whole steps (`rounding`: `math.floor` or `math.ceil`),
  from the product rounded to 6 decimals first: in floats 1.1 * 50 is 55.00000000000001, whose
  ceiling is a step too many, and 0.57 * 100 is 56.99999999999999, whose floor a step too few."""
  return int(rounding(round(epochs * steps_per_epoch, 6)))


def requested_warmup_steps(config, steps_per_epoch: int) -> int:
  """The warm-up steps `warmup_epochs` asks for; a run shorter than that warms up throughout."""
  return int(round(config.warmup_epochs * steps_per_epoch))


def make_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  `cosine` and `linear` decay to zero at `total_steps` after `warmup_epochs` of linear warm-up;
  `step` multiplies the rate by `lr_decay_factor` at each epoch in `lr_decay_epochs`; `onecycle`
  is Smith's one-cycle policy peaking at 30% of training (its own warm-up). Warm-up step s of W
  runs at (s + 1) / W of the rate, so that the first step already trains; a warm-up as long as
  the run or longer is cut to the run: its last step runs at `learning_rate`.
  """
  base = float(config.learning_rate)
  warmup = min(requested_warmup_steps(config, steps_per_epoch), total_steps)
  name = config.lr_schedule
  if name == 'constant':
    main = optax.constant_schedule(base)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  elif name == 'linear':
    main = optax.linear_schedule(base, 0.0, max(total_steps - warmup, 1))
  elif name == 'step':
    # Decays after the last step never happen (and would overflow int32 step counts).
    boundaries = {}  # Counted from the end of the warm-up, where `main` starts.
    for epoch in config.lr_decay_epochs:
      step = epochs_in_steps(epoch, steps_per_epoch)
      if step < total_steps:  # Decays that fall on one step all apply there.
        boundaries[step - warmup] = boundaries.get(step - warmup, 1.0) * config.lr_decay_factor
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif name == 'onecycle':
    return optax.cosine_onecycle_schedule(total_steps, base)
  else:
    raise ConfigError(f'unknown lr_schedule {name!r}; choose one of: {", ".join(SCHEDULES)}')
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(base / warmup, base, max(warmup - 1, 1))
  return optax.join_schedules([ramp, main], [warmup])


def _decay_mask(params):
  """Weight decay applies to kernels only, not to biases or normalisation scales (ndim <= 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer`, with its schedule, weight decay and clipping,
  for every parameter but those that `config.frozen` matches, which never move.

  `adamw` decays weights decoupled from the gradient (Loshchilov & Hutter). The layer-wise
  adaptive optimizers for large batches scale each kernel's step by a trust ratio, the ratio of
  the kernel's norm to its update's: `lars` (You et al. 2017, SGD with `momentum`; the decay joins
  the gradient before the ratio, and biases and normalisation scales are neither decayed nor
  scaled, as in MLPerf's ResNet-50) and `lamb` (You et al. 2019, Adam with `beta1` and `beta2`
  and decoupled decay). The other optimizers add `weight_decay * w` to the gradient (L2
  regularisation, as PyTorch's SGD does).
  """
  schedule = make_schedule(config, total_steps, steps_per_epoch)
  name = config.optimizer
  decay = float(config.weight_decay)
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if decay > 0 and name not in OWN_WEIGHT_DECAY:
    chain.append(optax.add_decayed_weights(decay, mask=_decay_mask))
  if name == 'sgd':
    chain.append(optax.sgd(schedule))
  elif name in ('momentum', 'nesterov'):
    chain.append(optax.sgd(schedule, momentum=config.momentum, nesterov=name == 'nesterov'))
  elif name == 'adam':
    chain.append(optax.adam(schedule, b1=config.beta1, b2=config.beta2))
  elif name == 'adamw':
    chain.append(optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=decay,
                             mask=_decay_mask))
  elif name == 'lars':
    chain.append(optax.lars(schedule, weight_decay=decay, weight_decay_mask=_decay_mask,
                            trust_ratio_mask=_decay_mask, momentum=config.momentum))
  elif name == 'lamb':
    chain.append(optax.lamb(schedule, b1=config.beta1, b2=config.beta2, weight_decay=decay,
                            mask=_decay_mask))
  else:
    raise ConfigError(f'unknown optimizer {name!r}; choose one of: {", ".join(OPTIMIZERS)}')
  tx = optax.chain(*chain) if len(chain) > 1 else chain[0]
  if not config.frozen:
    return tx
  # The optimizer sees the other parameters alone: its clipping norm, trust ratios and moments
  # are theirs, and frozen parameters keep no optimizer state.
  is_frozen = _frozen_test(config.frozen)
  return optax.multi_transform(
      {'trained': tx, 'frozen': optax.set_to_zero()},
      lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: 'frozen' if is_frozen(path) else 'trained', params))


def without_frozen(grads, pattern: str):
  """`grads` with zeros for the parameters that `pattern` freezes.

  The zeros are constants: nothing computed for those gradients is used any more, so XLA leaves
  out the backward pass through the layers below the lowest trained one.
  """
  is_frozen = _frozen_test(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, grad: jnp.zeros_like(grad) if is_frozen(path) else grad, grads)


def frozen_parameters(params, pattern: str) -> list[str]:
  """The paths of the parameters that the `frozen` regular expression `pattern` matches."""
  is_frozen = _frozen_test(pattern)
  return [tree_paths.dotted(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
          if is_frozen(path)]


def freezes(pattern: str):
  """Whether a parameter, given by its dotted name (`stages.0.layers.0.kernel`), is one that the
  regular expression `pattern` (the `frozen` config key) freezes: searched in the name."""
  regex = re.compile(pattern)
  return lambda name: regex.search(name) is not None


def _frozen_test(pattern: str):
  """`freezes(pattern)` for a parameter given by its key path."""
  test = freezes(pattern)
  return lambda path: test(tree_paths.dotted(path))
