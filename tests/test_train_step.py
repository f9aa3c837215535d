"""The functional train and eval steps on tiny synthetic batches."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcnn import models, optim, parallel, rng, xla_options
from jaxcnn.data.augment import Preprocessor, mix_batch, tta_views
from jaxcnn.train_state import create_train_state
from jaxcnn.train_step import (NO_STEP, StepOptions, cross_entropy, ema_decay_at,
                               jensen_shannon, make_eval_step, make_predict_step,
                               make_train_step)

from conftest import learnable_images, tiny_config

PREPROCESS = Preprocessor(mean=(100.0,), std=(80.0,))


def setup(model_name='bn_cnn', seed=0, learning_rate=3e-3, preprocess=PREPROCESS,
          dtype='float32', tx=None, unroll_micro_batches=None, **options):
  model = models.create_model(model_name, num_classes=10, input_shape=(28, 28, 1), seed=seed,
                              dtype=dtype)
  tx = tx or optax.adam(learning_rate)
  model_def, state = create_train_state(model, tx, ema=options.get('ema_decay', 0) > 0)
  step_options = StepOptions(num_classes=10, **options)
  jitted = jax.jit(make_train_step(model_def, tx, preprocess, step_options,
                                   unroll_micro_batches=unroll_micro_batches))
  return model_def, state, lambda state, batch: jitted(state, batch, seed)


def batch(n=64, seed=0):
  images, labels = learnable_images(n, (28, 28, 1), 10, seed)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}


def test_steps_lower_the_loss():
  _, state, step = setup()
  data = batch()
  losses = []
  for _ in range(15):
    state, metrics = step(state, data)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 15
  assert losses[-1] < 0.5 * losses[0], losses


def test_a_step_that_is_not_finite_changes_nothing_and_reports_its_number():
  _, state, step = setup()
  state, metrics = step(state, batch())  # Step 1: finite.
  assert int(metrics['nonfinite_step']) == NO_STEP
  poisoned = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan),
                                               state.params))
  after, metrics = step(poisoned, batch())
  assert int(metrics['nonfinite_step']) == 2  # Numbered as metrics.jsonl numbers steps.
  assert int(after.step) == int(state.step)  # Not counted as taken...
  for old, new in zip(jax.tree.leaves(poisoned), jax.tree.leaves(after)):
    np.testing.assert_array_equal(old, new)  # ...and nothing moved.


def test_only_parameters_get_gradients_and_batchnorm_statistics_update():
  _, state, step = setup()
  new_state, _ = step(state, batch())
  # The optimizer state mirrors the parameters alone: no moments for BatchNorm statistics.
  mu = new_state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  assert not any('mean' in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(mu))
  # BatchNorm running statistics moved by their update rule, not by the optimizer.
  old_stats = jax.tree.leaves(state.model_state)
  new_stats = jax.tree.leaves(new_state.model_state)
  assert old_stats and any(not np.array_equal(a, b) for a, b in zip(old_stats, new_stats))


def test_frozen_parameters_take_no_gradient_and_no_backward_pass_is_compiled_for_them():
  head_only = r'^(?!fc2\.)'  # A linear probe.
  data = batch()
  steps, compiled = {}, {}
  for frozen in ('', head_only):
    model = models.create_model('bn_cnn', num_classes=10, input_shape=(28, 28, 1), seed=0)
    tx = optim.make_optimizer(tiny_config(optimizer='sgd', learning_rate=0.1,
                                          lr_schedule='constant', frozen=frozen), 10, 10)
    model_def, state = create_train_state(model, tx)
    step = jax.jit(make_train_step(model_def, tx, PREPROCESS,
                                   StepOptions(num_classes=10, frozen=frozen)))
    steps[frozen] = step(state, data, 0)
    compiled[frozen] = step.lower(state, data, 0).compile().as_text()
  (trained, _), (probed, metrics) = steps[''], steps[head_only]
  flat = lambda tree: {jax.tree_util.keystr(path): np.asarray(value)
                       for path, value in jax.tree_util.tree_leaves_with_path(tree)}
  before, after, unfrozen = flat(state.params), flat(probed.params), flat(trained.params)
  for path, value in before.items():
    in_head = path.startswith("['fc2']")
    assert np.array_equal(after[path], value) != in_head, path  # Only the head moved...
    assert not np.array_equal(unfrozen[path], value), path  # ...where every array would have.

  # The gradient's norm is the head's: computed here by hand, from the same normalised batch.
  def loss(params):
    logits = model_def.merge(params, state.model_state)(
        (data['image'].astype(jnp.float32) - 100.0) / 80.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data['label']).mean()
  head_grad = jax.grad(loss)(state.params)['fc2']
  np.testing.assert_allclose(metrics['grad_norm'], optax.tree.norm(head_grad), rtol=1e-5)
  # Nothing below the head needs a gradient: XLA compiles no backward convolution.
  assert compiled[head_only].count('convolution(') < compiled[''].count('convolution(')


def test_same_seed_same_step_is_bitwise_identical():
  data = batch()
  results = []
  for _ in range(2):
    _, state, step = setup(model_name='keras_cnn', seed=7)  # With dropout.
    for _ in range(3):
      state, metrics = step(state, data)
    results.append((jax.tree.leaves(state.params), float(metrics['loss'])))
  for a, b in zip(results[0][0], results[1][0]):
    np.testing.assert_array_equal(a, b)
  assert results[0][1] == results[1][1]


def test_dropout_and_augmentation_change_with_the_step():
  """The step's randomness is drawn from (seed, step): the same batch at two steps differs."""
  preprocess = Preprocessor(mean=(100.0,), std=(80.0,), crop_padding=2)
  _, state, step = setup(model_name='keras_cnn', learning_rate=0.0, preprocess=preprocess)
  data = batch()
  _, first = step(state, data)
  _, again = step(state, data)
  _, later = step(state.replace(step=state.step + 1), data)
  assert float(first['loss']) == float(again['loss'])
  assert float(first['loss']) != float(later['loss'])


