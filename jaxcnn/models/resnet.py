"""Residual networks: ResNet v1.5 for ImageNet and the CIFAR ResNets of He et al.

ImageNet ResNets (`resnet18` ... `resnet152`) follow torchvision's ResNet v1.5: the stride of a
downsampling bottleneck sits in its 3x3 convolution, shortcuts that change shape are a strided 1x1
convolution plus BatchNorm, convolutions are bias-free and initialised He-normal (fan_out), and
padding is explicit and symmetric as in PyTorch. With 224x224x3 input and 1000 classes the
parameter counts equal torchvision's exactly:

  resnet18  11,689,512    resnet34  21,797,672    resnet50  25,557,032
  resnet101 44,549,160    resnet152 60,192,808

torchvision's two widenings of the bottleneck are here too, with its names and its counts.
ResNeXt (Xie et al. 2017) splits the 3x3 convolution of every bottleneck into `groups` groups
of `width_per_group` channels each (`resnext50_32x4d`: 32 groups of 4 channels in the first
stage, doubling per stage); Wide ResNet-50-2 and -101-2 (Zagoruyko & Komodakis 2016, as
torchvision builds them) double the bottleneck's inner channels (2048-1024-2048 in the last
block, against ResNet-50's 2048-512-2048):

  resnext50_32x4d   25,028,904    resnext101_32x8d  88,791,336    resnext101_64x4d 83,455,272
  wide_resnet50_2   68,883,240    wide_resnet101_2 126,886,696

CIFAR ResNets (`cifar_resnet20/32/56`) follow He et al. 2016, section 4.2: a 3x3 convolution with
16 channels, three stages of n basic blocks with 16, 32 and 64 channels (n = 3, 5, 9), global
average pooling and a linear classifier. Like the paper they use option A shortcuts: where the
shape changes the shortcut subsamples with stride 2 and pads the new channels with zeros, so it has
no parameters. For 32x32x3 input and 10 classes they have 269,722 (0.27M), 464,154 (0.46M) and
853,018 (0.85M) parameters, the paper's counts. `shortcut='B'` gives projection shortcuts instead
(+2,752 parameters).

Every block can start as an identity: with `zero_init_residual=True` (the default) the last
BatchNorm scale of each residual branch starts at zero (Goyal et al. 2017), which makes large-batch
training start more stably; torchvision offers the same option.

`drop_path_rate` turns on stochastic depth (Huang et al. 2016), as timm's `drop_path_rate`: in
training each example skips a block's residual branch with a probability that rises linearly from
0 at the first block to `drop_path_rate` at the last, and a branch it keeps is scaled by
1 / (1 - that probability), so that evaluation runs every block unscaled. It draws from the
`dropout` stream, which the train step reseeds at every step. At 0, the default, the model has no
such layer and its arrays are those of the plain network.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.errors import ConfigError
from jaxcnn.models import cpu_conv
from jaxcnn.models.layers import strided_max_pool

# torchvision's `kaiming_normal_(mode='fan_out', nonlinearity='relu')`: an untruncated normal with
# variance 2 / (kernel height * kernel width * output channels).
conv_kernel_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# PyTorch's BatchNorm defaults: its momentum 0.1 is Flax's 0.9 (the weight of the old average).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(in_features: int, out_features: int, kernel_size: int, stride: int = 1, *, dtype,
         rngs: nnx.Rngs, groups: int = 1) -> nnx.Conv:
  """A bias-free convolution padded like PyTorch's `padding=kernel_size // 2`, its channels in
  `groups` groups (each output group sees only its own input group).

  Explicit symmetric padding, not 'SAME': for stride 2 on even sizes 'SAME' pads only at the end,
  which would shift every downsampled feature map by a pixel against the torchvision layout.
  """
  pad = kernel_size // 2
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                  kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs)


def batch_norm(features: int, *, dtype, axis_name: str | None, rngs: nnx.Rngs,
               zero_scale: bool = False, momentum: float = BN_MOMENTUM,
               epsilon: float = BN_EPSILON) -> nnx.BatchNorm:
  """BatchNorm, by default with PyTorch's momentum and epsilon; `zero_scale` starts its scale at
  zero."""
  scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
  return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                       axis_name=axis_name, scale_init=scale_init, rngs=rngs)


def drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
  """Stochastic depth for one residual branch: dropout of whole examples (broadcast over height,
  width and channels) with probability `rate`; None where `rate` is 0."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
  """Each block's probability of skipping its branch: linear from 0 at the first block to
  `drop_path_rate` at the last (Huang et al.'s linear decay rule)."""
  number = isinstance(drop_path_rate, (int, float)) and not isinstance(drop_path_rate, bool)
  if not (number and 0 <= drop_path_rate < 1):
    raise ConfigError(f"config key 'model_kwargs' sets drop_path_rate={drop_path_rate!r}; it "
                      'must be a probability at least 0 and below 1, such as 0.1')
  return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def residual_output(y: jax.Array) -> jax.Array:
  """A residual block's output: the next block's input and its shortcut's.

  On XLA:CPU in float32 it is computed once (`cpu_conv.computed_once`). Otherwise XLA fuses the
  residual stream's chain of sums, back to the stem, into every fusion that reads a block's
  output and recomputes it there; worst in the copies that put a convolution's input into the
  layout its kernel gradient takes, which then read every operand of the chain out of order.
  Those copies were over half of CIFAR ResNet-20's traced step (2-core AMD EPYC machine); with
  the outputs computed once ResNet-20 trains at 1.21x the images/s (302 against 249, medians of
  6 interleaved rounds of 10 steps at batch 128) and ResNet-50 at 1.13x (4.1 against 3.6, batch
  8). Not in bfloat16, where it cost ResNet-20 5%, nor for the pre-activation blocks of the wide
  ResNets (WRN-16-8: 6%), whose wider convolutions outweigh the copies.
  """
  if jax.default_backend() == 'cpu' and y.dtype == jnp.float32:
    return cpu_conv.computed_once(y)
  return y


