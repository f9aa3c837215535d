"""The PyTorch reference of jaxcnn's benchmark suite: the same models, trained the same way.

  python benchmarks/torch_reference.py throughput --model lenet5 --batch_size 128 \
      --dtype float32 --steps 50 --repeats 3 [--compile] [--device cpu|cuda] [--threads N]
  python benchmarks/torch_reference.py mnist-epoch --mnist_dir DIR [--threads N]

Each command prints one JSON object. The module is self-contained (torch, numpy and the standard
library; no torchvision, no jaxcnn) so that it measures PyTorch alone, and it mirrors jaxcnn's
architectures layer for layer; `build_model` gives models whose parameter counts equal jaxcnn's:

  lenet5          28x28x1,   10 classes       61,706
  cifar_resnet20  32x32x3,   10 classes      269,722
  airbench        32x32x3,   10 classes    1,971,640
  resnet50        224x224x3, 1000 classes 25,557,032

Models are NCHW modules that run in `torch.channels_last` memory format. Initialisation follows
jaxcnn where it shapes training (He-normal fan-out residual convolutions, zero-initialised last
BatchNorm scale of each residual block) and PyTorch's defaults elsewhere.

`throughput` times steady-state training steps (uint8 NHWC batch already on the device ->
normalise -> NCHW channels_last -> forward -> cross-entropy -> backward -> SGD with momentum and
weight decay), as jaxcnn's benchmarks/throughput.py does for jaxcnn. `mnist-epoch` trains LeNet-5
for one epoch on the official MNIST files in eager mode on the CPU and evaluates it.

Errors (unknown model, missing files, bad arguments) print one line on stderr and exit with
status 2. A failure of torch.compile is not an error of the command: it is reported in the JSON
object's 'error' field.
"""

import time

# The process's start, as near as Python lets us see it: the caller times the whole process from
# outside, and the JSON says how much of that time went into importing torch.
_MODULE_START = time.perf_counter()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import gzip
import json
import os
import platform
import statistics
import struct
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_TORCH_IMPORT_S = time.perf_counter() - _MODULE_START

# Input shape (height, width, channels) and class count of each model's benchmark.
MODEL_SHAPES = {
    'lenet5': (28, 28, 1, 10),
    'cifar_resnet20': (32, 32, 3, 10),
    'airbench': (32, 32, 3, 10),
    'resnet50': (224, 224, 3, 1000),
}

# jaxcnn's parameter counts for the shapes of MODEL_SHAPES (see jaxcnn/models/).
EXPECTED_PARAMS = {
    'lenet5': 61_706,
    'cifar_resnet20': 269_722,
    'airbench': 1_971_640,
    'resnet50': 25_557_032,
}

# Fixed input normalisation of the synthetic benchmark data: (x / 255 - 0.5) / 0.25.
_INPUT_MEAN = 0.5
_INPUT_STD = 0.25

_SEED = 0


# ------------------------------------------------------------------------------------------------
# Models.


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and max-pooling, as jaxcnn's `LeNet5`.

  conv 6@5x5 SAME -> pool -> conv 16@5x5 VALID -> pool -> 120 -> 84 -> classes.
  """

  def __init__(self, num_classes: int = 10, input_shape=(28, 28, 1)):
    super().__init__()
    height, width, channels = input_shape
    self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)  # 'SAME' for a stride-1 5x5 kernel.
    self.conv2 = nn.Conv2d(6, 16, 5)
    out_h, out_w = (height // 2 - 4) // 2, (width // 2 - 4) // 2
    self.fc1 = nn.Linear(out_h * out_w * 16, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = torch.flatten(x, 1)
    x = F.relu(self.fc1(x))
    x = F.relu(self.fc2(x))
    return self.fc3(x)


def _residual_conv(in_channels: int, out_channels: int, kernel_size: int,
                   stride: int = 1) -> nn.Conv2d:
  """A bias-free convolution padded by kernel_size // 2, He-normal (fan-out) as in jaxcnn."""
  conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                   padding=kernel_size // 2, bias=False)
  nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
  return conv


def _batch_norm(channels: int, zero_scale: bool = False) -> nn.BatchNorm2d:
  """PyTorch's default BatchNorm (as jaxcnn's ResNets); `zero_scale` starts its scale at zero."""
  bn = nn.BatchNorm2d(channels)
  if zero_scale:
    nn.init.zeros_(bn.weight)
  return bn