def test_the_seed_argument_draws_the_randomness_of_the_step():
  """The seed is an argument of the compiled step, not part of the model: from the same weights,
  another seed augments and drops out differently, the same seed exactly as before."""
  preprocess = Preprocessor(mean=(100.0,), std=(80.0,), crop_padding=2)
  model = models.create_model('keras_cnn', num_classes=10, input_shape=(28, 28, 1), seed=0)
  tx = optax.sgd(0.0)
  model_def, state = create_train_state(model, tx)
  step = jax.jit(make_train_step(model_def, tx, preprocess, StepOptions(num_classes=10)))
  data = batch()
  losses = [float(step(state, data, seed)[1]['loss']) for seed in (3, 4, 3)]
  assert losses[0] == losses[2] != losses[1]
  assert step._cache_size() == 1  # pylint: disable=protected-access  (one trace for every seed)


def test_eval_step_sums_only_masked_examples():
  model_def, state, _ = setup()
  eval_step = jax.jit(make_eval_step(model_def, PREPROCESS, num_classes=10))
  data = batch(32)
  mask = jnp.arange(32) < 20
  sums = eval_step(state, data, mask)
  head = eval_step(state, jax.tree.map(lambda x: x[:20], data), jnp.ones(20, bool))
  assert int(sums['count']) == 20
  assert int(sums['correct']) == int(head['correct'])
  np.testing.assert_allclose(float(sums['loss']), float(head['loss']), rtol=1e-5)


