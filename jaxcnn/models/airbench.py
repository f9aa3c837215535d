"""A fast CIFAR-10 network in the manner of Keller Jordan's airbench94 (arXiv:2404.00498).

The network is small and has no residual connections; airbench's single most effective trick is its
first layer, initialised to whiten image patches:

  whiten   2x2 convolution, VALID, with bias: 8C filters for C input channels (24 for RGB), whose
           weights `init_whitening` can set from the training images (see there), then GELU.
  block x3 conv3x3 -> 2x2 max-pool -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU, with
           64, 256 and 256 channels. Convolutions are bias-free.
  head     global max-pool, Linear(256, classes) without bias, logits times 1/9.

On 32x32x3 input the maps are 31 -> 15 -> 7 -> 3 pixels and the network has 1,971,640 parameters
(the paper's 1.97M) for 10 classes, 1,962,152 on 28x28x1 input; any input of at least 16x16
works.

As in airbench, BatchNorms have no learnable scale (only a bias) and use a fast running-average
momentum (0.6 in PyTorch's convention, `momentum=0.4` in Flax's), which suits schedules of ten-odd
epochs; the fixed output scale keeps the initial logits small. Unlike airbench, the whitening
weights stay ordinary trainable parameters (jaxcnn trains every `nnx.Param`), and the other
convolutions keep Flax's default initialisation.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcnn.models.layers import max_pool

# The running statistics' update weight is 0.6 (PyTorch convention), as in airbench94.
BN_MOMENTUM = 0.4
# Images per chunk when accumulating patch moments: bounds memory for any training set size.
_WHITENING_CHUNK = 512


class ConvGroup(nnx.Module):
  """conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU, without a residual."""

  def __init__(self, in_features: int, features: int, *, dtype, axis_name: str | None,
               rngs: nnx.Rngs):
    def conv(n_in):
      return nnx.Conv(n_in, features, (3, 3), padding='SAME', use_bias=False, dtype=dtype,
                      rngs=rngs)

    def norm():
      return nnx.BatchNorm(features, use_scale=False, momentum=BN_MOMENTUM, epsilon=1e-5,
                           dtype=dtype, axis_name=axis_name, rngs=rngs)

    self.conv1 = conv(in_features)
    self.bn1 = norm()
    self.conv2 = conv(features)
    self.bn2 = norm()

  def __call__(self, x: jax.Array) -> jax.Array:
    # Pooling before the norm halves the work of the norm and the activation.
    x = nnx.gelu(self.bn1(max_pool(self.conv1(x))))
    return nnx.gelu(self.bn2(self.conv2(x)))


class AirBench(nnx.Module):
  """The airbench94-style network (see the module docstring)."""

  def __init__(self, *, num_classes: int, input_shape: Sequence[int], dtype=jnp.float32,
               rngs: nnx.Rngs, axis_name: str | None = None,
               widths: Sequence[int] = (64, 256, 256), logit_scale: float = 1 / 9):
    channels = input_shape[-1]
    # One filter per eigenvector of the 2x2xC patch covariance, and its negative: after the GELU
    # the pair keeps both signs of each whitened component.
    self.whiten = nnx.Conv(channels, 2 * 4 * channels, (2, 2), padding='VALID', use_bias=True,
                           dtype=dtype, rngs=rngs)
    groups = []
    features = 2 * 4 * channels
    for width in widths:
      groups.append(ConvGroup(features, width, dtype=dtype, axis_name=axis_name, rngs=rngs))
      features = width
    self.groups = nnx.List(groups)
    self.head = nnx.Linear(features, num_classes, use_bias=False, dtype=dtype, rngs=rngs)
    self.logit_scale = logit_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.gelu(self.whiten(x))
    for group in self.groups:
      x = group(x)
    x = jnp.max(x, axis=(1, 2))
    return self.head(x) * jnp.asarray(self.logit_scale, x.dtype)

  def init_whitening(self, images, eps: float = 5e-4) -> None:
    """Sets the first convolution to whiten the 2x2 patches of `images` (NHWC).

    Filter i is eigenvector i of the patch covariance divided by sqrt(eigenvalue_i + eps), and
    filter 4C + i is its negative; the bias centres the responses on the patches' mean. On the
    given images the first 4C output channels are then uncorrelated, each with variance
    eigenvalue / (eigenvalue + eps), close to 1 except for the faintest components, which `eps`
    keeps from being amplified into noise.

    Args:
      images: training images as the model will see them. Floats are taken as the model's input
        already; uint8 images are first standardised per channel with their own mean and standard
        deviation, which is what jaxcnn's input pipeline does with the training set's statistics.
        A few thousand images are plenty (airbench uses 5,000).
      eps: added to every eigenvalue before its square root is taken.
    """
    images = _as_model_input(images)
    mean, covariance = _patch_moments(images)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # Strongest first.
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
    filters = np.concatenate([filters, -filters], axis=1)  # (4C, 8C)
    kernel, bias = self.whiten.kernel, self.whiten.bias
    kernel.set_value(jnp.asarray(filters.reshape(kernel.shape), kernel.dtype))
    bias.set_value(jnp.asarray(-mean @ filters, bias.dtype))


def _as_model_input(images) -> np.ndarray:
  """float64 NHWC images as the model sees them (see `AirBench.init_whitening`)."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'init_whitening needs NHWC images, got shape {images.shape}')
  if images.dtype == np.uint8:
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    mean, std = pixels.mean(0), pixels.std(0)
    return (images - mean) / np.maximum(std, 1e-6)
  return images.astype(np.float64)


def _patch_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of all 2x2 patches (stride 1), flattened in the kernel's (h, w, c) order.

  Accumulated chunk by chunk in float64, so memory stays bounded and a large training set loses no
  precision.
  """
  channels = images.shape[-1]
  dim = 4 * channels
  count, total, outer = 0, np.zeros(dim), np.zeros((dim, dim))
  for start in range(0, len(images), _WHITENING_CHUNK):
    patches = _patches(images[start:start + _WHITENING_CHUNK])
    count += len(patches)
    total += patches.sum(0)
    outer += patches.T @ patches
  mean = total / count
  return mean, outer / count - np.outer(mean, mean)


def _patches(images: np.ndarray) -> np.ndarray:
  """All 2x2 patches of NHWC `images` as rows, ordered (dh, dw, channel) like a conv kernel."""
  height, width = images.shape[1:3]
  shifted = [images[:, dh:height - 1 + dh, dw:width - 1 + dw, :] for dh in (0, 1) for dw in (0, 1)]
  return np.stack(shifted, axis=3).reshape(-1, 4 * images.shape[-1])
