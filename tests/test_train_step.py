"""The functional train and eval steps on tiny synthetic batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcnn import models
from jaxcnn.data.augment import Preprocessor
from jaxcnn.train_state import create_train_state
from jaxcnn.train_step import make_eval_step, make_train_step

from conftest import learnable_images

PREPROCESS = Preprocessor(mean=(100.0,), std=(80.0,))


def setup(model_name='bn_cnn', seed=0, learning_rate=3e-3, preprocess=PREPROCESS):
  model = models.create_model(model_name, num_classes=10, input_shape=(28, 28, 1), seed=seed)
  tx = optax.adam(learning_rate)
  model_def, state = create_train_state(model, tx)
  step = jax.jit(make_train_step(model_def, tx, preprocess, num_classes=10, seed=seed))
  return model_def, state, step


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
