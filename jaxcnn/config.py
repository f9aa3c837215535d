"""The config schema: every key jaxcnn reads, its default, and the check of its value.

Config files in `configs/` start from `default_config()` and override what they need; the command
line then overrides single keys (`--config.batch_size=256`). Because configs are loaded with
`lock_config=True`, a key that is not defined here is an error on the command line, and `validate`
turns every key a config file adds and every bad value into a one-line `ConfigError` before any
work starts.
"""

import difflib
import json
import math
import numbers
import re
import sys

import ml_collections
from ml_collections import config_dict

from jaxcnn import models, optim, parallel
from jaxcnn.data import randaugment
from jaxcnn.data.augment import RANDOM_ERASING_MODES, TEST_TIME_AUGMENTATIONS
from jaxcnn.errors import ConfigError

PAD_MODES = ('constant', 'reflect')  # jnp.pad's and np.pad's names.
WEIGHTS = ('trained', 'ema')  # A run's trained weights, or their moving average.
AUTOAUGMENT_CHOICES = ('none', *randaugment.AUTOAUGMENT_POLICIES)
# The automatic augmentations, of which a run takes one at most, each with the value that turns
# it off.
AUTOMATIC_AUGMENTATIONS = (('randaugment_ops', 0), ('trivialaugment', False),
                           ('autoaugment', 'none'), ('augmix', False))


