"""Prints a model's parameters, one row each, and their total.

  python -m jaxcnn.summary resnet50                       # 224x224x3 input, 1000 classes
  python -m jaxcnn.summary cifar_resnet20 --num_classes 100
  python -m jaxcnn.summary --config configs/mnist.py      # the config's model and dataset
  python -m jaxcnn.summary --config configs/imagenet_resnet50.py --config.image_size=160
  python -m jaxcnn.summary mymodels.net:Net --input_shape 64,64,3

The model is built under `nnx.eval_shape`, so no parameter is ever materialised: ResNet-152 costs
no memory and no initialisation time. Without --config the input defaults to 224x224x3 with 1000
classes for the ImageNet models (the ResNets, ResNeXts, wide ResNets, ConvNeXts, EfficientNets and
MobileNetV2), 32x32x3 with 10 classes for the CIFAR models, and 28x28x1 with 10 classes
otherwise. With --config the model and the dataset's image shape (at the config's
`image_size`) and class count come from the config file; MODEL, --input_shape and --num_classes
override them (MODEL and a --config.model override may not name different models), and the
config's `model_kwargs` (--config.model_kwargs="{'widths': (32, 64)}") build its model. The last
two lines are the totals, `total: 25,557,032 parameters` and the arithmetic of one image's
forward pass, `forward pass: 4.09G multiply-adds per image (4,089,184,256)` (see
`jaxcnn.models.cost`); the parameters that the config's `frozen` pattern matches are marked
`frozen`, and counted in the first of them, so that a pattern can be checked before a run.
"""

import math
from collections.abc import Collection, Mapping, Sequence

from absl import flags
from flax import nnx
from ml_collections import config_flags

from jaxcnn import cli, models, optim
from jaxcnn import config as config_lib
from jaxcnn.data import pipeline
from jaxcnn.errors import ConfigError
from jaxcnn.models import cost

_INPUT_SHAPE = flags.DEFINE_string('input_shape', None, 'Image shape H,W,C, e.g. 32,32,3.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Number of classes.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config file (path.py[:variant]) whose model and dataset to use; '
    '--config.KEY=VALUE overrides its keys, as for train.py.', lock_config=True)

# The zoo's ImageNet networks (torchvision's layouts), by their names' beginnings.
_IMAGENET_PREFIXES = ('resnet', 'resnext', 'wide_resnet', 'convnext_', 'efficientnet_',
                      'mobilenet_')
_CIFAR_PREFIXES = ('cifar_', 'wrn', 'vgg', 'airbench')


def default_input(model: str) -> tuple[tuple[int, int, int], int]:
  """The input shape and class count a model is summarised for when nothing else says."""
  if model.startswith(_IMAGENET_PREFIXES) and model in models.MODELS:
    return (224, 224, 3), 1000
  if model.startswith(_CIFAR_PREFIXES) and model in models.MODELS:
    return (32, 32, 3), 10
  return (28, 28, 1), 10


def parse_shape(text: str) -> tuple[int, int, int]:
  """Parses `H,W,C` into three positive integers, or raises a ConfigError."""
  try:
    shape = tuple(int(part) for part in text.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f'--input_shape must be three positive integers H,W,C, got {text!r}')
  return shape


def parameter_rows(model: nnx.Module) -> list[tuple[str, tuple[int, ...], int]]:
  """(path, shape, count) of every `nnx.Param` of `model`, sorted by path as NNX orders state."""
  return [(path, shape, math.prod(shape))
          for path, shape in models.parameter_shapes(model).items()]


