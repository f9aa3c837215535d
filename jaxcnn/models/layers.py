"""Small building blocks shared by the model zoo."""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn.models import cpu_conv


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """Non-overlapping `window` x `window` max-pooling of NHWC input (floor mode, like Keras and PyTorch).

  Values are those of `nnx.max_pool`; the computation depends on whether a gradient is taken,
  because XLA:CPU is fast at different formulations in each case (2-core CI machine, LeNet-5):

  * Without a gradient (evaluation) it is XLA's reduce-window. A reshape and a max would let XLA
    fuse the layer before it into the max's reduction, where it runs several times slower: the
    10,000 MNIST test images take 0.25 s against 0.6 s.
  * Under differentiation it is a reshape and a max forward, and an elementwise gradient
    (`_max_pool_bwd`): 13 ms per training step against 16 ms with reduce-window forward, and
    reduce-window's own gradient (a select-and-scatter) is about 10x slower still (41 ms against
    4 ms for a 128x28x28x32 batch). On ties the gradient is shared among the maximal elements
    (select-and-scatter gives it all to the first).

  On GPU every formulation fuses equally well. Rows and columns that do not fill a window are
  dropped, as floor-mode pooling does.
  """
  return _max_pool(x, window)


def _reduce_window_max(x: jax.Array, window: int) -> jax.Array:
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  size = (1, window, window, 1)
  return jax.lax.reduce_window(x, jnp.array(lowest, x.dtype), jax.lax.max, size, size, 'VALID')


def _windows(x: jax.Array, window: int) -> jax.Array:
  """NHWC `x` as (batch, out_h, window, out_w, window, channels), less the rows and columns
  that fill no window."""
  batch, height, width, channels = x.shape
  out_h, out_w = height // window, width // window
  x = x[:, :out_h * window, :out_w * window, :]
  return x.reshape(batch, out_h, window, out_w, window, channels)


def _reshape_max(x: jax.Array, window: int) -> jax.Array:
  return jnp.max(_windows(x, window), axis=(2, 4))


def _max_pool_fwd(x, window):  # Used only when differentiating: see max_pool.
  pooled = _reshape_max(x, window)
  return pooled, (x, pooled)


def _max_pool_bwd(window, residuals, grad):
  """`jnp.max`'s gradient (shared equally among tied maxima), with no reduction in it: the ties
  are counted tap by tap, so that XLA fuses the whole gradient into one elementwise loop. On the
  CPU that is twice as fast as differentiating `_reshape_max`, which recomputes the max and counts
  the ties with reductions (1.2 ms against 2.3 ms for LeNet-5's first pooling alone at batch 128),
  and bn_cnn's training step 1.5x as fast (6,300 against 4,200 images/s)."""
  x, pooled = residuals
  batch, height, width, channels = x.shape
  out_h, out_w = pooled.shape[1:3]
  windows = _windows(x, window)
  ties = sum((windows[:, :, i, :, j, :] == pooled).astype(grad.dtype)
             for i in range(window) for j in range(window))
  spread = lambda a: a[:, :, None, :, None, :]  # One value per window, to its every element.
  dx = jnp.where(windows == spread(pooled), spread(grad / ties), 0).astype(x.dtype)
  dx = dx.reshape(batch, out_h * window, out_w * window, channels)
  # The rows and columns that filled no window get no gradient.
  return (jnp.pad(dx, ((0, 0), (0, height - out_h * window), (0, width - out_w * window),
                       (0, 0))),)


_max_pool = jax.custom_vjp(_reduce_window_max, nondiff_argnums=(1,))
_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def strided_max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1
                     ) -> jax.Array:
  """`window` x `window` max-pooling of NHWC input at `stride`, after `padding` pixels of -inf on
  every side: the overlapping pooling of the ImageNet ResNets' stem (3x3, stride 2, padding 1).

  Values are exactly `nnx.max_pool`'s, and so are gradients up to the order of summation (in
  float32, also for bfloat16 input): a window's gradient goes to its first maximal element in
  row-major order, as with XLA's select-and-scatter and PyTorch.
  The gradient is computed without select-and-scatter, which XLA:GPU implements with atomic adds
  (their order varies from run to run) and refuses to compile under
  `--xla_gpu_deterministic_ops=true`. Here each of the window's taps contributes its share by
  elementwise compares and a strided `lax.pad`, which XLA fuses into one loop, in a fixed order.
  """
  return _strided_max_pool(x, window, stride, padding)


