"""`train_and_evaluate(config, workdir)`: the whole training run, from data to final metrics.

The run reads as phases: setup, data, model and optimizer, compiled steps, loop, final report.
The device never waits for the host: steps are dispatched asynchronously, metrics are summed on the
device and fetched only at log and evaluation steps.
"""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxcnn import config as config_lib
from jaxcnn import caches, checkpoint, feeds, models, optim, parallel, profiling, warm_start
from jaxcnn import tree_paths, xla_options
from jaxcnn import workdir as workdir_lib
from jaxcnn.checkpoint import StateMismatch, make_checkpointer
from jaxcnn.data import pipeline, randaugment
from jaxcnn.data.augment import Preprocessor
from jaxcnn.errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError
from jaxcnn.metrics import MetricWriter
from jaxcnn.progress import Progress, Stopwatch, format_duration
from jaxcnn.train_state import ModelDef, TrainState, create_train_state
from jaxcnn.train_step import (NO_STEP, TOP5_ABOVE_CLASSES, StepOptions, init_eval_sums,
                               init_train_sums, make_eval_step, make_train_step)


# The phases a run times; each is reported as `time/<phase>_seconds` in metrics.jsonl.
TIMED_PHASES = ('compile', 'train', 'eval', 'checkpoint', 'data')

# Training images that initialise a data-dependent first layer (airbench uses 5,000).
_WHITENING_IMAGES = 5000


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The number of optimizer steps of the run: `num_train_steps`, or `num_epochs` of steps."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, optim.epochs_in_steps(config.num_epochs, steps_per_epoch, math.ceil))


def default_steps_per_call(backend: str) -> int:
  """Train steps per compiled call when the config says -1.

  On the CPU, separately jitted steps win: a 469-step `lax.scan` of a small CNN ran over 10x
  slower than 469 jitted steps on the 2-core machine. Accelerators pay tens of microseconds of
  dispatch per call, which small models feel, so they scan several steps per call.
  """
  return 1 if backend == 'cpu' else 25


def call_length(steps_per_call: int, steps_to_boundary: int) -> int:
  """Steps of the next compiled call: `steps_per_call`, or, where a log, evaluation or checkpoint
  step, an epoch's end or the last step comes sooner, the largest power of two that fits.

  Each length is a program of its own (a scan's length is static). Cutting a call to fit each
  boundary exactly compiled one per distinct remainder (all 25 lengths for configs/mnist.py at 25
  steps per call); powers of two bound them to log2(steps_per_call) + 2 programs, and a remainder
  takes at most that many calls.
  """
  if steps_to_boundary >= steps_per_call:
    return steps_per_call
  return 1 << (steps_to_boundary.bit_length() - 1)


@dataclasses.dataclass
class Experiment:
  """Everything static about a run: the model definition, optimizer and compiled steps.

  `build_experiment` makes one from a config; `train_and_evaluate` and the benchmarks drive it.
  `train_fn` and `eval_fn` take device-resident splits (placement 'device') or streamed batches
  (placement 'stream'); see `jaxcnn.parallel` and `jaxcnn.feeds`.
  """
  config: ml_collections.ConfigDict
  strategy: parallel.Strategy
  num_classes: int
  steps_per_epoch: int
  total_steps: int
  model_def: ModelDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  preprocess: Preprocessor
  train_fn: Callable
  eval_fn: Callable
  confusion_matrix: bool = False  # Whether eval_fn also counts (label, prediction) pairs.

  def zero_train_sums(self):
    """Device-side accumulators of the train metrics between two log steps."""
    return self.strategy.replicate(init_train_sums())

  def zero_eval_sums(self):
    """Device-side accumulators of an evaluation's sums."""
    return self.strategy.replicate(init_eval_sums(
        self.num_classes, self.confusion_matrix,
        test_time_augmentation=self.config.eval_tta != 'none'))


def check_batch_sizes(config: ml_collections.ConfigDict, strategy: parallel.Strategy, *,
                      training: bool = True) -> None:
  """Refuses batches the devices cannot split evenly: the training batch and its micro-batches
  (`grad_accum_steps`) when `training`, and the evaluation batch."""
  if training:
    strategy.check_batch_size('batch_size', config.batch_size)
    per_device_batch = config.batch_size // strategy.num_devices
    if per_device_batch % config.grad_accum_steps:
      raise ConfigError(f"config key 'grad_accum_steps' ({config.grad_accum_steps}) must divide "
                        f'the batch of each device ({config.batch_size} / {strategy.num_devices} '
                        f'devices = {per_device_batch})')
  strategy.check_batch_size('eval_batch_size', config.eval_batch_size)


# L2 weight decay (every optimizer but AdamW) from which on it is likely meant as AdamW's: 20x the
# 5e-4 of the CIFAR and ImageNet recipes.
L2_WARNING_THRESHOLD = 0.01


