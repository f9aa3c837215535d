"""Checks in seconds that a machine can run the benchmark suite, before the suite spends its budget.

    python benchmarks/preflight.py [--platform gpu|cpu]      # default gpu

`benchmarks/on_device.sh` runs it first on a lent GPU machine, where one call of about ten minutes
is all there is. It imports JAX and then PyTorch, as `benchmarks/run.py` does (the first to load
the CUDA libraries decides their versions for both), and then:

* JAX's backend must be `--platform`; if not, it exits with status 1, as every figure of the suite
  would be a CPU's.
* Then it tries a bfloat16 convolution with its gradient in JAX and in PyTorch (on CUDA for a GPU),
  and looks for the C compiler that `torch.compile`'s Triton kernels need. What fails here is
  reported as a warning but does not stop the suite, which records every measurement that fails:
  a check wrong about this machine must not cost its one call.

It prints the versions behind the figures, then a line per problem, or that all is well.
"""

import os
import shutil
import traceback

# As in benchmarks/run.py: JAX must leave PyTorch its share of the GPU's memory.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from absl import flags

from jaxcnn import cli

_PLATFORM = flags.DEFINE_enum('platform', 'gpu', ['gpu', 'cpu'],
                              'Where JAX (and PyTorch) must compute.')


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'


def check_jax_platform(platform: str) -> str | None:
  """None if JAX computes on `platform`, else what is wrong, in one line."""
  backend = jax.default_backend()
  if backend != platform:
    return (f'JAX runs on {backend!r} ({jax.devices()}), not {platform!r}: its CUDA plugin did '
            'not start (see the log above), so every figure would be the CPU\'s')
  return None


def check_jax_convolution() -> str | None:
  """None if JAX runs a bfloat16 convolution and its gradient, else why not, in one line."""
  def loss(kernel, images):
    out = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(out.astype(jnp.float32))
  try:
    images = jnp.ones((8, 32, 32, 16), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 16, 16), jnp.bfloat16)
    jax.block_until_ready(jax.jit(jax.grad(loss))(kernel, images))
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    return f'JAX cannot run a bfloat16 convolution with its gradient: {_first_line(e)}'
  return None


def check_torch(platform: str) -> list[str]:
  """What stands in PyTorch's way on `platform` (empty if nothing), a line each."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return [f'PyTorch does not import: {_first_line(e)}']
  problems = []
  device = 'cuda' if platform == 'gpu' else 'cpu'
  if device == 'cuda' and not torch.cuda.is_available():
    return [f'PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device']
  try:
    weight = torch.ones(16, 16, 3, 3, device=device, requires_grad=True)
    images = torch.ones(8, 16, 32, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
      out = torch.nn.functional.conv2d(images, weight, padding=1)
    out.float().sum().backward()
    if device == 'cuda':
      torch.cuda.synchronize()
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    problems.append(f'PyTorch cannot run a bfloat16 convolution with its gradient: '
                    f'{_first_line(e)}')
  if device == 'cuda' and not any(shutil.which(cc) for cc in ('cc', 'gcc', 'clang')):
    problems.append('no C compiler (cc, gcc, clang) on PATH: torch.compile\'s Triton kernels '
                    'will fail, and PyTorch falls back to eager mode')
  return problems


def versions() -> str:
  """The versions behind the figures, in one line."""
  parts = [f'jax {jax.__version__}', f'devices {[d.device_kind for d in jax.devices()]}']
  try:
    import torch  # pylint: disable=g-import-not-at-top
    parts.append(f'torch {torch.__version__}')
    if torch.cuda.is_available():
      parts.append(f'torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')
  except ImportError:
    pass
  return ', '.join(parts)


def main(argv) -> None:
  del argv
  platform = _PLATFORM.value
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import  (before JAX's backend)
  except ImportError:
    pass
  wrong_platform = check_jax_platform(platform)
  if wrong_platform:
    raise SystemExit(f'preflight: error: {wrong_platform}')
  # Only a JAX on the wrong platform stops the suite: should a check below be wrong about this
  # machine, the suite still runs, and records what fails.
  problems = [problem for problem in (check_jax_convolution(), *check_torch(platform)) if problem]
  print(f'preflight: {versions()}')
  for problem in problems:
    print(f'preflight: warning: {problem}')
  print(f'preflight: JAX computes on {platform}' + ('' if problems else
                                                    '; its convolutions and PyTorch\'s run'))

if __name__ == '__main__':
  cli.run(main)
