"""The big model zoo: published parameter counts, forward passes, initialisation, user models."""

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcnn import models, trainer
from jaxcnn.errors import ConfigError
from jaxcnn.models import airbench, resnet, vgg, wide_resnet

from conftest import tiny_config

ZOO = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
       'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2',
       'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet56', 'wrn16_8', 'wrn28_10', 'vgg11_bn', 'vgg16_bn',
       'convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large', 'efficientnet_b0',
       'efficientnet_b1', 'efficientnet_b2', 'efficientnet_b3', 'efficientnet_b4',
       'efficientnet_b5', 'efficientnet_b6', 'efficientnet_b7', 'mobilenet_v2', 'airbench')
IMAGENET = ((224, 224, 3), 1000)
CIFAR = ((32, 32, 3), 10)


@functools.lru_cache(maxsize=None)
def abstract_model(name, input_shape, num_classes, dtype='float32', axis_name='data'):
  """The model with shapes only: counting ResNet-152's parameters costs no memory or time.

  Built with an axis name (it changes no parameter) and cached, so that the tests share one build.
  """
  return nnx.eval_shape(lambda: models.create_model(
      name, num_classes=num_classes, input_shape=input_shape, dtype=dtype, axis_name=axis_name))


PUBLISHED_COUNTS = [
    # torchvision's published counts.
    ('resnet18', IMAGENET, 11_689_512),
    ('resnet34', IMAGENET, 21_797_672),
    ('resnet50', IMAGENET, 25_557_032),
    ('resnet101', IMAGENET, 44_549_160),
    ('resnet152', IMAGENET, 60_192_808),
    ('resnext50_32x4d', IMAGENET, 25_028_904),
    ('resnext101_32x8d', IMAGENET, 88_791_336),
    ('resnext101_64x4d', IMAGENET, 83_455_272),
    ('wide_resnet50_2', IMAGENET, 68_883_240),
    ('wide_resnet101_2', IMAGENET, 126_886_696),
    # He et al. 2016, table 6, with option A shortcuts: 0.27M, 0.46M, 0.85M.
    ('cifar_resnet20', CIFAR, 269_722),
    ('cifar_resnet32', CIFAR, 464_154),
    ('cifar_resnet56', CIFAR, 853_018),
    # Zagoruyko & Komodakis: WRN-28-10 has 36.5M.
    ('wrn16_8', CIFAR, 10_961_370),
    ('wrn28_10', CIFAR, 36_479_194),
    # Bias-free convolutions, BatchNorm scale and bias, Linear(512, 10).
    ('vgg11_bn', CIFAR, 9_228_362),
    ('vgg16_bn', CIFAR, 14_724_042),
    # torchvision's published counts.
    ('convnext_tiny', IMAGENET, 28_589_128),
    ('convnext_small', IMAGENET, 50_223_688),
    ('convnext_base', IMAGENET, 88_591_464),
    ('convnext_large', IMAGENET, 197_767_336),
    # torchvision's published counts; B2 to B7 match too (efficientnet.py's docstring), but
    # their many small layers take 7 to 45 s each to build here, even abstractly.
    ('efficientnet_b0', IMAGENET, 5_288_548),
    ('efficientnet_b1', IMAGENET, 7_794_184),
    ('mobilenet_v2', IMAGENET, 3_504_872),
    # Jordan 2024: 1.97M.
    ('airbench', CIFAR, 1_971_640),
]


@pytest.mark.parametrize('name, data, expected', PUBLISHED_COUNTS)
def test_parameter_counts(name, data, expected):
  assert models.count_params(abstract_model(name, *data)) == expected


def test_every_zoo_model_is_registered():
  assert set(ZOO) <= set(models.model_names())