def test_top5_and_the_confusion_matrix_count_the_masked_examples_only():
  model = models.create_model('lenet5', num_classes=20, input_shape=(28, 28, 1))
  model_def, state = create_train_state(model, optax.sgd(0.1))
  images, labels = learnable_images(64, (28, 28, 1), 20, 0)
  data = {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}
  mask = jnp.arange(64) < 50
  sums = jax.jit(make_eval_step(model_def, PREPROCESS, num_classes=20, confusion_matrix=True))(
      state, data, mask)
  predict = jax.jit(make_predict_step(model_def, PREPROCESS))
  probabilities = np.asarray(predict(state, data['image']))
  ranks = (probabilities > probabilities[np.arange(64), labels][:, None]).sum(-1)  # 0: the top.
  assert int(sums['correct']) == int(np.sum(ranks[:50] == 0))
  assert int(sums['correct_top5']) == int(np.sum(ranks[:50] < 5))
  assert int(sums['correct']) < int(sums['correct_top5']) < 50  # Untrained: a test with teeth.
  expected = np.zeros((20, 20), np.int32)
  np.add.at(expected, (labels[:50], probabilities[:50].argmax(-1)), 1)
  np.testing.assert_array_equal(sums['confusion'], expected)  # Rows: labels; columns: guesses.
  ten = create_train_state(models.create_model('lenet5', num_classes=10, input_shape=(28, 28, 1)),
                           optax.sgd(0.1))
  assert 'correct_top5' not in jax.jit(make_eval_step(ten[0], PREPROCESS, num_classes=10))(
      ten[1], batch(8), jnp.ones(8, bool))


def test_test_time_views_are_the_images_mirrored_and_shifted_by_a_pixel():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 5, 2)), jnp.float32)
  mirrored = images[:, :, ::-1]
  for kind, count in (('none', 1), ('flip', 2), ('flip_translate', 6)):
    views = tta_views(images, kind)
    assert len(views) == count and sum(weight for _, weight in views) == 1.0
    assert views[0][0] is images and all(view.shape == images.shape for view, _ in views)
  (_, half), (flipped, _) = tta_views(images, 'flip')
  np.testing.assert_array_equal(flipped, mirrored)
  assert half == 0.5
  views = tta_views(images, 'flip_translate')
  assert [weight for _, weight in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
  down_right, down_right_mirrored, up_left, up_left_mirrored = (view for view, _ in views[2:])
  np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
  np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])  # Reflected at the edge.
  np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
  np.testing.assert_array_equal(down_right_mirrored, down_right[:, :, ::-1])
  np.testing.assert_array_equal(up_left_mirrored, up_left[:, :, ::-1])
  with pytest.raises(ValueError, match="got 'mirror'"):
    tta_views(images, 'mirror')


def test_test_time_augmentation_counts_the_averaged_logits_of_the_views_beside_the_plain_ones():
  model_def, state, train = setup()
  for _ in range(3):  # Trained a little: an untrained model's mirror views would hardly differ.
    state, _ = train(state, batch(64))
  data = batch(32, seed=1)
  mask = jnp.arange(32) < 27
  plain = jax.jit(make_eval_step(model_def, PREPROCESS, num_classes=10))(state, data, mask)
  for kind in ('flip', 'flip_translate'):
    sums = jax.jit(make_eval_step(model_def, PREPROCESS, num_classes=10,
                                  test_time_augmentation=kind))(state, data, mask)
    for name in plain:  # The images alone, as without test-time augmentation.
      np.testing.assert_allclose(sums[name], plain[name], rtol=1e-6)
    # By hand, from the predict step's softmax of the same averaged logits.
    probabilities = np.asarray(jax.jit(make_predict_step(model_def, PREPROCESS, kind))(
        state, data['image']))[:27]
    labels = np.asarray(data['label'])[:27]
    assert int(sums['tta_correct']) == int(np.sum(probabilities.argmax(-1) == labels))
    np.testing.assert_allclose(float(sums['tta_loss']),
                               -np.sum(np.log(probabilities[np.arange(27), labels])), rtol=1e-4)
    assert abs(float(sums['tta_loss']) - float(plain['loss'])) > 1e-3  # The views differ.
  # Images that are their own mirror image: 'flip' averages two equal logits.
  symmetric = {**data, 'image': jnp.concatenate([data['image'][:, :, :14],
                                                 data['image'][:, :, 13::-1]], axis=2)}
  sums = jax.jit(make_eval_step(model_def, PREPROCESS, num_classes=10,
                                test_time_augmentation='flip'))(state, symmetric, mask)
  assert int(sums['tta_correct']) == int(sums['correct'])
  np.testing.assert_allclose(float(sums['tta_loss']), float(sums['loss']), rtol=1e-5)