def _check_augmentation(config: ml_collections.ConfigDict, image_shape) -> None:
  """Refuses, in one line, training augmentation that these images cannot take."""
  side = min(image_shape[:2])
  size = f'{image_shape[0]}x{image_shape[1]}'
  if config.augment.cutout > side:
    raise ConfigError(f"config key 'augment.cutout' ({config.augment.cutout}) is larger than the "
                      f'{size} images it would cut from; use at most {side} (the Cutout paper '
                      'cut 16 from 32x32 CIFAR-10 and 8 from CIFAR-100)')
  if image_shape[-1] not in randaugment.CHANNELS:
    for key, off in config_lib.AUTOMATIC_AUGMENTATIONS:
      if config.augment[key] != off:
        value = config_lib.flag_text(config.augment[key])
        raise ConfigError(f"config key 'augment.{key}' ({value}) is for images of 1 or 3 "
                          f'channels, and these have {image_shape[-1]}: its colour operations '
                          f'are defined on grey and RGB images; set it to '
                          f'{config_lib.flag_text(off)}')
  if config.augment.crop_padding >= side:  # Some crops would be padding alone.
    raise ConfigError(f"config key 'augment.crop_padding' ({config.augment.crop_padding}) is not "
                      f'less than the side of the {size} images, so some crops would hold none '
                      f'of the image; use less than {side} (4 is the usual for 32x32 CIFAR-10)')


def build_experiment(config: ml_collections.ConfigDict, *, image_shape, num_classes: int,
                     num_train_examples: int, mean, std, strategy: parallel.Strategy,
                     placement: str = 'device',
                     training_images: Callable[[int], np.ndarray] | None = None,
                     training: bool = True, confusion_matrix: bool = False
                     ) -> tuple[Experiment, TrainState]:
  """Builds the model, optimizer and compiled steps of `config`; returns them and the initial state.

  The initial state is already placed on the devices in `strategy`'s layout. For streamed data
  (`placement='stream'`) the host pipeline crops and flips, so the device only normalises.
  `training_images(count)` (`count` uint8 training images) initialises models that learn their
  first layer from the data, such as airbench's patch whitening; it is called only for those.
  `training=False` (evaluating or predicting with a trained run's state) leaves out the checks of
  the training batch against the devices, which may not be those it was trained on, and of the
  training augmentation against the images.
  `confusion_matrix` has the evaluation count every (label, predicted class) pair too, which
  `evaluate` returns.
  """
  check_batch_sizes(config, strategy, training=training)
  if config.best_metric.endswith('top5_accuracy') and num_classes <= TOP5_ABOVE_CLASSES:
    raise ConfigError(f"config key 'best_metric' ({config.best_metric!r}) is counted only for "
                      f'datasets of more than {TOP5_ABOVE_CLASSES} classes, and this one has '
                      f'{num_classes}; use {config.best_metric.replace("top5_", "")!r}')
  if training:  # Evaluating a run leaves its training augmentation, of an older jaxcnn too, out.
    _check_augmentation(config, image_shape)
  steps_per_epoch = num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"config key 'batch_size' ({config.batch_size}) is larger than the "
                      f'{num_train_examples} training examples')
  total_steps = total_train_steps(config, steps_per_epoch)
  model = models.create_model(config.model, num_classes=num_classes, input_shape=image_shape,
                              dtype=config.dtype, seed=config.seed, axis_name=strategy.axis_name,
                              model_kwargs=config_lib.model_kwargs(config))
  if strategy.axis_name is not None and strategy.num_devices > 1:
    _check_batchnorm_axes(config.model, model, strategy)
  if training_images is not None and hasattr(model, 'init_whitening'):
    model.init_whitening(training_images(_WHITENING_IMAGES))
  warmup = optim.requested_warmup_steps(config, steps_per_epoch)
  if (training and warmup >= total_steps and config.lr_schedule != 'onecycle'
      and jax.process_index() == 0):
    print(f'warning: warmup_epochs={config.warmup_epochs:g} is {warmup} steps, as long as the '
          f'run ({total_steps} steps) or longer: the learning rate rises over the whole run and '
          'reaches learning_rate at its last step', file=sys.stderr, flush=True)
  if (training and config.optimizer not in optim.DECOUPLED_WEIGHT_DECAY
      and config.weight_decay >= L2_WARNING_THRESHOLD and jax.process_index() == 0):
    # Typically a config written for AdamW (configs/mnist.py's 0.05) run with another optimizer;
    # LARS adds its decay to the gradient, as an L2 penalty.
    print(f'warning: weight_decay={config.weight_decay:g} with optimizer {config.optimizer!r} is '
          f'an L2 penalty, {config.weight_decay / 5e-4:g}x the usual 5e-4; values like it are '
          "AdamW's decoupled decay (optimizer 'adamw'), which scales with the learning rate",
          file=sys.stderr, flush=True)
  if training and jax.process_index() == 0:
    for message in optim.unread_settings(config, config_lib.default_config()):
      print(f'warning: {message}', file=sys.stderr, flush=True)
  if config.eval_tta != 'none' and not config.augment.flip and jax.process_index() == 0:
    # Mirror images of digits or text are other glyphs, which a model that never saw them
    # classifies worse: averaging them in can only lower its accuracy.
    print(f'warning: eval_tta={config.eval_tta!r} averages in mirror images, which this model '
          'was not trained on (augment.flip is off): its TTA accuracy may well be below its '
          'accuracy', file=sys.stderr, flush=True)
  if config.frozen:
    _freeze(config, model, announce=training and jax.process_index() == 0)
  tx = optim.make_optimizer(config, total_steps, steps_per_epoch)
  model_def, state = create_train_state(model, tx, ema=config.ema_decay > 0)
  on_device = placement == 'device'
  preprocess = Preprocessor(mean=tuple(mean), std=tuple(std),
                            crop_padding=config.augment.crop_padding if on_device else 0,
                            pad_mode=config.augment.pad_mode,
                            flip=config.augment.flip and on_device,
                            inception_crop=config.augment.inception_crop and on_device,
                            # On the device for streamed data too: after the host's crops
                            # and flips, a few elementwise passes and a gather per image.
                            randaugment_ops=config.augment.randaugment_ops,
                            randaugment_magnitude=config.augment.randaugment_magnitude,
                            randaugment_magnitude_std=config.augment.randaugment_magnitude_std,
                            randaugment_probability=config.augment.randaugment_probability,
                            trivialaugment=config.augment.trivialaugment,
                            autoaugment=config.augment.autoaugment,
                            augmix=config.augment.augmix,
                            augmix_severity=config.augment.augmix_severity,
                            augmix_width=config.augment.augmix_width,
                            augmix_depth=config.augment.augmix_depth,
                            augmix_alpha=config.augment.augmix_alpha,
                            augmix_all_ops=config.augment.augmix_all_ops,
                            # Likewise: a mask, cheap anywhere.
                            cutout=config.augment.cutout,
                            random_erasing=config.augment.random_erasing,
                            random_erasing_mode=config.augment.random_erasing_mode,
                            dtype=config.dtype)
  options = StepOptions(num_classes=num_classes, label_smoothing=config.label_smoothing,
                        grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
                        mixup_alpha=config.augment.mixup_alpha,
                        cutmix_alpha=config.augment.cutmix_alpha, frozen=config.frozen,
                        augmix_jsd_weight=config.augment.augmix_jsd_weight)
  train_step = make_train_step(model_def, tx, preprocess, options, axis_name=strategy.axis_name)
  eval_step = make_eval_step(model_def, preprocess, num_classes=num_classes,
                             axis_name=strategy.axis_name, confusion_matrix=confusion_matrix,
                             test_time_augmentation=config.eval_tta)
  if on_device:
    train_fn = strategy.train_fn(train_step, config.batch_size)
    eval_fn = strategy.eval_fn(eval_step, config.eval_batch_size)
  else:
    train_fn, eval_fn = strategy.stream_train_fn(train_step), strategy.stream_eval_fn(eval_step)
  experiment = Experiment(
      config=config, strategy=strategy, num_classes=num_classes, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, model_def=model_def, tx=tx,
      schedule=optim.make_schedule(config, total_steps, steps_per_epoch), preprocess=preprocess,
      train_fn=train_fn, eval_fn=eval_fn, confusion_matrix=confusion_matrix)
  return experiment, strategy.replicate(state)


