"""The model zoo: output shapes, parameter counts, and the fast max-pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnn import models
from jaxcnn.errors import ConfigError
from jaxcnn.models import cost, cpu_conv, resnet
from jaxcnn.models.layers import Conv, max_pool, strided_max_pool


# Counts worked out by hand from each architecture (weights + biases, BatchNorm scale + bias).
@pytest.mark.parametrize('name, input_shape, expected', [
    # 6*(25+1) + 16*(150+1) + 120*(400+1) + 84*(120+1) + 10*(84+1)
    ('lenet5', (28, 28, 1), 61_706),
    # 32*(9+1) + 64*(13*13*32+1) + 10*(64+1)
    ('keras_cnn', (28, 28, 1), 347_146),
    # 64*(27+1) + 128*(576+1) + 256*(8*8*128+1) + 10*(256+1)
    ('simple_cnn', (32, 32, 3), 2_175_626),
    # 16*9 + 2*16 + 32*144 + 2*32 + 64*288 + 2*64 + 128*(3*3*64+1) + 10*(128+1)
    ('bn_cnn', (28, 28, 1), 98_554),
])
def test_parameter_counts(name, input_shape, expected):
  model = models.create_model(name, num_classes=10, input_shape=input_shape)
  assert models.count_params(model) == expected


# The MNIST family runs for real here; test_zoo.py checks the larger models' shapes abstractly.
@pytest.mark.parametrize('name', ['bn_cnn', 'keras_cnn', 'lenet5', 'simple_cnn'])
@pytest.mark.parametrize('input_shape, num_classes', [((28, 28, 1), 10), ((32, 32, 3), 100)])
def test_output_shapes_on_any_image_dataset(name, input_shape, num_classes):
  model = models.create_model(name, num_classes=num_classes, input_shape=input_shape)
  model.eval()
  logits = model(jnp.ones((3, *input_shape)))
  assert logits.shape == (3, num_classes)
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  model = models.create_model('bn_cnn', num_classes=10, input_shape=(28, 28, 1),
                              dtype='bfloat16')
  model.eval()
  assert model(jnp.ones((2, 28, 28, 1), jnp.bfloat16)).dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}


def test_same_seed_same_parameters_other_seed_others():
  def params(seed):
    model = models.create_model('lenet5', num_classes=10, input_shape=(28, 28, 1), seed=seed)
    return jax.tree.leaves(nnx.state(model, nnx.Param))
  for a, b in zip(params(3), params(3)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(params(3), params(4)))


def test_unknown_model_names_the_choices():
  with pytest.raises(ConfigError, match=r"unknown model 'resnet9000'; choose one of: airbench, "
                                        r"bn_cnn, .*lenet5"):
    models.create_model('resnet9000', num_classes=10, input_shape=(28, 28, 1))


@pytest.mark.parametrize('name, input_shape', [('bn_cnn', (3, 3, 1)), ('lenet5', (8, 8, 1))])
def test_images_too_small_for_a_model_are_a_config_error(name, input_shape):
  with pytest.raises(ConfigError, match=rf"model '{name}' cannot be built for "
                                        rf"{input_shape[0]}x{input_shape[1]}x1 images .* larger"):
    models.create_model(name, num_classes=10, input_shape=input_shape)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 1)])
def test_max_pool_matches_flax_values_and_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  reference = lambda x: nnx.max_pool(x, (2, 2), (2, 2), padding='VALID')
  np.testing.assert_array_equal(max_pool(x), reference(x))
  grad = jax.grad(lambda x: jnp.sum(max_pool(x) ** 2))(x)
  reference_grad = jax.grad(lambda x: jnp.sum(reference(x) ** 2))(x)
  np.testing.assert_allclose(grad, reference_grad)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_shares_the_gradient_among_tied_maxima_as_jnp_max_does(dtype):
  # Values on a coarse grid, and a window of zeros (as after a ReLU): many ties.
  x = (jnp.round(jax.random.normal(jax.random.key(0), (2, 9, 8, 3)) * 2) / 2).astype(dtype)
  x = x.at[0, :2, :2, 0].set(0)
  weights = jax.random.normal(jax.random.key(1), (2, 4, 4, 3)).astype(dtype)
  loss = lambda pool: lambda x: jnp.sum(pool(x) * weights)
  windows = lambda x: x[:, :8, :8, :].reshape(2, 4, 2, 4, 2, 3)
  grad = jax.grad(loss(max_pool))(x)
  expected = jax.grad(loss(lambda x: jnp.max(windows(x), axis=(2, 4))))(x)
  assert grad.dtype == dtype
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(expected, np.float32))
  assert float(grad[0, 0, 0, 0]) == float(weights[0, 0, 0, 0]) / 4  # Four tied zeros.


@pytest.mark.parametrize('shape', [(2, 12, 12, 3), (3, 7, 9, 2), (1, 2, 2, 1)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_strided_max_pool_matches_flax_values_and_gives_the_gradient_to_the_first_maximum(shape,
                                                                                         dtype):
  # Values on a coarse grid (many ties within a window), as after a ReLU.
  x = jnp.maximum(jnp.round(jax.random.normal(jax.random.key(0), shape) * 2), 0).astype(dtype)
  reference = lambda x: nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(strided_max_pool(x), reference(x))
  # Positive weights: each window's gradient lands on exactly the element that XLA's
  # select-and-scatter chooses (the first maximum), summed over the windows that share it.
  weights = jax.random.uniform(jax.random.key(1), reference(x).shape, minval=1, maxval=2)
  loss = lambda pool: lambda x: jnp.sum(pool(x).astype(jnp.float32) * weights)
  grad, expected = jax.grad(loss(strided_max_pool))(x), jax.grad(loss(reference))(x)
  assert grad.dtype == dtype
  np.testing.assert_array_equal(grad != 0, expected != 0)
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                             rtol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_imagenet_resnets_train_without_select_and_scatter(name):
  """XLA:GPU has no deterministic select-and-scatter: under --xla_gpu_deterministic_ops (the
  README's way to resume bitwise on a GPU) a model whose gradient holds one does not compile."""
  # Shapes are all that lowering needs: initialising ResNet-50 for real costs 20 s on a CI core.
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10,
                                                      input_shape=(32, 32, 3)))
  model.eval()  # BatchNorm's statistics need not be updated to show where gradients flow.
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, images):
    return jnp.mean(nnx.merge(graph, params, rest)(images))

  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  hlo = jax.jit(jax.grad(loss)).lower(params, rest, images).as_text()
  assert 'select_and_scatter' not in hlo and 'reduce_window' in hlo  # Only the forward pool.