def test_jensen_shannon_is_the_mean_divergence_of_each_view_from_their_mixture():
  logits = 3 * jax.random.normal(jax.random.key(0), (4, 3, 5))
  p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  mixture = p.mean(axis=1, keepdims=True)
  expected = np.mean(np.sum(p * np.log(p / mixture), axis=-1))  # Over views, then examples.
  np.testing.assert_allclose(jensen_shannon(logits), expected, rtol=1e-5)
  assert abs(float(jensen_shannon(jnp.broadcast_to(logits[:, :1], logits.shape)))) < 1e-6
  # Each view sure of a different class: the most three views can disagree, log 3.
  np.testing.assert_allclose(jensen_shannon(30 * jnp.eye(3)[None]), np.log(3), rtol=1e-4)


def test_augmixs_consistency_loss_adds_the_views_divergence_to_the_clean_cross_entropy():
  """With `augmix_jsd_weight`, the step's loss is the clean view's cross-entropy plus the weight
  times the Jensen-Shannon divergence of the three views' predictions, and its accuracy is the
  clean view's: computed here from the views and the weights the step started from (LeNet-5
  has no BatchNorm or dropout)."""
  preprocess = Preprocessor(mean=(100.0,), std=(80.0,), crop_padding=2, augmix=True)
  data = batch(16)
  model_def, state, step = setup(model_name='lenet5', preprocess=preprocess,
                                 augmix_jsd_weight=12.0)
  _, metrics = step(state, data)
  model = model_def.merge(state.params, state.model_state)
  augment_key = jax.random.split(rng.step_key(0, state.step), 3)[0]
  views = preprocess.augmix_views(data['image'], augment_key)
  logits = jax.jit(lambda model, x: model(x))(model, views.reshape(-1, 28, 28, 1))
  logits = logits.reshape(16, 3, 10)
  divergence = jensen_shannon(logits)
  assert divergence > 1e-4  # The views differ, so the term is there to be counted.
  expected = cross_entropy(logits[:, 0], data['label'], 10).mean() + 12.0 * divergence
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'],
                             np.mean(np.argmax(logits[:, 0], -1) == np.asarray(data['label'])))
  with pytest.raises(ValueError, match='does not take Mixup or CutMix'):
    setup(model_name='lenet5', preprocess=preprocess, augmix_jsd_weight=12.0, mixup_alpha=0.2)


# Unrolled is the CPU's default; the loop (accelerators' default) is checked here on the CPU.
@pytest.mark.parametrize('unroll', [True, False], ids=['unrolled', 'loop'])
def test_gradient_accumulation_equals_one_big_batch(unroll):
  """k micro-batches of B/k examples make the same update as one batch of B (no BatchNorm).

  Momentum SGD moves by the gradient's scale, so a sum of micro-batch gradients left undivided
  would show; Adam's updates hardly change with it."""
  data = batch(64)
  results = []
  for k in (1, 4):
    _, state, step = setup(model_name='lenet5', grad_accum_steps=k, unroll_micro_batches=unroll,
                           tx=optax.sgd(0.05, momentum=0.9),
                           preprocess=Preprocessor(mean=(100.0,), std=(80.0,), crop_padding=2))
    for _ in range(3):
      state, metrics = step(state, data)
    results.append((state, metrics))
  (one, one_metrics), (four, four_metrics) = results
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(one_metrics['loss'], four_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(one_metrics['grad_norm'], four_metrics['grad_norm'], rtol=1e-5)


def test_micro_batches_in_a_loop_make_the_unrolled_step_per_device_too():
  """The micro-batch loop (accelerators' default) and its unrolled form (the CPU's) make the same
  step, BatchNorm statistics carried from micro-batch to micro-batch included, also as
  shard_map's per-device step, whose loop carries values that differ between devices."""
  mesh = parallel.make_mesh(2)
  model = models.create_model('bn_cnn', num_classes=10, input_shape=(28, 28, 1),
                              axis_name=parallel.DATA_AXIS)
  tx = optax.sgd(0.05, momentum=0.9)
  model_def, state = create_train_state(model, tx, ema=True)
  options = StepOptions(num_classes=10, grad_accum_steps=2, ema_decay=0.9, mixup_alpha=0.4)
  P = jax.sharding.PartitionSpec
  results = []
  for unroll in (True, False):
    train_step = make_train_step(model_def, tx, PREPROCESS, options,
                                 axis_name=parallel.DATA_AXIS, unroll_micro_batches=unroll)
    per_device = lambda state, batch: train_step(  # pylint: disable=cell-var-from-loop
        state, batch, 0, jax.lax.axis_index(parallel.DATA_AXIS) * 32)
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                                 out_specs=P()))
    new_state = state
    for _ in range(2):
      new_state, metrics = step(new_state, batch(64))
    results.append((new_state, metrics))
  (unrolled, unrolled_metrics), (loop, loop_metrics) = results
  assert int(loop.step) == 2
  for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(loop)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for key in ('loss', 'grad_norm', 'accuracy'):
    np.testing.assert_allclose(unrolled_metrics[key], loop_metrics[key], rtol=1e-5)