def global_average_pool(x: jax.Array) -> jax.Array:
  """Averages NHWC feature maps over height and width."""
  return jnp.mean(x, axis=(1, 2))


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34 and the CIFAR ResNets).

  Where the shape changes, the shortcut is a projection (`shortcut='B'`: strided 1x1 convolution
  plus BatchNorm) or parameter-free (`shortcut='A'`: subsampling and zero-padded channels).
  """

  expansion = 1

  def __init__(self, in_features: int, features: int, *, stride: int = 1, dtype,
               axis_name: str | None = None, zero_init_residual: bool = True,
               shortcut: str = 'B', drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    norm = functools.partial(batch_norm, dtype=dtype, axis_name=axis_name, rngs=rngs)
    self.conv1 = conv(in_features, features, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = norm(features)
    self.conv2 = conv(features, features, 3, dtype=dtype, rngs=rngs)
    self.bn2 = norm(features, zero_scale=zero_init_residual)
    self.shortcut = _make_shortcut(in_features, features, stride, shortcut, dtype=dtype,
                                   axis_name=axis_name, rngs=rngs)
    self.drop_path = drop_path(drop_path_rate, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.drop_path is not None:
      y = self.drop_path(y)
    return residual_output(nnx.relu(y + self.shortcut(x)))


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided, as in v1.5), 1x1 expand to 4 x `features`, with a residual
  connection.

  The inner width is torchvision's: `features` at the defaults, and in general
  int(features * width_per_group / 64) * groups, the 3x3 convolution in `groups` groups
  (ResNeXt; wide ResNets set width_per_group=128).
  """

  expansion = 4

  def __init__(self, in_features: int, features: int, *, stride: int = 1, dtype,
               axis_name: str | None = None, zero_init_residual: bool = True,
               shortcut: str = 'B', drop_path_rate: float = 0.0, groups: int = 1,
               width_per_group: int = 64, rngs: nnx.Rngs):
    norm = functools.partial(batch_norm, dtype=dtype, axis_name=axis_name, rngs=rngs)
    out_features = features * self.expansion
    width = int(features * width_per_group / 64) * groups
    self.conv1 = conv(in_features, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = norm(width)
    self.conv2 = conv(width, width, 3, stride, groups=groups, dtype=dtype, rngs=rngs)
    self.bn2 = norm(width)
    self.conv3 = conv(width, out_features, 1, dtype=dtype, rngs=rngs)
    self.bn3 = norm(out_features, zero_scale=zero_init_residual)
    self.shortcut = _make_shortcut(in_features, out_features, stride, shortcut, dtype=dtype,
                                   axis_name=axis_name, rngs=rngs)
    self.drop_path = drop_path(drop_path_rate, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.drop_path is not None:
      y = self.drop_path(y)
    return residual_output(nnx.relu(y + self.shortcut(x)))


class PaddingShortcut(nnx.Module):
  """Option A shortcut: subsamples by `stride` and appends zero channels; it has no parameters."""

  def __init__(self, in_features: int, out_features: int, stride: int):
    self.stride = stride
    self.extra_features = out_features - in_features

  def __call__(self, x: jax.Array) -> jax.Array:
    # Subsampling x[::2] keeps ceil(size / 2) rows, as many as the padded stride-2 convolution.
    x = x[:, ::self.stride, ::self.stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.extra_features)))


