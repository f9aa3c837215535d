"""CIFAR-100 with the wide ResNet WRN-16-8 (Zagoruyko & Komodakis 2016).

  python train.py --config configs/cifar100.py
  python train.py --config configs/cifar100.py:smoke

The paper's recipe: SGD with Nesterov momentum 0.9, batch 128, learning rate 0.1 multiplied by 0.2
at epochs 60, 120 and 160, 200 epochs, weight decay 5e-4, dropout 0.3 between the convolutions,
random crops of images padded by 4 reflected pixels, and flips. Published: 77.93% test accuracy for
WRN-16-8 (22.07% error), from the paper's table of widths and depths, whose networks were trained
on ZCA-whitened images; this config normalises by the mean and standard deviation, which the
authors later found gives better results (their repository: WRN-28-10 at 19.25% error on CIFAR-100
with it), so expect somewhat more. Not measured here: the machines this was developed on cannot
reach CIFAR's hosts.
"""

from jaxcnn.config import default_config, shrink_for_smoke, unknown_variant


def get_config(variant: str = ''):
  """The CIFAR-100 config; `variant` is '' or 'smoke'."""
  config = default_config()
  config.dataset = 'cifar100'
  config.model = 'wrn16_8'
  config.batch_size = 128
  config.num_epochs = 200
  config.optimizer = 'nesterov'
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (60, 120, 160)
  config.lr_decay_factor = 0.2
  config.weight_decay = 5e-4
  config.augment.crop_padding = 4
  config.augment.pad_mode = 'reflect'  # The paper fills the padding with reflections.
  config.augment.flip = True
  if variant == 'smoke':
    config.model = 'cifar_resnet20'  # WRN-16-8 is 11M parameters: too slow for a CPU smoke run.
    shrink_for_smoke(config)
  elif variant:
    raise unknown_variant('configs/cifar100.py', variant, ('', 'smoke'))
  return config