def default_config() -> ml_collections.ConfigDict:
  """Every config key with its default value."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'mnist'  # A TFDS image-classification dataset, 'imagefolder' or 'synthetic'.
  config.image_folder = config_dict.placeholder(str)  # For 'imagefolder': ROOT/<split>/<class>/.
  config.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's ($TFDS_DATA_DIR).
  config.manual_dir = config_dict.placeholder(str)  # None: <data_dir>/downloads/manual.
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 0  # Train at this size (square); 0: the dataset's own (fixed) size.
  config.data_placement = 'auto'  # 'device' (in device memory), 'stream' (Grain) or 'auto'.
  # Grain worker processes when streaming; -1: one per usable CPU core, at most 16 (none when
  # training on the CPU).
  config.data_workers = -1
  config.synthetic = ml_collections.ConfigDict()  # For dataset='synthetic'.
  config.synthetic.image_shape = (32, 32, 3)
  config.synthetic.num_classes = 10
  config.synthetic.num_train = 10_000
  config.synthetic.num_eval = 2_000
  config.synthetic_if_unprepared = False  # Smoke runs: synthetic data if the dataset is absent.
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # Random crop after padding by this many pixels.
  config.augment.pad_mode = 'constant'  # That padding: 'constant' (zeros) or 'reflect'.
  config.augment.flip = False  # Random horizontal flips.
  config.augment.inception_crop = False  # Random-resized (Inception) crops, ImageNet style.
  # RandAugment: this many operations drawn for each image from its fourteen, at the magnitude
  # (0 to 10; the paper's ImageNet ResNet-50 used 2 at 9); 0 operations: off.
  config.augment.randaugment_ops = 0
  config.augment.randaugment_magnitude = 9.0
  config.augment.randaugment_magnitude_std = 0.0  # timm's mstd; inf: uniform from 0.
  config.augment.randaugment_probability = 1.0  # Per drawn operation; timm's is 0.5.
  # TrivialAugmentWide (torchvision's): one operation per image at a random level; no settings.
  config.augment.trivialaugment = False
  # AutoAugment: the paper's policy learned on 'imagenet', 'cifar10' or 'svhn' (digits); 'none'.
  config.augment.autoaugment = 'none'
  # AugMix (torchvision's): each image mixed with `width` chains of `depth` operations (-1: 1 to
  # 3 at random), at levels from the `severity` lowest of 10 bins, with Beta(alpha, alpha) and
  # Dirichlet(alpha) weights; `all_ops` adds the brightness, colour, contrast and sharpness
  # operations to the paper's nine. `jsd_weight` > 0 adds the paper's Jensen-Shannon consistency
  # loss at that weight (12 in the paper), training on the image and two AugMix views of it.
  config.augment.augmix = False
  config.augment.augmix_severity = 3
  config.augment.augmix_width = 3
  config.augment.augmix_depth = -1
  config.augment.augmix_alpha = 1.0
  config.augment.augmix_all_ops = False
  config.augment.augmix_jsd_weight = 0.0
  config.augment.cutout = 0  # Cutout: a square of this side erased from each image; 0: off.
  # Random Erasing: the probability of erasing a random box of each image (timm's reprob; 0.25
  # in DeiT's recipe); 0: off. What fills the box: 'pixel', 'rand' or 'const' (timm's remode).
  config.augment.random_erasing = 0.0
  config.augment.random_erasing_mode = 'pixel'
  config.augment.mixup_alpha = 0.0  # Mixup with Beta(alpha, alpha) weights; 0: off.
  config.augment.cutmix_alpha = 0.0  # CutMix likewise; with both, one of them per batch.

  # Model.
  config.model = 'bn_cnn'
  # Further arguments of the model's constructor, beyond those jaxcnn passes: bn_cnn's widths,
  # say, as --config.model_kwargs="{'widths': (32, 64, 128)}" (models.model_arguments lists them).
  config.model_kwargs = ml_collections.ConfigDict()
  config.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
  # Fine-tuning: a new run starts from the weights of another run's checkpoint instead of random
  # ones (jaxcnn/warm_start.py); arrays of another shape, such as a head for another number of
  # classes, keep their random start. A run that resumes reads its own checkpoint instead.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.workdir = config_dict.placeholder(str)  # That run's workdir; None: off.
  config.init_from.checkpoint = 'best'  # 'best' (by that run's best_metric), 'latest' or a step.
  config.init_from.weights = 'trained'  # 'trained', or 'ema': that run's moving average.

  # Optimisation.
  config.batch_size = 128  # Global batch size, over all devices.
  config.num_epochs = 10.0
  config.num_train_steps = -1  # -1: num_epochs worth of steps.
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.0
  config.lr_decay_epochs = (30, 60, 80)  # For lr_schedule='step'.
  config.lr_decay_factor = 0.1  # For lr_schedule='step'.
  config.momentum = 0.9  # For 'momentum', 'nesterov' and 'lars'.
  config.beta1 = 0.9  # For 'adam', 'adamw' and 'lamb'.
  config.beta2 = 0.999
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0  # 0: no clipping.
  config.label_smoothing = 0.0
  config.grad_accum_steps = 1  # Micro-batches per optimizer step (each batch_size / this).
  config.ema_decay = 0.0  # Moving average of the weights, evaluated alongside them; 0: off.
  # Parameters that training leaves as they are: a regular expression searched in each one's
  # path (r'stages\.0\.', or r'^(?!fc2\.)' to train bn_cnn's head alone); '': none. BatchNorm
  # layers whose parameters are all frozen keep their running statistics too.
  config.frozen = ''
  config.seed = 0

  # Evaluation, logging and execution.
  config.eval_batch_size = 1000
  # Test-time augmentation: 'flip' or 'flip_translate' (airbench's) also evaluate the averaged
  # logits of mirrored (and shifted) views, as <eval_split>/tta_accuracy; 'none': off.
  config.eval_tta = 'none'
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1: at the end of every epoch.
  config.steps_per_call = -1  # Train steps per compiled call; -1: chosen for the backend.
  config.parallel = 'jit'  # Data-parallel strategy: 'jit', 'shard_map' or 'pmap'.
  config.num_devices = -1  # Devices to train on; -1: every device of every process.
  # A jax.profiler trace of this many train steps into <workdir>/plugins/profile; 0: none. It
  # begins with the first compiled call from step profile_start_step on (compilation excluded).
  config.profile_steps = 0
  config.profile_start_step = 10

  # Checkpoints (in <workdir>/checkpoints; a run started again in the same workdir resumes).
  config.checkpoint_every_steps = -1  # -1: at every evaluation. Always at the end.
  config.keep_checkpoints = 3  # The most recent ones...
  config.keep_best = 1  # ...and, separately, the best ones by best_metric.
  # '<eval_split>/accuracy', following eval_split until set itself.
  config.best_metric = config.get_ref('eval_split') + '/accuracy'
  config.best_mode = 'auto'  # 'max', 'min' or 'auto': 'min' for a loss, 'max' for an accuracy.
  config.async_checkpointing = True  # Write checkpoints while training goes on.
  return config


_WARNED_BEST_MODE: set[str] = set()  # The config files whose best_mode was warned of.


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """A run's `config.json` as a config again: `default_config()` with the recorded values.

  Starting from the defaults keeps what JSON loses: which keys are tuples, and the type of the
  keys that are None (so that `--config.data_dir=DIR` still parses on top of it).
  """
  try:
    with open(path, encoding='utf-8') as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'config file {path!r} cannot be read as JSON: {e}') from None
  if not isinstance(values, dict):
    raise ConfigError(f'config file {path!r} holds a JSON {type(values).__name__}, not an object '
                      'of config keys')
  config = default_config()
  if values.get('best_metric') == f'{values.get("eval_split")}/accuracy':
    # JSON records the value, not that it followed eval_split: left to the default, it follows
    # again, so that the run's config with another --config.eval_split is still consistent.
    values = {key: value for key, value in values.items() if key != 'best_metric'}
  metric = values.get('best_metric', f'{values.get("eval_split", "test")}/accuracy')
  mode = values.get('best_mode')
  if isinstance(metric, str) and mode in ('max', 'min') and mode != metric_direction(metric):
    # Recorded before best_mode 'auto' (the default 'max' with a loss): it kept the worst.
    if path not in _WARNED_BEST_MODE:  # A command may read a run's config more than once.
      _WARNED_BEST_MODE.add(path)
      print(f"warning: {path} records best_mode {mode!r} for {metric}, which kept the "
            f"{'highest' if mode == 'max' else 'lowest'} as the best; reading it as 'auto'",
            file=sys.stderr, flush=True)
    values = {**values, 'best_mode': 'auto'}
  _update_from_json(config, values, path)
  return config


def _update_from_json(config: ml_collections.ConfigDict, values: dict, path: str,
                      prefix: str = '') -> None:
  for key, value in values.items():
    if key not in config:
      raise _unknown_key(key, config, prefix, f'config file {path!r}')
    default = config.get(key)
    if f'{prefix}{key}' == 'model_kwargs' and isinstance(value, dict):
      # The model's own argument names, which the defaults cannot define; JSON's lists are read
      # back as the tuples the command line gives.
      config[key] = ml_collections.ConfigDict(
          {name: _lists_as_tuples(v) for name, v in value.items()})
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
      _update_from_json(default, value, path, f'{prefix}{key}.')
    elif isinstance(default, tuple) and isinstance(value, list):
      config[key] = tuple(value)
    else:
      try:
        config[key] = value
      except TypeError:
        raise ConfigError(f"config file {path!r} gives config key '{prefix}{key}' the value "
                          f'{value!r}; it takes {type(default).__name__} values') from None


def _lists_as_tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_lists_as_tuples(v) for v in value)
  return value


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The `model_kwargs` of `config` as the keyword arguments the model's constructor gets."""
  return {key: _lists_as_tuples(value) for key, value in config.model_kwargs.items()}