def _check_batchnorm_axes(name: str, model, strategy: parallel.Strategy) -> None:
  """Refuses BatchNorm layers that would keep per-device statistics under shard_map or pmap.

  Such layers normalise each device's examples alone, and only device 0's running statistics
  would be saved: a different model from the one trained on one device, or with `jit`.
  """
  local = [tree_paths.dotted(path) for path, module in nnx.iter_graph(model)
           if isinstance(module, nnx.BatchNorm) and module.axis_name is None]
  if local:
    raise ConfigError(
        f'model {name!r} has BatchNorm layers without axis_name '
        f'({tree_paths.listed(local, 3)}): under {strategy.name} on {strategy.num_devices} '
        "devices each would normalise its device's examples alone. Accept axis_name in the "
        "model's constructor and pass it to nnx.BatchNorm, or use --config.parallel=jit")


def _freeze(config: ml_collections.ConfigDict, model, announce: bool) -> None:
  """Checks the `frozen` pattern against the model's parameters, refusing one that matches none
  or every one, and has the BatchNorm layers it freezes whole normalise with their running
  statistics in training too, leaving them as they are (torchvision's FrozenBatchNorm2d). With
  `announce`, says what it freezes."""
  sizes = {path: math.prod(shape) for path, shape in models.parameter_shapes(model).items()}
  frozen = optim.frozen_parameters(nnx.state(model, nnx.Param), config.frozen)
  trained = sorted(set(sizes) - set(frozen))
  if not frozen:
    raise ConfigError(f"config key 'frozen' ({config.frozen!r}) matches none of the parameters "
                      f'of model {config.model!r}: {tree_paths.listed(sorted(sizes))}')
  if not trained:
    raise ConfigError(f"config key 'frozen' ({config.frozen!r}) matches every parameter of model "
                      f'{config.model!r}: nothing would train')
  freezes = optim.freezes(config.frozen)
  frozen_norms = 0
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      own = [tree_paths.dotted((*path, *key)) for key, _ in
             nnx.to_flat_state(nnx.state(module, nnx.Param))]
      # A BatchNorm without scale and bias is named by its statistics.
      own = own or [tree_paths.dotted((*path, 'mean'))]
      if all(freezes(param) for param in own):
        # Set before the model is split: the train step's graph holds it, and evaluation's
        # model.eval() sets it for every layer anyway.
        module.use_running_average = True
        frozen_norms += 1
  if announce:
    norms = {0: '', 1: ' and 1 BatchNorm layer, which normalises with its running statistics'}.get(
        frozen_norms, f' and {frozen_norms} BatchNorm layers, which normalise with their running '
        'statistics')
    print(f'frozen: {len(frozen)} of {len(sizes)} parameter arrays '
          f'({sum(sizes[name] for name in frozen):,} of {sum(sizes.values()):,} parameters)'
          f'{norms}; training {tree_paths.listed(trained)}', flush=True)


