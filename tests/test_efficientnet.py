"""EfficientNet: the same function as torchvision's layout written in PyTorch, and its own checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxcnn import models, trainer
from jaxcnn.models import efficientnet

from conftest import tiny_config

# B0's seven stages at a quarter of its channels and one block each (two in the 2-block stages):
# every kind of block, small enough to compile in seconds.
TINY = dict(width=0.25, depth=0.5, default_dropout_rate=0.2)


def tiny_efficientnet(input_shape=(40, 36, 3), **kwargs) -> efficientnet.EfficientNet:
  return efficientnet.EfficientNet(**TINY, num_classes=5, input_shape=input_shape,
                                   rngs=nnx.Rngs(0), **kwargs)


class TorchConvBN(torch.nn.Sequential):
  """torchvision's Conv2dNormActivation: bias-free convolution, BatchNorm and `activation` (a
  module class; None: none)."""

  def __init__(self, cin, cout, kernel, stride=1, groups=1, activation=torch.nn.SiLU):
    layers = [torch.nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                              bias=False), torch.nn.BatchNorm2d(cout)]
    super().__init__(*layers, *([activation()] if activation is not None else []))


class TorchMBConv(torch.nn.Module):
  """torchvision's MBConv: expansion, depthwise, squeeze-and-excitation, projection."""

  def __init__(self, cin, cout, expansion, kernel, stride):
    super().__init__()
    expanded = efficientnet.make_divisible(cin * expansion)
    self.expand = TorchConvBN(cin, expanded, 1) if expanded != cin else None
    self.depthwise = TorchConvBN(expanded, expanded, kernel, stride, groups=expanded)
    squeeze = max(1, cin // 4)
    self.reduce = torch.nn.Conv2d(expanded, squeeze, 1)
    self.excite = torch.nn.Conv2d(squeeze, expanded, 1)
    self.project = TorchConvBN(expanded, cout, 1, activation=None)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = self.depthwise(self.expand(x) if self.expand is not None else x)
    scale = torch.sigmoid(self.excite(torch.nn.functional.silu(self.reduce(y.mean((2, 3), True)))))
    y = self.project(y * scale)
    return x + y if self.residual else y


def torch_efficientnet(model: efficientnet.EfficientNet, width, depth, num_classes):
  """The same network in PyTorch, built from B0's stages as torchvision builds it."""
  features = efficientnet.make_divisible(32 * width)
  layers = [TorchConvBN(3, features, 3, 2)]
  for expansion, kernel, stride, channels, blocks in efficientnet.B0_STAGES:
    channels = efficientnet.make_divisible(channels * width)
    for index in range(int(math.ceil(blocks * depth))):
      layers.append(TorchMBConv(features, channels, expansion, kernel, stride if index == 0 else 1))
      features = channels
  layers.append(TorchConvBN(features, 4 * features, 1))
  network = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4 * features, num_classes))
  return network.eval()


def put(parameter: torch.Tensor, value, transpose=None) -> None:
  """Sets a PyTorch tensor to an NNX variable's value, its axes in `transpose`'s order."""
  value = np.array(value[...])  # A writable copy, as torch.from_numpy wants.
  parameter.data = torch.from_numpy(np.ascontiguousarray(
      value.transpose(transpose) if transpose else value))


def copy_conv(ours: nnx.Conv, theirs: torch.nn.Conv2d) -> None:
  put(theirs.weight, ours.kernel, (3, 2, 0, 1))  # HWIO to OIHW.
  if ours.bias is not None:
    put(theirs.bias, ours.bias)


def copy_conv_bn(ours: efficientnet.ConvBN, theirs: torch.nn.Sequential) -> None:
  """A convolution and its BatchNorm, running statistics included."""
  copy_conv(ours.conv, theirs[0])
  put(theirs[1].weight, ours.bn.scale)
  put(theirs[1].bias, ours.bn.bias)
  put(theirs[1].running_mean, ours.bn.mean)
  put(theirs[1].running_var, ours.bn.var)


def randomize(model: nnx.Module) -> None:
  """Every vector random, so that each counts in a comparison: BatchNorm's scales and variances
  in [0.5, 1], biases, offsets and means in [-0.5, 0.5] (so that activations see both signs).
  The kernels keep their random initialisation, whose scale keeps activations in range: larger
  ones would grow float32's rounding through the blocks."""
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(1), len(paths_and_leaves))
  drawn = []
  for key, (path, leaf) in zip(keys, paths_and_leaves):
    if leaf.ndim != 1:
      drawn.append(leaf)
    elif any(getattr(entry, 'key', None) in ('scale', 'var') for entry in path):
      drawn.append(jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.0))
    else:
      drawn.append(jax.random.uniform(key, leaf.shape, minval=-0.5, maxval=0.5))
  nnx.update(model, jax.tree.unflatten(treedef, drawn))


