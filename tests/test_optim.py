"""Learning-rate schedules and optimizers built from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import config as config_lib
from jaxcnn import optim, trainer
from jaxcnn.errors import ConfigError

from conftest import tiny_config


def rates(schedule, steps):
  return np.array([float(schedule(step)) for step in steps])


@pytest.mark.parametrize('name', ['constant', 'cosine', 'linear', 'step'])
def test_warm_up_trains_from_the_first_step_and_reaches_the_rate(name):
  config = tiny_config(learning_rate=0.4, lr_schedule=name, warmup_epochs=1)
  schedule = optim.make_schedule(config, total_steps=1000, steps_per_epoch=100)
  np.testing.assert_allclose(rates(schedule, [0, 49, 99]), [0.004, 0.2, 0.4], rtol=1e-5)
  assert np.all(np.diff(rates(schedule, range(100))) > 0)
  assert float(schedule(100)) == pytest.approx(0.4, rel=1e-4)  # The main schedule's start.


def test_a_warm_up_longer_than_the_run_rises_to_the_rate_at_the_last_step():
  config = tiny_config(learning_rate=0.4, lr_schedule='cosine', warmup_epochs=10)
  schedule = optim.make_schedule(config, total_steps=50, steps_per_epoch=100)
  steps = rates(schedule, range(50))
  assert np.all(np.diff(steps) > 0)
  assert steps[0] == pytest.approx(0.4 / 50, rel=1e-5) and steps[-1] == pytest.approx(0.4, rel=1e-5)


def test_cosine_and_linear_decay_to_zero_at_the_last_step():
  for name in ('cosine', 'linear'):
    config = tiny_config(learning_rate=0.1, lr_schedule=name)
    schedule = optim.make_schedule(config, total_steps=500, steps_per_epoch=50)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(250)) == pytest.approx(0.05, rel=1e-3)  # Half-way, both.
    assert float(schedule(500)) == pytest.approx(0.0, abs=1e-7)


def test_step_schedule_decays_at_the_given_epochs():
  config = tiny_config(learning_rate=1.0, lr_schedule='step', lr_decay_epochs=(2, 4),
                       lr_decay_factor=0.1)
  schedule = optim.make_schedule(config, total_steps=600, steps_per_epoch=100)
  np.testing.assert_allclose(rates(schedule, [0, 199, 200, 399, 400, 599]),
                             [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-5)
  # 0.57 * 100 is 56.99999999999999 in floats: the decay is at step 57 all the same.
  config.lr_decay_epochs = (0.57,)
  schedule = optim.make_schedule(config, total_steps=600, steps_per_epoch=100)
  np.testing.assert_allclose(rates(schedule, [56, 57]), [1, 0.1], rtol=1e-5)
  # Decays that fall on one step compound there.
  config.lr_decay_epochs = (1.0, 1.2, 2)
  schedule = optim.make_schedule(config, total_steps=30, steps_per_epoch=3)
  np.testing.assert_allclose(rates(schedule, [2, 3, 5, 6]), [1, 0.01, 0.01, 0.001], rtol=1e-5)


def test_fractional_epochs_are_as_many_steps_as_they_are_exactly():
  """1.1 * 50 is 55.00000000000001 in floats, and 4.9 * 100 490.00000000000006."""
  for epochs, steps_per_epoch, steps in ((1.1, 50, 55), (4.9, 100, 490), (2.2, 195, 429),
                                         (0.5, 3, 2), (0.01, 10, 1)):
    config = tiny_config(num_epochs=epochs, num_train_steps=-1)
    assert trainer.total_train_steps(config, steps_per_epoch) == steps


def test_onecycle_warms_up_itself_and_refuses_a_warm_up():
  config = tiny_config(learning_rate=0.2, lr_schedule='onecycle')
  schedule = optim.make_schedule(config, total_steps=1000, steps_per_epoch=100)
  peak = int(np.argmax(rates(schedule, range(1000))))
  assert 290 <= peak <= 310 and float(schedule(peak)) == pytest.approx(0.2, rel=1e-3)
  config = tiny_config(lr_schedule='onecycle', warmup_epochs=2)
  with pytest.raises(ConfigError, match="'warmup_epochs' \\(2\\) is not used by lr_schedule "
                                        "'onecycle'"):
    config_lib.validate(config)


def test_weight_decay_leaves_biases_and_norm_scales_alone():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.ones(4)},
            'norm': {'scale': jnp.ones(4)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  for name in ('sgd', 'adamw'):
    config = tiny_config(optimizer=name, learning_rate=0.1, lr_schedule='constant',
                         weight_decay=0.5)
    tx = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # Decayed by learning_rate * weight_decay * w, as optax's and PyTorch's AdamW and SGD's L2
    # do; AdamW adds nothing more where the gradient is zero.
    np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 0.5 * params['conv']['kernel'],
                               rtol=1e-6, err_msg=name)
    assert float(jnp.abs(updates['conv']['bias']).max()) == 0, name
    assert float(jnp.abs(updates['norm']['scale']).max()) == 0, name


def test_lars_and_lamb_scale_each_kernels_step_by_its_trust_ratio():
  keys = jax.random.split(jax.random.key(0), 3)
  params = {'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 1, 4)), 'bias': jnp.ones(4)}}
  grads = {'conv': {'kernel': 50 * jax.random.normal(keys[1], (3, 3, 1, 4)),
                    'bias': jax.random.normal(keys[2], (4,))}}

  def first_update(name):
    config = tiny_config(optimizer=name, learning_rate=0.1, lr_schedule='constant',
                         weight_decay=1e-4)
    tx = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    return tx.update(grads, tx.init(params), params)[0]['conv']

  kernel, bias = params['conv']['kernel'], grads['conv']['bias']
  # LARS: the kernel moves by lr * 0.001 (the trust coefficient) of its own norm, whatever the
  # gradient's scale, along the decayed gradient; the bias takes a plain SGD step.
  lars = first_update('lars')
  decayed = grads['conv']['kernel'] + 1e-4 * kernel
  np.testing.assert_allclose(lars['kernel'],
                             -0.1 * 0.001 * jnp.linalg.norm(kernel) * decayed
                             / jnp.linalg.norm(decayed), rtol=1e-4)
  np.testing.assert_allclose(lars['bias'], -0.1 * bias, rtol=1e-6)
  # LAMB: the step of every array is lr times that array's norm (Adam's direction).
  lamb = first_update('lamb')
  for name, param in params['conv'].items():
    assert float(jnp.linalg.norm(lamb[name])) == pytest.approx(
        0.1 * float(jnp.linalg.norm(param)), rel=1e-4), name


def test_gradient_clipping_bounds_the_global_norm():
  params = {'w': jnp.zeros(4), 'b': jnp.zeros(3)}
  grads = {'w': jnp.full(4, 3.0), 'b': jnp.full(3, 4.0)}  # Global norm sqrt(36 + 48) = 9.17.
  for clip, expected_norm in ((1.0, 1.0), (100.0, float(np.sqrt(84.0)))):
    config = tiny_config(optimizer='sgd', learning_rate=1.0, lr_schedule='constant',
                         grad_clip_norm=clip)
    tx = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(np.sqrt(sum(float(jnp.sum(u ** 2)) for u in jax.tree.leaves(updates))))
    assert norm == pytest.approx(expected_norm, rel=1e-5)
    # Clipping scales the gradient; it does not turn it.
    np.testing.assert_allclose(updates['w'] / updates['w'][0], np.ones(4), rtol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars'])
def test_frozen_parameters_never_move_and_the_others_train_as_without_them(name):
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.ones(4)},
            'head': {'kernel': jnp.ones((4, 10)), 'bias': jnp.ones(10)}}
  grads = {'conv': {'kernel': jnp.full((3, 3, 1, 4), 5.0), 'bias': jnp.full(4, 5.0)},
           'head': {'kernel': jnp.full((4, 10), 0.5), 'bias': jnp.full(10, 0.5)}}
  settings = dict(optimizer=name, learning_rate=0.1, lr_schedule='constant', weight_decay=0.01,
                  grad_clip_norm=1.0)
  tx = optim.make_optimizer(tiny_config(frozen=r'^conv\.', **settings), 10, 10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  # Neither the gradient nor the weight decay moves them.
  for array in updates['conv'].values():
    assert float(jnp.abs(array).max()) == 0
  # The head trains as it would alone: the clipping norm is its gradient's, not the conv's too.
  alone = optim.make_optimizer(tiny_config(**settings), 10, 10)
  head_updates, _ = alone.update(grads['head'], alone.init(params['head']), params['head'])
  for key in ('kernel', 'bias'):
    np.testing.assert_allclose(updates['head'][key], head_updates[key], rtol=1e-6)
  # Frozen parameters keep no optimizer state (moments, momentum).
  state_sizes = sum(leaf.size for leaf in jax.tree.leaves(state))
  assert state_sizes == sum(leaf.size for leaf in jax.tree.leaves(alone.init(params['head'])))
  assert optim.frozen_parameters(params, r'^conv\.') == ['conv.bias', 'conv.kernel']


def test_settings_the_optimizer_or_schedule_never_reads_are_named_when_changed():
  defaults = config_lib.default_config()
  config = config_lib.default_config()
  config.optimizer, config.lr_schedule = 'adamw', 'cosine'
  assert optim.unread_settings(config, defaults) == []  # Defaults are not the user's doing.
  config.momentum, config.lr_decay_epochs = 0.95, [30, 60]  # As config.json gives tuples back.
  assert optim.unread_settings(config, defaults) == [
      "momentum=0.95 has no effect with optimizer 'adamw': it is read only with optimizer "
      "'lars' or 'momentum' or 'nesterov'",
      "lr_decay_epochs=30,60 has no effect with lr_schedule 'cosine': it is read only with "
      "lr_schedule 'step'"]
  config.optimizer, config.lr_schedule = 'nesterov', 'step'
  assert optim.unread_settings(config, defaults) == []
  config.optimizer = 'lars'  # SGD with momentum, layer by layer.
  assert optim.unread_settings(config, defaults) == []
  config.beta2, config.optimizer = 0.99, 'lamb'  # Adam, layer by layer.
  assert optim.unread_settings(config, defaults) == [
      "momentum=0.95 has no effect with optimizer 'lamb': it is read only with optimizer "
      "'lars' or 'momentum' or 'nesterov'"]
  config.optimizer, config.beta2 = 'nesterov', defaults.beta2
  config.lr_decay_epochs = defaults.lr_decay_epochs
  config.lr_schedule = 'onecycle'
  assert optim.unread_settings(config, defaults) == []
