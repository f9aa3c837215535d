"""Small building blocks shared by the model zoo."""

import jax
import jax.numpy as jnp
from flax import nnx


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """Non-overlapping `window` x `window` max-pooling of NHWC input (floor mode, like Keras and PyTorch).

  Written as a reshape and a max instead of `nnx.max_pool`: the gradient of XLA's reduce-window max
  is a select-and-scatter that runs about 10x slower on CPU (41 ms against 4 ms for a 128x28x28x32
  batch on the 2-core CI machine), while on GPU both fuse equally well. Rows and columns that do not
  fill a window are dropped, as floor-mode pooling does.
  """
  batch, height, width, channels = x.shape
  out_h, out_w = height // window, width // window
  x = x[:, :out_h * window, :out_w * window, :]
  x = x.reshape(batch, out_h, window, out_w, window, channels)
  return jnp.max(x, axis=(2, 4))


def flatten(x: jax.Array) -> jax.Array:
  """Flattens every axis but the batch axis."""
  return x.reshape(x.shape[0], -1)


def conv_output_size(size: int, kernel: int, padding: str) -> int:
  """Spatial size after a stride-1 convolution with 'SAME' or 'VALID' padding."""
  return size if padding == 'SAME' else size - kernel + 1


def conv_bn_relu(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs,
                 kernel_size: int = 3, axis_name: str | None = None) -> nnx.Sequential:
  """A bias-free 'SAME' convolution followed by BatchNorm and ReLU."""
  return nnx.Sequential(
      Conv(in_features, out_features, (kernel_size, kernel_size), padding='SAME',
           use_bias=False, dtype=dtype, rngs=rngs),
      nnx.BatchNorm(out_features, momentum=0.9, dtype=dtype, axis_name=axis_name, rngs=rngs),
      nnx.relu,
  )


# A shift-and-add convolution beats XLA:CPU's for few input channels: for LeNet-5's first layer
# (1 -> 6 channels, 5x5, 128 x 28x28 images) 1.8 ms against 7.5 ms on the 2-core CI machine,
# which is a quarter of its whole training step. Gradients stay XLA's own.
_SHIFT_CONV_MAX_INPUT_CHANNELS = 3


def _shift_and_add(x, kernel, padding):
  """Stride-1 convolution of NHWC `x` with an HWIO `kernel` as a sum of shifted products."""
  kernel_h, kernel_w, in_features, _ = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = x.shape[1] - kernel_h + 1, x.shape[2] - kernel_w + 1
  out = None
  for dy in range(kernel_h):
    for dx in range(kernel_w):
      window = x[:, dy:dy + out_h, dx:dx + out_w, :]
      term = sum(window[..., c:c + 1] * kernel[dy, dx, c] for c in range(in_features))
      out = term if out is None else out + term
  return out


def _lax_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _shift_and_add_conv_fwd(x, kernel, padding):
  return _shift_and_add(x, kernel, padding), (x, kernel)


def _shift_and_add_conv_bwd(padding, residuals, grad):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x, kernel: _lax_conv(x, kernel, padding), x, kernel)
  return vjp(grad)


_shift_and_add_conv = jax.custom_vjp(_shift_and_add, nondiff_argnums=(2,))
_shift_and_add_conv.defvjp(_shift_and_add_conv_fwd, _shift_and_add_conv_bwd)


class Conv(nnx.Conv):
  """`nnx.Conv` (same parameters, same results) with a faster CPU kernel for few input channels.

  On the CPU backend, a stride-1, undilated, ungrouped convolution of at most 3 input channels
  (a first layer on grayscale or RGB images) runs as a sum of shifted products; everything else,
  and every other backend, is `nnx.Conv` unchanged.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self._use_shift_and_add(inputs):
      return super().__call__(inputs)
    kernel = self.kernel[...]
    padding = _explicit_padding(self.padding, kernel.shape[:2])
    dtype = self.dtype or inputs.dtype
    y = _shift_and_add_conv(inputs.astype(dtype), kernel.astype(dtype), padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y

  def _use_shift_and_add(self, inputs) -> bool:
    return (jax.default_backend() == 'cpu' and inputs.ndim == 4
            and self.in_features <= _SHIFT_CONV_MAX_INPUT_CHANNELS
            and _is_one(self.strides) and self.feature_group_count == 1
            and _is_one(self.input_dilation) and _is_one(self.kernel_dilation)
            and not self.mask and _explicit_padding(self.padding, self.kernel_size) is not None)


def _is_one(value) -> bool:
  return value is None or value == 1 or tuple(value) == (1, 1)  # Strides and dilations.


def _explicit_padding(padding, kernel_size):
  """((top, bottom), (left, right)) for 'SAME', 'VALID' or explicit pairs; None otherwise."""
  kernel_h, kernel_w = kernel_size
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  if padding == 'SAME':
    return ((kernel_h // 2, kernel_h - 1 - kernel_h // 2),
            (kernel_w // 2, kernel_w - 1 - kernel_w // 2))
  if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
      isinstance(p, (tuple, list)) and len(p) == 2 for p in padding):
    return tuple(tuple(int(v) for v in p) for p in padding)
  return None