def _identity(x: jax.Array) -> jax.Array:
  return x


def _make_shortcut(in_features: int, out_features: int, stride: int, kind: str, *, dtype,
                   axis_name: str | None, rngs: nnx.Rngs):
  """The shortcut of a residual block: identity when the shape is kept, else option A or B."""
  if stride == 1 and in_features == out_features:
    return _identity
  if kind == 'A':
    return PaddingShortcut(in_features, out_features, stride)
  if kind == 'B':
    return nnx.Sequential(
        conv(in_features, out_features, 1, stride, dtype=dtype, rngs=rngs),
        batch_norm(out_features, dtype=dtype, axis_name=axis_name, rngs=rngs))
  raise ValueError(f"shortcut must be 'A' or 'B', got {kind!r}")


def _make_stages(block_cls, in_features: int, widths: Sequence[int], stage_sizes: Sequence[int],
                 strides: Sequence[int], drop_path_rate: float = 0.0,
                 **block_kwargs) -> tuple[nnx.List, int]:
  """Stages of residual blocks; the first block of each stage carries its stride, and each
  block its share of `drop_path_rate` (`drop_path_rates`).

  Returns the stages and the number of channels they output.
  """
  rates = iter(drop_path_rates(drop_path_rate, sum(stage_sizes)))
  stages = []
  for width, num_blocks, stride in zip(widths, stage_sizes, strides):
    blocks = []
    for i in range(num_blocks):
      blocks.append(block_cls(in_features, width, stride=stride if i == 0 else 1,
                              drop_path_rate=next(rates), **block_kwargs))
      in_features = width * block_cls.expansion
    stages.append(nnx.Sequential(*blocks))
  return nnx.List(stages), in_features


