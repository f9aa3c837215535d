"""Convolution kernels for XLA:CPU when a layer has few input channels.

XLA:CPU's convolutions are slow for the narrow layers at the start of small CNNs. Two formulations
of the same stride-1 convolution (NHWC input, HWIO kernel) run faster there, measured on the 2-core
CI machine with a batch of 128:

* shift-and-add, for at most 3 input channels: the output is a sum of shifted input windows times
  kernel taps, fused by XLA into one elementwise loop. LeNet-5's first layer (1 -> 6 channels, 5x5,
  28x28) runs its forward pass in 1.2 ms against 6.0 ms; its gradients stay XLA's own (custom VJP).
* im2col, for 4 to 8 input channels: the kernel-sized patches are gathered into one matrix and the
  convolution is a single matrix product, differentiated by JAX as products and padded slices.
  LeNet-5's second layer (6 -> 16 channels, 5x5, 14x14) takes 3.9 ms forward and backward against
  5.8 ms, and the whole LeNet-5 training step 11.5 ms against 13.3 ms.

They still win with XLA's own convolutions in place of YNNPACK's (`xla_options.training_options`):
LeNet-5's train step at batch 128, 11,100 images/s with both kernels and 8,500 with neither.

Wider layers stay on XLA's convolution: there im2col's patch matrix is larger than the layer's
activations many times over and does not pay (a CIFAR ResNet-20 with im2col for its 16-channel
stage: 2x slower against YNNPACK's convolutions, no faster than XLA's own).
"""

from typing import Callable

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
ConvKernel = Callable[[jax.Array, jax.Array, Padding], jax.Array]

SHIFT_AND_ADD_MAX_INPUT_CHANNELS = 3
IM2COL_MAX_INPUT_CHANNELS = 8


def kernel_for(in_features: int) -> ConvKernel | None:
  """The faster CPU kernel for a layer with `in_features` input channels, or None for XLA's."""
  if in_features <= SHIFT_AND_ADD_MAX_INPUT_CHANNELS:
    return shift_and_add_conv
  if in_features <= IM2COL_MAX_INPUT_CHANNELS:
    return im2col_conv
  return None


def _shifted_windows(x: jax.Array, kernel_h: int, kernel_w: int, padding: Padding):
  """((dy, dx), window) for each kernel tap of a stride-1 convolution: the padded input under
  that tap, in (dy, dx) order, the order of an HWIO kernel's flattened taps."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = x.shape[1] - kernel_h + 1, x.shape[2] - kernel_w + 1
  return [((dy, dx), x[:, dy:dy + out_h, dx:dx + out_w, :])
          for dy in range(kernel_h) for dx in range(kernel_w)]


def _shift_and_add(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  kernel_h, kernel_w, in_features, _ = kernel.shape
  out = None
  for (dy, dx), window in _shifted_windows(x, kernel_h, kernel_w, padding):
    term = sum(window[..., c:c + 1] * kernel[dy, dx, c] for c in range(in_features))
    out = term if out is None else out + term
  return out


def _xla_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _shift_and_add_fwd(x, kernel, padding):
  return _shift_and_add(x, kernel, padding), (x, kernel)


def _shift_and_add_bwd(padding, residuals, grad):
  # The gradient of the sum of shifted products would be as many passes over the output
  # gradient as the kernel has taps; XLA's convolution gradients are faster.
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x, kernel: _xla_conv(x, kernel, padding), x, kernel)
  return vjp(grad)


shift_and_add_conv = jax.custom_vjp(_shift_and_add, nondiff_argnums=(2,))
shift_and_add_conv.defvjp(_shift_and_add_fwd, _shift_and_add_bwd)
shift_and_add_conv.__doc__ = """Stride-1 convolution of NHWC `x` with an HWIO `kernel` and explicit
`padding` ((top, bottom), (left, right)), as a sum of shifted products."""


def im2col_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """Stride-1 convolution of NHWC `x` with an HWIO `kernel` and explicit `padding`
  ((top, bottom), (left, right)), as one matrix product over the kernel-sized patches."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  # Patch features in (dy, dx, channel) order, the order of the HWIO kernel's flattened rows.
  patches = jnp.concatenate(
      [window for _, window in _shifted_windows(x, kernel_h, kernel_w, padding)], axis=-1)
  return patches @ kernel.reshape(kernel_h * kernel_w * in_features, out_features)