def evaluate(experiment: Experiment, state, feed, prefix: str) -> dict[str, float]:
  """Metrics over every example of the feed's split: `<prefix>/loss`, `<prefix>/accuracy`
  (`<prefix>/top5_accuracy` too, for datasets of more than 10 classes), and the count. With
  a moving average of the weights, `<prefix>/ema_loss` and `<prefix>/ema_accuracy` too; with
  test-time augmentation (`eval_tta`), `<prefix>/tta_loss` and `<prefix>/tta_accuracy` (and
  `ema_tta_...`) of the logits averaged over each image's views. Where the
  experiment counts a confusion matrix, `<prefix>/confusion_matrix` (of the trained weights) is
  that matrix, an array: rows the labels, columns the predicted classes.

  Batches are padded to full size; the mask keeps padding out of every sum, so every example of
  the split counts exactly once.
  """
  metrics = _evaluate_weights(experiment, state, feed, prefix, '')
  if experiment.config.ema_decay > 0:
    metrics.update(_evaluate_weights(experiment, state.averaged(), feed, prefix, 'ema_'))
  return metrics


def _evaluate_weights(experiment, state, feed, prefix, name_prefix):
  sums = experiment.strategy.fetch(feed.run(state, experiment.zero_eval_sums()))
  count = int(sums['count'])
  metrics = {}
  for views in ('', 'tta_'):  # The images alone, and averaged over their test-time views.
    if f'{views}correct' in sums:
      name = f'{prefix}/{name_prefix}{views}'
      metrics[f'{name}loss'] = float(sums[f'{views}loss']) / count
      metrics[f'{name}accuracy'] = float(sums[f'{views}correct']) / count
      if f'{views}correct_top5' in sums:
        metrics[f'{name}top5_accuracy'] = float(sums[f'{views}correct_top5']) / count
  if not name_prefix:
    metrics[f'{prefix}/num_examples'] = count
    if 'confusion' in sums:
      metrics[f'{prefix}/confusion_matrix'] = sums['confusion']  # Fetched: a numpy array.
  return metrics


class _StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  Preemption (SIGTERM) and Ctrl-C (SIGINT) then end the run with a saved checkpoint instead of a
  lost one; a second Ctrl-C interrupts at once. In a multi-process run every process must stop at
  the same step, also when only one of them was signalled, so JAX's preemption sync point decides
  there. Its notifier, which `jax.distributed.initialize` installs, listens for SIGTERM and tells
  every process: a Python handler for SIGTERM would take the signal from it, so there SIGTERM is
  left to it, and a first SIGINT is passed on to it as a SIGTERM.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_number = None
    self._previous = {}
    self._multi_process = jax.process_count() > 1
    self._checks = 0

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for number in self.SIGNALS:
        if not (self._multi_process and number == signal.SIGTERM):
          self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  def _handle(self, number, frame):
    if self.signal_number == signal.SIGINT and number == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_number = number
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier.

  def should_stop(self) -> bool:
    """Whether to stop after the call just made: called once after every compiled call."""
    if self._multi_process:
      # JAX stops every process at the check one past the furthest any process had reached when
      # the notice came, so the ids it is given must count up by one: they number the checks,
      # as every process makes the same ones. (Steps would skip that id where a call runs
      # several, and no process would ever stop.)
      self._checks += 1
      return multihost_utils.reached_preemption_sync_point(self._checks)
    return self.signal_number is not None

  def stop_if_requested_before_training(self, step: int = 0) -> None:
    """Ends a single-process run that was asked to stop while it was setting up (loading data,
    compiling); a multi-process run stops at its first sync point in the loop instead."""
    if self.signal_number is None or self._multi_process:
      return
    kept = (f'its checkpoint of step {step} is unchanged' if step else 'nothing was saved')
    raise TrainingInterrupted(f'stopped by {signal.Signals(self.signal_number).name} before '
                              f'training began; {kept}', self.signal_number)