def test_batchnorm_models_take_the_mapped_axis_name():
  model = models.create_model('bn_cnn', num_classes=10, input_shape=(28, 28, 1), axis_name='data')
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert len(norms) == 3 and all(norm.axis_name == 'data' for norm in norms)
  # Models without BatchNorm accept the same call.
  models.create_model('lenet5', num_classes=10, input_shape=(28, 28, 1), axis_name='data')


@pytest.mark.parametrize('in_features, padding, kernel, kernel_size', [
    (1, 'SAME', cpu_conv.shift_and_add_conv, (5, 5)),
    (3, 'VALID', cpu_conv.shift_and_add_conv, (5, 5)),
    (2, ((1, 2), (0, 1)), cpu_conv.shift_and_add_conv, (5, 5)),
    (4, 'VALID', cpu_conv.col2im_gradient_conv, (5, 5)),
    (6, ((2, 1), (1, 0)), cpu_conv.col2im_gradient_conv, (5, 5)),
    (9, 'SAME', None, (3, 3)),
    # Even kernels: 'SAME' puts the odd row or column of padding after, as XLA does.
    (1, 'SAME', cpu_conv.shift_and_add_conv, (4, 2)),
    (3, 'SAME', cpu_conv.shift_and_add_conv, (2, 3))])
