"""ConvNeXt (Liu et al. 2022), torchvision's layout: a ResNet modernised towards vision transformers.

A 4x4/4 "patchify" convolution and LayerNorm as the stem; four stages of blocks at `dims`
channels, each stage after the first entered through LayerNorm and a 2x2/2 convolution; global
average pooling, LayerNorm and a linear classifier. Each block is a 7x7 depthwise convolution,
LayerNorm, a 4x-wide MLP (Linear, exact GELU, Linear) over the channels, a learned per-channel
layer scale (initially 1e-6) and a residual connection. There is no BatchNorm, so batch size and
the devices' split of the batch change nothing in the forward pass. With 224x224x3 input and 1000
classes the parameter counts and multiply-adds equal torchvision's:

  convnext_tiny  28,589,128 (4.46G)    convnext_small 50,223,688 (8.68G)
  convnext_base  88,591,464 (15.4G)    convnext_large 197,767,336 (34.4G)

Convolution and linear kernels start from a normal of standard deviation 0.02 (torchvision's
`trunc_normal_(std=0.02)` truncates at +-2 in absolute terms, a hundred deviations out), biases
from zero; LayerNorms use epsilon 1e-6.

`drop_path_rate` sets stochastic depth as in `resnet`: linear over the blocks, from 0 to that
rate. By default it is the variant's in torchvision's builders: 0.1 for tiny, 0.4 for small and
0.5 for base and large (`model_kwargs` sets another, 0 turns it off). The layer scales are
vectors, so weight decay leaves them alone, as it does biases and normalisation scales (timm's
rule; torchvision's recipe decays them).

Images need at least 32x32 pixels: the stem and the three downsamplings divide the size by 32,
without padding, as torchvision's do (CIFAR's 32x32 images end as one pixel in the last stage).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.models.resnet import drop_path, drop_path_rates, global_average_pool

LAYER_NORM_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
DOWNSAMPLING = 32  # The stem's 4 times three stages' 2.
# torchvision's trunc_normal_(std=0.02) with its absolute bounds of +-2: a normal in effect.
kernel_init = nnx.initializers.normal(0.02)


def layer_norm(features: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the channels (the last axis of NHWC), as torchvision's LayerNorm2d."""
  return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)


def patch_conv(in_features: int, out_features: int, size: int, *, dtype,
               rngs: nnx.Rngs) -> nnx.Conv:
  """A `size`x`size` convolution with stride `size` and a bias: non-overlapping patches."""
  return nnx.Conv(in_features, out_features, (size, size), strides=(size, size), padding='VALID',
                  kernel_init=kernel_init, dtype=dtype, rngs=rngs)


class ConvNeXtBlock(nnx.Module):
  """Depthwise 7x7 convolution, LayerNorm, Linear to 4x, GELU, Linear back, layer scale, and the
  residual connection (with stochastic depth at `drop_path_rate`)."""

  def __init__(self, dim: int, *, dtype, drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    self.depthwise = nnx.Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                              kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.expand = nnx.Linear(dim, 4 * dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.project = nnx.Linear(4 * dim, dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((dim,), LAYER_SCALE_INIT, jnp.float32))
    self.drop_path = drop_path(drop_path_rate, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.norm(self.depthwise(x))
    # PyTorch's nn.GELU is the exact one; Flax's default is the tanh approximation.
    y = self.project(nnx.gelu(self.expand(y), approximate=False))
    y = y * self.layer_scale[...].astype(y.dtype)
    if self.drop_path is not None:
      y = self.drop_path(y)
    return x + y


class ConvNeXt(nnx.Module):
  """ConvNeXt with `depths` blocks per stage at `dims` channels (see the module docstring)."""

  def __init__(self, *, depths: Sequence[int], dims: Sequence[int], num_classes: int,
               input_shape: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs,
               default_drop_path_rate: float = 0.0, drop_path_rate: float | None = None):
    height, width, channels = input_shape
    if min(height, width) < DOWNSAMPLING:
      raise ValueError(f'ConvNeXt divides the image size by {DOWNSAMPLING}, so images need at '
                       f'least {DOWNSAMPLING}x{DOWNSAMPLING} pixels')
    self.stem_conv = patch_conv(channels, dims[0], 4, dtype=dtype, rngs=rngs)
    self.stem_norm = layer_norm(dims[0], dtype=dtype, rngs=rngs)
    if drop_path_rate is None:
      drop_path_rate = default_drop_path_rate
    rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
    downsamples, stages = [], []
    for index, (depth, dim) in enumerate(zip(depths, dims)):
      if index > 0:
        downsamples.append(nnx.Sequential(
            layer_norm(dims[index - 1], dtype=dtype, rngs=rngs),
            patch_conv(dims[index - 1], dim, 2, dtype=dtype, rngs=rngs)))
      stages.append(nnx.Sequential(*[
          ConvNeXtBlock(dim, dtype=dtype, drop_path_rate=next(rates), rngs=rngs)
          for _ in range(depth)]))
    self.downsamples = nnx.List(downsamples)
    self.stages = nnx.List(stages)
    self.head_norm = layer_norm(dims[-1], dtype=dtype, rngs=rngs)
    self.fc = nnx.Linear(dims[-1], num_classes, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_norm(self.stem_conv(x))
    for index, stage in enumerate(self.stages):
      if index > 0:
        x = self.downsamples[index - 1](x)
      x = stage(x)
    return self.fc(self.head_norm(global_average_pool(x)))


convnext_tiny = functools.partial(ConvNeXt, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                                  default_drop_path_rate=0.1)
convnext_small = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768),
                                   default_drop_path_rate=0.4)
convnext_base = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024),
                                  default_drop_path_rate=0.5)
convnext_large = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
                                   default_drop_path_rate=0.5)
