"""Fashion-MNIST with `bn_cnn`: the MNIST recipe, with flips and twice the epochs.

  python train.py --config configs/fashion_mnist.py
  python train.py --config configs/fashion_mnist.py:smoke

Expected: about 93% test accuracy. Not measured here: the machines this was developed on cannot
reach the dataset's hosts. The reference is the range published for CNNs of this size
(Zalando's Fashion-MNIST benchmark lists 91-93% for two-layer CNNs).
"""

from configs import mnist
from jaxcnn.config import unknown_variant


def get_config(variant: str = ''):
  """The Fashion-MNIST config; `variant` is '' or 'smoke'."""
  if variant not in ('', 'smoke'):
    raise unknown_variant('configs/fashion_mnist.py', variant, ('', 'smoke'))
  config = mnist.get_config(variant)
  config.dataset = 'fashion_mnist'
  config.augment.flip = True  # Clothes mirror well, unlike digits.
  if not variant:
    config.num_epochs = 20
  return config