class _PaddingShortcut(nn.Module):
  """Option A shortcut: subsamples by `stride` and appends zero channels; no parameters."""

  def __init__(self, in_channels: int, out_channels: int, stride: int):
    super().__init__()
    self.stride = stride
    self.extra_channels = out_channels - in_channels

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x[:, :, ::self.stride, ::self.stride]
    # F.pad pads the last dimension first: (W, W, H, H, C, C); the new channels go at the end.
    return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
  """Two 3x3 convolutions and a residual connection (the CIFAR ResNets)."""

  expansion = 1

  def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = 'A'):
    super().__init__()
    self.conv1 = _residual_conv(in_channels, channels, 3, stride)
    self.bn1 = _batch_norm(channels)
    self.conv2 = _residual_conv(channels, channels, 3)
    self.bn2 = _batch_norm(channels, zero_scale=True)
    self.shortcut = _make_shortcut(in_channels, channels, stride, shortcut)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class _Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride: ResNet v1.5), 1x1 expand by 4, residual connection."""

  expansion = 4

  def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = 'B'):
    super().__init__()
    out_channels = channels * self.expansion
    self.conv1 = _residual_conv(in_channels, channels, 1)
    self.bn1 = _batch_norm(channels)
    self.conv2 = _residual_conv(channels, channels, 3, stride)
    self.bn2 = _batch_norm(channels)
    self.conv3 = _residual_conv(channels, out_channels, 1)
    self.bn3 = _batch_norm(out_channels, zero_scale=True)
    self.shortcut = _make_shortcut(in_channels, out_channels, stride, shortcut)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + self.shortcut(x))


def _make_shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
  """Identity where the shape is kept, else option A (padding) or B (1x1 projection + BN)."""
  if stride == 1 and in_channels == out_channels:
    return nn.Identity()
  if kind == 'A':
    return _PaddingShortcut(in_channels, out_channels, stride)
  if kind == 'B':
    return nn.Sequential(_residual_conv(in_channels, out_channels, 1, stride),
                         _batch_norm(out_channels))
  raise ValueError(f"shortcut must be 'A' or 'B', got {kind!r}")


def _make_stages(block_cls, in_channels: int, widths, stage_sizes, strides,
                 shortcut: str) -> tuple[nn.Sequential, int]:
  """Stages of residual blocks, the first block of each carrying the stage's stride."""
  stages = []
  for width, num_blocks, stride in zip(widths, stage_sizes, strides):
    blocks = []
    for i in range(num_blocks):
      blocks.append(block_cls(in_channels, width, stride if i == 0 else 1, shortcut))
      in_channels = width * block_cls.expansion
    stages.append(nn.Sequential(*blocks))
  return nn.Sequential(*stages), in_channels


class CifarResNet(nn.Module):
  """The CIFAR ResNet of He et al. 2016 (section 4.2) with option A shortcuts, as jaxcnn's."""

  def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, input_channels: int = 3):
    super().__init__()
    self.stem_conv = _residual_conv(input_channels, 16, 3)
    self.stem_bn = _batch_norm(16)
    self.stages, channels = _make_stages(_BasicBlock, 16, (16, 32, 64), (blocks_per_stage,) * 3,
                                         (1, 2, 2), shortcut='A')
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    x = self.stages(x)
    return self.fc(torch.mean(x, dim=(2, 3)))


class ResNet(nn.Module):
  """ResNet v1.5 in torchvision's layout (7x7/2 stem, 3x3/2 max-pool, four stages), as jaxcnn's."""

  def __init__(self, block_cls=_Bottleneck, stage_sizes=(3, 4, 6, 3), num_classes: int = 1000,
               input_channels: int = 3):
    super().__init__()
    self.stem_conv = _residual_conv(input_channels, 64, 7, 2)
    self.stem_bn = _batch_norm(64)
    self.stages, channels = _make_stages(block_cls, 64, (64, 128, 256, 512), stage_sizes,
                                         (1, 2, 2, 2), shortcut='B')
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    x = self.stages(x)
    return self.fc(torch.mean(x, dim=(2, 3)))


