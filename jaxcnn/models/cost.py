"""A model's arithmetic: the multiply-adds of its convolutions and matrix products per image.

Beside the parameter count, this is the figure CNNs are compared by: ResNet-50 does 4.1 G
multiply-adds per 224x224 image, the "4.1 GFLOPs" of papers and of torchvision's model tables,
which count a multiply-add as one operation (as a FLOP count it is twice that, 8.2 GFLOP; a
training step is about three forward passes, the 24.6 GFLOP per image of the benchmarks' MFU).
Normalisation, activations and pooling are left out, as PyTorch's FlopCounterMode and fvcore
leave them out: a few percent of the total for these networks, and memory-bound anyway.

The count comes from the traced forward pass in evaluation mode, with shapes only: nothing is
initialised or run, so ResNet-152 costs a trace of a second or two. Every convolution is traced
as XLA's own, also on the CPU, where narrow layers otherwise run as `cpu_conv`'s elementwise
kernels with the same multiply-adds.
"""

from collections.abc import Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcnn.models import cpu_conv


def multiply_adds(model: nnx.Module, input_shape: Sequence[int]) -> int:
  """The multiply-adds of `model`'s convolutions and matrix products for one `input_shape`
  (H, W, C) image, in evaluation mode. `model` may be abstract (built under `nnx.eval_shape`);
  it is left in the mode it was in."""
  probe = nnx.merge(*nnx.split(model))  # A copy, so that model.eval() leaves `model` alone.
  probe.eval()
  graphdef, state = nnx.split(probe)
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with cpu_conv.xla_convolutions():
    jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, image)
  return jaxpr_multiply_adds(jaxpr.jaxpr)


def jaxpr_multiply_adds(jaxpr) -> int:
  """The multiply-adds of every convolution and matrix product in `jaxpr`, those of the jaxprs
  nested in it (under `jit`, `remat`, a loop's body) included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      # Each output element sums kernel height x width x (input channels / groups) products.
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(kernel)) // out_features
    elif eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += (int(np.prod(eqn.outvars[0].aval.shape))
                * int(np.prod([lhs[d] for d in contracting])))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += jaxpr_multiply_adds(sub)
  return total


def format_count(count: int) -> str:
  """`count` to three significant digits with an SI prefix: 4.11G, 40.8M, 1.2K, 512."""
  for factor, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
    if count >= 0.9995 * factor:  # 999,700 is 1.00M, not 1e+03K.
      return f'{count / factor:.3g}{prefix}'
  return str(count)
