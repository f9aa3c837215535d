"""XLA options per kind of program: what training and inference compile with on each backend.

XLA:CPU (jaxlib 0.10) hands parts of a program to YNNPACK: by default single convolutions, single
matrix products and reductions. For the CNNs here that loses twice, measured on the 2-core CI
machine (XLA_FLAGS A/B runs, then these options):

* Training: YNNPACK's convolutions are slower than XLA's own. Without them (matrix products and
  reductions stay with YNNPACK) a training step is up to 2.4x faster: images/s at the suite's CPU
  batch sizes, float32 / bfloat16, LeNet-5 8,500 -> 11,100 / 2,640 -> 2,540 (same within noise),
  CIFAR ResNet-20 178 -> 245 / 194 -> 299, the fast CIFAR network 101 -> 173 / 66 -> 161,
  ResNet-50 at 224x224 2.0 -> 2.9 / 1.6 -> 3.5.
* Inference (a forward pass with no gradient): there YNNPACK also takes fused elementwise work,
  down to broadcasting the kernel taps of a convolution into full-size arrays, and XLA's own loops
  win with no YNNPACK fusion at all. A forward pass of 250 images: LeNet-5 15 -> 5.5 ms (14.5 ms
  with the training options), ResNet-20 254 -> 209 ms, the fast CIFAR network 477 -> 396 ms.

Other backends compile with XLA's defaults.
"""

import jax

_YNN_FUSIONS = 'xla_cpu_experimental_ynn_fusion_type'
# XLA:CPU's default YNNPACK fusions less single convolutions (names as the option takes them).
_CPU_TRAINING_OPTIONS = {
    _YNN_FUSIONS: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
_CPU_INFERENCE_OPTIONS = {_YNN_FUSIONS: ''}  # '': no YNNPACK fusions.


def training_options() -> dict[str, str]:
  """Compiler options for train steps, on the default backend."""
  return dict(_CPU_TRAINING_OPTIONS) if jax.default_backend() == 'cpu' else {}


def inference_options() -> dict[str, str]:
  """Compiler options for programs that only run the model forward, on the default backend."""
  return dict(_CPU_INFERENCE_OPTIONS) if jax.default_backend() == 'cpu' else {}


def compile_lowered(lowered: jax.stages.Lowered,
                    options: dict[str, str] | None) -> jax.stages.Compiled:
  """`lowered.compile(options)`, or without them where this jaxlib does not know one of them or
  one of their values (the options above are experimental XLA flags and may be renamed), so that
  speed never costs a run."""
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    unknown = ('No such compile option', 'not a valid enum value')
    if not any(message in str(e) for message in unknown):
      raise
    return lowered.compile()
