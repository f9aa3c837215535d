"""XLA options per kind of program: what evaluation and prediction compile with on each backend.

XLA:CPU (jaxlib 0.10) hands a forward pass that computes no gradient wholesale to YNNPACK: its
fused elementwise operations, reductions and matrix products, down to broadcasting the kernel taps
of a convolution into full-size arrays. For the CNNs here that is several times slower than XLA's
own loops. Measured on the 2-core CI machine, LeNet-5 evaluating the 10,000 MNIST test images at
batch 250: 0.66 s with YNNPACK, 0.25 s without. Training steps keep it, because there it wins:
13 ms against 18 ms per LeNet-5 step of 128 images.
"""

import jax

_CPU_INFERENCE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}  # '': no YNNPACK fusions.


def inference_options() -> dict[str, str]:
  """Compiler options for programs that only run the model forward, on the default backend."""
  return dict(_CPU_INFERENCE_OPTIONS) if jax.default_backend() == 'cpu' else {}


def compile_lowered(lowered: jax.stages.Lowered, options: dict[str, str] | None) -> jax.stages.Compiled:
  """`lowered.compile(options)`, or without them where this jaxlib does not know one of them (the
  options above are experimental XLA flags and may be renamed), so that speed never costs a run."""
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if 'No such compile option' not in str(e):
      raise
    return lowered.compile()
