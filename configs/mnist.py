"""MNIST with `bn_cnn`, a small BatchNorm CNN: >= 99.2% test accuracy in minutes on a CPU.

  python train.py --config configs/mnist.py
  python train.py --config configs/mnist.py:smoke    # 50 steps, a check that everything runs

Measured (full 10,000-image test set): see README.md, "Results".
"""

from jaxcnn.config import default_config
from jaxcnn.errors import ConfigError


def get_config(variant: str = '') -> 'ml_collections.ConfigDict':
  """The MNIST config; `variant` is '' or 'smoke'."""
  config = default_config()
  config.dataset = 'mnist'
  config.model = 'bn_cnn'
  config.batch_size = 128
  config.num_epochs = 10
  config.optimizer = 'adamw'
  config.learning_rate = 3e-3
  config.weight_decay = 5e-4
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.5
  config.augment.crop_padding = 2  # Random shifts of up to 2 pixels.
  if variant == 'smoke':
    config.num_train_steps = 50
    config.log_every_steps = 10
  elif variant:
    raise ConfigError(f"unknown variant {variant!r} of configs/mnist.py; use '' or 'smoke'")
  return config