class _ShiftOnlyBatchNorm(nn.BatchNorm2d):
  """BatchNorm whose scale is fixed at 1 and whose shift (bias) alone is learned, as in airbench.

  The scale stays a tensor, held as a buffer: it is then neither a parameter (not trained, not
  counted, no weight decay) nor missing from the call, since cuDNN's batch norm kernel is used only
  when a weight tensor is passed.
  """

  def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-5):
    super().__init__(num_features, eps=eps, momentum=momentum)
    del self.weight
    self.register_buffer('weight', torch.ones(num_features))


class _AirBenchGroup(nn.Module):
  """conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU, without a residual."""

  def __init__(self, in_channels: int, channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
    self.bn1 = _ShiftOnlyBatchNorm(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.bn2 = _ShiftOnlyBatchNorm(channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Pooling before the norm halves the work of the norm and the activation (as jaxcnn does).
    x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)), approximate='tanh')
    return F.gelu(self.bn2(self.conv2(x)), approximate='tanh')


class AirBench(nn.Module):
  """jaxcnn's airbench94-style network: 2x2 whitening conv, three conv groups, max-pool head.

  The first convolution keeps PyTorch's default initialisation (jaxcnn can set it from the data
  to whiten patches; that changes no shapes and no cost).
  """

  def __init__(self, num_classes: int = 10, input_channels: int = 3, widths=(64, 256, 256),
               logit_scale: float = 1 / 9):
    super().__init__()
    channels = 2 * 4 * input_channels
    self.whiten = nn.Conv2d(input_channels, channels, 2, bias=True)
    groups = []
    for width in widths:
      groups.append(_AirBenchGroup(channels, width))
      channels = width
    self.groups = nn.Sequential(*groups)
    self.head = nn.Linear(channels, num_classes, bias=False)
    self.logit_scale = logit_scale

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.gelu(self.whiten(x), approximate='tanh')
    x = self.groups(x)
    x = torch.amax(x, dim=(2, 3))
    return self.head(x) * self.logit_scale


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
  """A freshly initialised model by name, for the input shape of `MODEL_SHAPES[name]`.

  Args:
    name: one of `MODEL_SHAPES`.
    num_classes: the classifier's size; defaults to that of `MODEL_SHAPES[name]`.

  Returns:
    The model on the CPU, in float32 and the default (contiguous) memory format.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODEL_SHAPES:
    raise ValueError(f'unknown model {name!r}; choose from {", ".join(MODEL_SHAPES)}')
  height, width, channels, default_classes = MODEL_SHAPES[name]
  num_classes = default_classes if num_classes is None else num_classes
  if name == 'lenet5':
    return LeNet5(num_classes, (height, width, channels))
  if name == 'cifar_resnet20':
    return CifarResNet(3, num_classes, channels)
  if name == 'airbench':
    return AirBench(num_classes, channels)
  return ResNet(_Bottleneck, (3, 4, 6, 3), num_classes, channels)


def count_params(model: nn.Module) -> int:
  """The number of trainable parameters (what jaxcnn counts as `nnx.Param`s)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Throughput.


def _resolve_device(device: str | None) -> torch.device:
  """'cpu', 'cuda' (or 'cuda:N'), or None for CUDA where available."""
  if device is None:
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  device = torch.device(device)
  if device.type == 'cuda' and not torch.cuda.is_available():
    raise ValueError('device cuda was asked for, but torch sees no CUDA device '
                     f'(torch {torch.__version__})')
  if device.type not in ('cpu', 'cuda'):
    raise ValueError(f'device must be cpu or cuda, got {device}')
  return device


def _synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


