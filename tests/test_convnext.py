"""ConvNeXt: the same function as torchvision's layout written in PyTorch, and its own checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxcnn import models, trainer
from jaxcnn.errors import ConfigError
from jaxcnn.models import convnext

from conftest import tiny_config

# A network of every kind of layer, small enough to compile in seconds: one block per stage.
TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 16, 24))


def tiny_convnext(input_shape=(32, 32, 3), **kwargs) -> convnext.ConvNeXt:
  return convnext.ConvNeXt(**TINY, num_classes=5, input_shape=input_shape, rngs=nnx.Rngs(0),
                           **kwargs)


class TorchLayerNorm2d(torch.nn.LayerNorm):
  """LayerNorm over the channels of an NCHW tensor, as torchvision's LayerNorm2d."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchBlock(torch.nn.Module):
  """torchvision's CNBlock: depthwise 7x7, LayerNorm, Linear, exact GELU, Linear, layer scale."""

  def __init__(self, dim):
    super().__init__()
    self.depthwise = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
    self.expand = torch.nn.Linear(dim, 4 * dim)
    self.project = torch.nn.Linear(4 * dim, dim)
    self.layer_scale = torch.nn.Parameter(torch.zeros(dim, 1, 1))

  def forward(self, x):
    y = self.depthwise(x).permute(0, 2, 3, 1)
    y = self.project(torch.nn.functional.gelu(self.expand(self.norm(y))))
    return x + self.layer_scale * y.permute(0, 3, 1, 2)


class TorchConvNeXt(torch.nn.Module):
  """torchvision's ConvNeXt: patchify stem, stages with LayerNorm-then-2x2 downsampling, head."""

  def __init__(self, depths, dims, channels, num_classes):
    super().__init__()
    layers = [torch.nn.Sequential(torch.nn.Conv2d(channels, dims[0], 4, stride=4),
                                  TorchLayerNorm2d(dims[0], eps=1e-6))]
    for index, (depth, dim) in enumerate(zip(depths, dims)):
      if index > 0:
        layers.append(torch.nn.Sequential(TorchLayerNorm2d(dims[index - 1], eps=1e-6),
                                          torch.nn.Conv2d(dims[index - 1], dim, 2, stride=2)))
      layers.append(torch.nn.Sequential(*[TorchBlock(dim) for _ in range(depth)]))
    self.features = torch.nn.Sequential(*layers)
    self.head_norm = TorchLayerNorm2d(dims[-1], eps=1e-6)
    self.fc = torch.nn.Linear(dims[-1], num_classes)

  def forward(self, x):
    x = self.head_norm(self.features(x).mean((2, 3), keepdim=True))
    return self.fc(x.flatten(1))


def copy_into_torch(model: convnext.ConvNeXt, reference: TorchConvNeXt) -> None:
  """Sets `reference`'s weights to `model`'s (HWIO kernels to OIHW, (in, out) to (out, in))."""
  def put(parameter, value, transpose=None):
    value = np.array(value[...])  # A writable copy, as torch.from_numpy wants.
    parameter.data = torch.from_numpy(np.ascontiguousarray(
        value.transpose(transpose) if transpose else value))

  def conv(ours, theirs):
    put(theirs.weight, ours.kernel, (3, 2, 0, 1))
    put(theirs.bias, ours.bias)

  def norm(ours, theirs):
    put(theirs.weight, ours.scale)
    put(theirs.bias, ours.bias)

  def linear(ours, theirs):
    put(theirs.weight, ours.kernel, (1, 0))
    put(theirs.bias, ours.bias)

  features = iter(reference.features)
  stem = next(features)
  conv(model.stem_conv, stem[0])
  norm(model.stem_norm, stem[1])
  for index, stage in enumerate(model.stages):
    if index > 0:
      downsample = next(features)
      norm(model.downsamples[index - 1].layers[0], downsample[0])
      conv(model.downsamples[index - 1].layers[1], downsample[1])
    for ours, theirs in zip(stage.layers, next(features)):
      conv(ours.depthwise, theirs.depthwise)
      norm(ours.norm, theirs.norm)
      linear(ours.expand, theirs.expand)
      linear(ours.project, theirs.project)
      put(theirs.layer_scale, ours.layer_scale[...].reshape(-1, 1, 1))
  norm(model.head_norm, reference.head_norm)
  linear(model.fc, reference.fc)


