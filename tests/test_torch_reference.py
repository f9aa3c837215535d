"""The PyTorch reference of the benchmark suite (benchmarks/torch_reference.py), on the CPU."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import torch_reference
from conftest import REPO_ROOT

THROUGHPUT_KEYS = {
    'framework', 'model', 'batch_size', 'dtype', 'steps', 'repeats', 'compile', 'device',
    'device_name', 'num_threads', 'torch_version', 'num_params', 'first_step_s', 'warmup_s',
    'timings_s', 'images_per_s_median', 'images_per_s_min', 'images_per_s_max', 'final_loss',
    'error',
}


@pytest.fixture(autouse=True)
def one_torch_thread():
  """Tiny workloads run fastest on one thread, and a busy machine cannot stall its barriers."""
  saved = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(saved)


def write_idx(path, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file: zero bytes, type 0x08, rank, big-endian sizes."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_tiny_mnist(directory, num_train: int = 256, num_test: int = 64, seed: int = 0) -> None:
  """A learnable MNIST look-alike: dim noise plus a bright 6x6 square placed by the label."""
  rng = np.random.default_rng(seed)
  for split, count in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 64, (count, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
      row, col = 2 + 14 * (label // 5), 1 + 5 * (label % 5)
      image[row:row + 6, col:col + 6] = 255
    write_idx(directory / f'{split}-images-idx3-ubyte.gz', images)
    write_idx(directory / f'{split}-labels-idx1-ubyte.gz', labels)


@pytest.mark.parametrize('name', sorted(torch_reference.MODEL_SHAPES))
def test_parameter_counts_equal_jaxcnns(name):
  expected = {'lenet5': 61_706, 'cifar_resnet20': 269_722, 'airbench': 1_971_640,
              'resnet50': 25_557_032}[name]
  model = torch_reference.build_model(name)
  assert torch_reference.count_params(model) == expected
  assert sum(p.numel() for p in model.parameters()) == expected  # No frozen parameters either.


@pytest.mark.parametrize('name', sorted(torch_reference.MODEL_SHAPES))
def test_the_reference_does_the_same_arithmetic_as_jaxcnn(name):
  """The throughput ratios compare the same work: equal parameter counts alone would also allow
  another stride placement (ResNet-50 v1 against v1.5) or pooling order. jaxcnn's count (that of
  `jaxcnn.summary` and `jaxcnn.compare`) is checked against PyTorch's own counter here too."""
  from jaxcnn import models  # pylint: disable=g-import-not-at-top
  from jaxcnn.models import cost  # pylint: disable=g-import-not-at-top
  height, width, channels, num_classes = torch_reference.MODEL_SHAPES[name]
  # Shapes only: no weights are initialised, and the forward pass is traced, not run.
  model = nnx.eval_shape(lambda: models.create_model(
      name, num_classes=num_classes, input_shape=(height, width, channels)))
  flops = 2 * cost.multiply_adds(model, (height, width, channels))  # Per image.
  reference = torch_reference.build_model(name).eval()
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    reference(torch.zeros(2, channels, height, width))
  assert 2 * flops == counter.get_total_flops() > 0
  if name == 'resnet50':  # The MFU's 24.6 GFLOP per training image: 3x the forward pass.
    assert 3 * flops == pytest.approx(24.6e9, rel=0.01)


@pytest.mark.parametrize('name', ['lenet5', 'cifar_resnet20', 'airbench'])
def test_models_give_logits_in_channels_last(name):
  height, width, channels, num_classes = torch_reference.MODEL_SHAPES[name]
  model = torch_reference.build_model(name).to(memory_format=torch.channels_last).eval()
  x = torch.randn(2, channels, height, width).contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    assert model(x).shape == (2, num_classes)


def test_build_model_rejects_unknown_names():
  with pytest.raises(ValueError, match='unknown model'):
    torch_reference.build_model('resnet5')


def test_measure_throughput_reports_a_positive_rate():
  result = torch_reference.measure_throughput(
      'lenet5', batch_size=16, dtype='float32', steps=3, repeats=2, compile=False, device='cpu')
  assert THROUGHPUT_KEYS <= set(result), THROUGHPUT_KEYS - set(result)
  assert result['error'] is None
  assert result['num_params'] == 61_706
  assert result['device'] == 'cpu' and result['device_name'] == 'cpu'
  assert len(result['timings_s']) == 2
  assert 0 < result['images_per_s_min'] <= result['images_per_s_median'] <= (
      result['images_per_s_max'])
  assert result['warmup_s'] >= result['first_step_s'] > 0
  assert np.isfinite(result['final_loss'])
  json.dumps(result)  # The command line prints it.


def test_measure_throughput_runs_bfloat16_autocast():
  result = torch_reference.measure_throughput(
      'lenet5', batch_size=8, dtype='bfloat16', steps=1, repeats=1, warmup_steps=1, device='cpu')
  assert result['error'] is None and result['images_per_s_median'] > 0
  assert np.isfinite(result['final_loss'])