@contextlib.contextmanager
def _torch_settings(device: torch.device, threads: int | None, tf32: bool):
  """Sets the thread count and the CUDA flags for one measurement, then restores them.

  Restoring keeps one measurement's settings from leaking into the next when a suite runs many in
  one process (and into other tests).
  """
  saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark,
           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  try:
    if threads:
      torch.set_num_threads(threads)
    if device.type == 'cuda':
      # Autotuned convolution algorithms: the input shape never changes.
      torch.backends.cudnn.benchmark = True
      # JAX's default float32 precision on GPUs lets XLA use TF32 for both convolutions and
      # matmuls; PyTorch allows it for convolutions only unless told.
      torch.backends.cuda.matmul.allow_tf32 = tf32
      torch.backends.cudnn.allow_tf32 = tf32
    yield
  finally:
    torch.set_num_threads(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.backends.cuda.matmul.allow_tf32 = saved[2]
    torch.backends.cudnn.allow_tf32 = saved[3]


def _to_model_input(images: torch.Tensor) -> torch.Tensor:
  """uint8 NHWC -> normalised float32 NCHW, channels_last in memory.

  Permuting a contiguous NHWC tensor to NCHW yields exactly channels_last strides, so no copy is
  made beyond the float conversion.
  """
  x = images.permute(0, 3, 1, 2).float()
  x = (x * (1 / (255 * _INPUT_STD)) - _INPUT_MEAN / _INPUT_STD)
  return x.contiguous(memory_format=torch.channels_last)


def _make_sgd(model: nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
  """The benchmark's SGD, and whether it is PyTorch's fused CUDA kernel (one launch for every
  parameter; what a PyTorch user on a GPU would choose), where this PyTorch has one. Weight decay
  spares biases and BatchNorm's parameters, as jaxcnn's does (`optim`)."""
  parameters = list(model.parameters())
  groups = [{'params': [p for p in parameters if p.ndim > 1]},
            {'params': [p for p in parameters if p.ndim <= 1], 'weight_decay': 0.0}]
  settings = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
  if device.type == 'cuda':
    try:
      return torch.optim.SGD(groups, fused=True, **settings), True
    except (TypeError, RuntimeError):  # A PyTorch without fused SGD.
      pass
  return torch.optim.SGD(groups, **settings), False


def _make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                     device_type: str, bfloat16: bool, compile_mode: str | None,
                     compile_optimizer: bool = True):
  """One SGD step on a uint8 NHWC batch; `compile_mode` None runs eagerly.

  With torch.compile the forward pass with its loss (whose backward AOTAutograd compiles too) and
  the optimizer step are compiled separately: `loss.backward()` inside a compiled function would
  only break the graph there. A fused optimizer is one kernel already (`compile_optimizer`
  False): compiling it would only add compile time.
  """

  def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = _to_model_input(images)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bfloat16):
      logits = model(x)
      return F.cross_entropy(logits, labels)

  def optimizer_step() -> None:
    optimizer.step()

  if compile_mode is not None:
    mode = None if compile_mode == 'default' else compile_mode
    forward_loss = torch.compile(forward_loss, mode=mode)
    if compile_optimizer:
      optimizer_step = torch.compile(optimizer_step, mode=mode)

  cuda_graphs = compile_mode == 'reduce-overhead'

  def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if cuda_graphs:  # Each step begins a new replay of the recorded graphs.
      torch.compiler.cudagraph_mark_step_begin()
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(images, labels)
    loss.backward()
    optimizer_step()
    return loss

  return train_step


