"""MobileNetV2: the same function as torchvision's layout written in PyTorch (its blocks' layers
are EfficientNet's, whose run test_efficientnet.py trains), and its width checked."""

import functools

import pytest
import torch
from flax import nnx

from jaxcnn import models
from jaxcnn.errors import ConfigError
from jaxcnn.models import efficientnet, mobilenet

import test_efficientnet
from test_efficientnet import assert_same_logits_in_training, copy_conv_bn, put, randomize


TorchConvBN = functools.partial(test_efficientnet.TorchConvBN, activation=torch.nn.ReLU6)


class TorchInvertedResidual(torch.nn.Module):
  """torchvision's InvertedResidual: expansion (unless by 1), depthwise, linear projection."""

  def __init__(self, cin, cout, expansion, stride):
    super().__init__()
    hidden = int(round(cin * expansion))
    self.expand = TorchConvBN(cin, hidden, 1) if expansion != 1 else None
    self.depthwise = TorchConvBN(hidden, hidden, 3, stride, groups=hidden)
    self.project = TorchConvBN(hidden, cout, 1, activation=None)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
    return x + y if self.residual else y


def torch_mobilenet_v2(width, num_classes):
  """torchvision's MobileNetV2 layout at `width`, in evaluation mode."""
  features = efficientnet.make_divisible(32 * width)
  layers = [TorchConvBN(3, features, 3, 2)]
  for expansion, channels, count, stride in mobilenet.STAGES:
    channels = efficientnet.make_divisible(channels * width)
    for index in range(count):
      layers.append(TorchInvertedResidual(features, channels, expansion, stride if index == 0 else 1))
      features = channels
  last = efficientnet.make_divisible(1280 * max(1.0, width))
  layers.append(TorchConvBN(features, last, 1))
  return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                             torch.nn.Linear(last, num_classes)).eval()


def test_it_computes_what_torchvisions_layout_computes():
  model = mobilenet.MobileNetV2(num_classes=5, input_shape=(40, 36, 3), width=0.25,
                                dropout_rate=0.0, rngs=nnx.Rngs(0))
  randomize(model)
  reference = torch_mobilenet_v2(0.25, 5)
  copy_conv_bn(model.stem, reference[0])
  for ours, theirs in zip(model.blocks.layers, reference[1:]):
    if ours.expand is not None:
      copy_conv_bn(ours.expand, theirs.expand)
    copy_conv_bn(ours.depthwise, theirs.depthwise)
    copy_conv_bn(ours.project, theirs.project)
  copy_conv_bn(model.head, reference[-4])
  put(reference[-1].weight, model.fc.kernel, (1, 0))
  put(reference[-1].bias, model.fc.bias)
  assert_same_logits_in_training(model, reference)


@pytest.mark.parametrize('width', [0, -1.0, 'wide'])
def test_a_width_that_is_not_a_positive_number_is_a_one_line_error(width):
  with pytest.raises(ConfigError, match=f"sets width={width!r}; it must be a positive number"):
    models.create_model('mobilenet_v2', num_classes=10, input_shape=(32, 32, 3),
                        model_kwargs={'width': width})