def test_measure_throughput_reports_a_compile_failure(monkeypatch):
  def failing_compile(fn, **unused_kwargs):
    def compiled(*args, **kwargs):
      raise RuntimeError('inductor failed\nlong traceback')
    return compiled

  # Compiling for real takes most of a minute on two CPU cores; its failure is what matters here.
  monkeypatch.setattr(torch, 'compile', failing_compile)
  result = torch_reference.measure_throughput(
      'lenet5', batch_size=8, steps=1, repeats=1, compile=True, device='cpu')
  assert result['error'] == 'RuntimeError: inductor failed'
  assert result['images_per_s_median'] is None and result['final_loss'] is None
  json.dumps(result)


def test_one_cifar_resnet20_step_trains():
  torch.manual_seed(0)
  model = torch_reference.build_model('cifar_resnet20').to(memory_format=torch.channels_last)
  before = {name: p.detach().clone() for name, p in model.named_parameters()}
  optimizer, fused = torch_reference._make_sgd(  # pylint: disable=protected-access
      model, torch.device('cpu'))
  assert not fused
  train_step = torch_reference._make_train_step(  # pylint: disable=protected-access
      model, optimizer, device_type='cpu', bfloat16=False, compile_mode=None)
  images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
  labels = torch.randint(0, 10, (4,))
  loss = train_step(images, labels)
  assert torch.isfinite(loss)
  unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
  # Each residual branch starts at zero (its last BatchNorm scale is zero), so no gradient reaches
  # its first BatchNorm, whose scale and shift weight decay spares, as jaxcnn's does (biases and
  # BatchNorm parameters); all else moves, the first convolution by its decay alone.
  assert unchanged and all(name.endswith(('.bn1.bias', '.bn1.weight')) for name in unchanged), \
      unchanged
  assert any(name.endswith('.bn1.weight') for name in unchanged)
  assert not torch.equal(model.stages[0][0].bn2.weight, before['stages.0.0.bn2.weight'])


def test_read_idx_checks_the_header(tmp_path):
  write_idx(tmp_path / 'ok.gz', np.arange(6, dtype=np.uint8).reshape(2, 3))
  np.testing.assert_array_equal(torch_reference.read_idx(str(tmp_path / 'ok.gz')),
                                [[0, 1, 2], [3, 4, 5]])
  with gzip.open(tmp_path / 'short.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 1]) + struct.pack('>I', 5) + b'abc')
  with pytest.raises(ValueError, match='header says'):
    torch_reference.read_idx(str(tmp_path / 'short.gz'))


def test_mnist_epoch_on_a_tiny_dataset(tmp_path):
  write_tiny_mnist(tmp_path)
  result = torch_reference.mnist_epoch(str(tmp_path), batch_size=8)
  assert result['steps'] == 256 // 8
  assert result['train_examples'] == 256 and result['test_examples'] == 64
  assert result['num_params'] == 61_706
  assert min(result['load_s'], result['train_s'], result['eval_s']) > 0
  assert np.isfinite(result['final_train_loss'])
  # 32 Adam steps learn where the bright square sits (83% to 100% over seeds; chance is 10%).
  assert result['test_accuracy'] >= 0.6, result
  json.dumps(result)


def test_mnist_epoch_steps_are_full_batches_up_to_max_steps(tmp_path):
  write_tiny_mnist(tmp_path, num_train=100, num_test=10)
  assert torch_reference.mnist_epoch(str(tmp_path), batch_size=32)['steps'] == 3
  assert torch_reference.mnist_epoch(str(tmp_path), batch_size=32, max_steps=2)['steps'] == 2


def test_command_line_prints_json(tmp_path):
  write_tiny_mnist(tmp_path)
  result = subprocess.run(
      [sys.executable, 'benchmarks/torch_reference.py', 'mnist-epoch', '--mnist_dir',
       str(tmp_path), '--batch_size', '32', '--max_steps', '2', '--threads', '1'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(result.stdout)
  assert record['steps'] == 2 and record['num_threads'] == 1
  assert record['process_s'] >= record['torch_import_s'] > 0


@pytest.mark.parametrize('argv, message', [
    (['throughput', '--model', 'nope'], 'unknown model'),
    (['throughput', '--model', 'lenet5', '--dtype', 'float16'], 'dtype'),
    (['mnist-epoch', '--mnist_dir', '/nonexistent/mnist'], 'No such file'),
    (['throughput'], 'required'),
])
def test_command_line_errors_are_one_line_with_status_2(argv, message, capsys):
  try:
    status = torch_reference.main(argv)
  except SystemExit as e:  # argparse's own errors.
    status = e.code
  assert status == 2
  captured = capsys.readouterr()
  assert not captured.out
  assert message in captured.err and captured.err.count('\n') == 1, captured.err
