"""Convolution kernels for XLA:CPU for layers with few input channels.

XLA:CPU's convolutions are slow where a layer has few input channels: in the forward pass of the
narrow first layer of small CNNs, whose one to three input channels leave its kernels little to
vectorise over, and in the input gradient of any layer with few input channels, which is a
convolution with that few output channels. Two kernels replace them (stride 1, NHWC input, HWIO
kernel), both with XLA's own kernel gradient:

* At most 3 input channels (`shift_and_add_conv`): the forward pass is a sum of shifted input
  windows times kernel taps, which XLA fuses into one elementwise loop. Measured on the 2-core CI
  machine with a batch of 128: LeNet-5's first layer (1 -> 6 channels, 5x5, 28x28) runs its
  forward pass in 1.2 ms against 6.0 ms, and LeNet-5 trains at 12,300 images/s with this kernel
  against 8,500 without (train steps compiled with `xla_options.training_options`). Under
  differentiation its output is computed once (`computed_once`), not again in every fusion
  of the backward pass that reads it.
* At most 8 input channels (both kernels): the input gradient is one matrix product of the output
  gradient with the kernel, giving every tap's contribution, then the sum of those contributions
  shifted into place (col2im), again one elementwise loop. For LeNet-5's second layer (6 -> 16
  channels, 5x5, 14x14, batch 128) that is 1.4 ms against XLA's 3.3 ms, and LeNet-5 trains at
  12,700 images/s against 11,300 (2-core Intel Xeon machine, medians of 3 interleaved rounds).
  With 16 input channels (bn_cnn's second layer, 3x3) XLA's is faster: 1.6 ms against 2.7 ms.

Both kernels sum their products in float32 and round the result once to the layer's dtype, as
XLA's own convolution does, and cuDNN's: in bfloat16 their outputs matched XLA's to the bit and
their input gradients within half a unit in the last place (2-core AMD EPYC machine). Summed in
bfloat16, XLA:CPU rounded after every product and every sum (it has no bfloat16 arithmetic and
computes each operation in float32), which cost time as well as precision: LeNet-5 trains at
10,800 images/s in bfloat16 this way against 5,100 (2-core AMD EPYC machine, medians of 6
interleaved rounds of 40 steps at batch 128); ResNet-20 and the fast CIFAR network, whose only
narrow layer is the first, are unchanged within noise.

Wider layers stay on XLA's convolution. An im2col forward kernel (one matrix product over the
kernel-sized patches) once won for LeNet-5's second layer (6 -> 16 channels) against YNNPACK's
convolutions. Against XLA's own (interleaved in one process, 12 rounds of 50 steps) it makes the
float32 step 7-15% faster (10% on a second machine, 0.96x to 1.21x paired) and the bfloat16 step
15% slower. Its 0.5 s of extra compile time is paid once (the persistent compilation cache keeps
the step), yet the whole one-epoch process did not measurably gain: 11.61 s against 11.86 s,
medians of 5 runs interleaved with the kernel and without, against a spread of 10.6 to 14.0 s.
For 16 channels (a CIFAR ResNet-20 stage) its patch matrix is many times the layer's activations
and it does not pay either.
"""

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
ConvKernel = Callable[[jax.Array, jax.Array, Padding], jax.Array]

SHIFT_AND_ADD_MAX_INPUT_CHANNELS = 3
COL2IM_MAX_INPUT_CHANNELS = 8


_XLA_CONVOLUTIONS_ONLY = contextvars.ContextVar('xla_convolutions_only', default=False)


@contextlib.contextmanager
def xla_convolutions():
  """Within it, every layer traces XLA's own convolution, on the CPU too: for counting a model's
  convolutions (`cost.multiply_adds`), whose arithmetic these kernels spread over elementwise
  operations."""
  token = _XLA_CONVOLUTIONS_ONLY.set(True)
  try:
    yield
  finally:
    _XLA_CONVOLUTIONS_ONLY.reset(token)


def kernel_for(in_features: int) -> ConvKernel | None:
  """The faster CPU kernel for a layer with `in_features` input channels, or None for XLA's
  (always within `xla_convolutions`)."""
  if _XLA_CONVOLUTIONS_ONLY.get():
    return None
  if in_features <= SHIFT_AND_ADD_MAX_INPUT_CHANNELS:
    return shift_and_add_conv
  if in_features <= COL2IM_MAX_INPUT_CHANNELS:
    return col2im_gradient_conv
  return None


