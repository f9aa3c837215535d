"""Predicts the classes of image files with a trained run.

  python -m jaxcnn.predict --workdir DIR [--checkpoint best|latest|STEP] [--top_k 5]
                          [--weights trained|ema] [--tta none|flip|flip_translate] IMAGE...

Each image is decoded, converted to the run's channels, resized and centre-cropped to its image
size and normalised with its training statistics, as evaluation does; the top classes and their
probabilities are printed one image per line. An unreadable image is named in a one-line error on
stderr and the others are still predicted (the exit status is then 2). `--weights=ema` predicts
with the moving average of the weights of a run trained with `ema_decay`. The probabilities are
those of the logits averaged over the test-time views of the run's `eval_tta`, or of `--tta`.
"""

import sys

import jax
import numpy as np
from absl import flags
from PIL import Image

from jaxcnn import cli
from jaxcnn.config import WEIGHTS
from jaxcnn.data.augment import TEST_TIME_AUGMENTATIONS
from jaxcnn.data.image_ops import resize_and_center_crop, to_uint8
from jaxcnn.errors import UserError
from jaxcnn.restore import restore_run
from jaxcnn.train_step import make_predict_step

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command: importing this module (for
  `load_image`, say) beside another command's `--workdir` must not clash."""
  flags.DEFINE_string('workdir', None, 'The run directory to predict with.', required=True)
  flags.DEFINE_string('checkpoint', 'latest',
                      "'latest', 'best' (by the run's best_metric) or a step number.")
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image (1 or more).', lower_bound=1)
  flags.DEFINE_enum('weights', 'trained', WEIGHTS,
                    "The trained weights, or their moving average ('ema', for a run trained "
                    'with ema_decay).')
  flags.DEFINE_enum('tta', None, TEST_TIME_AUGMENTATIONS,
                    "Test-time augmentation whose views' logits are averaged (default: the run's "
                    'eval_tta).')


def load_image(path: str, image_shape) -> np.ndarray:
  """Decodes `path` into uint8 [H, W, C] with the run's channels and size, resized and
  centre-cropped as evaluation does (the shorter side to size / 0.875, then the centre).

  Raises:
    OSError: the file cannot be read, is not an image, or is an image too large for PIL to decode
      safely (its DecompressionBombError, which main's loop would not have caught: one such
      image stopped the predictions of all the others).
  """
  height, width, channels = image_shape
  try:
    with Image.open(path) as image:
      pixels = to_uint8(image, 'L' if channels == 1 else 'RGB')
  except Image.DecompressionBombError as e:
    raise OSError(str(e)) from None
  return resize_and_center_crop(pixels.reshape(*pixels.shape[:2], channels), height, width)


def main(argv):
  """Prints the `--top_k` classes of each image named in `argv`, by `--workdir`'s model."""
  paths = argv[1:]
  if not paths:
    raise UserError('name at least one image file: python -m jaxcnn.predict --workdir DIR IMAGE...')
  run = restore_run(FLAGS.workdir, FLAGS.checkpoint, eval_tta=FLAGS.tta)
  if FLAGS.weights == 'ema' and run.state.ema_params is None:
    raise UserError(f'the run in {FLAGS.workdir} keeps no moving average of its weights (it was '
                    'trained with ema_decay 0); predict with --weights=trained')
  record = run.dataset
  images, readable, failed = [], [], 0
  for path in paths:
    try:
      images.append(load_image(path, record.image_shape))
      readable.append(path)
    except (OSError, ValueError) as e:
      failed += 1
      print(f'error: cannot read image {path!r}: {" ".join(str(e).split())}', file=sys.stderr,
            flush=True)
  if images:
    predict = jax.jit(make_predict_step(run.experiment.model_def, run.experiment.preprocess,
                                        run.config.eval_tta))
    state = run.experiment.strategy.fetch(run.state)
    if FLAGS.weights == 'ema':
      state = state.averaged()
    probabilities = np.asarray(predict(state, np.stack(images)))
    top_k = min(FLAGS.top_k, record.num_classes)
    for path, probs in zip(readable, probabilities):
      best = np.argsort(-probs)[:top_k]
      ranked = ', '.join(f'{record.class_names[i]} ({probs[i]:.4f})' for i in best)
      print(f'{path}: {ranked}')
  if failed:
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