def describe_evaluation(metrics: dict, split: str, loss: bool = True) -> str:
  """`<split> accuracy 98.91%, loss 0.0345` for the terminal, with the top-5 accuracy after the
  accuracy where it is counted (`, top-5 93.20%`), and at the end the accuracy with test-time
  augmentation (`, TTA accuracy 94.10%`, with eval_tta) and the moving average's (`, EMA accuracy
  99.02%`, with ema_decay)."""
  text = f'{split} accuracy {100 * metrics[split + "/accuracy"]:.2f}%'
  if split + '/top5_accuracy' in metrics:
    text += f', top-5 {100 * metrics[split + "/top5_accuracy"]:.2f}%'
  if loss:
    text += f', loss {metrics[split + "/loss"]:.4f}'
  for name, shown in (('tta_accuracy', 'TTA'), ('ema_accuracy', 'EMA'),
                      ('ema_tta_accuracy', 'EMA TTA')):
    if f'{split}/{name}' in metrics:
      text += f', {shown} accuracy {100 * metrics[f"{split}/{name}"]:.2f}%'
  return text


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Trains `config.model` on `config.dataset` and evaluates it; returns the final metrics.

  Writes `config.json`, `dataset.json`, `metrics.jsonl`, TensorBoard event files and checkpoints
  into `workdir` (a new directory under `runs/` if None). A workdir that holds checkpoints is
  resumed from its latest good one. The returned dict holds the last evaluation
  (`<eval_split>/loss`, `<eval_split>/accuracy`, `<eval_split>/num_examples`), the last training
  metrics, `workdir`, `step`, and the seconds spent compiling, training, evaluating and saving.

  Raises:
    TrainingDiverged: the loss or gradient norm stopped being finite.
    TrainingInterrupted: SIGTERM or SIGINT arrived: during training, a checkpoint of the last
      step was saved; before training began, or at a second SIGINT, nothing more was saved.
  """
  # ---------------------------------------------------------------- Setup
  config_lib.validate(config)
  dataset_info = pipeline.check_dataset(config)  # An unknown dataset fails before any work.
  if dataset_info:  # An image folder's splits are known once it is prepared: load_data warns.
    pipeline.warn_of_shared_examples(config, dataset_info)
  caches.enable_compilation_cache()
  strategy = parallel.make_strategy(config.parallel, config.num_devices)
  check_batch_sizes(config, strategy)  # Before any data loads; build_experiment checks again.
  if workdir is None and jax.process_count() > 1:
    raise ConfigError('a multi-process run needs --workdir: every process must write to the '
                      'same directory')
  new_workdir = workdir is None
  workdir = workdir or workdir_lib.new_workdir(config.dataset, config.model)
  try:
    # A new run that starts from another's weights finds them before it writes anything; a run
    # that resumes reads its own checkpoint instead.
    source = (warm_start.find_source(config)
              if config.init_from.workdir and not checkpoint.holds_checkpoints(workdir) else None)
    workdir_lib.make_workdir(workdir)
    workdir_lib.check_can_hold_run(workdir)
    # From here on a signal asks the run to stop where it can: before training begins, or after
    # a step, with a checkpoint.
    with (_StopRequests() as stop_requests,
          workdir_lib.in_use(workdir, enabled=jax.process_index() == 0),
          contextlib.ExitStack() as resources):
      return _train(config, workdir, strategy, stop_requests, resources, source)
  except KeyboardInterrupt:  # A second Ctrl-C: stop at once.
    raise TrainingInterrupted(
        f'stopped at once by a second SIGINT, without saving; {workdir} resumes from its latest '
        'complete checkpoint, if it has one', signal.SIGINT) from None
  finally:
    if new_workdir:  # A run that ended before writing anything leaves no empty folder behind.
      workdir_lib.remove_if_empty(workdir)


def _train(config: ml_collections.ConfigDict, workdir: str, strategy: parallel.Strategy,
           stop_requests: _StopRequests, resources: contextlib.ExitStack,
           source: warm_start.Source | None) -> dict:
  """The run itself, from data to final metrics (see `train_and_evaluate`); a new run starts
  from the weights of `source`, if given.

  What needs closing (Grain's workers, the checkpoint manager, the metric writer, the progress
  bar) goes on `resources`, which closes it however the run ends: finished, stopped, diverged or
  failed. The normal end closes them itself first, in the order that keeps its timing right.
  """
  is_chief = jax.process_index() == 0
  stopwatch = Stopwatch()

  # ---------------------------------------------------------------- Data
  with stopwatch.timed('data'):
    data = pipeline.load_data(config)
  stop_requests.stop_if_requested_before_training()

  # ---------------------------------------------------------------- Model, optimizer, steps
  experiment, state = build_experiment(
      config, image_shape=data.image_shape, num_classes=data.num_classes,
      num_train_examples=data.num_train_examples, mean=data.mean, std=data.std,
      strategy=strategy, placement=data.placement,
      # Streamed data too: its sample is decoded from the source (airbench's run took its
      # random first layer for whitened patches).
      training_images=functools.partial(pipeline.training_sample, data))
  total_steps, steps_per_epoch = experiment.total_steps, experiment.steps_per_epoch
  model_source = models.source_digest(config.model)  # Of the code the model was just built from.
  train_feed = resources.enter_context(
      contextlib.closing(feeds.make_train_feed(config, experiment, data)))
  eval_feed = feeds.make_eval_feed(config, experiment, data)
  sums = experiment.zero_train_sums()

  # ---------------------------------------------------------------- Restore
  checkpointer = resources.enter_context(contextlib.closing(make_checkpointer(config, workdir)))
  step, num_saves = 0, 0  # num_saves: the checkpoints the run saved, before resumes included.
  if checkpointer.steps() and os.path.isfile(os.path.join(workdir, workdir_lib.DATASET_FILE)):
    # Before restoring: another number of classes would otherwise be refused as another model.
    workdir_lib.check_same_classes(workdir, data.class_names)
  try:
    restored = checkpointer.restore_latest_good(
        {'state': strategy.unreplicate(state), 'train_sums': strategy.unreplicate(sums)},
        NamedSharding(strategy.mesh, PartitionSpec()))
  except StateMismatch as e:  # With the changed keys that can have done it, if any.
    raise StateMismatch(e.step, e.directory, e.difference,
                        _how_to_resume(e, workdir, config)) from None
  if restored is not None:
    tree, meta = restored
    step = meta['step']
    if step >= total_steps:
      print(f'{workdir} already holds a checkpoint at step {step} (this config trains '
            f'{total_steps} steps): nothing to train. Raise num_train_steps or num_epochs to '
            'train on.', flush=True)
      return {**meta['metrics'], 'workdir': workdir, 'step': step}
    changes = _config_changes(workdir, config)
    train_feed.restore(step, {**meta['data'], 'batch_size': meta['batch_size']},
                       config.batch_size)
    state, sums = strategy.from_global(tree['state']), strategy.from_global(tree['train_sums'])
    for phase, seconds in meta.get('seconds', {}).items():  # The run's time so far counts too.
      stopwatch.add(phase, seconds)
    num_saves = meta.get('saves', 0)  # 0 from a jaxcnn that did not record the count.
    print(f'resuming from the checkpoint at step {step} ({_describe_position(meta["data"])})'
          + (f' with changed config: {changes}' if changes else ''), flush=True)
    source_change = is_chief and workdir_lib.changed_model_source(workdir, model_source)
    if source_change:
      print(source_change, file=sys.stderr, flush=True)
  elif config.init_from.workdir:
    source = source or warm_start.find_source(config)
    state, warm_start_record = warm_start.start_from(source, state, experiment.tx, strategy)
    if is_chief:
      warm_start.write_record(workdir, warm_start_record)
      line = warm_start.describe(source, warm_start_record)
      print(line, file=sys.stderr if line.startswith('warning') else sys.stdout, flush=True)
  # Written only now that the run goes ahead: a refused resume leaves the run's own record, which
  # `evaluate` and `predict` rebuild the model from. Metrics logged after the checkpoint (all of
  # them, for a run killed before its first one) are logged again.
  if is_chief:
    workdir_lib.truncate_metrics(workdir, step)
    workdir_lib.write_config(workdir, config)
    workdir_lib.write_model_source(workdir, model_source)
    workdir_lib.write_dataset(workdir, workdir_lib.DatasetRecord(
        name=data.name, image_shape=data.image_shape, num_classes=data.num_classes,
        class_names=data.class_names, num_train_examples=data.num_train_examples,
        mean=data.mean, std=data.std))

  # ---------------------------------------------------------------- Compile
  steps_per_call = (config.steps_per_call if config.steps_per_call > 0
                    else default_steps_per_call(jax.default_backend()))
  if steps_per_call > 1 and jax.default_backend() == 'cpu' and is_chief:
    print(f'warning: steps_per_call={steps_per_call} on the CPU, where XLA runs a loop of train '
          'steps many times slower than one step per call (bn_cnn on MNIST: 1.6 against 61 '
          'steps/s on 2 cores); -1, the default, takes 1 here', file=sys.stderr, flush=True)
  compiled_train: dict[int, Callable] = {}

  def compiled_train_fn(num_steps: int, args) -> Callable:
    """Compiles one variant per call length ahead of time: compiling never counts as training."""
    if num_steps not in compiled_train:
      # The steps already dispatched run on while this compiles: they are training time.
      jax.block_until_ready(args[0])
      with stopwatch.timed('compile'):
        compiled_train[num_steps] = strategy.compile(train_feed.fn, *args,
                                                     static=train_feed.static(num_steps),
                                                     options=xla_options.training_options())
    return compiled_train[num_steps]

  with stopwatch.timed('compile'):
    eval_feed.compile(state, experiment.zero_eval_sums())
  with stopwatch.timed('data'):  # The first epoch's order, or the stream's first batch.
    train_feed.warm_up(step)
  stop_requests.stop_if_requested_before_training(step)

  # ---------------------------------------------------------------- Loop
  writer = resources.enter_context(
      contextlib.closing(MetricWriter(workdir, enabled=is_chief, purge_step=step + 1)))
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  checkpoint_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                      else eval_every)
  progress = resources.enter_context(
      contextlib.closing(Progress(total_steps, step, enabled=is_chief)))
  num_params = models.count_params(strategy.unreplicate(state).params)
  progress.message(f'{config.model} ({num_params:,} parameters) on {data.name} '
                   f'({data.placement}): {total_steps} steps of {config.batch_size} '
                   f'({steps_per_epoch} per epoch) on {strategy.num_devices} '
                   f'{jax.default_backend()} device(s) with {strategy.name}; workdir {workdir}')
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  window_seconds, window_step = 0.0, step  # Training time and first step of the log window.

  if config.profile_steps and config.profile_start_step >= total_steps and is_chief:
    print(f'warning: profile_start_step={config.profile_start_step} is not before the last step '
          f'({total_steps}): no steps will be profiled; lower profile_start_step',
          file=sys.stderr, flush=True)
  profile = profiling.ProfileWindow(workdir, start_step=config.profile_start_step,
                                    num_steps=config.profile_steps, report=progress.message)
  with profile:
    window_start = time.perf_counter()
    while step < total_steps:
      next_event = min(_next_multiple(step, every)
                       for every in (config.log_every_steps, eval_every, checkpoint_every))
      num_steps = call_length(steps_per_call, min(train_feed.max_steps(step), next_event - step,
                                                  total_steps - step))
      args = train_feed.args(state, sums, step, num_steps)
      compile_seconds = stopwatch.totals.get('compile', 0.0)
      train_fn = compiled_train_fn(num_steps, args)
      window_start += stopwatch.totals.get('compile', 0.0) - compile_seconds  # Not training.
      profile.before_call(step)
      state, sums = train_fn(*args)
      step += num_steps
      progress.advance(num_steps)
      window_start += profile.after_call(step, state)  # Writing a trace is not training.

      stopping = stop_requests.should_stop()
      log_now = step % config.log_every_steps == 0
      eval_now = step % eval_every == 0 or step == total_steps
      checkpoint_now = step % checkpoint_every == 0 or step == total_steps or stopping
      if not (log_now or eval_now or checkpoint_now):
        continue

      fetched = strategy.fetch(sums)  # Waits for the device: the loop's only sync points.
      elapsed = time.perf_counter() - window_start
      stopwatch.add('train', elapsed)
      window_seconds += elapsed
      if int(fetched['first_nonfinite_step']) != NO_STEP:
        checkpointer.wait()
        latest = checkpointer.latest_step()
        raise TrainingDiverged(
            f'training diverged: the loss or gradient norm was not finite at step '
            f'{int(fetched["first_nonfinite_step"])}, so training stopped there. '
            + (f'The last good checkpoint is step {latest} in {checkpointer.directory}.'
               if latest is not None else 'No checkpoint had been written yet.'))
      if log_now or eval_now:
        steps_per_sec = (step - window_step) / window_seconds
        num = int(fetched['steps'])
        last_train = {'train/loss': float(fetched['loss']) / num,
                      'train/accuracy': float(fetched['accuracy']) / num,
                      'train/grad_norm': float(fetched['grad_norm']) / num,
                      'train/learning_rate': float(experiment.schedule(step - 1)),
                      'train/steps_per_sec': steps_per_sec,
                      'train/examples_per_sec': steps_per_sec * config.batch_size}
        writer.write_scalars(step, last_train)
        progress.report(step, last_train['train/loss'], steps_per_sec,
                        steps_per_sec * config.batch_size)
        sums = experiment.zero_train_sums()
        window_seconds, window_step = 0.0, step
      if eval_now:
        with stopwatch.timed('eval'):
          last_eval = evaluate(experiment, state, eval_feed, config.eval_split)
        # With the training seconds so far, compile and evaluation excluded: time to accuracy.
        writer.write_scalars(step, {**{k: v for k, v in last_eval.items()
                                       if not k.endswith('/num_examples')},
                                    'train/seconds': stopwatch.totals.get('train', 0.0)})
        progress.message(f'step {step}: {describe_evaluation(last_eval, config.eval_split)}')
      if checkpoint_now:
        num_saves += 1
        with stopwatch.timed('checkpoint'):
          checkpointer.save(
              step, {'state': strategy.unreplicate(state), 'train_sums': strategy.unreplicate(sums)},
              meta={'data': train_feed.position(step), 'batch_size': config.batch_size,
                    'seconds': dict(stopwatch.totals), 'saves': num_saves},
              metrics=last_eval if eval_now else None)
      # A stop asked for during the last call finds the run trained, evaluated and saved: it ends
      # as any finished run, with its timing record, not as one to resume.
      if stopping and step < total_steps:  # `resources` waits for the checkpoint just started.
        raise TrainingInterrupted(
            f'stopped by {signal.Signals(stop_requests.signal_number or signal.SIGTERM).name} at '
            f'step {step} of {total_steps}; the checkpoint of step {step} is in '
            f'{checkpointer.directory}. Run the same command again to resume.',
            stop_requests.signal_number or signal.SIGTERM)
      window_start = time.perf_counter()

  # ---------------------------------------------------------------- Final report
  progress.close()
  train_feed.close()
  with stopwatch.timed('checkpoint'):
    checkpointer.close()  # Waits for the last checkpoint to be completely written.
  timing = {f'time/{phase}_seconds': stopwatch.totals.get(phase, 0.0)
            for phase in TIMED_PHASES}
  timing['time/checkpoint_saves'] = num_saves
  writer.write_scalars(step, timing)
  writer.close()
  progress.message(
      f'done: {describe_evaluation(last_eval, config.eval_split, loss=False)} '
      f'after {step} steps; training {format_duration(timing["time/train_seconds"])}, compiling '
      f'{format_duration(timing["time/compile_seconds"])}, evaluating '
      f'{format_duration(timing["time/eval_seconds"])}, saving '
      f'{format_duration(timing["time/checkpoint_seconds"])}')
  return {**last_train, **last_eval, **timing, 'workdir': workdir, 'step': step}


def _how_to_resume(mismatch: StateMismatch, workdir: str, config: ml_collections.ConfigDict
                   ) -> str | None:
  """The advice of a resume refused for a checkpoint of another state: the changed config keys
  that can have caused it, or a user model's code (None: the default advice)."""
  changes = _config_changes(workdir, config, only=STATE_SHAPING_KEYS)
  if changes:
    # The user may be resuming with the run's own config already, with these on top of it.
    return (f'this config changes {changes}, which can shape the training state; resume with '
            f"the run's own config (--config {mismatch.run_config}) without that change, or "
            'start a new --workdir')
  if ':' in config.model and mismatch.in_model:
    return (f"if this is the run's own config, the code of model {config.model!r} builds other "
            'arrays than it did for the run: restore that code, or start a new --workdir')
  return None


