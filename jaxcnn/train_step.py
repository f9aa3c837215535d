"""The train and eval steps: pure functions of arrays, jitted by the caller.

`make_train_step` and `make_eval_step` return plain functions with no side effects and no host
synchronisation. The parallel strategy wraps them in `jax.jit` with its shardings; under
`shard_map` or `pmap` the same functions run per device and average over `axis_name`.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import optim, rng
from jaxcnn.data.augment import Preprocessor, mix_batch, tta_views
from jaxcnn.train_state import ModelDef, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# `first_nonfinite_step` of a window in which every step was finite.
NO_STEP = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a train step does besides the plain gradient step; all off by default.

  Attributes:
    num_classes: classes of the dataset.
    label_smoothing: weight of the uniform distribution mixed into the one-hot targets.
    grad_accum_steps: micro-batches whose gradients are averaged into one update.
    ema_decay: decay of the exponential moving average of the weights (0: no average).
    mixup_alpha: Beta(alpha, alpha) weight of Mixup (0: off).
    cutmix_alpha: Beta(alpha, alpha) weight of CutMix (0: off).
    frozen: the regular expression of the parameters that never move ('': none), whose
      gradients are then neither computed nor counted in the gradient's norm.
    augmix_jsd_weight: weight of AugMix's Jensen-Shannon consistency loss (`jensen_shannon`;
      0: off). When on, each image is trained on as three views (`Preprocessor.augmix_views`),
      the cross-entropy and the accuracy are the clean view's, and the preprocessor must have
      AugMix on and the step no Mixup nor CutMix.
  """
  num_classes: int
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1
  ema_decay: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  frozen: str = ''
  augmix_jsd_weight: float = 0.0


def init_train_sums() -> dict[str, np.ndarray]:
  """Accumulators of the train metrics over a logging window (host values, to be replicated)."""
  return {'loss': np.float32(0), 'accuracy': np.float32(0), 'grad_norm': np.float32(0),
          'steps': np.int32(0), 'first_nonfinite_step': np.int32(NO_STEP)}


# Top-5 accuracy is counted for datasets of more classes than this (ImageNet's 1000, CIFAR-100's
# 100): with 10 or fewer, the right class is nearly always among five.
TOP5_ABOVE_CLASSES = 10


def init_eval_sums(num_classes: int, confusion_matrix: bool = False,
                   test_time_augmentation: bool = False) -> dict[str, np.ndarray]:
  """Accumulators of an evaluation: summed loss, correct predictions (and correct top-5
  predictions, above `TOP5_ABOVE_CLASSES` classes) and examples; with `test_time_augmentation`,
  the same sums for the averaged predictions of the test-time views (`tta_loss`, `tta_correct`,
  ...); with `confusion_matrix`, the count of every (label, predicted class) pair."""
  sums = {'count': np.int32(0)}
  for kind in ('', 'tta_') if test_time_augmentation else ('',):
    sums.update({f'{kind}loss': np.float32(0), f'{kind}correct': np.int32(0)})
    if num_classes > TOP5_ABOVE_CLASSES:
      sums[f'{kind}correct_top5'] = np.int32(0)
  if confusion_matrix:
    sums['confusion'] = np.zeros((num_classes, num_classes), np.int32)
  return sums


def accumulate(sums: Metrics, metrics: Metrics) -> Metrics:
  """Adds one step's metrics to the window's sums; remembers the first non-finite step."""
  return {'loss': sums['loss'] + metrics['loss'],
          'accuracy': sums['accuracy'] + metrics['accuracy'],
          'grad_norm': sums['grad_norm'] + metrics['grad_norm'],
          'steps': sums['steps'] + 1,
          'first_nonfinite_step': jnp.minimum(sums['first_nonfinite_step'],
                                              metrics['nonfinite_step'])}


def one_hot_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Float32 class distributions: one-hot, optionally label-smoothed."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels, optionally label-smoothed."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     one_hot_targets(labels, num_classes, label_smoothing))