def _unknown_key(key: str, defined: ml_collections.ConfigDict, prefix: str,
                 where: str) -> ConfigError:
  """The error for `prefix + key`, which `where` sets and `defined` (its level of the defaults)
  does not define, with the defined keys closest to it."""
  close = difflib.get_close_matches(key, list(defined.keys()), n=3)
  hint = (f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else
          '; jaxcnn/config.py defines every key')
  return ConfigError(f"{where} has an unknown config key '{prefix}{key}'{hint}")


def _check_keys_defined(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                        prefix: str = '') -> None:
  """Refuses keys that `default_config` does not define. `lock_config` refuses them on the
  command line, but a config file adds keys to its config before it is locked, and a misspelt
  one would be silently ignored (and recorded in the run's config.json)."""
  for key, value in config.items():
    if key not in defaults:
      raise _unknown_key(key, defaults, prefix, 'the config')
    if isinstance(value, ml_collections.ConfigDict):
      default = defaults[key]
      # model_kwargs holds the model's own argument names, which models.check_model_kwargs checks.
      if isinstance(default, ml_collections.ConfigDict) and f'{prefix}{key}' != 'model_kwargs':
        _check_keys_defined(value, default, f'{prefix}{key}.')


def shrink_for_smoke(config: ml_collections.ConfigDict, *, num_train_steps: int = 20,
                     batch_size: int = 32, eval_batch_size: int = 100, num_train: int = 640,
                     num_eval: int = 200) -> ml_collections.ConfigDict:
  """Turns `config` into its `:smoke` variant: a few small steps that run on a CPU in seconds.

  The smoke run trains on synthetic data of the dataset's shape when the dataset is neither
  prepared nor in manual_dir (it never downloads), so it checks the whole pipeline on any machine.
  """
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size
  config.num_train_steps = num_train_steps
  # The recipe's warm-up, in epochs of the real dataset, would outlast these few steps.
  config.warmup_epochs = 0.0
  config.log_every_steps = max(1, num_train_steps // 2)
  config.synthetic_if_unprepared = True
  config.synthetic.num_train = num_train
  config.synthetic.num_eval = num_eval
  return config


def unknown_variant(config_file: str, variant: str, known: tuple[str, ...]) -> ConfigError:
  """The error for `configs/<file>.py:<variant>` with a variant the file does not define."""
  choices = ', '.join(repr(name) for name in known)
  return ConfigError(f'unknown variant {variant!r} of {config_file}; use one of: {choices}')


def flatten(values: dict, prefix: str = '') -> dict:
  """A config as a dict (`ConfigDict.to_dict()`, or config.json read back) flattened to dotted
  keys, `{'augment.flip': True, ...}`, with tuples as the lists that JSON reads back."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming the first key that is not defined or whose value is not
  accepted."""
  _check_keys_defined(config, default_config())
  _require(config, 'dataset', isinstance(config.dataset, str) and config.dataset,
           "a TFDS dataset name, 'imagefolder' or 'synthetic'")
  if config.image_folder and config.dataset != 'imagefolder':
    raise ConfigError(f"config key 'image_folder' is read only with --config.dataset=imagefolder; "
                      f'this config trains on {config.dataset!r}')
  # An empty folder name, often an unset shell variable (--config.data_dir=$DATA), would have
  # datasets read from and prepared in the current folder.
  for key, what in (('data_dir', "a folder, or left unset for TFDS's default"),
                    ('manual_dir', 'a folder, or left unset for <data_dir>/downloads/manual'),
                    ('image_folder', 'a folder')):
    _require(config, key, config[key] is None or str(config[key]).strip(), what)
  models.get_model_constructor(config.model)
  _require(config, 'model_kwargs', isinstance(config.model_kwargs, ml_collections.ConfigDict),
           "a dict of the model's constructor arguments, e.g. \"{'widths': (32, 64, 128)}\"")
  for key, value in config.model_kwargs.items():
    if not _is_literal(value):
      raise ConfigError(f"config key 'model_kwargs.{key}' must be a number, string, true or false, "
                        f'None, or a tuple of those (a run records it in config.json), got '
                        f'{value!r}')
  models.check_model_kwargs(config.model, model_kwargs(config))
  _choice(config, 'dtype', tuple(models.DTYPES))
  _choice(config, 'optimizer', optim.OPTIMIZERS)
  _choice(config, 'lr_schedule', optim.SCHEDULES)
  _choice(config, 'parallel', tuple(parallel.STRATEGIES))
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints',
              'grad_accum_steps'):
    _positive_int(config, key)
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config key 'batch_size' ({config.batch_size}) must be divisible by "
                      f"'grad_accum_steps' ({config.grad_accum_steps})")
  _choice(config, 'data_placement', ('auto', 'device', 'stream'))
  shape = config.synthetic.image_shape
  _require(config, 'synthetic.image_shape',
           isinstance(shape, (tuple, list)) and len(shape) == 3
           and all(_is_int(d) and d > 0 for d in shape),
           'three positive integers, height,width,channels, e.g. 32,32,3')
  _require(config, 'synthetic.num_classes',
           _is_int(config.synthetic.num_classes) and config.synthetic.num_classes >= 2,
           'an integer >= 2')
  for key in ('num_train', 'num_eval'):
    _require(config, f'synthetic.{key}',
             _is_int(config.synthetic[key]) and config.synthetic[key] > 0, 'a positive integer')
  _require(config, 'image_size', _is_int(config.image_size) and config.image_size >= 0,
           'an integer >= 0')
  _require(config, 'data_workers', _is_int(config.data_workers) and config.data_workers >= -1,
           'an integer >= 0, or -1')
  for key in ('augment.mixup_alpha', 'augment.cutmix_alpha'):
    value = config.augment[key.split('.')[1]]
    _require(config, key, _is_number(value) and value >= 0, 'a number >= 0')
  _require(config, 'ema_decay', _is_number(config.ema_decay) and 0 <= config.ema_decay < 1,
           'a number in [0, 1)')
  _require(config, 'augment.inception_crop', isinstance(config.augment.inception_crop, bool),
           'true or false')
  for key in ('keep_best', 'profile_steps', 'profile_start_step'):
    _require(config, key, _is_int(config[key]) and config[key] >= 0, 'an integer >= 0')
  _choice(config, 'best_mode', ('auto', 'max', 'min'))
  _choice(config, 'eval_tta', TEST_TIME_AUGMENTATIONS)
  # Checkpoints are ranked by the evaluation metrics saved with them.
  best_metrics = [f'{config.eval_split}/{weights}{views}{name}'
                  for weights in ('', *(('ema_',) if config.ema_decay else ()))
                  for views in ('', *(('tta_',) if config.eval_tta != 'none' else ()))
                  # top5_accuracy: for datasets of more than 10 classes (build_experiment checks).
                  for name in ('accuracy', 'loss', 'top5_accuracy')]
  metric_name = str(config.best_metric).rpartition('/')[2]
  for kind, key, setting in (('ema_', 'ema_decay', 'a decay in (0, 1)'),
                             ('tta_', 'eval_tta',
                              ' or '.join(map(repr, TEST_TIME_AUGMENTATIONS[1:])))):
    if config.best_metric not in best_metrics and kind in metric_name:
      # A metric that this run would not evaluate; named, with the key that would.
      raise ConfigError(f"config key 'best_metric' ({config.best_metric!r}) is evaluated only "
                        f'with {key} set to {setting}; this run evaluates '
                        f'{", ".join(best_metrics)}')
  _choice(config, 'best_metric', best_metrics)
  direction = metric_direction(config.best_metric)
  if config.best_mode not in ('auto', direction):
    # The checkpoint kept as best would be the worst one, with nothing to say so.
    highest = 'highest' if config.best_mode == 'max' else 'lowest'
    raise ConfigError(f"config key 'best_mode' ({config.best_mode!r}) would keep the checkpoints "
                      f"with the {highest} {config.best_metric} as the best; use "
                      f"'{direction}' or 'auto'")
  check_frozen(config)
  checkpoint = config.init_from.checkpoint
  _require(config, 'init_from.checkpoint', isinstance(checkpoint, str)
           and (checkpoint in ('best', 'latest') or checkpoint.isdigit()),
           "'best', 'latest' or a step number")
  _require(config, 'init_from.weights', config.init_from.weights in WEIGHTS,
           f'one of {", ".join(WEIGHTS)}')
  _require(config, 'async_checkpointing', isinstance(config.async_checkpointing, bool),
           'true or false')
  for key in ('num_train_steps', 'eval_every_steps', 'steps_per_call', 'num_devices',
              'checkpoint_every_steps'):
    value = config[key]
    _require(config, key, _is_int(value) and (value == -1 or value > 0),
             'a positive integer, or -1')
  if config.num_train_steps == -1:
    _require(config, 'num_epochs', _is_number(config.num_epochs) and config.num_epochs > 0,
             'a positive number (or set num_train_steps)')
  _require(config, 'learning_rate', _is_number(config.learning_rate) and config.learning_rate > 0,
           'a positive number')
  for key in ('weight_decay', 'warmup_epochs', 'grad_clip_norm'):
    _require(config, key, _is_number(config[key]) and config[key] >= 0, 'a number >= 0')
  if config.lr_schedule == 'onecycle' and config.warmup_epochs:
    raise ConfigError(f"config key 'warmup_epochs' ({config.warmup_epochs:g}) is not used by "
                      "lr_schedule 'onecycle', which warms up over its first 30% itself; set it "
                      'to 0 or choose another schedule')
  _require(config, 'lr_decay_epochs',
           isinstance(config.lr_decay_epochs, (tuple, list))
           and all(_is_number(e) and e > 0 for e in config.lr_decay_epochs)
           and list(config.lr_decay_epochs) == sorted(config.lr_decay_epochs),
           'increasing positive numbers of epochs, e.g. 30,60,80')
  _require(config, 'lr_decay_factor',
           _is_number(config.lr_decay_factor) and 0 < config.lr_decay_factor <= 1,
           'a number in (0, 1]')
  for key in ('momentum', 'beta1', 'beta2', 'label_smoothing'):
    _require(config, key, _is_number(config[key]) and 0 <= config[key] < 1, 'a number in [0, 1)')
  # The compiled steps take the seed as an int32 argument.
  _require(config, 'seed', _is_int(config.seed) and 0 <= config.seed < 2 ** 31,
           'an integer from 0 to 2147483647')
  _require(config, 'augment.crop_padding',
           _is_int(config.augment.crop_padding) and config.augment.crop_padding >= 0,
           'an integer >= 0')
  _require(config, 'augment.pad_mode', config.augment.pad_mode in PAD_MODES,
           f'one of {", ".join(PAD_MODES)}')
  _require(config, 'augment.flip', isinstance(config.augment.flip, bool), 'true or false')
  _require(config, 'augment.cutout', _is_int(config.augment.cutout) and config.augment.cutout >= 0,
           'an integer >= 0 (pixels)')
  _require(config, 'augment.randaugment_ops',
           _is_int(config.augment.randaugment_ops) and config.augment.randaugment_ops >= 0,
           'an integer >= 0 (operations per image)')
  magnitude = config.augment.randaugment_magnitude
  _require(config, 'augment.randaugment_magnitude',
           _is_number(magnitude) and 0 <= magnitude <= randaugment.MAX_MAGNITUDE,
           f'a number from 0 to {randaugment.MAX_MAGNITUDE:g}')
  magnitude_std = config.augment.randaugment_magnitude_std
  _require(config, 'augment.randaugment_magnitude_std',
           (_is_number(magnitude_std) or magnitude_std == math.inf) and magnitude_std >= 0,
           'a number >= 0 (inf draws the magnitude uniformly from 0)')
  probability = config.augment.randaugment_probability
  _require(config, 'augment.randaugment_probability',
           _is_number(probability) and 0 <= probability <= 1, 'a number from 0 to 1')
  _require(config, 'augment.trivialaugment', isinstance(config.augment.trivialaugment, bool),
           'true or false')
  _require(config, 'augment.autoaugment', config.augment.autoaugment in AUTOAUGMENT_CHOICES,
           f'one of {", ".join(AUTOAUGMENT_CHOICES)}')
  _require(config, 'augment.augmix', isinstance(config.augment.augmix, bool), 'true or false')
  severity, width, depth = (config.augment.augmix_severity, config.augment.augmix_width,
                            config.augment.augmix_depth)
  _require(config, 'augment.augmix_severity',
           _is_int(severity) and 1 <= severity <= randaugment.AUGMIX_BINS,
           f'an integer from 1 to {randaugment.AUGMIX_BINS}')
  _require(config, 'augment.augmix_width', _is_int(width) and width >= 1,
           'an integer >= 1 (chains)')
  _require(config, 'augment.augmix_depth', _is_int(depth) and (depth == -1 or depth >= 1),
           'an integer >= 1, or -1 for 1 to 3 operations at random')
  _require(config, 'augment.augmix_alpha',
           _is_number(config.augment.augmix_alpha) and config.augment.augmix_alpha > 0,
           'a number > 0')
  _require(config, 'augment.augmix_all_ops', isinstance(config.augment.augmix_all_ops, bool),
           'true or false')
  chosen = [(key, off) for key, off in AUTOMATIC_AUGMENTATIONS if config.augment[key] != off]
  if len(chosen) > 1:
    (first, first_off), (second, second_off) = chosen[:2]
    raise ConfigError(f"config keys 'augment.{first}' ({flag_text(config.augment[first])}) and "
                      f"'augment.{second}' ({flag_text(config.augment[second])}) both ask for an "
                      f'automatic augmentation; choose one ({first}={flag_text(first_off)} or '
                      f'{second}={flag_text(second_off)})')
  jsd_weight = config.augment.augmix_jsd_weight
  _require(config, 'augment.augmix_jsd_weight', _is_number(jsd_weight) and jsd_weight >= 0,
           'a number >= 0 (12 in the AugMix paper; 0: off)')
  if jsd_weight and not config.augment.augmix:
    raise ConfigError(f"config key 'augment.augmix_jsd_weight' ({jsd_weight}) weighs AugMix's "
                      'consistency loss, and AugMix is off; set augment.augmix=true, or '
                      'augmix_jsd_weight=0')
  mixing = [key for key in ('mixup_alpha', 'cutmix_alpha') if config.augment[key]]
  if jsd_weight and mixing:
    raise ConfigError(f"config key 'augment.augmix_jsd_weight' ({jsd_weight}) compares three "
                      f"views of each image, which 'augment.{mixing[0]}' "
                      f'({config.augment[mixing[0]]}) would mix with other images; set '
                      f'{" and ".join(f"{key}=0" for key in mixing)}, or augmix_jsd_weight=0')
  _require(config, 'augment.random_erasing',
           _is_number(config.augment.random_erasing) and 0 <= config.augment.random_erasing <= 1,
           'a number from 0 to 1 (the probability of erasing a box of each image)')
  _require(config, 'augment.random_erasing_mode',
           config.augment.random_erasing_mode in RANDOM_ERASING_MODES,
           f'one of {", ".join(RANDOM_ERASING_MODES)}')