def test_conv_matches_flax_values_and_gradients(in_features, padding, kernel, kernel_size):
  """layers.Conv (a CPU kernel for few input channels) is nnx.Conv, numerically."""
  reference = nnx.Conv(in_features, 6, kernel_size, padding=padding, rngs=nnx.Rngs(0))
  conv = Conv(in_features, 6, kernel_size, padding=padding, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, in_features))
  assert conv._cpu_kernel(x) is kernel
  np.testing.assert_allclose(conv(x), reference(x), atol=1e-5)
  loss = lambda module, x: jnp.sum(module(x) ** 2)
  # Compiled whole: compiling each operation of the gradient eagerly costs twice the CPU time.
  gradients = jax.jit(jax.grad(loss, argnums=(0, 1)))
  (grad_module, grad_x) = gradients(conv, x)
  (ref_module, ref_x) = gradients(reference, x)
  np.testing.assert_allclose(grad_x, ref_x, atol=1e-4)
  np.testing.assert_allclose(grad_module.kernel[...], ref_module.kernel[...], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(grad_module.bias[...], ref_module.bias[...], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('in_features, padding, kernel', [
    (1, 'SAME', cpu_conv.shift_and_add_conv),
    (3, 'VALID', cpu_conv.shift_and_add_conv),
    (6, ((2, 1), (1, 0)), cpu_conv.col2im_gradient_conv)])
def test_cpu_kernels_sum_bfloat16_in_float32(in_features, padding, kernel):
  """In bfloat16 the CPU kernels' outputs and input gradients are XLA's, each element within one
  bfloat16 unit in the last place (summed in a different order, two float32 sums may round to
  neighbours; on this machine the outputs were equal to the bit and the gradients within half a
  unit), and the bias gradient is the exact sum to within one unit. Summed in bfloat16, the
  kernels missed XLA's by hundreds of units at the smaller elements, and XLA's own bfloat16 bias
  gradient misses the exact sum by up to hundreds of units too."""
  make = lambda cls: cls(in_features, 6, (5, 5), padding=padding, dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(0))
  conv, reference = make(Conv), make(nnx.Conv)
  x = jax.random.normal(jax.random.key(1), (16, 12, 12, in_features))
  assert conv._cpu_kernel(x) is kernel
  one_unit = 2.0 ** -7  # bfloat16's spacing relative to a value's power of two: 7 bits.
  as_float = lambda a: np.asarray(a, np.float32)
  apply = jax.jit(lambda module, x: module(x))
  outputs = apply(conv, x)
  np.testing.assert_allclose(as_float(outputs), as_float(apply(reference, x)), rtol=one_unit,
                             atol=0)
  loss = lambda module, x: jnp.sum(module(x).astype(jnp.float32) ** 2)
  gradients = jax.jit(jax.grad(loss, argnums=(0, 1)))
  (grad_module, grad_x), (_, ref_x) = gradients(conv, x), gradients(reference, x)
  np.testing.assert_allclose(as_float(grad_x), as_float(ref_x), rtol=one_unit, atol=0)
  # The loss's gradient with respect to each output is twice it, exactly, in bfloat16.
  exact_bias_gradient = np.sum(2 * np.asarray(outputs, np.float64), axis=(0, 1, 2))
  np.testing.assert_allclose(as_float(grad_module.bias[...]), exact_bias_gradient,
                             rtol=one_unit, atol=0)


def test_computed_once_is_the_identity_and_passes_the_gradient_through():
  y = jax.random.normal(jax.random.key(0), (2, 3, 3, 5))
  value, vjp = jax.vjp(jax.jit(cpu_conv.computed_once), y)
  np.testing.assert_array_equal(value, y)
  np.testing.assert_array_equal(vjp(2 * y)[0], 2 * y)
  hlo = jax.jit(jax.grad(lambda y: jnp.sum(cpu_conv.computed_once(y) ** 2))).lower(y).as_text()
  assert gathers(hlo) == 1 and 'scatter' not in hlo  # The forward gather only.


def gathers(hlo: str) -> int:
  """The gather operations in a lowered program's text."""
  return hlo.count('"stablehlo.gather"(')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_resnet_block_outputs_are_computed_once_on_the_cpu_in_float32_only(dtype, monkeypatch):
  """One gather per residual block in float32 (nine in ResNet-20), none in bfloat16, and the
  same values and gradients as without."""
  model = models.create_model('cifar_resnet20', num_classes=10, input_shape=(8, 8, 3),
                              dtype=dtype)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  loss = lambda model, images: jnp.sum(model(images).astype(jnp.float32) ** 2)
  # A fresh function each time: jit would otherwise reuse the first trace.
  gradients = lambda: jax.jit(jax.value_and_grad(lambda m, x: loss(m, x)))
  hlo = gradients().lower(model, images).as_text()
  assert gathers(hlo) == (9 if dtype == 'float32' else 0)
  value, grads = gradients()(model, images)
  monkeypatch.setattr(resnet, 'residual_output', lambda y: y)
  plain_value, plain_grads = gradients()(model, images)
  assert gathers(gradients().lower(model, images).as_text()) == 0
  tolerance = 1e-5 if dtype == 'float32' else 1e-2
  np.testing.assert_allclose(value, plain_value, rtol=tolerance)
  grads, plain_grads = jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(plain_grads))
  assert len(grads) == len(plain_grads) > 60  # Every convolution's, BatchNorm's and the head's.
  for grad, plain in zip(grads, plain_grads):
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(plain, np.float32),
                               rtol=tolerance, atol=tolerance)


# Worked out by hand, as the parameter counts above: each layer's output elements times the
# products summed into each.
@pytest.mark.parametrize('name, input_shape, expected', [
    # 28*28*6 * 5*5*1 + 10*10*16 * 5*5*6 + 400*120 + 120*84 + 84*10; on the CPU the first layer
    # runs as shift-and-add, which must not hide its products.
    ('lenet5', (28, 28, 1), 416_520),
    # 26*26*32 * 3*3*1 + 13*13*32*64 + 64*10
    ('keras_cnn', (28, 28, 1), 541_440),
])
def test_multiply_adds_per_image(name, input_shape, expected):
  model = models.create_model(name, num_classes=10, input_shape=input_shape)
  assert cost.multiply_adds(model, input_shape) == expected