def copy_into_torch(model: efficientnet.EfficientNet, reference: torch.nn.Sequential) -> None:
  """Sets `reference`'s weights and BatchNorm statistics to `model`'s."""
  copy_conv_bn(model.stem, reference[0])
  for ours, theirs in zip(model.blocks.layers, reference[1:]):
    if ours.expand is not None:
      copy_conv_bn(ours.expand, theirs.expand)
    copy_conv_bn(ours.depthwise, theirs.depthwise)
    copy_conv(ours.squeeze_excitation.reduce, theirs.reduce)
    copy_conv(ours.squeeze_excitation.expand, theirs.excite)
    copy_conv_bn(ours.project, theirs.project)
  copy_conv_bn(model.head, reference[-4])
  put(reference[-1].weight, model.fc.kernel, (1, 0))
  put(reference[-1].bias, model.fc.bias)


def test_it_computes_what_torchvisions_layout_computes():
  model = tiny_efficientnet(dropout_rate=0.0, drop_path_rate=0.0)
  randomize(model)
  reference = torch_efficientnet(model, TINY['width'], TINY['depth'], 5)
  copy_into_torch(model, reference)
  assert len(model.blocks.layers) == 10  # 1, 1, 1, 2, 2, 2, 1 blocks: ceil(half of B0's).
  assert_same_logits_in_training(model, reference)


def assert_same_logits_in_training(model: nnx.Module, reference: torch.nn.Module) -> None:
  """Both networks, of the same size, give the same logits for 40x36 images in training mode.

  On batch statistics: with running statistics the depthwise layers' initialisation (He,
  fan_out: a variance of 2 / (9 channels) for 9 products) shrinks the image away, and the logits
  would be the classifier's bias whatever the image.
  """
  assert sum(p.numel() for p in reference.parameters()) == models.count_params(model)
  images = 3 * np.random.default_rng(2).normal(size=(4, 40, 36, 3)).astype(np.float32)
  ours = nnx.jit(lambda model, x: model(x))(model, jnp.asarray(images))
  with torch.no_grad():
    theirs = reference.train()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert np.abs(theirs - theirs.mean(0)).max() > 0.1  # Each image's own logits.
  np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5 * np.abs(theirs).max())


@pytest.mark.parametrize('channels, expected', [(32.0, 32), (35.2, 32), (22.4, 24), (10.0, 16),
                                                (3.0, 8), (320 * 1.4, 448)])
def test_channels_round_to_multiples_of_8_as_torchvisions(channels, expected):
  assert efficientnet.make_divisible(channels) == expected


def test_stochastic_depth_rises_over_the_residual_blocks_as_torchvisions():
  model = nnx.eval_shape(lambda: efficientnet.efficientnet_b0(
      num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
  rates = [block.drop_path.rate if block.drop_path is not None else None
           for block in model.blocks.layers]
  # 16 blocks; block i's rate is 0.2 * i / 16, where it has a residual connection (not the
  # first block of a stage that changes the shape, nor the first block of all).
  expected = [0.2 * i / 16 if i not in (0, 1, 3, 5, 8, 11, 15) else None for i in range(16)]
  expected[0] = None
  assert rates == pytest.approx(expected)
  assert model.dropout.rate == 0.2  # B0's; the variant's unless given.
  assert tiny_efficientnet(dropout_rate=0.1).dropout.rate == 0.1


def test_squeeze_and_excitation_starts_he_normal_as_every_convolution():
  """torchvision initialises every Conv2d He-normal (fan_out), the squeeze-and-excitation ones
  too; Flax's default (LeCun, fan_in) gave their kernels 0.14 to 3.5 times that deviation."""
  model = efficientnet.efficientnet_b0(num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  standardised = [layer.kernel[...].ravel() / math.sqrt(2 / layer.out_features)
                  for block in model.blocks.layers
                  for layer in (block.squeeze_excitation.reduce, block.squeeze_excitation.expand)]
  assert len(standardised) == 32
  assert float(jnp.std(jnp.concatenate(standardised))) == pytest.approx(1.0, abs=0.05)
  assert all(float(jnp.mean(layer.bias[...] == 0)) == 1 for block in model.blocks.layers
             for layer in (block.squeeze_excitation.reduce, block.squeeze_excitation.expand))


def test_a_run_trains_it(fake_tfds, tmp_path):
  """The class itself, shrunk through model_kwargs, on the fake digits. BatchNorm's running
  averages take half of each step's statistics: at the default momentum (0.9) they still trail
  31 layers that move as they train after 40 steps, and the evaluation would be at chance
  (though the training loss is low), where 96 steps would reach 100%."""
  config = tiny_config(model='jaxcnn.models.efficientnet:EfficientNet', optimizer='adamw',
                       learning_rate=3e-3, num_train_steps=32, eval_every_steps=32,
                       model_kwargs=dict(TINY, bn_momentum=0.5))
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['test/accuracy'] > 0.5  # Ten classes: chance is 0.1.
