"""A convolution kernel for XLA:CPU when a layer has at most 3 input channels.

XLA:CPU's convolutions are slow for the narrow first layer of small CNNs, whose one to three input
channels leave its kernels little to vectorise over. There a stride-1 convolution (NHWC input,
HWIO kernel) runs faster as shift-and-add: the output is a sum of shifted input windows times
kernel taps, which XLA fuses into one elementwise loop. Its gradients stay XLA's own (custom VJP).
Measured on the 2-core CI machine with a batch of 128: LeNet-5's first layer (1 -> 6 channels,
5x5, 28x28) runs its forward pass in 1.2 ms against 6.0 ms, and LeNet-5 trains at 12,300
images/s with this kernel against 8,500 without (train steps compiled with
`xla_options.training_options`).

Wider layers stay on XLA's convolution. An im2col kernel (one matrix product over the
kernel-sized patches) once won for LeNet-5's second layer (6 -> 16 channels) against YNNPACK's
convolutions. Against XLA's own (interleaved in one process, 12 rounds of 50 steps) it makes the
float32 step 7-15% faster (10% on a second machine, 0.96x to 1.21x paired) and the bfloat16 step
15% slower. Its 0.5 s of extra compile time is paid once (the persistent compilation cache keeps
the step), yet the whole one-epoch process did not measurably gain: 11.61 s against 11.86 s,
medians of 5 runs interleaved with the kernel and without, against a spread of 10.6 to 14.0 s.
For 16 channels (a CIFAR ResNet-20 stage) its patch matrix is many times the layer's activations
and it does not pay either.
"""

from typing import Callable

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
ConvKernel = Callable[[jax.Array, jax.Array, Padding], jax.Array]

SHIFT_AND_ADD_MAX_INPUT_CHANNELS = 3


def kernel_for(in_features: int) -> ConvKernel | None:
  """The faster CPU kernel for a layer with `in_features` input channels, or None for XLA's."""
  if in_features <= SHIFT_AND_ADD_MAX_INPUT_CHANNELS:
    return shift_and_add_conv
  return None


def _shift_and_add(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  kernel_h, kernel_w, in_features, _ = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = x.shape[1] - kernel_h + 1, x.shape[2] - kernel_w + 1
  out = None
  for dy in range(kernel_h):
    for dx in range(kernel_w):
      window = x[:, dy:dy + out_h, dx:dx + out_w, :]  # The padded input under tap (dy, dx).
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