def test_projection_shortcuts_add_two_projections():
  model = nnx.eval_shape(lambda: resnet.cifar_resnet20(
      num_classes=10, input_shape=(32, 32, 3), shortcut='B', rngs=nnx.Rngs(0)))
  # 1x1 convolutions 16->32 and 32->64, each with a BatchNorm.
  assert models.count_params(model) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize('name, input_shape', [
    ('resnet18', (64, 64, 3)), ('resnet50', (64, 64, 3)), ('resnext50_32x4d', (64, 64, 3)),
    ('wide_resnet50_2', (48, 40, 3)), ('convnext_tiny', (32, 40, 3)),
    ('mobilenet_v2', (28, 28, 1)), ('efficientnet_b0', (28, 28, 1)),
    ('cifar_resnet20', (32, 32, 3)),
    ('cifar_resnet32', (32, 32, 3)), ('cifar_resnet56', (20, 20, 3)), ('wrn16_8', (16, 16, 3)),
    ('wrn28_10', (32, 32, 3)), ('vgg11_bn', (32, 32, 3)), ('vgg16_bn', (27, 27, 3)),
    ('airbench', (28, 28, 1)),
])
def test_output_shapes(name, input_shape):
  # Shapes only; test_models.py and the test below run the networks on real numbers.
  model = abstract_model(name, input_shape, 7, axis_name=None)
  images = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  logits = nnx.eval_shape(lambda model, x: model(x), model, images)
  assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)


# Real forward passes, in training and evaluation mode, on the presets' classes. XLA compiles a
# random initialiser for every new parameter shape (up to a second each on a CI core), so the
# networks are shrunk to share the CIFAR ResNet's shapes; the presets' full sizes are checked above
# without materialising them. VGG's layers are bn_cnn's, tested there.
SMALL_NETWORKS = {
    'cifar_resnet20': functools.partial(models.MODELS['cifar_resnet20'], input_shape=(32, 32, 3)),
    'wide_resnet': functools.partial(wide_resnet.WideResNet, depth=10, widen_factor=1,
                                     input_shape=(16, 16, 3)),
    'airbench': functools.partial(airbench.AirBench, widths=(16, 32, 64), input_shape=(32, 32, 3)),
}


