"""EfficientNet B0 to B7 (Tan & Le 2019), torchvision's layout.

A 3x3/2 convolution stem; seven stages of MBConv blocks (a 1x1 expansion by 6 except in the first
stage, a depthwise 3x3 or 5x5 convolution, squeeze-and-excitation to a quarter of the block's
input channels, and a 1x1 projection, with a residual connection where the shape allows); a 1x1
convolution to 4x the last stage's channels, global average pooling, dropout and a linear
classifier. BatchNorm and SiLU follow every convolution but the projections. B1 to B7 scale the
channels by `width` and the blocks per stage by `depth` as torchvision does (channels rounded to
multiples of 8, block counts up). With 224x224x3 input and 1000 classes the parameter counts and
multiply-adds equal torchvision's:

  efficientnet_b0   5,288,548 (0.39G)    efficientnet_b4  19,341,616 (4.39G)
  efficientnet_b1   7,794,184 (0.69G)    efficientnet_b5  30,389,784 (10.3G)
  efficientnet_b2   9,109,994 (1.09G)    efficientnet_b6  43,040,704 (19.1G)
  efficientnet_b3  12,233,232 (1.83G)    efficientnet_b7  66,347,960 (37.8G)

(the paper trains each at its own resolution, 224 for B0 up to 600 for B7; the counts do not
depend on it). As in torchvision: convolutions start He-normal (fan_out), the classifier uniform
within 1/sqrt(classes); B5 to B7 use BatchNorm's TensorFlow settings (epsilon 1e-3, momentum
0.99), whose weights they were ported with; stochastic depth rises over the blocks as
`drop_path_rate` * block / blocks (0.2 by default, torchvision's), and the classifier's dropout
is the variant's (0.2 for B0 and B1 up to 0.5 for B6 and B7) unless `dropout_rate` is given.
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.models.resnet import (BN_EPSILON, BN_MOMENTUM, batch_norm, conv, conv_kernel_init,
                                  drop_path, drop_path_rates, global_average_pool)

# The B0 network, stage by stage: (expansion, kernel size, stride, output channels, blocks).
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
B0_STEM_CHANNELS = 32


def make_divisible(channels: float, divisor: int = 8) -> int:
  """`channels` rounded to the nearest multiple of `divisor` (at least `divisor`), and up by one
  more where rounding lost over 10%: torchvision's (and TensorFlow's) `_make_divisible`."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


class SqueezeExcitation(nnx.Module):
  """Scales each channel by a gate computed from all channels' means (Hu et al. 2018): 1x1
  convolutions to `squeeze` channels and back, SiLU between, a sigmoid gate."""

  def __init__(self, features: int, squeeze: int, *, dtype, rngs: nnx.Rngs):
    # He-normal (fan_out) as every other convolution here, as torchvision initialises these too.
    one_by_one = functools.partial(nnx.Conv, kernel_size=(1, 1), kernel_init=conv_kernel_init,
                                   dtype=dtype, rngs=rngs)
    self.reduce = one_by_one(features, squeeze)
    self.expand = one_by_one(squeeze, features)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = global_average_pool(x)[:, None, None, :]
    return x * nnx.sigmoid(self.expand(nnx.silu(self.reduce(scale))))


