"""MobileNetV2 (Sandler et al. 2018), torchvision's layout.

A 3x3/2 convolution stem with 32 channels; seven stages of inverted residual blocks (a 1x1
expansion by 6 except in the first stage, a depthwise 3x3 convolution, a linear 1x1 projection,
with a residual connection where the shape allows); a 1x1 convolution to 1280 channels, global
average pooling, dropout 0.2 and a linear classifier. BatchNorm follows every convolution and
ReLU6 every one but the projections. `width` scales the channels as torchvision's `width_mult`
does (rounded to multiples of 8; the last 1280 only grows). With 224x224x3 input and 1000 classes
`mobilenet_v2` has torchvision's 3,504,872 parameters and 0.30G multiply-adds. As in torchvision,
convolutions start He-normal (fan_out) and the classifier from a normal of deviation 0.01.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.errors import ConfigError
from jaxcnn.models.efficientnet import ConvBN, make_divisible
from jaxcnn.models.resnet import batch_norm, global_average_pool

# Stage by stage: (expansion, output channels, blocks, stride of the first block).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nnx.Module):
  """1x1 expansion (unless by 1), depthwise 3x3, linear 1x1 projection, and the residual
  connection where the stride is 1 and the channels stay."""

  def __init__(self, in_features: int, out_features: int, *, expansion: int, stride: int, norm,
               dtype, rngs: nnx.Rngs):
    layer = functools.partial(ConvBN, activation=jax.nn.relu6, norm=norm, dtype=dtype, rngs=rngs)
    hidden = int(round(in_features * expansion))
    self.expand = layer(in_features, hidden, 1) if expansion != 1 else None
    self.depthwise = layer(hidden, hidden, 3, stride, groups=hidden)
    self.project = layer(hidden, out_features, 1, activation=None)
    self.residual = stride == 1 and in_features == out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.expand(x) if self.expand is not None else x
    y = self.project(self.depthwise(y))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  """MobileNetV2 at `width` (see the module docstring)."""

  def __init__(self, *, num_classes: int, input_shape: Sequence[int], dtype=jnp.float32,
               rngs: nnx.Rngs, axis_name: str | None = None, width: float = 1.0,
               dropout_rate: float = 0.2):
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0):
      # make_divisible would round any width, even a negative one, up to 8 channels.
      raise ConfigError(f"config key 'model_kwargs' sets width={width!r}; it must be a positive "
                        "number, torchvision's width_mult, such as 0.5 or 1.4")
    norm = functools.partial(batch_norm, dtype=dtype, axis_name=axis_name, rngs=rngs)
    layer = functools.partial(ConvBN, activation=jax.nn.relu6, norm=norm, dtype=dtype, rngs=rngs)
    features = make_divisible(STEM_CHANNELS * width)
    self.stem = layer(input_shape[-1], features, 3, 2)
    blocks = []
    for expansion, channels, count, stride in STAGES:
      channels = make_divisible(channels * width)
      for index in range(count):
        blocks.append(InvertedResidual(features, channels, expansion=expansion,
                                       stride=stride if index == 0 else 1, norm=norm,
                                       dtype=dtype, rngs=rngs))
        features = channels
    self.blocks = nnx.Sequential(*blocks)
    last = make_divisible(LAST_CHANNELS * max(1.0, width))
    self.head = layer(features, last, 1)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.fc = nnx.Linear(last, num_classes, kernel_init=nnx.initializers.normal(0.01),
                         dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.head(self.blocks(self.stem(x)))
    return self.fc(self.dropout(global_average_pool(x)))


mobilenet_v2 = functools.partial(MobileNetV2)  # As every zoo entry: a partial of its class.