# The config keys (and groups of keys) whose change can change the arrays a checkpoint holds: the
# model's (its inputs and classes included), the optimizer's state, and the moving average's.
STATE_SHAPING_KEYS = ('dataset', 'image_folder', 'image_size', 'synthetic',
                      'synthetic_if_unprepared', 'model', 'model_kwargs', 'optimizer',
                      'grad_clip_norm', 'weight_decay', 'ema_decay', 'frozen')


def _config_changes(workdir: str, config: ml_collections.ConfigDict,
                    only: tuple[str, ...] | None = None) -> str:
  """The keys a resume changes from the run's recorded config (`only` these, if given), as
  'key old -> new, ...'.

  Raises a ConfigError for a changed seed: the data order, augmentation and dropout of every step
  derive from it, so a resumed run with another seed would no longer be the run.
  """
  try:
    recorded_config = workdir_lib.read_config(workdir)
  except UserError:  # No record to compare with (written by hand, or lost).
    return ''
  recorded, changes = config_lib.flatten(recorded_config.to_dict()), []
  shown = lambda value: f"'{value}'" if isinstance(value, str) else value  # So that '' shows.
  for key, now in config_lib.flatten(config.to_dict()).items():
    before = recorded.get(key)
    group = key.split('.')[0]
    if (before != now and key in recorded and group != 'model_kwargs'
        and (only is None or group in only)):
      if key == 'seed':
        raise ConfigError(
            f'the run in {workdir} was trained with seed {before}, and its data order, '
            f'augmentation and dropout derive from it; resume with --config.seed={before}, or '
            'start a new --workdir for another seed')
      changes.append(f'{key} {shown(before)} -> {shown(now)}')
  # The model's arguments are compared whole: an argument set on one side only is a change too,
  # where a key of jaxcnn's own that the record lacks is only newer than the run.
  kwargs_before = config_lib.model_kwargs(recorded_config)
  kwargs_now = config_lib.model_kwargs(config)
  if kwargs_before != kwargs_now and (only is None or 'model_kwargs' in only):
    changes.append(f'model_kwargs {kwargs_before} -> {kwargs_now}')
  return ', '.join(changes)


def _describe_position(position: dict) -> str:
  if 'epoch' in position:
    return f'epoch {position["epoch"]}, batch {position["batch_in_epoch"]}'
  if 'stream_batch' in position:
    return f'streamed data, batch {position["stream_batch"]}'
  return 'streamed data, the iterator where it was'  # An earlier jaxcnn's Grain iterator state.


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every
