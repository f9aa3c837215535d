"""The train and eval steps: pure functions of arrays, jitted by the caller.

`make_train_step` and `make_eval_step` return plain functions with no side effects and no host
synchronisation. The trainer wraps them in `jax.jit` with the shardings of its parallel strategy;
under `shard_map` or `pmap` the same functions run per device and average over `axis_name`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import rng
from jaxcnn.data.augment import Preprocessor
from jaxcnn.train_state import ModelDef, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# `first_nonfinite_step` of a window in which every step was finite.
NO_STEP = np.iinfo(np.int32).max


def init_train_sums() -> dict[str, np.ndarray]:
  """Accumulators of the train metrics over a logging window (host values, to be replicated)."""
  return {'loss': np.float32(0), 'accuracy': np.float32(0), 'grad_norm': np.float32(0),
          'steps': np.int32(0), 'first_nonfinite_step': np.int32(NO_STEP)}


def init_eval_sums() -> dict[str, np.ndarray]:
  """Accumulators of an evaluation: summed loss, correct predictions and examples."""
  return {'loss': np.float32(0), 'correct': np.int32(0), 'count': np.int32(0)}


def accumulate(sums: Metrics, metrics: Metrics) -> Metrics:
  """Adds one step's metrics to the window's sums; remembers the first non-finite step."""
  return {'loss': sums['loss'] + metrics['loss'],
          'accuracy': sums['accuracy'] + metrics['accuracy'],
          'grad_norm': sums['grad_norm'] + metrics['grad_norm'],
          'steps': sums['steps'] + 1,
          'first_nonfinite_step': jnp.minimum(sums['first_nonfinite_step'],
                                              metrics['nonfinite_step'])}


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels, optionally label-smoothed."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    preprocess: Preprocessor, *, num_classes: int, seed: int,
                    label_smoothing: float = 0.0,
                    axis_name: str | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (new_state, metrics)`.

  The step draws its augmentation and dropout keys from (seed, state.step), takes gradients with
  respect to the parameters only, and returns the batch's mean loss, accuracy and gradient norm.
  A step whose loss or gradient is not finite leaves the state as it was and reports its number
  as `nonfinite_step`, so a diverged run never holds, nor saves, a NaN state.
  With `axis_name` the step runs per device (shard_map, pmap): gradients and metrics are averaged
  across that mapped axis.
  """

  def train_step(state: TrainState, batch: Batch,
                 first_example: int | jax.Array = 0) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch`, whose first example is `first_example` of the global batch
    (non-zero for a device's shard of it)."""
    augment_key, model_key = jax.random.split(rng.step_key(seed, state.step))
    if axis_name is not None:  # Each device drops out different units of its own examples.
      model_key = jax.random.fold_in(model_key, jax.lax.axis_index(axis_name))
    images = preprocess(batch['image'], augment_key, train=True, first_example=first_example)
    labels = batch['label']

    def loss_fn(params):
      model = model_def.merge(params, state.model_state)
      model_def.reseed(model, model_key)
      logits = model(images)
      loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
      return loss, (logits, model_def.split_state(model)[1])

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
    if axis_name is not None:
      grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    metrics['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              model_state=model_state, opt_state=opt_state)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics['nonfinite_step'] = jnp.where(finite, NO_STEP, state.step).astype(jnp.int32)
    return new_state, metrics

  return train_step


def make_eval_step(model_def: ModelDef, preprocess: Preprocessor, *, num_classes: int,
                   axis_name: str | None = None) -> Callable[..., Metrics]:
  """Builds `eval_step(state, batch, mask) -> sums` over the real (mask=True) examples.

  It returns sums, not means (`loss`, `correct`, `count`), so that batches, devices and the padded
  last batch add up to exact metrics over the whole split.
  """

  def eval_step(state: TrainState, batch: Batch, mask: jax.Array) -> Metrics:
    model = model_def.merge(state.params, state.model_state)
    model.eval()
    logits = model(preprocess(batch['image'], None, train=False))
    loss = cross_entropy(logits, batch['label'], num_classes)
    correct = jnp.argmax(logits, -1) == batch['label']
    sums = {'loss': jnp.sum(jnp.where(mask, loss, 0.0)),
            'correct': jnp.sum(correct & mask, dtype=jnp.int32),
            'count': jnp.sum(mask, dtype=jnp.int32)}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step


def make_predict_step(model_def: ModelDef, preprocess: Preprocessor) -> Callable[..., jax.Array]:
  """Builds `predict_step(state, images_uint8) -> class probabilities` (float32)."""

  def predict_step(state: TrainState, images: jax.Array) -> jax.Array:
    model = model_def.merge(state.params, state.model_state)
    model.eval()
    logits = model(preprocess(images, None, train=False))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return predict_step