def error_line(error: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  message = str(error).strip().splitlines()
  return f'{type(error).__name__}: {message[0] if message else ""}'[:1000]


def device_description(device: torch.device) -> dict:
  """What a measurement ran on."""
  if device.type == 'cuda':
    name = torch.cuda.get_device_name(device)
  else:
    name = 'cpu'
  return {'device': device.type, 'device_name': name, 'num_threads': torch.get_num_threads(),
          'torch_version': torch.__version__, 'cuda_version': torch.version.cuda,
          'python': platform.python_version(), 'host': platform.node()}


def measure_throughput(name: str, *, batch_size: int, dtype: str = 'float32', steps: int = 50,
                       repeats: int = 3, compile: bool = False,  # pylint: disable=redefined-builtin
                       device: str | None = None, threads: int | None = None,
                       warmup_steps: int = 3, compile_mode: str = 'default',
                       tf32: bool = True) -> dict:
  """Steady-state training images/s of a model on synthetic data held on the device.

  A few distinct uint8 NHWC batches with random labels are made once (seeded) and moved to the
  device; every step then normalises one, permutes it to NCHW channels_last, runs the forward
  pass and cross-entropy, backpropagates, and takes an SGD step (lr 0.01, momentum 0.9, weight
  decay 5e-4) with `zero_grad(set_to_none=True)`. The first `warmup_steps` steps (compilation,
  cuDNN autotuning, optimizer state creation) are timed apart; then `repeats` timings of `steps`
  steps each, the device synchronised before and after each.

  Args:
    name: a model of `MODEL_SHAPES`.
    batch_size: images per step.
    dtype: 'float32', or 'bfloat16' for autocast to bfloat16 around forward and loss (the
      parameters and the optimizer stay float32).
    steps: steps per timed repeat.
    repeats: timed repeats; their median, min and max are reported.
    compile: whether to torch.compile the forward pass with its loss and the optimizer step. A
      failure is reported in the result's 'error' field rather than raised.
    device: 'cpu', 'cuda', or None for CUDA where available.
    threads: CPU threads for torch (restored afterwards); None keeps torch's default.
    warmup_steps: untimed steps before the timings (at least 1).
    compile_mode: torch.compile's mode ('default', 'reduce-overhead', 'max-autotune').
    tf32: on CUDA, whether float32 convolutions and matmuls may use TF32 (as JAX's do).

  Returns:
    A JSON-serialisable dict of the settings and the results; 'error' is None on success.

  Raises:
    ValueError: for an unknown model or dtype, or an unavailable device.
  """
  if name not in MODEL_SHAPES:
    raise ValueError(f'unknown model {name!r}; choose from {", ".join(MODEL_SHAPES)}')
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  if min(batch_size, steps, repeats, warmup_steps) < 1:
    raise ValueError('batch_size, steps, repeats and warmup_steps must be positive')
  device = _resolve_device(device)
  height, width, channels, num_classes = MODEL_SHAPES[name]
  result = {
      'framework': 'torch', 'task': 'throughput', 'model': name, 'batch_size': batch_size,
      'dtype': dtype, 'steps': steps, 'repeats': repeats, 'warmup_steps': warmup_steps,
      'compile': compile, 'compile_mode': compile_mode if compile else None,
      'image_shape': [height, width, channels], 'num_classes': num_classes,
      'channels_last': True, 'optimizer': 'sgd(lr=0.01, momentum=0.9, weight_decay=5e-4)',
      'seed': _SEED,
  }
  with _torch_settings(device, threads, tf32):
    result.update(device_description(device))
    if device.type == 'cuda':
      result.update(cudnn_benchmark=True, tf32=tf32)
    if compile:
      # Fresh compilation caches, so that measurements run one after another in one process
      # neither reuse each other's graphs nor run into dynamo's recompilation limit.
      torch._dynamo.reset()  # pylint: disable=protected-access
    torch.manual_seed(_SEED)
    model = build_model(name).to(device=device, memory_format=torch.channels_last).train()
    result['num_params'] = count_params(model)
    optimizer, fused = _make_sgd(model, device)
    result['fused_optimizer'] = fused
    # Made on the CPU from a seeded generator, so that every device sees the same data. A few
    # distinct batches suffice: the cost of a step does not depend on the pixels.
    generator = torch.Generator().manual_seed(_SEED)
    num_batches = min(steps, 4)
    images = torch.randint(0, 256, (num_batches, batch_size, height, width, channels),
                           dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (num_batches, batch_size),
                           generator=generator).to(device)
    train_step = _make_train_step(model, optimizer, device_type=device.type,
                                  bfloat16=dtype == 'bfloat16',
                                  compile_mode=compile_mode if compile else None,
                                  compile_optimizer=not fused)
    if device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats(device)
    timings, loss = [], None
    result.update(first_step_s=None, warmup_s=None)  # The same keys when a step fails.
    try:
      _synchronize(device)
      start = time.perf_counter()
      for i in range(warmup_steps):
        loss = train_step(images[i % num_batches], labels[i % num_batches])
        if i == 0:
          _synchronize(device)
          result['first_step_s'] = time.perf_counter() - start
      _synchronize(device)
      result['warmup_s'] = time.perf_counter() - start
      for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
          loss = train_step(images[i % num_batches], labels[i % num_batches])
        _synchronize(device)
        timings.append(time.perf_counter() - start)
      result['error'] = None
    except Exception as e:  # pylint: disable=broad-exception-caught
      # A compiler failure, or memory exhausted by too large a batch, is a result of the
      # benchmark; anything else in eager mode is a bug to see.
      if not (compile or isinstance(e, torch.cuda.OutOfMemoryError)):
        raise
      result['error'] = error_line(e)
    rates = [batch_size * steps / t for t in timings]
    result.update(
        timings_s=timings,
        images_per_s_median=statistics.median(rates) if rates else None,
        images_per_s_min=min(rates) if rates else None,
        images_per_s_max=max(rates) if rates else None,
        step_ms_median=1000 * statistics.median(timings) / steps if timings else None,
        final_loss=(float(loss.detach()) if loss is not None and not result['error'] else None))
    if device.type == 'cuda':
      result['peak_memory_mib'] = torch.cuda.max_memory_allocated(device) / 2**20
    # Free the device for the next measurement of a suite.
    del model, optimizer, images, labels, train_step, loss
    if device.type == 'cuda':
      torch.cuda.empty_cache()
  return result


# ------------------------------------------------------------------------------------------------
# One epoch of LeNet-5 on MNIST.

MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}


