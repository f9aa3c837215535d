"""Measuring a config's training throughput: the shared part of the benchmark scripts.

`measure_throughput` runs a config's real compiled train function (model, optimizer, augmentation,
parallel strategy, steps per call) on synthetic uint8 images of the dataset's shape held in device
memory, so the input pipeline is not measured and no dataset needs to be prepared.
"""

import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxcnn import config as config_lib, parallel, xla_options
from jaxcnn.data import device_data, pipeline
from jaxcnn.errors import UserError
from jaxcnn.models import cost
from jaxcnn.trainer import build_experiment, default_steps_per_call

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_description() -> dict:
  """What the numbers were measured on."""
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'devices_available': jax.device_count(), 'host': platform.node(),
          'jax': jax.__version__, 'python': platform.python_version()}


def emit_json(result: dict, output: str | None) -> None:
  """Prints `result` as JSON and, where `output` names a file, writes it there too (making its
  folder)."""
  text = json.dumps(result, indent=2)
  if output:
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    with open(output, 'w', encoding='utf-8') as f:
      f.write(text + '\n')
  print(text)


# About the mean and standard deviation of uniform uint8 noise (127.5 and 73.9), so that synthetic
# pixels are normalised to roughly zero mean and unit variance, as real ones are.
_SYNTHETIC_MEAN, _SYNTHETIC_STD = 127.5, 73.9


def dataset_shape(config) -> tuple[tuple[int, ...], int]:
  """(image_shape, num_classes) the config's model trains on, from metadata (no image is read)."""
  return pipeline.input_spec(config)


def training_only(config):
  """A copy of `config` whose evaluation batch is its training batch: the benchmarks never
  evaluate, so the config's own (MNIST's 1000, say) is no reason to refuse a device count that
  does not split it."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval_batch_size = config.batch_size
  return config


def build_synthetic_experiment(config, image_shape, num_classes: int, num_train_examples: int,
                               strategy):
  """`trainer.build_experiment` for synthetic uint8 data: the real model, optimizer and step."""
  channels = image_shape[-1]
  return build_experiment(
      config, image_shape=tuple(image_shape), num_classes=num_classes,
      num_train_examples=num_train_examples, mean=(_SYNTHETIC_MEAN,) * channels,
      std=(_SYNTHETIC_STD,) * channels, strategy=strategy)


def measure_throughput(config, steps: int, repeats: int, image_shape=None,
                       num_classes: int | None = None) -> dict:
  """Compile time and steady-state steps/s of `config`'s train function on synthetic data.

  `image_shape` and `num_classes` default to those of `config.dataset` from its TFDS metadata.
  A batch that does not fit in device memory is a UserError naming it, not XLA's traceback.
  """
  config = training_only(config)
  config_lib.validate(config)
  if image_shape is None or num_classes is None:
    image_shape, num_classes = dataset_shape(config)
  strategy = parallel.make_strategy(config.parallel, config.num_devices)
  try:
    return _measure(config, strategy, steps, repeats, tuple(image_shape), num_classes)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    raise UserError(f'{config.model} at a global batch of {config.batch_size} on '
                    f'{strategy.num_devices} {jax.default_backend()} device(s) does not fit in '
                    'device memory (RESOURCE_EXHAUSTED); measure a smaller batch') from None


def _measure(config, strategy, steps: int, repeats: int, image_shape, num_classes: int) -> dict:
  """`measure_throughput` of a checked config."""
  steps_per_call = (config.steps_per_call if config.steps_per_call > 0
                    else default_steps_per_call(jax.default_backend()))
  steps = max(steps // steps_per_call, 1) * steps_per_call
  num_examples = config.batch_size * steps
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  experiment, state = build_synthetic_experiment(config, image_shape, num_classes, num_examples,
                                                 strategy)
  split = strategy.replicate(device_data.pad_split(images, labels))
  permutation = strategy.permutation(config.seed, 0, num_examples)
  sums = experiment.zero_train_sums()
  seed = strategy.scalar(config.seed)

  start = time.perf_counter()
  train_fn = strategy.compile(experiment.train_fn, state, sums, seed, split, permutation,
                              strategy.scalar(0), static=(steps_per_call,),
                              options=xla_options.training_options())
  compile_seconds = time.perf_counter() - start

  def run_steps(state, sums):
    for first in range(0, steps, steps_per_call):
      # The step index as training passes it (DeviceTrainFeed), so that its cost is measured too.
      state, sums = train_fn(state, sums, seed, split, permutation, strategy.scalar(first))
    jax.block_until_ready((state, sums))
    return state, sums

  state, sums = run_steps(state, sums)  # Warm-up: first-run allocations and autotuning.
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, sums = run_steps(state, sums)
    seconds.append(time.perf_counter() - start)
  steps_per_sec = [steps / s for s in seconds]
  # Traced, not run: the state's global arrays will do, without a copy to the host.
  global_state = strategy.unreplicate(state)
  multiply_adds = cost.multiply_adds(
      experiment.model_def.merge(global_state.params, global_state.model_state), image_shape)
  return {
      'model': config.model, 'dataset': config.dataset, 'image_shape': list(image_shape),
      'batch_size': config.batch_size, 'dtype': config.dtype, 'parallel': strategy.name,
      'num_devices': strategy.num_devices, 'steps_per_call': steps_per_call,
      'compile_seconds': compile_seconds, 'steps_timed': steps, 'repeats': repeats,
      'steps_per_sec': statistics.median(steps_per_sec),
      'steps_per_sec_min': min(steps_per_sec), 'steps_per_sec_max': max(steps_per_sec),
      'examples_per_sec': statistics.median(steps_per_sec) * config.batch_size,
      'examples_per_sec_min': min(steps_per_sec) * config.batch_size,
      'examples_per_sec_max': max(steps_per_sec) * config.batch_size,
      # The model's arithmetic rate: a training step as three forward passes (less with frozen
      # layers), 2 FLOP per multiply-add, as the suite's ResNet-50 MFU counts it.
      'multiply_adds_per_example': multiply_adds,
      'model_tflops_per_sec': (6 * multiply_adds * statistics.median(steps_per_sec)
                               * config.batch_size / 1e12),
  }