def format_table(rows: Sequence[tuple[str, tuple[int, ...], int]],
                 frozen: Collection[str] | None = None) -> str:
  """The rows as aligned columns with a header, then `total: N parameters`. Given `frozen`,
  the parameters it names are marked as such and counted in the total line, even when none is."""
  cells = [(path, str(shape), f'{count:,}') for path, shape, count in rows]
  widths = [max([len(header)] + [len(cell[i]) for cell in cells])
            for i, header in enumerate(('parameter', 'shape', 'count'))]
  mark = lambda path: '  frozen' if frozen is not None and path in frozen else ''
  lines = [f"{'parameter':<{widths[0]}}  {'shape':<{widths[1]}}  {'count':>{widths[2]}}"]
  lines += [f'{path:<{widths[0]}}  {shape:<{widths[1]}}  {count:>{widths[2]}}{mark(path)}'
            for path, shape, count in cells]
  total = f'total: {sum(count for _, _, count in rows):,} parameters'
  if frozen is not None:
    total += f', {sum(count for path, _, count in rows if path in frozen):,} of them frozen'
  lines.append(total)
  return '\n'.join(lines)


def resolve(model: str | None, config, input_shape: str | None, num_classes: int | None,
            config_model_given: bool = False) -> tuple[str, tuple[int, int, int], int]:
  """The model name, input shape and class count to summarise, from the arguments' sources
  (`config` is the --config ConfigDict, or None; `config_model_given` says whether the command
  line set --config.model, which then may not name another model than MODEL)."""
  if config is not None:
    if model and config_model_given and model != config.model:
      raise ConfigError(f'MODEL {model!r} and --config.model={config.model!r} name different '
                        'models; give one of them')
    model = model or config.model
    shape, classes = pipeline.input_spec(config)
  elif model:
    shape, classes = default_input(model)
  else:
    raise ConfigError('name a model (e.g. resnet50) or give --config FILE')
  models.get_model_constructor(model)  # An unknown name fails here, in one line.
  if input_shape is not None:
    shape = parse_shape(input_shape)
  if num_classes is not None:
    if num_classes < 1:
      raise ConfigError(f'--num_classes must be a positive integer, got {num_classes}')
    classes = num_classes
  return model, shape, classes


def summarize(model: str, input_shape: Sequence[int], num_classes: int,
              model_kwargs: Mapping[str, object] | None = None, frozen: str = '') -> str:
  """The parameter table of `model` (built with `model_kwargs`) for `input_shape` images and
  `num_classes` classes, with the parameters that the regular expression `frozen` (the config
  key's) matches marked, then the multiply-adds of one image's forward pass."""
  abstract = nnx.eval_shape(lambda: models.create_model(
      model, num_classes=num_classes, input_shape=input_shape, model_kwargs=model_kwargs))
  header = (f'{model}{models.describe_kwargs(model_kwargs or {})}: input '
            f'{",".join(map(str, input_shape))}, {num_classes} classes')
  marked = (set(optim.frozen_parameters(nnx.state(abstract, nnx.Param), frozen)) if frozen
            else None)
  arithmetic = cost.multiply_adds(abstract, input_shape)
  return (f'{header}\n{format_table(parameter_rows(abstract), marked)}\nforward pass: '
          f'{cost.format_count(arithmetic)} multiply-adds per image ({arithmetic:,})')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 2:
    raise ConfigError(f'expected one model name, got: {" ".join(argv[1:])}')
  model = argv[1] if len(argv) == 2 else None
  config_model_given = 'config.model' in flags.FLAGS and flags.FLAGS['config.model'].present
  name, shape, classes = resolve(model, _CONFIG.value, _INPUT_SHAPE.value, _NUM_CLASSES.value,
                                 config_model_given)
  config = _CONFIG.value
  # The config's model_kwargs are arguments of its model, not of another MODEL.
  kwargs = config_lib.model_kwargs(config) if config is not None and name == config.model else {}
  frozen = ''
  if config is not None:
    config_lib.check_frozen(config)
    frozen = config.frozen
  try:
    print(summarize(name, shape, classes, kwargs, frozen))
  except models.ImagesTooSmall as e:
    # The config's image size, where the shape came from a config; else --input_shape.
    raise e.with_flag('--config.image_size' if config is not None and not _INPUT_SHAPE.value
                      else '--input_shape') from None


if __name__ == '__main__':
  cli.run(main, config_flag='config', config_required=False)