class ConvBN(nnx.Module):
  """Convolution (bias-free, PyTorch's padding), BatchNorm and `activation` (None: none), as
  torchvision's Conv2dNormActivation."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *,
               groups: int = 1, activation: Callable[[jax.Array], jax.Array] | None = nnx.silu,
               norm, dtype, rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, kernel_size, stride, groups=groups, dtype=dtype,
                     rngs=rngs)
    self.bn = norm(out_features)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return self.activation(x) if self.activation is not None else x


class MBConv(nnx.Module):
  """Mobile inverted bottleneck with squeeze-and-excitation (see the module docstring)."""

  def __init__(self, in_features: int, out_features: int, *, expansion: int, kernel_size: int,
               stride: int, drop_path_rate: float, norm, dtype, rngs: nnx.Rngs):
    layer = functools.partial(ConvBN, norm=norm, dtype=dtype, rngs=rngs)
    expanded = make_divisible(in_features * expansion)
    self.expand = layer(in_features, expanded, 1) if expanded != in_features else None
    self.depthwise = layer(expanded, expanded, kernel_size, stride, groups=expanded)
    self.squeeze_excitation = SqueezeExcitation(expanded, max(1, in_features // 4), dtype=dtype,
                                                rngs=rngs)
    self.project = layer(expanded, out_features, 1, activation=None)
    self.residual = stride == 1 and in_features == out_features
    self.drop_path = drop_path(drop_path_rate, rngs) if self.residual else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.expand(x) if self.expand is not None else x
    y = self.project(self.squeeze_excitation(self.depthwise(y)))
    if not self.residual:
      return y
    if self.drop_path is not None:
      y = self.drop_path(y)
    return x + y


class EfficientNet(nnx.Module):
  """EfficientNet: B0 scaled by `width` and `depth` (see the module docstring)."""

  def __init__(self, *, width: float, depth: float, default_dropout_rate: float,
               num_classes: int, input_shape: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs,
               axis_name: str | None = None, dropout_rate: float | None = None,
               drop_path_rate: float = 0.2, bn_epsilon: float = BN_EPSILON,
               bn_momentum: float = BN_MOMENTUM):
    norm = functools.partial(batch_norm, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype,
                             axis_name=axis_name, rngs=rngs)
    stages = [(expansion, kernel_size, stride, make_divisible(channels * width),
               int(math.ceil(blocks * depth)))
              for expansion, kernel_size, stride, channels, blocks in B0_STAGES]
    num_blocks = sum(stage[-1] for stage in stages)
    # torchvision's rate of block i is drop_path_rate * i / num_blocks: resnet's linear rates
    # over one block more, whose rate, the full one, no block takes.
    rates = iter(drop_path_rates(drop_path_rate, num_blocks + 1)[:num_blocks])
    features = make_divisible(B0_STEM_CHANNELS * width)
    self.stem = ConvBN(input_shape[-1], features, 3, 2, norm=norm, dtype=dtype, rngs=rngs)
    blocks = []
    for expansion, kernel_size, stride, channels, count in stages:
      for index in range(count):
        blocks.append(MBConv(features, channels, expansion=expansion, kernel_size=kernel_size,
                             stride=stride if index == 0 else 1, drop_path_rate=next(rates),
                             norm=norm, dtype=dtype, rngs=rngs))
        features = channels
    self.blocks = nnx.Sequential(*blocks)
    self.head = ConvBN(features, 4 * features, 1, norm=norm, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(default_dropout_rate if dropout_rate is None else dropout_rate,
                               rngs=rngs)
    # torchvision: uniform within 1/sqrt(classes), the bias zero.
    self.fc = nnx.Linear(4 * features, num_classes, dtype=dtype, rngs=rngs,
                         kernel_init=nnx.initializers.variance_scaling(1 / 3, 'fan_out',
                                                                       'uniform'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.head(self.blocks(self.stem(x)))
    return self.fc(self.dropout(global_average_pool(x)))


_TENSORFLOW_BATCHNORM = dict(bn_epsilon=1e-3, bn_momentum=0.99)
efficientnet_b0 = functools.partial(EfficientNet, width=1.0, depth=1.0, default_dropout_rate=0.2)
efficientnet_b1 = functools.partial(EfficientNet, width=1.0, depth=1.1, default_dropout_rate=0.2)
efficientnet_b2 = functools.partial(EfficientNet, width=1.1, depth=1.2, default_dropout_rate=0.3)
efficientnet_b3 = functools.partial(EfficientNet, width=1.2, depth=1.4, default_dropout_rate=0.3)
efficientnet_b4 = functools.partial(EfficientNet, width=1.4, depth=1.8, default_dropout_rate=0.4)
efficientnet_b5 = functools.partial(EfficientNet, width=1.6, depth=2.2, default_dropout_rate=0.4,
                                    **_TENSORFLOW_BATCHNORM)
efficientnet_b6 = functools.partial(EfficientNet, width=1.8, depth=2.6, default_dropout_rate=0.5,
                                    **_TENSORFLOW_BATCHNORM)
efficientnet_b7 = functools.partial(EfficientNet, width=2.0, depth=3.1, default_dropout_rate=0.5,
                                    **_TENSORFLOW_BATCHNORM)
