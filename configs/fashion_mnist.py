"""Fashion-MNIST with `bn_cnn`: the MNIST recipe, with flips and twice the epochs.

  python train.py --config configs/fashion_mnist.py
  python train.py --config configs/fashion_mnist.py:smoke

Expected: about 93% test accuracy. Not measured here: the machines this was developed on cannot
reach the dataset's hosts. The reference is the range published for CNNs of this size
(Zalando's Fashion-MNIST benchmark lists 91-93% for two-layer CNNs).
"""

import os

from jaxcnn.cli import load_config_file
from jaxcnn.config import unknown_variant

# The MNIST config file beside this one, loaded by path: config files are loaded from any working
# directory, where `configs` is not an importable package.
_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist.py')


def get_config(variant: str = ''):
  """The Fashion-MNIST config; `variant` is '' or 'smoke'."""
  if variant not in ('', 'smoke'):
    raise unknown_variant('configs/fashion_mnist.py', variant, ('', 'smoke'))
  config = load_config_file(f'{_MNIST}:{variant}' if variant else _MNIST)
  config.dataset = 'fashion_mnist'
  config.augment.flip = True  # Clothes mirror well, unlike digits.
  if not variant:
    config.num_epochs = 20
  return config