def check_frozen(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError when the `frozen` key is not a regular expression."""
  _require(config, 'frozen', isinstance(config.frozen, str), 'a regular expression')
  try:
    re.compile(config.frozen)
  except re.error as e:
    raise ConfigError(f"config key 'frozen' ({config.frozen!r}) is not a regular expression: "
                      f'{e}') from None


def metric_direction(metric: str) -> str:
  """Whether the best value of `metric` is its 'min' (a loss) or its 'max' (an accuracy): what
  best_mode 'auto' ranks checkpoints by."""
  return 'min' if metric.endswith('loss') else 'max'


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _is_literal(value) -> bool:
  """Whether `value` is what JSON records and reads back as itself (a tuple as a list)."""
  if isinstance(value, (list, tuple)):
    return all(_is_literal(v) for v in value)
  return (value is None or isinstance(value, (str, bool, numbers.Integral))
          or _is_number(value))


def _require(config, key: str, ok, what: str) -> None:
  if not ok:
    value = config
    for part in key.split('.'):
      value = value[part]
    raise ConfigError(f'config key {key!r} must be {what}, got {value!r}')


def _positive_int(config, key: str) -> None:
  _require(config, key, _is_int(config[key]) and config[key] > 0, 'a positive integer')


def flag_text(value) -> str:
  """A config value as a command line sets it (`--config.augment.augmix=false`): false, not
  Python's False."""
  return str(value).lower() if isinstance(value, bool) else str(value)


def _choice(config, key: str, choices) -> None:
  _require(config, key, config[key] in choices, f'one of {", ".join(choices)}')