def test_label_smoothing_trains_against_smoothed_targets():
  """The step's loss is the cross-entropy against (1 - e) * one-hot + e / K, computed here from
  the logits of the weights it started from (LeNet-5 has no BatchNorm or dropout, so training
  and evaluation give the same logits)."""
  data = batch(32)
  model_def, state, _ = setup(model_name='lenet5')
  model = model_def.merge(state.params, state.model_state)
  model.eval()
  log_probs = jax.nn.log_softmax(model(PREPROCESS(data['image'], None, train=False)))
  one_hot = np.eye(10)[np.asarray(data['label'])]
  for smoothing in (0.0, 0.1):
    _, _, step = setup(model_name='lenet5', label_smoothing=smoothing)
    _, metrics = step(state, data)
    targets = (1 - smoothing) * one_hot + smoothing / 10
    expected = -np.mean(np.sum(targets * np.asarray(log_probs), axis=-1))
    np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)


def test_initial_state_is_the_model_and_a_fresh_optimizer_state():
  model = models.create_model('bn_cnn', num_classes=10, input_shape=(28, 28, 1))
  tx = optax.adamw(1e-3, weight_decay=0.05)
  _, state = create_train_state(model, tx, ema=True)
  params, batch_stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  assert int(state.step) == 0
  for expected, got in [(params, state.params), (params, state.ema_params),
                        (batch_stats, state.ema_model_state), (tx.init(params), state.opt_state)]:
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(g, e)
  # The averages are buffers of their own: a step that donates the state may overwrite the weights.
  params_buffers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.params)}
  assert not params_buffers & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.ema_params)}


def test_ema_follows_the_weights_with_the_ramped_decay():
  _, state, step = setup(ema_decay=0.9)
  data = batch()
  new, _ = step(state, data)
  decay = float(ema_decay_at(jnp.int32(0), 0.9))
  assert decay == pytest.approx(0.1)  # min(0.9, 1/10): early steps follow the weights closely.
  for old, updated, average in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params),
                                   jax.tree.leaves(new.ema_params)):
    np.testing.assert_allclose(average, decay * old + (1 - decay) * updated, rtol=1e-6, atol=1e-7)
  assert float(ema_decay_at(jnp.int32(10_000), 0.9)) == pytest.approx(0.9)