def small_airbench(input_shape=(32, 32, 3), num_classes=10):
  return airbench.AirBench(num_classes=num_classes, input_shape=input_shape, widths=(16, 32, 64),
                           rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', SMALL_NETWORKS)
def test_training_forward_pass_updates_batch_statistics(name):
  model = SMALL_NETWORKS[name](num_classes=10, rngs=nnx.Rngs(0))
  input_shape = SMALL_NETWORKS[name].keywords['input_shape']
  before = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  # One compiled call costs less CPU time than compiling every operation eagerly.
  logits = nnx.jit(lambda model, x: model(x))(
      model, jax.random.normal(jax.random.key(0), (2, *input_shape)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  after = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert before and all(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize('name', SMALL_NETWORKS)
def test_evaluation_uses_the_running_statistics_and_changes_none(name):
  """In evaluation mode an image's logits do not depend on the rest of its batch, and BatchNorm's
  statistics stay as they are."""
  model = SMALL_NETWORKS[name](num_classes=10, rngs=nnx.Rngs(0))
  input_shape = SMALL_NETWORKS[name].keywords['input_shape']
  images = jax.random.normal(jax.random.key(0), (4, *input_shape))
  train_forward = nnx.jit(lambda model, x: model(x))
  train_forward(model, images)  # Running statistics that are not the initial zeros and ones.
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
  model.eval()
  forward = nnx.jit(lambda model, x: model(x))
  batch_logits, alone = forward(model, images), forward(model, images[:1])
  assert np.isfinite(np.asarray(batch_logits)).all()
  np.testing.assert_allclose(alone[0], batch_logits[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(forward(model, images), batch_logits)  # Deterministic.
  for old, new in zip(before, jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'wrn16_8', 'vgg11_bn', 'airbench'])
def test_bfloat16_logits_with_float32_parameters_and_statistics(name):
  model = abstract_model(name, *CIFAR, dtype='bfloat16', axis_name=None)
  images = jax.ShapeDtypeStruct((2, *CIFAR[0]), jnp.bfloat16)
  assert nnx.eval_shape(lambda model, x: model(x), model, images).dtype == jnp.bfloat16
  variables = jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  assert {v.dtype for v in variables} == {jnp.dtype('float32')}


@pytest.mark.parametrize('name, data', [(name, data) for name, data, _ in PUBLISHED_COUNTS
                                         if not name.startswith('convnext')])  # LayerNorm.
def test_every_batchnorm_gets_the_axis_name(name, data):
  model = abstract_model(name, *data)
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert norms and {norm.axis_name for norm in norms} == {'data'}


def test_axis_name_makes_per_device_statistics_global():
  # Two "devices" with two images each, their BatchNorm statistics averaged over the mapped axis,
  # compute what one device computes on all four images.
  def split(axis_name):
    return nnx.split(models.create_model('cifar_resnet20', num_classes=10, input_shape=(8, 8, 3),
                                         axis_name=axis_name))
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  graphdef, state = split('data')
  per_device = jax.vmap(lambda state, x: nnx.merge(graphdef, state, copy=True)(x),
                        in_axes=(None, 0), axis_name='data')
  mapped = jax.jit(per_device)(state, images.reshape(2, 2, 8, 8, 3)).reshape(4, 10)
  graphdef, state = split(None)
  whole = jax.jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x))(state, images)
  np.testing.assert_allclose(mapped, whole, rtol=1e-4, atol=1e-5)


def test_resnet_initialisation_follows_torchvision():
  # He normal, fan_out: std sqrt(2 / (3 * 3 * 64)).
  kernel = resnet.conv(64, 64, 3, dtype=jnp.float32, rngs=nnx.Rngs(0)).kernel[...]
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 64)), rtol=0.02)
  # zero_init_residual: the last BatchNorm of a residual branch starts at zero, the others at one.
  block = resnet.Bottleneck(64, 16, stride=2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert not np.any(block.bn3.scale[...])
  assert np.all(block.bn1.scale[...] == 1) and np.all(block.bn2.scale[...] == 1)
  # v1.5: the stride sits in the 3x3 convolution; the projection shortcut matches it.
  assert block.conv1.strides == (1, 1) and block.conv2.strides == (2, 2)
  assert block.shortcut.layers[0].strides == (2, 2)
  assert block(jnp.ones((1, 8, 8, 64))).shape == (1, 4, 4, 64)


def test_resnext_groups_and_wide_resnets_widen_the_bottlenecks_as_torchvision_does():
  first, last = {}, {}
  for name in ('resnet50', 'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2'):
    model = abstract_model(name, *IMAGENET)
    first[name] = model.stages[0].layers[0].conv2.kernel.shape
    last[name] = [layer.kernel.shape for layer in (model.stages[3].layers[-1].conv1,
                                                    model.stages[3].layers[-1].conv3)]
  # The 3x3 kernels (H, W, input channels per group, output channels) of the first block.
  assert first == {'resnet50': (3, 3, 64, 64), 'resnext50_32x4d': (3, 3, 4, 128),
                   'resnext101_32x8d': (3, 3, 8, 256), 'wide_resnet50_2': (3, 3, 128, 128)}
  # The last block: 2048-512-2048 in ResNet-50, 2048-1024-2048 in Wide ResNet-50-2.
  assert last['resnet50'] == [(1, 1, 2048, 512), (1, 1, 512, 2048)]
  assert last['wide_resnet50_2'] == [(1, 1, 2048, 1024), (1, 1, 1024, 2048)]


def test_a_grouped_convolution_keeps_each_group_to_its_own_channels():
  grouped = resnet.conv(8, 12, 3, groups=4, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 5, 5, 8))
  changed_input = x.at[..., 2:4].add(1.0)  # The second group's two input channels.
  outputs = jax.jit(lambda x: grouped(x))
  changed = np.abs(np.asarray(outputs(changed_input) - outputs(x))).max(axis=(0, 1, 2)) > 0
  np.testing.assert_array_equal(changed, np.arange(12) // 3 == 1)  # Its three outputs alone.


def test_basic_blocks_and_bad_groups_are_one_line_errors():
  with pytest.raises(ConfigError, match="sets groups=32 and width_per_group=4; networks of basic "
                                        r'blocks \(resnet18, resnet34\) take only groups=1'):
    models.create_model('resnet18', num_classes=10, input_shape=(32, 32, 3),
                        model_kwargs={'groups': 32, 'width_per_group': 4})
  with pytest.raises(ConfigError, match='sets width_per_group=0; it must be a positive integer'):
    models.create_model('resnet50', num_classes=10, input_shape=(32, 32, 3),
                        model_kwargs={'width_per_group': 0})


def test_zero_initialised_residual_block_starts_as_identity():
  block = resnet.BasicBlock(16, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.eval()
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
  np.testing.assert_array_equal(block(x), x)
  block = resnet.BasicBlock(16, 16, dtype=jnp.float32, zero_init_residual=False, rngs=nnx.Rngs(0))
  block.eval()
  assert not np.allclose(block(x), x)


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 16))
  y = resnet.PaddingShortcut(16, 32, stride=2)(x)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
  assert not np.any(y[..., 16:])