def _shift_and_add(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  kernel_h, kernel_w, in_features, _ = kernel.shape
  dtype = x.dtype
  x, kernel = _accumulator(x), _accumulator(kernel)
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = x.shape[1] - kernel_h + 1, x.shape[2] - kernel_w + 1
  out = None
  for dy in range(kernel_h):
    for dx in range(kernel_w):
      window = x[:, dy:dy + out_h, dx:dx + out_w, :]  # The padded input under tap (dy, dx).
      term = sum(window[..., c:c + 1] * kernel[dy, dx, c] for c in range(in_features))
      out = term if out is None else out + term
  return out.astype(dtype)


def _accumulator(x: jax.Array) -> jax.Array:
  """`x` in float32 where it is narrower (bfloat16, float16), for the sums of products these
  kernels compute (see the module's docstring)."""
  return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def _xla_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _col2im_input_gradient(grad: jax.Array, kernel: jax.Array, input_shape,
                           padding: Padding) -> jax.Array:
  """The gradient of a stride-1 convolution with respect to its input, as a matrix product and
  the sum of its shifted columns (see the module's docstring)."""
  kernel_h, kernel_w = kernel.shape[:2]
  _, height, width, _ = input_shape
  out_h, out_w = grad.shape[1:3]
  (top, bottom), (left, right) = padding
  padded_h, padded_w = height + top + bottom, width + left + right
  # Each output position's gradient spread over the input positions under each tap.
  columns = jnp.einsum('bhwo,yxio->bhwyxi', grad, kernel,
                       preferred_element_type=_accumulator(grad).dtype)
  total = sum(jnp.pad(columns[:, :, :, dy, dx, :],
                      ((0, 0), (dy, padded_h - out_h - dy), (dx, padded_w - out_w - dx), (0, 0)))
              for dy in range(kernel_h) for dx in range(kernel_w))
  # The padding gets no gradient.
  return total[:, top:top + height, left:left + width, :].astype(grad.dtype)


@jax.custom_vjp
def computed_once(y: jax.Array) -> jax.Array:
  """`y` unchanged, through an identity gather over its channels, so that XLA computes it once;
  its gradient passes through unchanged.

  XLA fuses a producer of cheap elementwise operations into every fusion that reads it, and
  recomputes it in each: under differentiation LeNet-5's first-layer sum was computed four times
  per step, once for the layer after it and again in three fusions of the backward pass (the
  pooling gradient, its spreading over the pooling windows, the copy the kernel gradient reads).
  XLA never duplicates a gather, so the gather's own fusion computes the sum once and every reader
  reads it. LeNet-5 trains at 16,400 images/s against 13,500 in float32 (medians of 3 rounds
  interleaved with the sum left to XLA) and at 6,200 to 6,500 against 3,600 to 3,700 in bfloat16
  (2 rounds), on the 2-core Intel Xeon machine; `bn_cnn`, whose first layer has 9 taps, is
  unchanged within noise. `lax.optimization_barrier` does not help: XLA:CPU removes barriers
  before fusion. The gather runs over channels, not the batch, which the `jit` strategy shards:
  one over the batch made it all-gather the whole layer between devices. Its gradient is the
  identity, not the gather's own: that is a scatter, with which ResNet-20's traced step took
  0.56 s against 0.52 s without any gather and 0.49 s with this one (`resnet.residual_output`).
  """
  return y[..., jnp.arange(y.shape[-1])]


def _computed_once_forward(y):
  return computed_once(y), None


def _computed_once_backward(_, grad):
  return (grad,)


computed_once.defvjp(_computed_once_forward, _computed_once_backward)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` (one dtype) over `y`'s last axis, its bias gradient summed in float32 and
  rounded once.

  Differentiated as a plain sum, a bfloat16 bias gradient is a bfloat16 reduction. XLA:CPU
  splits that into windows of 32 examples, where it hands a float32 one to YNNPACK: for LeNet-5's
  first layer a 1.6 ms reduce-window in an 11.7 ms step, whose sums missed the exact ones by up
  to hundreds of bfloat16 units. Summed in float32, LeNet-5 trains at 13,500 images/s in
  bfloat16 against 11,300 (2-core AMD EPYC machine, medians of 6 interleaved rounds of 100 steps
  at batch 128). In float32 it is the plain sum's gradient.
  """
  return y + bias


def _add_bias_forward(y, bias):
  return y + bias, None


def _add_bias_backward(_, grad):
  bias_grad = jnp.sum(_accumulator(grad), axis=tuple(range(grad.ndim - 1)))
  return grad, bias_grad.astype(grad.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def _forward(conv):
  def forward(x, kernel, padding):
    return conv(x, kernel, padding), (x, kernel)
  return forward


def _shift_and_add_once(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return computed_once(_shift_and_add(x, kernel, padding))


def _backward(padding, residuals, grad):
  # The kernel gradient stays XLA's: differentiating the sum of shifted products would take as
  # many passes over the output gradient as the kernel has taps.
  x, kernel = residuals
  _, kernel_vjp = jax.vjp(lambda kernel: _xla_conv(x, kernel, padding), kernel)
  return _col2im_input_gradient(grad, kernel, x.shape, padding), kernel_vjp(grad)[0]


shift_and_add_conv = jax.custom_vjp(_shift_and_add, nondiff_argnums=(2,))
shift_and_add_conv.defvjp(_forward(_shift_and_add_once), _backward)
shift_and_add_conv.__doc__ = """Stride-1 convolution of NHWC `x` with an HWIO `kernel` and explicit
`padding` ((top, bottom), (left, right)), as a sum of shifted products."""

col2im_gradient_conv = jax.custom_vjp(_xla_conv, nondiff_argnums=(2,))
col2im_gradient_conv.defvjp(_forward(_xla_conv), _backward)
col2im_gradient_conv.__doc__ = """Stride-1 convolution of NHWC `x` with an HWIO `kernel` and
explicit `padding`: XLA's, with its input gradient computed as col2im."""