class Bfloat16Linear(nnx.Module):
  """A model whose parameters are bfloat16."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(28 * 28, 10, param_dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.fc(x.reshape(x.shape[0], -1)).astype(jnp.float32)


def test_the_average_of_bfloat16_weights_moves_late_in_a_run_and_keeps_their_dtype():
  """Averaged in bfloat16, (1 - 0.999) x the change of a step would round away."""
  # Steps well above bfloat16's resolution: XLA may average the update before its rounding to
  # bfloat16 (excess precision), which would dwarf steps that round away.
  tx = optax.sgd(1.0)
  model_def, state = create_train_state(Bfloat16Linear(nnx.Rngs(0)), tx, ema=True)
  step = jax.jit(make_train_step(model_def, tx, PREPROCESS,
                                 StepOptions(num_classes=10, ema_decay=0.999)))
  state = state.replace(step=jnp.int32(100_000))  # The decay has reached 0.999.
  new, _ = step(state, batch(), 0)
  kernel = lambda tree: tree['fc']['kernel'][...]
  assert kernel(new.params).dtype == jnp.bfloat16 and kernel(new.ema_params).dtype == jnp.float32
  # The average moves by a thousandth of the step's change.
  old, weights = np.asarray(kernel(state.ema_params)), np.asarray(kernel(new.params), np.float32)
  moved, expected = np.asarray(kernel(new.ema_params)) - old, 0.001 * (weights - old)
  np.testing.assert_allclose(moved, expected, atol=0.02 * np.abs(expected).max())
  assert np.abs(moved).max() > 0.5 * np.abs(expected).max() > 0
  assert kernel(new.averaged().params).dtype == jnp.bfloat16  # Evaluated as the model computes.


@pytest.mark.parametrize('mixup, cutmix', [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_mix_images_and_targets_alike(mixup, cutmix):
  images = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1))
  targets = jax.nn.one_hot(jnp.arange(8) % 3, 3)
  mixed, mixed_targets = mix_batch(images, targets, jax.random.key(1), mixup, cutmix)
  assert mixed.shape == images.shape
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)  # Still distributions.
  # One weight for the batch: lam on each example's class, 1 - lam on its neighbour's (0 <-> 1,
  # 2 <-> 3, ...), so that the partners stay together when the batch is split over devices.
  partner = np.arange(8) ^ 1
  lam = float(mixed_targets[0] @ targets[0])
  np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[partner], atol=1e-6)
  # Images are convex combinations (mixup) or pastes (cutmix) of an example and its neighbour.
  low, high = jnp.minimum(images, images[partner]), jnp.maximum(images, images[partner])
  assert bool(jnp.all(mixed >= low - 1e-6)) and bool(jnp.all(mixed <= high + 1e-6))
  # Deterministic per key, different across keys.
  again, _ = mix_batch(images, targets, jax.random.key(1), mixup, cutmix)
  np.testing.assert_array_equal(mixed, again)
  other, _ = mix_batch(images, targets, jax.random.key(2), mixup, cutmix)
  assert not np.array_equal(mixed, other)


def test_an_odd_last_example_is_mixed_with_itself():
  images = jax.random.uniform(jax.random.key(0), (7, 4, 4, 1))
  targets = jax.nn.one_hot(jnp.arange(7) % 3, 3)
  mixed, mixed_targets = mix_batch(images, targets, jax.random.key(1), 0.2, 0.0)
  np.testing.assert_allclose(mixed[6], images[6], rtol=1e-6)
  np.testing.assert_allclose(mixed_targets[6], targets[6], rtol=1e-6)
  lam = float(mixed_targets[0] @ targets[0])
  np.testing.assert_allclose(mixed[5], lam * images[5] + (1 - lam) * images[4], rtol=1e-5)


def test_mixing_a_batch_sharded_over_devices_moves_no_example_between_them():
  """Partners are neighbours, so under jit over a mesh each device mixes its own examples: no
  all-gather of the batch onto every device (a gather by partner index made one)."""
  mesh = parallel.make_mesh(4)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  images = jax.device_put(jax.random.uniform(jax.random.key(0), (32, 8, 8, 3)), sharded)
  targets = jax.device_put(jax.nn.one_hot(jnp.arange(32) % 10, 10), sharded)
  mix = jax.jit(lambda i, t, k: mix_batch(i, t, k, 0.2, 1.0))
  compiled = mix.lower(images, targets, jax.random.key(1)).compile().as_text()
  assert 'all-gather' not in compiled and 'all-to-all' not in compiled
  expected = mix_batch(np.asarray(images), np.asarray(targets), jax.random.key(1), 0.2, 1.0)
  for got, want in zip(mix(images, targets, jax.random.key(1)), expected):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cutmix_weight_is_the_area_of_the_pasted_box():
  images = jnp.zeros((2, 10, 10, 1)).at[1].set(1.0)  # Example 0 is black, its partner white.
  targets = jnp.eye(2)
  mixed, mixed_targets = mix_batch(images, targets, jax.random.key(3), 0.0, 1.0)
  pasted = float(mixed[0].mean())  # The fraction of example 0 covered by the white box.
  np.testing.assert_allclose(mixed_targets[0], [1 - pasted, pasted], atol=1e-6)


def convolution_dtypes(step, state, data) -> set[str]:
  """The result types of the train step's convolutions, forward and backward, as its jaxpr
  prints them ('f32', 'bf16'): traced only, nothing is compiled."""
  jaxpr = str(jax.make_jaxpr(step)(state, data))
  return set(re.findall(r'(\w+)\[[\d,]*\] = conv_general_dilated\[', jaxpr))


def test_bfloat16_training_tracks_float32():
  """bf16 compute with float32 weights follows the float32 loss curve within bf16 noise."""
  data = batch(64)
  curves = []
  for dtype, convolutions in (('float32', 'f32'), ('bfloat16', 'bf16')):
    _, state, step = setup(dtype=dtype)
    # The dtype reaches the computation: every convolution runs in it.
    assert convolution_dtypes(step, state, data) == {convolutions}
    losses = []
    for _ in range(10):
      state, metrics = step(state, data)
      losses.append(float(metrics['loss']))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
    curves.append(np.array(losses))
  assert not np.array_equal(curves[1], curves[0])  # Rounded to bf16, not the float32 run again.
  np.testing.assert_allclose(curves[1], curves[0], rtol=0.05, atol=0.02)


@pytest.mark.parametrize('kind', ['training', 'inference'])
def test_xla_options_are_known_to_this_jaxlib_and_keep_results(kind):
  """The CPU options compile as given (a renamed XLA flag or value would silently cost speed)."""
  lowered = jax.jit(lambda x: jnp.max(jnp.tanh(x) @ x, axis=0)).lower(jnp.ones((8, 8)))
  x = jax.random.normal(jax.random.key(0), (8, 8))
  options = getattr(xla_options, f'{kind}_options')()
  fusions = {'training': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
             'inference': ''}[kind]
  assert options == ({'xla_cpu_experimental_ynn_fusion_type': fusions}
                     if jax.default_backend() == 'cpu' else {})
  np.testing.assert_allclose(lowered.compile(options)(x), lowered.compile()(x), rtol=1e-6)


def test_training_options_change_what_xla_cpu_compiles():
  """A convolution's gradient step compiles differently with the training options on the CPU (it
  stays with XLA instead of YNNPACK), and computes the same values."""
  def loss(kernel, x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.tanh(y))
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 32, 32))
  x = jax.random.normal(jax.random.key(1), (64, 16, 16, 32))
  lowered = jax.jit(jax.grad(loss)).lower(kernel, x)
  tuned = xla_options.compile_lowered(lowered, xla_options.training_options())
  default = lowered.compile()
  if jax.default_backend() == 'cpu':
    assert tuned.as_text() != default.as_text()
  np.testing.assert_allclose(tuned(kernel, x), default(kernel, x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('options', [
    {'xla_cpu_no_such_option_in_any_jaxlib': ''},
    {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_NO_SUCH_FUSION'}])
def test_an_unknown_xla_option_or_value_falls_back_to_the_defaults(options):
  lowered = jax.jit(lambda x: 2 * x).lower(jnp.ones(3))
  compiled = xla_options.compile_lowered(lowered, options)
  np.testing.assert_array_equal(compiled(jnp.ones(3)), np.full(3, 2.0))