def test_multiply_adds_of_the_imagenet_networks_are_torchvisions_published_figures():
  """torchvision's model table gives their 'GFLOPS' (multiply-adds) at 224x224 to 2 decimals
  (ConvNeXt's to 3; EfficientNet's at each variant's own size, B0's 224x224)."""
  # The other variants match too (their modules' docstrings); building each here, even
  # abstractly, takes seconds: 80 s for all of them.
  for name, published in (('resnet18', 1.81e9), ('resnet50', 4.09e9),
                          ('resnext50_32x4d', 4.23e9), ('convnext_tiny', 4.456e9),
                          ('efficientnet_b0', 0.39e9), ('mobilenet_v2', 0.30e9)):
    model = nnx.eval_shape(lambda name=name: models.create_model(
        name, num_classes=1000, input_shape=(224, 224, 3)))
    model.train()
    decimals = 3 if name.startswith('convnext') else 2
    assert cost.multiply_adds(model, (224, 224, 3)) == pytest.approx(
        published, abs=0.5 * 10 ** -decimals * 1e9), name
    # Counted in evaluation mode on a copy: the model itself is left training.
    assert all(not m.use_running_average for _, m in nnx.iter_graph(model)
               if isinstance(m, nnx.BatchNorm))


@pytest.mark.parametrize('count, shown', [(512, '512'), (1_200, '1.2K'), (40_812_544, '40.8M'),
                                          (4_111_514_624, '4.11G'), (999_700, '1M'),
                                          (999_400, '999K')])
def test_counts_are_shown_to_three_digits_with_a_prefix(count, shown):
  assert cost.format_count(count) == shown


def test_stochastic_depth_drops_whole_residual_branches_in_training_only():
  from jaxcnn.models import resnet  # pylint: disable=g-import-not-at-top

  def block(rate):  # The same parameters: the drop-path layer draws none.
    return resnet.BasicBlock(8, 8, dtype=jnp.float32, zero_init_residual=False,
                             drop_path_rate=rate, rngs=nnx.Rngs(0))

  plain, dropping = block(0.0), block(0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 6, 6, 8)), jnp.float32)
  branch = plain.bn2(plain.conv2(nnx.relu(plain.bn1(plain.conv1(x)))))
  out = np.asarray(dropping(x))
  # Each example skips the branch (half of them), or keeps it scaled by 1 / (1 - 0.5).
  skipped = [np.allclose(o, nnx.relu(xi), atol=1e-5) for o, xi in zip(out, x)]
  kept = [np.allclose(o, nnx.relu(2 * b + xi), atol=1e-4) for o, b, xi in zip(out, branch, x)]
  assert all(s != k for s, k in zip(skipped, kept)) and 16 < sum(skipped) < 48
  assert not np.allclose(dropping(x), out)  # Another draw at the next call.
  plain, dropping = block(0.0), block(0.5)  # Untouched BatchNorm statistics, the same in both.
  plain.eval()
  dropping.eval()
  np.testing.assert_allclose(dropping(x), plain(x), atol=1e-6)  # Every block, unscaled.


def test_stochastic_depth_rises_linearly_over_the_blocks_and_adds_no_arrays():
  plain = models.create_model('cifar_resnet20', num_classes=10, input_shape=(32, 32, 3))
  dropping = models.create_model('cifar_resnet20', num_classes=10, input_shape=(32, 32, 3),
                                 model_kwargs={'drop_path_rate': 0.2})
  rates = [0.0 if b.drop_path is None else b.drop_path.rate
           for stage in dropping.stages for b in stage.layers]
  np.testing.assert_allclose(rates, np.linspace(0, 0.2, 9))
  # Checkpoints of either load into the other: the same parameters and statistics.
  for kind in (nnx.Param, nnx.BatchStat):
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                     nnx.state(plain, kind), nnx.state(dropping, kind)))
  wide = nnx.eval_shape(lambda: models.create_model(
      'wrn16_8', num_classes=10, input_shape=(32, 32, 3), model_kwargs={'drop_path_rate': 0.3}))
  wide_rates = [0.0 if b.drop_path is None else b.drop_path.rate
                for group in wide.groups for b in group.layers]
  assert wide_rates == pytest.approx([0, .06, .12, .18, .24, .3])
  for bad in (1.0, -0.1, '0.1'):
    with pytest.raises(ConfigError) as error:
      models.create_model('resnet18', num_classes=10, input_shape=(32, 32, 3),
                          model_kwargs={'drop_path_rate': bad})
    assert str(error.value) == (f"config key 'model_kwargs' sets drop_path_rate={bad!r}; it must "
                                'be a probability at least 0 and below 1, such as 0.1')