class ResNet(nnx.Module):
  """ResNet v1.5 for ImageNet-size images (see the module docstring).

  Stem: 7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool; then four stages of `stage_sizes`
  blocks with 64, 128, 256 and 512 base channels (strides 1, 2, 2, 2), global average pooling and
  a linear classifier. Any input of at least 1x1 works; the classifier's size does not depend on
  it. The classifier keeps Flax's default initialisation (LeCun normal, zero bias). `groups` and
  `width_per_group` widen or group the bottlenecks' 3x3 convolutions (`Bottleneck`), as
  torchvision's arguments of those names do; basic blocks take only their defaults, as there.
  """

  def __init__(self, *, block_cls: type[BasicBlock] | type[Bottleneck], stage_sizes: Sequence[int],
               num_classes: int, input_shape: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs,
               axis_name: str | None = None, zero_init_residual: bool = True,
               drop_path_rate: float = 0.0, groups: int = 1, width_per_group: int = 64):
    channels = input_shape[-1]
    block_kwargs = {}
    if (groups, width_per_group) != (1, 64):
      if block_cls is not Bottleneck:
        raise ConfigError(f"config key 'model_kwargs' sets groups={groups!r} and "
                          f'width_per_group={width_per_group!r}; networks of basic blocks '
                          '(resnet18, resnet34) take only groups=1 and width_per_group=64, as '
                          "torchvision's do")
      for name, value in (('groups', groups), ('width_per_group', width_per_group)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
          raise ConfigError(f"config key 'model_kwargs' sets {name}={value!r}; it must be a "
                            'positive integer (resnext50_32x4d: groups=32, width_per_group=4)')
      block_kwargs = dict(groups=groups, width_per_group=width_per_group)
    self.stem_conv = conv(channels, 64, 7, 2, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(64, dtype=dtype, axis_name=axis_name, rngs=rngs)
    self.stages, features = _make_stages(
        block_cls, 64, (64, 128, 256, 512), stage_sizes, (1, 2, 2, 2), dtype=dtype,
        axis_name=axis_name, zero_init_residual=zero_init_residual,
        drop_path_rate=drop_path_rate, rngs=rngs, **block_kwargs)
    self.fc = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    # A 3x3/2 max-pool padded by one pixel of -inf on each side, as PyTorch's.
    x = strided_max_pool(x, window=3, stride=2, padding=1)
    for stage in self.stages:
      x = stage(x)
    return self.fc(global_average_pool(x))


class CifarResNet(nnx.Module):
  """The CIFAR ResNet of He et al. 2016, section 4.2 (see the module docstring).

  3x3 convolution with 16 channels, BatchNorm, ReLU; three stages of `blocks_per_stage` basic
  blocks with 16, 32 and 64 channels (strides 1, 2, 2); global average pooling; linear classifier.
  Depth is 6 * blocks_per_stage + 2. `shortcut` is 'A' (the paper's, parameter-free) or 'B'.
  """

  def __init__(self, *, blocks_per_stage: int, num_classes: int, input_shape: Sequence[int],
               dtype=jnp.float32, rngs: nnx.Rngs, axis_name: str | None = None,
               shortcut: str = 'A', zero_init_residual: bool = True,
               drop_path_rate: float = 0.0):
    channels = input_shape[-1]
    self.stem_conv = conv(channels, 16, 3, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(16, dtype=dtype, axis_name=axis_name, rngs=rngs)
    self.stages, features = _make_stages(
        BasicBlock, 16, (16, 32, 64), (blocks_per_stage,) * 3, (1, 2, 2), dtype=dtype,
        axis_name=axis_name, zero_init_residual=zero_init_residual, shortcut=shortcut,
        drop_path_rate=drop_path_rate, rngs=rngs)
    self.fc = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    for stage in self.stages:
      x = stage(x)
    return self.fc(global_average_pool(x))


resnet18 = functools.partial(ResNet, block_cls=BasicBlock, stage_sizes=(2, 2, 2, 2))
resnet34 = functools.partial(ResNet, block_cls=BasicBlock, stage_sizes=(3, 4, 6, 3))
resnet50 = functools.partial(ResNet, block_cls=Bottleneck, stage_sizes=(3, 4, 6, 3))
resnet101 = functools.partial(ResNet, block_cls=Bottleneck, stage_sizes=(3, 4, 23, 3))
resnet152 = functools.partial(ResNet, block_cls=Bottleneck, stage_sizes=(3, 8, 36, 3))
resnext50_32x4d = functools.partial(resnet50, groups=32, width_per_group=4)
resnext101_32x8d = functools.partial(resnet101, groups=32, width_per_group=8)
resnext101_64x4d = functools.partial(resnet101, groups=64, width_per_group=4)
wide_resnet50_2 = functools.partial(resnet50, width_per_group=128)
wide_resnet101_2 = functools.partial(resnet101, width_per_group=128)

cifar_resnet20 = functools.partial(CifarResNet, blocks_per_stage=3)
cifar_resnet32 = functools.partial(CifarResNet, blocks_per_stage=5)
cifar_resnet56 = functools.partial(CifarResNet, blocks_per_stage=9)