def _padded_reduce_window_max(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  return jax.lax.reduce_window(x, jnp.array(lowest, x.dtype), jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1),
                               ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _strided_max_pool_fwd(x, window, stride, padding):
  pooled = _padded_reduce_window_max(x, window, stride, padding)
  return pooled, (x, pooled)


def _strided_max_pool_bwd(window, stride, padding, residuals, grad):
  """Tap by tap in row-major order, the window's gradient goes to the first tap equal to its max;
  each tap's share is spread back onto the padded input's grid by a `lax.pad` with interior
  padding (the stride's gaps), and the padding is cut off at the end."""
  x, pooled = residuals
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=lowest)
  out_h, out_w = pooled.shape[1:3]
  padded_h, padded_w = padded.shape[1:3]
  grad = grad.astype(jnp.float32)  # An input element sums the shares of up to 4 windows.
  zero = jnp.zeros((), jnp.float32)
  taken = jnp.zeros(pooled.shape, bool)
  dx = jnp.zeros(padded.shape, jnp.float32)
  for i in range(window):
    for j in range(window):
      # The input elements tap (i, j) of every window reads: rows i, i + stride, ...
      tap = jax.lax.slice(padded, (0, i, j, 0),
                          (padded.shape[0], i + stride * (out_h - 1) + 1,
                           j + stride * (out_w - 1) + 1, padded.shape[3]),
                          (1, stride, stride, 1))
      first_max = (tap == pooled) & ~taken
      taken = taken | first_max
      share = jnp.where(first_max, grad, zero)
      dx = dx + jax.lax.pad(share, zero, ((0, 0, 0),
                                          (i, padded_h - i - stride * (out_h - 1) - 1, stride - 1),
                                          (j, padded_w - j - stride * (out_w - 1) - 1, stride - 1),
                                          (0, 0, 0)))
  height, width = x.shape[1:3]
  return (dx[:, padding:padding + height, padding:padding + width, :].astype(x.dtype),)


_strided_max_pool = jax.custom_vjp(_padded_reduce_window_max, nondiff_argnums=(1, 2, 3))
_strided_max_pool.defvjp(_strided_max_pool_fwd, _strided_max_pool_bwd)


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


class Conv(nnx.Conv):
  """`nnx.Conv` (same parameters, same results) with a faster CPU kernel for few input channels.

  On the CPU backend, a stride-1, undilated, ungrouped convolution of at most 8 input channels
  runs on one of `cpu_conv`'s kernels (see there for which, and the measurements); everything
  else, and every other backend, is `nnx.Conv` unchanged.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_fn = self._cpu_kernel(inputs)
    if kernel_fn is None:
      return super().__call__(inputs)
    kernel = self.kernel[...]
    padding = _explicit_padding(self.padding, kernel.shape[:2])
    dtype = self.dtype or inputs.dtype
    y = kernel_fn(inputs.astype(dtype), kernel.astype(dtype), padding)
    if self.bias is not None:
      y = cpu_conv.add_bias(y, self.bias[...].astype(y.dtype))
    return y

  def _cpu_kernel(self, inputs) -> Callable | None:
    """The CPU kernel this layer runs on for `inputs`, or None for XLA's own convolution."""
    if not (jax.default_backend() == 'cpu' and inputs.ndim == 4
            and _is_one(self.strides) and self.feature_group_count == 1
            and _is_one(self.input_dilation) and _is_one(self.kernel_dilation)
            and not self.mask and _explicit_padding(self.padding, self.kernel_size) is not None):
      return None
    return cpu_conv.kernel_for(self.in_features)


def _is_one(value) -> bool:
  return value is None or value == 1 or tuple(value) == (1, 1)  # Strides and dilations.


def _explicit_padding(padding, kernel_size):
  """((top, bottom), (left, right)) for 'SAME', 'VALID' or explicit pairs; None otherwise."""
  kernel_h, kernel_w = kernel_size
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  if padding == 'SAME':
    # As XLA pads: an even kernel's extra row and column go after, not before.
    return (((kernel_h - 1) // 2, kernel_h - 1 - (kernel_h - 1) // 2),
            ((kernel_w - 1) // 2, kernel_w - 1 - (kernel_w - 1) // 2))
  if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
      isinstance(p, (tuple, list)) and len(p) == 2 for p in padding):
    return tuple(tuple(int(v) for v in p) for p in padding)
  return None