def jensen_shannon(logits: jax.Array) -> jax.Array:
  """The Jensen-Shannon divergence among the predictions of several views of each example, as
  AugMix's consistency loss (Hendrycks et al. 2020) computes it: `logits` is (batch, views,
  classes); the mean over views of KL(p_view || M), M the views' mean prediction (clipped below
  at 1e-7 as the paper's code clips it), averaged over the batch. 0 where every view predicts
  the same; at most log(views)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  log_mixture = jnp.log(jnp.clip(jnp.mean(p, axis=1, keepdims=True), 1e-7, 1.0))
  return jnp.mean(jnp.sum(p * (log_p - log_mixture), axis=-1))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The average's decay at `step`: ramped up early (as TF's ExponentialMovingAverage with
  num_updates), so the first weights do not dominate it."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    preprocess: Preprocessor, options: StepOptions,
                    axis_name: str | None = None, unroll_micro_batches: bool | None = None
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch, seed, first_example=0) -> (new_state, metrics)`.

  The step draws its augmentation, mixing and dropout keys from (seed, state.step), takes gradients
  with respect to the parameters only (averaged over `grad_accum_steps` micro-batches), and returns
  the batch's mean loss, accuracy and gradient norm. With `axis_name` the step runs per device
  (shard_map, pmap): gradients and metrics are averaged across that mapped axis. A step whose loss
  or gradient is not finite leaves the state as it was and reports its number as `nonfinite_step`,
  so a diverged run never holds, nor saves, a NaN state.

  The micro-batches run one after another in a `lax.scan`, or unrolled where
  `unroll_micro_batches` (default: on the CPU backend only); both compute the same step.
  """
  if options.augmix_jsd_weight and (options.mixup_alpha or options.cutmix_alpha):
    raise ValueError('AugMix\'s consistency loss compares views of the same image; it does not '
                     'take Mixup or CutMix (mixup_alpha and cutmix_alpha must be 0)')
  num_micro = options.grad_accum_steps
  if unroll_micro_batches is None:
    # XLA:CPU runs a rolled loop's body several times slower than the same code unrolled (as for
    # `steps_per_call`); accelerators keep the loop, which holds one micro-batch's activations.
    unroll_micro_batches = jax.default_backend() == 'cpu'

  def micro_step(params, model_state, inputs, targets, labels, model_key, mix_key):
    """Loss and gradient of one (micro-)batch of preprocessed inputs; returns the updated
    BatchNorm statistics too."""
    if axis_name is not None:
      # Each device drops out different units of its own examples.
      model_key = jax.random.fold_in(model_key, jax.lax.axis_index(axis_name))
      # Under shard_map with its check of varying axes (JAX's default; `parallel.ShardMapStrategy`
      # turns it off) the parameters are known to be the same on every device, so the gradient
      # of this device's loss with respect to them would come out already summed over the
      # devices (and the pmean after it would leave that sum): D times the mean gradient. Taken
      # with respect to a per-device copy, it is this device's own, for the pmean to average.
      params = _per_device(params, axis_name)
    inputs, targets = mix_batch(inputs, targets, mix_key, options.mixup_alpha,
                                options.cutmix_alpha)

    def loss_fn(params):
      model = model_def.merge(params, model_state)
      model_def.reseed(model, model_key)
      if options.augmix_jsd_weight:
        # inputs: (batch, views, ...), run as one batch with each example's views adjacent, so
        # that a batch sharded over devices stays sharded as it was.
        view_logits = model(inputs.reshape(-1, *inputs.shape[2:])).reshape(
            *inputs.shape[:2], -1)
        logits = view_logits[:, 0]  # The clean view's.
      else:
        logits = model(inputs)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      if options.augmix_jsd_weight:
        loss += options.augmix_jsd_weight * jensen_shannon(view_logits)
      return loss, (logits, model_def.split_state(model)[1])

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if options.frozen:
      grads = optim.without_frozen(grads, options.frozen)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return grads, new_model_state, loss, accuracy

  def train_step(state: TrainState, batch: Batch, seed: int | jax.Array,
                 first_example: int | jax.Array = 0) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch`, whose first example is `first_example` of the global batch
    (non-zero for a device's shard of it).

    `seed` is the run's seed. Passed as an argument, not built in, it leaves the compiled program
    the same for every seed, so a sweep over seeds compiles once and then reads the persistent
    compilation cache.

    Augmentation draws per-example keys from each example's index in the global batch. Micro-batch
    k holds every `grad_accum_steps`-th example from the k-th, and Mixup and CutMix pair
    neighbouring examples of a micro-batch, so that augmentation, mixing and the examples behind
    each BatchNorm statistic are the same whether the batch runs on one device or is split over
    several (given an even number of examples per device and micro-batch). Dropout is the
    exception: each device draws its own masks.
    """
    augment_key, model_key, mix_key = jax.random.split(rng.step_key(seed, state.step), 3)
    if options.augmix_jsd_weight:
      inputs = preprocess.augmix_views(batch['image'], augment_key, first_example=first_example)
    else:
      inputs = preprocess(batch['image'], augment_key, train=True, first_example=first_example)
    labels = batch['label']
    targets = one_hot_targets(labels, options.num_classes, options.label_smoothing)
    if num_micro == 1:
      grads, model_state, loss, accuracy = micro_step(
          state.params, state.model_state, inputs, targets, labels, model_key, mix_key)
    else:
      def micro_batch(x, index):
        return x.reshape(-1, num_micro, *x.shape[1:])[:, index]

      def run_micro(model_state, index):
        return micro_step(state.params, model_state, micro_batch(inputs, index),
                          micro_batch(targets, index), micro_batch(labels, index),
                          jax.random.fold_in(model_key, index), jax.random.fold_in(mix_key, index))

      def accumulate_micro(carry, index):
        grads_sum, model_state, loss_sum, accuracy_sum = carry
        grads, model_state, loss, accuracy = run_micro(model_state, index)
        return (jax.tree.map(jnp.add, grads_sum, grads), model_state, loss_sum + loss,
                accuracy_sum + accuracy), None

      # The first micro-batch starts the sums: under shard_map they are then per-device values
      # from the start, as the loop's carry must be.
      carry = run_micro(state.model_state, 0)
      if unroll_micro_batches:
        for index in range(1, num_micro):
          carry, _ = accumulate_micro(carry, index)
      else:
        carry, _ = jax.lax.scan(accumulate_micro, carry, jnp.arange(1, num_micro))
      grads, model_state, loss, accuracy = carry
      grads = jax.tree.map(lambda g: g / num_micro, grads)
      loss, accuracy = loss / num_micro, accuracy / num_micro

    metrics = {'loss': loss, 'accuracy': accuracy}
    if axis_name is not None:
      grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    metrics['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    if options.ema_decay > 0:
      decay = ema_decay_at(state.step, options.ema_decay)

      def average(old, new):
        # Floating averages are kept in float32 (`create_train_state`), whatever the weights'
        # dtype; a leaf that is not floating (a counter) is not averaged but copied.
        if not jnp.issubdtype(new.dtype, jnp.floating):
          return new
        return decay * old + (1 - decay) * new.astype(old.dtype)

      new_state = new_state.replace(
          ema_params=jax.tree.map(average, state.ema_params, params),
          ema_model_state=jax.tree.map(average, state.ema_model_state, model_state))
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    # Numbered as metrics and checkpoints count steps: the step that takes state.step to this.
    metrics['nonfinite_step'] = jnp.where(finite, NO_STEP, state.step + 1).astype(jnp.int32)
    return new_state, metrics

  return train_step


def _per_device(tree, axis_name: str):
  """`tree` marked as varying over `axis_name` (a no-op under pmap and under shard_map without
  its check of varying axes, which track no such thing)."""
  if hasattr(jax.lax, 'pcast'):
    return jax.lax.pcast(tree, axis_name, to='varying')
  return jax.lax.pvary(tree, axis_name)  # JAX before pcast.


def make_eval_step(model_def: ModelDef, preprocess: Preprocessor, *, num_classes: int,
                   axis_name: str | None = None, confusion_matrix: bool = False,
                   test_time_augmentation: str = 'none') -> Callable[..., Metrics]:
  """Builds `eval_step(state, batch, mask) -> sums` over the real (mask=True) examples.

  It returns sums, not means (`loss`, `correct`, `count`, and `correct_top5` and `confusion`
  where `init_eval_sums` has them), so that batches, devices and the padded last batch add up to
  exact metrics over the whole split. With `test_time_augmentation` ('flip', 'flip_translate':
  see `tta_views`) the model also sees the test-time views of each image, and the `tta_`
  sums count the predictions of their averaged logits; the plain sums and the confusion matrix
  stay those of the images alone, which come free as the first view.
  """

  def eval_step(state: TrainState, batch: Batch, mask: jax.Array) -> Metrics:
    model = model_def.merge(state.params, state.model_state)
    model.eval()
    views = tta_views(preprocess(batch['image'], None, train=False), test_time_augmentation)
    labels = batch['label']
    logits = model(views[0][0]).astype(jnp.float32)
    sums = {'count': jnp.sum(mask, dtype=jnp.int32),
            **_prediction_sums(logits, labels, mask, num_classes)}
    if len(views) > 1:
      averaged = views[0][1] * logits
      for images, weight in views[1:]:
        averaged += weight * model(images).astype(jnp.float32)
      sums.update(_prediction_sums(averaged, labels, mask, num_classes, prefix='tta_'))
    if confusion_matrix:  # Rows: the labels; columns: the predicted classes.
      sums['confusion'] = jnp.zeros((num_classes, num_classes), jnp.int32).at[
          labels, jnp.argmax(logits, -1)].add(mask.astype(jnp.int32))
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step


def _prediction_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int,
                     prefix: str = '') -> Metrics:
  """Summed loss and correct (and, above `TOP5_ABOVE_CLASSES` classes, correct top-5) predictions
  of `logits` over the real examples, named with `prefix`."""
  loss = cross_entropy(logits, labels, num_classes)
  sums = {f'{prefix}loss': jnp.sum(jnp.where(mask, loss, 0.0)),
          f'{prefix}correct': jnp.sum((jnp.argmax(logits, -1) == labels) & mask, dtype=jnp.int32)}
  if num_classes > TOP5_ABOVE_CLASSES:
    _, top5 = jax.lax.top_k(logits, 5)
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    sums[f'{prefix}correct_top5'] = jnp.sum(in_top5 & mask, dtype=jnp.int32)
  return sums


def make_predict_step(model_def: ModelDef, preprocess: Preprocessor,
                      test_time_augmentation: str = 'none') -> Callable[..., jax.Array]:
  """Builds `predict_step(state, images_uint8) -> class probabilities` (float32): the softmax of
  the logits, averaged over the test-time views of `test_time_augmentation` where it is not
  'none'."""

  def predict_step(state: TrainState, images: jax.Array) -> jax.Array:
    model = model_def.merge(state.params, state.model_state)
    model.eval()
    views = tta_views(preprocess(images, None, train=False), test_time_augmentation)
    logits = sum(weight * model(view).astype(jnp.float32) for view, weight in views)
    return jax.nn.softmax(logits, axis=-1)

  return predict_step