def test_it_computes_what_torchvisions_layout_computes():
  model = tiny_convnext(input_shape=(40, 36, 3))
  # Every parameter random, layer scales and LayerNorms included, so that each layer counts.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)]))
  reference = TorchConvNeXt(TINY['depths'], TINY['dims'], 3, 5)
  copy_into_torch(model, reference)
  assert sum(p.numel() for p in reference.parameters()) == models.count_params(model)
  images = np.random.default_rng(2).normal(size=(3, 40, 36, 3)).astype(np.float32)
  ours = nnx.jit(lambda model, x: model(x))(model, jnp.asarray(images))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  # Within float32 rounding (1e-7 here): Flax's default tanh approximation of GELU would be 3e-5
  # off, beyond this tolerance.
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)


def test_each_block_starts_close_to_the_identity_and_images_do_not_meet_in_a_batch():
  model = tiny_convnext()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  block = model.stages[1].layers[0]
  # The branch is scaled by 1e-6 at first, as torchvision's layer_scale.
  assert float(jnp.abs(nnx.jit(lambda block, x: block(x))(block, x) - x).max()) < 1e-4
  # No BatchNorm: in training too, an image's logits are its own, whatever the batch.
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  forward = nnx.jit(lambda model, x: model(x))
  np.testing.assert_allclose(forward(model, images)[:1], forward(model, images[:1]),
                             rtol=1e-5, atol=1e-6)


def test_stochastic_depth_drops_whole_branches_in_training_only():
  # By default the variant's rate in torchvision's builders.
  presets = {name: nnx.eval_shape(lambda name=name: models.MODELS[name](
      num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))).stages[-1].layers[-1]
      for name in ('convnext_tiny', 'convnext_small')}
  assert {name: last.drop_path.rate for name, last in presets.items()} == {
      'convnext_tiny': 0.1, 'convnext_small': 0.4}
  assert tiny_convnext().stages[-1].layers[-1].drop_path is None  # The class's default: 0.
  model = tiny_convnext(drop_path_rate=0.5)
  rates = [block.drop_path.rate if block.drop_path else 0.0
           for stage in model.stages for block in stage.layers]
  assert rates == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])  # Linear over the blocks.
  block = model.stages[3].layers[0]
  block.layer_scale[...] = jnp.ones_like(block.layer_scale[...])  # A branch that shows.
  x = jax.random.normal(jax.random.key(0), (64, 2, 2, 24))
  out = np.asarray(nnx.jit(lambda block, x: block(x))(block, x))
  kept_whole = np.isclose(out, np.asarray(x)).all(axis=(1, 2, 3))
  assert 0.3 < kept_whole.mean() < 0.7  # Half the examples skip the branch, each whole.
  block.eval()
  assert not np.isclose(np.asarray(block(x)), np.asarray(x)).all(axis=(1, 2, 3)).any()


def test_images_smaller_than_32_pixels_are_a_one_line_error():
  with pytest.raises(ConfigError, match="model 'convnext_tiny' cannot be built for 28x28x1 "
                                        r'images \(ValueError: ConvNeXt divides the image size by '
                                        '32, so images need at least 32x32 pixels'):
    models.create_model('convnext_tiny', num_classes=10, input_shape=(28, 28, 1))


def test_a_run_trains_it_with_adamw(fake_tfds, tmp_path):
  """The class itself, shrunk through model_kwargs, on the fake digits brought to 32x32."""
  config = tiny_config(model='jaxcnn.models.convnext:ConvNeXt', image_size=32, optimizer='adamw',
                       learning_rate=3e-3, num_train_steps=40, eval_every_steps=40,
                       model_kwargs=dict(TINY))
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['test/accuracy'] > 0.5  # Ten classes: chance is 0.1.
