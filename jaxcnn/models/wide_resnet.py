"""Wide residual networks (Zagoruyko & Komodakis 2016) for CIFAR-size images.

WRN-d-k: a 3x3 convolution with 16 channels, then three groups of n = (d - 4) / 6 pre-activation
blocks with 16k, 32k and 64k channels (strides 1, 2, 2), a final BatchNorm and ReLU, global average
pooling and a linear classifier. A block is BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus a
shortcut; where the shape changes the shortcut is a bias-free 1x1 convolution of the pre-activated
input, as in the authors' code. Convolutions are bias-free and He-normal (fan_out) initialised.

For 32x32x3 input and 10 classes: `wrn16_8` has 10,961,370 parameters and `wrn28_10` 36,479,194
(the paper's 36.5M). Dropout between the two convolutions defaults to 0.3, the paper's choice for
CIFAR; it draws from the `dropout` stream of the `rngs` given, which the train step reseeds.
`drop_path_rate` adds stochastic depth, as for the ResNets (`jaxcnn.models.resnet`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.models.resnet import (batch_norm, conv, drop_path, drop_path_rates,
                                  global_average_pool)


class WideBasicBlock(nnx.Module):
  """A pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus the shortcut."""

  def __init__(self, in_features: int, features: int, *, stride: int, dropout_rate: float, dtype,
               axis_name: str | None, rngs: nnx.Rngs, drop_path_rate: float = 0.0):
    norm = functools.partial(batch_norm, dtype=dtype, axis_name=axis_name, rngs=rngs)
    self.bn1 = norm(in_features)
    self.conv1 = conv(in_features, features, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = norm(features)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.conv2 = conv(features, features, 3, dtype=dtype, rngs=rngs)
    needs_projection = stride != 1 or in_features != features
    self.projection = (conv(in_features, features, 1, stride, dtype=dtype, rngs=rngs)
                       if needs_projection else None)
    self.drop_path = drop_path(drop_path_rate, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    activated = nnx.relu(self.bn1(x))
    y = self.conv1(activated)
    y = self.conv2(self.dropout(nnx.relu(self.bn2(y))))
    if self.drop_path is not None:
      y = self.drop_path(y)
    # A projection sees the pre-activated input: the raw input of a group's first block is the
    # previous group's un-normalised sum.
    shortcut = x if self.projection is None else self.projection(activated)
    return y + shortcut


class WideResNet(nnx.Module):
  """WRN-`depth`-`widen_factor` (see the module docstring); depth must be 6n + 4."""

  def __init__(self, *, depth: int, widen_factor: int, num_classes: int,
               input_shape: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs,
               axis_name: str | None = None, dropout_rate: float = 0.3,
               drop_path_rate: float = 0.0):
    if (depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {depth}')
    blocks_per_group = (depth - 4) // 6
    rates = iter(drop_path_rates(drop_path_rate, 3 * blocks_per_group))
    channels = input_shape[-1]
    self.stem_conv = conv(channels, 16, 3, dtype=dtype, rngs=rngs)
    groups = []
    in_features = 16
    for base, stride in zip((16, 32, 64), (1, 2, 2)):
      features = base * widen_factor
      blocks = []
      for i in range(blocks_per_group):
        blocks.append(WideBasicBlock(in_features, features, stride=stride if i == 0 else 1,
                                     dropout_rate=dropout_rate, dtype=dtype,
                                     axis_name=axis_name, rngs=rngs,
                                     drop_path_rate=next(rates)))
        in_features = features
      groups.append(nnx.Sequential(*blocks))
    self.groups = nnx.List(groups)
    self.final_bn = batch_norm(in_features, dtype=dtype, axis_name=axis_name, rngs=rngs)
    self.fc = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_conv(x)
    for group in self.groups:
      x = group(x)
    x = nnx.relu(self.final_bn(x))
    return self.fc(global_average_pool(x))


wrn16_8 = functools.partial(WideResNet, depth=16, widen_factor=8)
wrn28_10 = functools.partial(WideResNet, depth=28, widen_factor=10)