@pytest.mark.parametrize('shape', [(1, 5, 7, 2), (1, 6, 6, 2), (1, 1, 1, 2)])
def test_vgg_pool_keeps_odd_rows_like_ceil_mode(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  pad = ((0, shape[1] % 2), (0, shape[2] % 2))
  np.testing.assert_array_equal(vgg.ceil_max_pool(x), nnx.max_pool(x, (2, 2), (2, 2), pad))


# User models: `package.module:ClassName`.

USER_MODULE = '''
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
  """Takes only some of the keywords create_model passes."""

  def __init__(self, *, num_classes, rngs):
    self.fc = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.fc(x.reshape(x.shape[0], -1)[:, :4])


def build(**kwargs):
  """A function that builds a model, taking every keyword."""
  build.kwargs = kwargs
  return Net(num_classes=kwargs['num_classes'], rngs=kwargs['rngs'])


class WrongOutput(Net):
  """Returns one output too many."""

  def __init__(self, *, num_classes, rngs):
    super().__init__(num_classes=num_classes + 1, rngs=rngs)


class IntegerOutput(Net):
  """Returns integer logits, which have no gradient."""

  def __call__(self, x):
    return super().__call__(x).astype(jnp.int32)


class TwoOutputs(Net):
  """Returns logits and features."""

  def __call__(self, x):
    return super().__call__(x), x


class NotAModule:
  pass


def build_a_dict(num_classes):
  return {'classes': num_classes}


WIDTH = 3


class Wide(Net):
  """Requires an argument jaxcnn cannot know."""

  def __init__(self, width, *, num_classes, rngs):
    super().__init__(num_classes=num_classes, rngs=rngs)
    self.width = width


WIDE_BUILT = Net(num_classes=5, rngs=nnx.Rngs(0))


class TrainFlag(Net):
  """A linen habit: a train flag that jaxcnn never passes."""

  def __call__(self, x, train=False):
    return super().__call__(x)


class Unseeded(nnx.Module):
  """Initialised without rngs: the same weights whatever the seed."""

  def __init__(self, *, num_classes):
    self.w = nnx.Param(jnp.ones((4, num_classes)))

  def __call__(self, x):
    return x.reshape(x.shape[0], -1)[:, :4] @ self.w


class NnxFlags(Net):
  """NNX's own optional arguments: None follows model.train() and model.eval()."""

  def __call__(self, x, *, rngs=None, deterministic=None):
    return super().__call__(x)


class KeywordImages(Net):
  def __call__(self, *, x):
    return super().__call__(x)


class NoCall(nnx.Module):
  def __init__(self, *, num_classes, rngs):
    self.fc = nnx.Linear(4, num_classes, rngs=rngs)


class Positional(Net):
  """Takes the class count by position, which a partial may bind."""

  def __init__(self, num_classes, *, rngs):
    super().__init__(num_classes=num_classes, rngs=rngs)


BOUND_BY_POSITION = functools.partial(Positional, 5)
WIDE_3 = functools.partial(Wide, 3)


class TrainRequired(Net):
  def __call__(self, x, train):
    return super().__call__(x)


class DropoutWithoutRngs(Net):
  """Dropout built without rngs fails in training mode only."""

  def __init__(self, *, num_classes, rngs):
    super().__init__(num_classes=num_classes, rngs=rngs)
    self.drop = nnx.Dropout(0.5)

  def __call__(self, x):
    return self.drop(super().__call__(x))


class OwnStreams(Net):
  """Draws from streams other than params and dropout."""

  def __init__(self, *, num_classes, rngs):
    super().__init__(num_classes=num_classes, rngs=rngs)
    self.offset = nnx.Param(jax.random.normal(rngs(), (num_classes,)))
    self.noise = nnx.Param(jax.random.normal(rngs.noise(), (num_classes,)))

  def __call__(self, x):
    return super().__call__(x) + self.offset + self.noise


class Bfloat16WithCounter(nnx.Module):
  """Parameters in bfloat16 and an integer count of calls: neither is float32."""

  def __init__(self, *, num_classes, input_shape, rngs):
    height, width, channels = input_shape
    self.fc = nnx.Linear(height * width * channels, num_classes, param_dtype=jnp.bfloat16,
                         rngs=rngs)
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] = self.calls[...] + 1
    return self.fc(x.reshape(x.shape[0], -1)).astype(jnp.float32)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / 'mymod.py').write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, 'mymod', raising=False)
  yield
  sys.modules.pop('mymod', None)  # The next test's tmp_path holds another copy.


def test_user_module_gets_only_the_keywords_it_takes(user_module):
  model = models.create_model('mymod:Net', num_classes=5, input_shape=(2, 2, 1),
                              axis_name='data')
  assert model(jnp.ones((3, 2, 2, 1))).shape == (3, 5)


def test_user_function_with_var_keywords_gets_every_keyword(user_module):
  models.create_model('mymod:build', num_classes=5, input_shape=(2, 2, 1), axis_name='data')
  import mymod  # pylint: disable=g-import-not-at-top
  assert sorted(mymod.build.kwargs) == ['axis_name', 'dtype', 'input_shape', 'num_classes', 'rngs']


@pytest.mark.parametrize('name, message', [
    ('no_such_module:Net', r"model 'no_such_module:Net': cannot import module 'no_such_module'"),
    ('mymod:Nett', r"model 'mymod:Nett': module 'mymod' has no attribute 'Nett'"),
    ('mymod:NotAModule', r"model 'mymod:NotAModule': class 'NotAModule' is not an nnx.Module "
                         r"subclass"),
    ('mymod:WIDTH', r"model 'mymod:WIDTH': 'WIDTH' \(a int\) is neither an nnx.Module subclass "
                    r"nor a function"),
    ('mymod:', r"invalid model 'mymod:': write your own model as 'package.module:ClassName'"),
])
def test_bad_user_models_are_one_line_config_errors(user_module, name, message):
  with pytest.raises(ConfigError, match=message) as error:
    models.get_model_constructor(name)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('name, message', [
    ('mymod:Wide', r"model 'mymod:Wide' requires 'width', which jaxcnn does not pass: it passes "
                   r'those of num_classes, .* set the others in the config key model_kwargs'),
    ('mymod:WIDE_BUILT', r"model 'mymod:WIDE_BUILT': 'WIDE_BUILT' is a built Net; name its "
                         r'class'),
    ('mymod:TrainRequired', r"model 'mymod:TrainRequired': its __call__ requires 'train'; "
                            r'jaxcnn calls model\(images\) and switches between training and '
                            r'evaluation with model.train\(\) and model.eval\(\)'),
    ('mymod:KeywordImages', r"model 'mymod:KeywordImages': its __call__ takes no images as its "
                            r'first argument; jaxcnn calls model\(images\)'),
    ('mymod:NoCall', r"model 'mymod:NoCall': a NoCall has no __call__; jaxcnn calls "
                     r'model\(images\)'),
])
def test_a_user_model_jaxcnn_cannot_build_or_call_is_a_one_line_error(user_module, name,
                                                                      message):
  with pytest.raises(ConfigError, match=message) as error:
    models.create_model(name, num_classes=5, input_shape=(2, 2, 1))
  assert '\n' not in str(error.value)


def test_model_kwargs_reach_the_constructor_of_zoo_and_user_models(user_module):
  model = nnx.eval_shape(lambda: models.create_model(
      'bn_cnn', num_classes=10, input_shape=(28, 28, 1),
      model_kwargs={'widths': (4, 8), 'hidden': 16}))
  assert [stage.layers[0].kernel.shape for stage in model.stages] == [(3, 3, 1, 4), (3, 3, 4, 8)]
  assert model.fc1.kernel.shape == (7 * 7 * 8, 16)  # Two poolings of 28x28, 8 channels.
  wide = models.create_model('mymod:Wide', num_classes=5, input_shape=(2, 2, 1),
                             model_kwargs={'width': 3})
  assert wide.width == 3


@pytest.mark.parametrize('name, kwargs, message', [
    ('bn_cnn', {'width': 8}, "config key 'model_kwargs' sets 'width', which model 'bn_cnn' does "
                             'not take; it takes: widths (default (16, 32, 64)), hidden (default '
                             '128)'),
    # wrn16_8 is depth 16 by its name.
    ('wrn16_8', {'depth': 28}, "sets 'depth', which model 'wrn16_8' does not take; it takes: "
                               'dropout_rate (default 0.3)'),
    ('lenet5', {'hidden': 3}, "sets 'hidden', which model 'lenet5' does not take; it takes: none"),
    ('mymod:Wide', {'width': 3, 'depth': 2}, "sets 'depth', which model 'mymod:Wide' does not "
                                             'take; it takes: width'),
    ('bn_cnn', {'num_classes': 3}, "config key 'model_kwargs' sets 'num_classes', which jaxcnn "
                                   'passes to every model itself'),
    ('bn_cnn', {'widths': (4,) * 6}, "model 'bn_cnn' with widths=(4, 4, 4, 4, 4, 4) cannot be "
                                     'built for 28x28x1 images'),
])
def test_model_kwargs_a_model_cannot_take_are_one_line_errors(user_module, name, kwargs, message):
  with pytest.raises(ConfigError, match=re.escape(message)) as error:
    models.create_model(name, num_classes=10, input_shape=(28, 28, 1), model_kwargs=kwargs)
  assert '\n' not in str(error.value)


def test_a_model_taking_any_keyword_takes_any_model_kwargs(user_module):
  models.create_model('mymod:build', num_classes=5, input_shape=(2, 2, 1),
                      model_kwargs={'depth': 7})
  import mymod  # pylint: disable=g-import-not-at-top
  assert mymod.build.kwargs['depth'] == 7


def test_what_a_partial_binds_is_not_passed_again(user_module):
  for name in ('mymod:BOUND_BY_POSITION', 'mymod:WIDE_3'):  # Positional, and what jaxcnn lacks.
    model = models.create_model(name, num_classes=5, input_shape=(2, 2, 1))
    assert model(jnp.ones((3, 2, 2, 1))).shape == (3, 5)


def test_what_a_user_model_would_silently_ignore_is_warned_of(user_module, capsys):
  models.create_model('mymod:TrainFlag', num_classes=5, input_shape=(2, 2, 1), dtype='bfloat16')
  assert capsys.readouterr().err.splitlines() == [
      "warning: model 'mymod:TrainFlag' takes no dtype argument, so it computes in its own "
      "dtype, not in the config's bfloat16",
      "warning: model 'mymod:TrainFlag': its __call__ takes 'train', which jaxcnn never passes: "
      'jaxcnn calls model(images) and switches between training and evaluation with '
      'model.train() and model.eval()']
  models.create_model('mymod:NnxFlags', num_classes=5, input_shape=(2, 2, 1))
  assert capsys.readouterr().err == ''  # NNX's own rngs=None and deterministic=None are fine.
  models.create_model('mymod:Unseeded', num_classes=5, input_shape=(2, 2, 1))
  assert capsys.readouterr().err.splitlines() == [
      "warning: model 'mymod:Unseeded' takes no rngs argument, so its initialisation does not "
      "follow the config's seed"]


def test_a_user_models_training_mode_is_checked_before_training(user_module):
  with pytest.raises(ValueError, match='.deterministic. is False, but no .rngs. argument'):
    models.create_model('mymod:DropoutWithoutRngs', num_classes=5, input_shape=(2, 2, 1))


def test_a_user_model_may_draw_from_streams_of_its_own(user_module):
  one = models.create_model('mymod:OwnStreams', num_classes=5, input_shape=(2, 2, 1), seed=1)
  two = models.create_model('mymod:OwnStreams', num_classes=5, input_shape=(2, 2, 1), seed=2)
  assert not np.array_equal(one.noise[...], two.noise[...])  # Seeded from the run's seed.


def test_a_moving_average_keeps_each_leafs_dtype(user_module, fake_tfds, tmp_path):
  """The compiled step takes its state back: an average promoted to float32 was refused."""
  result = trainer.train_and_evaluate(
      tiny_config(model='mymod:Bfloat16WithCounter', ema_decay=0.9, num_train_steps=4,
                  eval_every_steps=2), str(tmp_path))
  assert result['step'] == 4 and 0 <= result['test/ema_accuracy'] <= 1


def test_a_user_models_code_changed_since_its_run_is_named(user_module, fake_tfds, tmp_path,
                                                           monkeypatch):
  from jaxcnn.restore import restore_run  # pylint: disable=g-import-not-at-top
  config = tiny_config(model='mymod:Net', num_train_steps=2)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  # The model's code is edited: it now reads 3 features, not 4.
  module = tmp_path / 'mymod.py'
  module.write_text(module.read_text().replace('nnx.Linear(4,', 'nnx.Linear(3,')
                    .replace('[:, :4]', '[:, :3]'))
  monkeypatch.delitem(sys.modules, 'mymod')
  cause = "the code of model 'mymod:Net' builds other arrays than it did for the run"
  with pytest.raises(ConfigError, match=rf'state.params.fc.kernel has shape \(4, 10\) in the '
                                        rf'checkpoint and \(3, 10\) in the model; {cause}: '
                                        'restore that code$'):
    restore_run(str(tmp_path / 'run'))  # What evaluate and predict do.
  config.num_train_steps = 4
  with pytest.raises(ConfigError, match=rf"if this is the run's own config, {cause}: restore that "
                                        'code, or start a new --workdir$'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


def test_a_user_models_code_changed_in_what_it_computes_is_warned_of(user_module, fake_tfds,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
  """A change that keeps every array's shape restores without a mismatch to name."""
  from jaxcnn.restore import restore_run  # pylint: disable=g-import-not-at-top
  config = tiny_config(model='mymod:Net', num_train_steps=2)
  run = tmp_path / 'run'
  trainer.train_and_evaluate(config, str(run))
  restore_run(str(run))
  assert 'has changed' not in capsys.readouterr().err  # The code the run trained with.
  module = tmp_path / 'mymod.py'
  module.write_text(module.read_text() + '\nSCALE = 2  # An edit that keeps every shape.\n')
  monkeypatch.delitem(sys.modules, 'mymod')
  warning = (f"warning: {module}, which defines model 'mymod:Net', has changed since the run in "
             f'{run} last trained: its checkpoint now runs in the new code')
  restore_run(str(run))  # What evaluate and predict do.
  assert warning in capsys.readouterr().err.splitlines()
  config.num_train_steps = 4
  trainer.train_and_evaluate(config, str(run))
  assert warning in capsys.readouterr().err.splitlines()
  config.num_train_steps = 6  # It has now trained with the new code: nothing more to say.
  trainer.train_and_evaluate(config, str(run))
  assert 'has changed' not in capsys.readouterr().err


def test_a_model_function_must_build_an_nnx_module(user_module):
  with pytest.raises(ConfigError, match=r"model 'mymod:build_a_dict' built a dict, not an "
                                        r'nnx.Module'):
    models.create_model('mymod:build_a_dict', num_classes=5, input_shape=(2, 2, 1))


def test_a_model_must_return_one_logit_per_class(user_module):
  with pytest.raises(ConfigError, match=r"model 'mymod:WrongOutput' returns outputs of shape "
                                        r'\(2, 6\) .* \(2, 5\)'):
    models.create_model('mymod:WrongOutput', num_classes=5, input_shape=(2, 2, 1))


@pytest.mark.parametrize('name, message', [
    ('mymod:IntegerOutput', r"model 'mymod:IntegerOutput' returns logits of dtype int32; they "
                            r'must be floating point'),
    ('mymod:TwoOutputs', r"model 'mymod:TwoOutputs' returns a tuple; it must return one array "
                         r'of logits'),
])
def test_a_model_must_return_one_floating_array_of_logits(user_module, name, message):
  with pytest.raises(ConfigError, match=message):
    models.create_model(name, num_classes=5, input_shape=(2, 2, 1))


# airbench's whitening initialisation.

def correlated_images(num_images=64, size=12, seed=0):
  """Smooth, channel-mixed noise: neighbouring pixels and channels are strongly correlated."""
  x = np.random.default_rng(seed).normal(size=(num_images, size + 2, size + 2, 3))
  x = (x[:, :-2, :-2] + x[:, 1:-1, 1:-1] + x[:, 2:, 2:] + x[:, 1:-1, :-2] + x[:, :-2, 1:-1])
  return x @ np.array([[1.0, 0.6, 0.3], [0.2, 1.0, 0.5], [0.1, 0.4, 1.0]]) + 0.5


def correlation(responses):
  return np.corrcoef(np.asarray(responses, np.float64).reshape(-1, responses.shape[-1]).T)


def test_whitening_decorrelates_the_first_layer_responses():
  images = correlated_images()
  model = small_airbench()
  # The 2x2 patches (as 12 channels) are strongly correlated to begin with.
  patches = np.concatenate([images[:, i:11 + i, j:11 + j] for i in (0, 1) for j in (0, 1)], -1)
  off_diagonal = ~np.eye(12, dtype=bool)
  assert np.abs(correlation(patches))[off_diagonal].max() > 0.5

  model.init_whitening(images)
  responses = np.asarray(model.whiten(jnp.asarray(images, jnp.float32)))
  positive, negative = responses[..., :12], responses[..., 12:]
  np.testing.assert_allclose(negative, -positive, atol=1e-5)  # Each filter and its negative.
  assert np.abs(correlation(positive))[off_diagonal].max() < 1e-3
  np.testing.assert_allclose(positive.reshape(-1, 12).mean(0), 0, atol=1e-4)
  variances = positive.reshape(-1, 12).var(0)
  assert np.all(variances < 1) and variances[0] > 0.99  # lambda / (lambda + eps), strongest first.


def test_whitening_standardises_uint8_images_like_the_input_pipeline():
  pixels = np.clip(correlated_images() * 40 + 100, 0, 255).astype(np.uint8)
  standardised = (pixels - pixels.mean((0, 1, 2))) / pixels.std((0, 1, 2))
  from_uint8, from_float = small_airbench(), small_airbench()
  from_uint8.init_whitening(pixels)
  from_float.init_whitening(standardised)
  np.testing.assert_allclose(from_uint8.whiten.kernel[...], from_float.whiten.kernel[...],
                             rtol=1e-5, atol=1e-5)


def test_airbench_trains_without_whitening():
  model = small_airbench((16, 16, 3))
  images = jnp.asarray(correlated_images(num_images=8, size=16), jnp.float32)
  labels = jnp.arange(8)  # Eight images of eight classes: learnable only by fitting them.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # A high learning rate, as airbench uses: the 1/9 output scale makes the logits' gradients small.
  optimizer = optax.sgd(1.0, momentum=0.9, nesterov=True)

  @jax.jit
  def step(params, rest, opt_state):
    def loss_fn(params, rest):
      model = nnx.merge(graphdef, params, rest, copy=True)  # Variables of this trace.
      loss = optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()
      return loss, nnx.state(model, nnx.Not(nnx.Param))
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(10):
    params, rest, opt_state, loss = step(params, rest, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_presets_are_partials_of_a_few_classes():
  classes = {models.MODELS[name].func for name in ZOO if name != 'airbench'}
  assert {c.__name__ for c in classes} == {'ResNet', 'CifarResNet', 'WideResNet', 'VGG',
                                           'ConvNeXt', 'EfficientNet', 'MobileNetV2'}
  assert all(isinstance(models.MODELS[name], functools.partial) for name in ZOO[:-1])