def read_idx(path: str) -> np.ndarray:
  """A gzipped IDX file (the MNIST format) as a uint8 array.

  The header is big-endian: two zero bytes, a type code (0x08 for unsigned bytes), the number of
  dimensions, then one 32-bit size per dimension (16 bytes in all for images, 8 for labels).

  Raises:
    FileNotFoundError: if the file is missing.
    ValueError: if it is not an unsigned-byte IDX file of the size its header says.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes')
  ndim = data[3]
  offset = 4 + 4 * ndim
  shape = struct.unpack(f'>{ndim}I', data[4:offset])
  # A bytearray makes the array writable, as torch.from_numpy wants it.
  array = np.frombuffer(bytearray(data), dtype=np.uint8, offset=offset)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: the header says {shape}, but there are {array.size} values')
  return array.reshape(shape)


def load_mnist(mnist_dir: str) -> dict[str, np.ndarray]:
  """The four official MNIST files of `mnist_dir` as uint8 arrays (images N x 28 x 28)."""
  arrays = {key: read_idx(os.path.join(mnist_dir, filename))
            for key, filename in MNIST_FILES.items()}
  for split in ('train', 'test'):
    if len(arrays[f'{split}_images']) != len(arrays[f'{split}_labels']):
      raise ValueError(f'{mnist_dir}: {split} images and labels differ in number')
  return arrays


def _pixel_moments(images: np.ndarray) -> tuple[float, float]:
  """Mean and standard deviation of uint8 pixels scaled to [0, 1], exactly, from a histogram."""
  counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
  values = np.arange(256) / 255
  mean = float(counts @ values / counts.sum())
  std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
  return mean, std


def _normalised(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
  """uint8 N x H x W -> float32 N x 1 x H x W, (x / 255 - mean) / std."""
  x = torch.from_numpy(images).unsqueeze(1).float()
  return x.mul_(1 / (255 * std)).sub_(mean / std)


def mnist_epoch(mnist_dir: str, *, batch_size: int = 128, seed: int = 0,
                threads: int | None = None, max_steps: int | None = None,
                eval_batch_size: int = 1000) -> dict:
  """Trains LeNet-5 for one epoch on MNIST on the CPU in eager mode, then evaluates it.

  The whole dataset is read into memory and normalised with the training set's pixel mean and
  standard deviation. The epoch visits a seeded permutation of the training set in
  len // batch_size full batches (the last partial batch is dropped) with Adam (lr 1e-3) and no
  augmentation; then all test images are classified.

  Args:
    mnist_dir: folder of the four official gzipped IDX files.
    batch_size: training batch size.
    seed: seeds the initialisation and the shuffle.
    threads: CPU threads for torch (restored afterwards); None keeps torch's default.
    max_steps: stops the epoch early after this many steps (for tests).
    eval_batch_size: images per evaluation batch.

  Returns:
    A JSON-serialisable dict: seconds spent loading, training and evaluating, test accuracy, and
    the settings.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: if a file is malformed or the training set has less than one batch.
  """
  saved_threads = torch.get_num_threads()
  try:
    if threads:
      torch.set_num_threads(threads)
    start = time.perf_counter()
    arrays = load_mnist(mnist_dir)
    mean, std = _pixel_moments(arrays['train_images'])
    train_images = _normalised(arrays['train_images'], mean, std)
    test_images = _normalised(arrays['test_images'], mean, std)
    train_labels = torch.from_numpy(arrays['train_labels'].astype(np.int64))
    test_labels = torch.from_numpy(arrays['test_labels'].astype(np.int64))
    load_s = time.perf_counter() - start

    num_train = len(train_labels)
    steps = num_train // batch_size
    if max_steps is not None:
      steps = min(steps, max_steps)
    if steps < 1:
      raise ValueError(f'{num_train} training images make no batch of {batch_size}')
    torch.manual_seed(seed)
    height, width = train_images.shape[2:]
    model = LeNet5(10, (height, width, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    permutation = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))

    model.train()
    loss_sum = torch.zeros(())
    start = time.perf_counter()
    for step in range(steps):
      index = permutation[step * batch_size:(step + 1) * batch_size]
      optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(train_images[index]), train_labels[index])
      loss.backward()
      optimizer.step()
      loss_sum += loss.detach()
    train_s = time.perf_counter() - start

    model.eval()
    correct = 0
    start = time.perf_counter()
    with torch.no_grad():
      for i in range(0, len(test_labels), eval_batch_size):
        logits = model(test_images[i:i + eval_batch_size])
        correct += int((logits.argmax(1) == test_labels[i:i + eval_batch_size]).sum())
    eval_s = time.perf_counter() - start

    return {
        'framework': 'torch', 'task': 'mnist-epoch', 'model': 'lenet5',
        'num_params': count_params(model), 'optimizer': 'adam(lr=1e-3)', 'compile': False,
        **device_description(torch.device('cpu')),
        'batch_size': batch_size, 'eval_batch_size': eval_batch_size, 'seed': seed,
        'steps': steps, 'train_examples': num_train,
        'test_examples': len(test_labels), 'pixel_mean': mean, 'pixel_std': std,
        'load_s': load_s, 'train_s': train_s, 'eval_s': eval_s,
        'train_images_per_s': steps * batch_size / train_s,
        'train_loss_mean': float(loss_sum) / steps, 'final_train_loss': float(loss.detach()),
        'test_accuracy': correct / len(test_labels),
    }
  finally:
    torch.set_num_threads(saved_threads)


# ------------------------------------------------------------------------------------------------
# Command line.


class _ArgumentParser(argparse.ArgumentParser):
  """Reports a usage error in one line on stderr, with exit status 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def _parse_args(argv):
  parser = _ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  commands = parser.add_subparsers(dest='command', required=True)

  throughput = commands.add_parser('throughput', help='steady-state training images/s')
  throughput.add_argument('--model', required=True, help=', '.join(MODEL_SHAPES))
  throughput.add_argument('--batch_size', type=int, default=128)
  throughput.add_argument('--dtype', default='float32', help='float32 or bfloat16 (autocast)')
  throughput.add_argument('--steps', type=int, default=50, help='steps per timed repeat')
  throughput.add_argument('--repeats', type=int, default=3, help='timed repeats')
  throughput.add_argument('--warmup_steps', type=int, default=3)
  throughput.add_argument('--compile', action='store_true', help='use torch.compile')
  throughput.add_argument('--compile_mode', default='default',
                          help="torch.compile mode: default, reduce-overhead or max-autotune")
  throughput.add_argument('--device', default=None, help='cpu or cuda (default: cuda if any)')
  throughput.add_argument('--threads', type=int, default=None, help='torch CPU threads')
  throughput.add_argument('--no_tf32', dest='tf32', action='store_false',
                          help='keep float32 matmuls and convolutions out of TF32 on CUDA')

  epoch = commands.add_parser('mnist-epoch', help='one epoch of LeNet-5 on MNIST, on the CPU')
  epoch.add_argument('--mnist_dir', required=True, help='folder of the four official .gz files')
  epoch.add_argument('--batch_size', type=int, default=128)
  epoch.add_argument('--seed', type=int, default=0)
  epoch.add_argument('--threads', type=int, default=None, help='torch CPU threads')
  epoch.add_argument('--max_steps', type=int, default=None)
  epoch.add_argument('--eval_batch_size', type=int, default=1000)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  """Runs a command and prints its JSON object; returns the exit status."""
  args = _parse_args(argv)
  try:
    if args.command == 'throughput':
      result = measure_throughput(
          args.model, batch_size=args.batch_size, dtype=args.dtype, steps=args.steps,
          repeats=args.repeats, compile=args.compile, device=args.device, threads=args.threads,
          warmup_steps=args.warmup_steps, compile_mode=args.compile_mode, tf32=args.tf32)
    else:
      result = mnist_epoch(args.mnist_dir, batch_size=args.batch_size, seed=args.seed,
                           threads=args.threads, max_steps=args.max_steps,
                           eval_batch_size=args.eval_batch_size)
  except (OSError, ValueError) as e:
    print(f'torch_reference.py {args.command}: error: {error_line(e)}', file=sys.stderr)
    return 2
  result['torch_import_s'] = _TORCH_IMPORT_S
  result['process_s'] = time.perf_counter() - _MODULE_START  # Up to here: all but the exit.
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
