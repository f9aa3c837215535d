"""VGG with BatchNorm, the CIFAR variant (Simonyan & Zisserman 2015; Ioffe & Szegedy 2015).

Five stages of 3x3 convolution-BatchNorm-ReLU layers, each followed by a 2x2 max-pool; then global
average pooling and a single Linear(512, num_classes). On 32x32 input the fifth pool leaves 1x1, so
the average pool is the identity and the head is exactly the common CIFAR one (flatten, one linear
layer) that replaces ImageNet VGG's three 4096-unit layers. Convolutions are bias-free, since the
BatchNorm that follows has its own bias.

  vgg11_bn: stages (64) (128) (256 256) (512 512) (512 512)                 9,228,362 parameters
  vgg16_bn: stages (64 64) (128 128) (256 256 256) (512 512 512) (512 512 512) 14,724,042 parameters

(32x32x3 input, 10 classes; the count does not depend on the image's height and width.) A pool
over an odd size keeps the last row or column (ceil mode), so every input of at least 1x1 works:
28x28 input goes 28-14-7-4-2-1.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.models.layers import conv_bn_relu, max_pool

VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def ceil_max_pool(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool that keeps a last odd row or column (PyTorch's ceil_mode=True).

  Pads odd sizes with -inf, which never wins a max, and reuses `max_pool` (fast on CPU).
  """
  pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
  return max_pool(x)


class VGG(nnx.Module):
  """VGG-BN for small images: `stages` lists each stage's conv widths (see the module docstring)."""

  def __init__(self, *, stages: Sequence[Sequence[int]], num_classes: int,
               input_shape: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs,
               axis_name: str | None = None):
    channels = input_shape[-1]
    built = []
    for widths in stages:
      layers = []
      for width in widths:
        layers.append(conv_bn_relu(channels, width, dtype=dtype, axis_name=axis_name, rngs=rngs))
        channels = width
      built.append(nnx.Sequential(*layers))
    self.stages = nnx.List(built)
    self.fc = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for stage in self.stages:
      x = ceil_max_pool(stage(x))
    return self.fc(jnp.mean(x, axis=(1, 2)))


vgg11_bn = functools.partial(VGG, stages=VGG11_STAGES)
vgg16_bn = functools.partial(VGG, stages=VGG16_STAGES)
