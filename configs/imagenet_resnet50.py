"""ImageNet (ILSVRC 2012) with ResNet-50 v1.5: the standard 90-epoch recipe, in bfloat16.

  python train.py --config configs/imagenet_resnet50.py --config.manual_dir=DIR
  python train.py --config configs/imagenet_resnet50.py:smoke

ImageNet must be downloaded by hand (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into
manual_dir), as TFDS documents for `imagenet2012`; jaxcnn then prepares it once and streams it
through Grain with random-resized crops and flips in worker processes.

The recipe of Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): momentum SGD, batch 1024 with
learning rate 0.1 x 1024 / 256 = 0.4 after a 5-epoch linear warm-up, divided by 10 at epochs 30, 60
and 80, weight decay 1e-4 on weights (not on BatchNorm or biases), zero-initialised last BatchNorm
of each block, 224x224 crops. Published: 76.3% top-1 on the validation set (ResNet-50; v1.5 is
usually about 0.5% higher). Not measured here: no copy of ImageNet, nor a GPU, was available.
"""

from jaxcnn.config import default_config, shrink_for_smoke, unknown_variant


def get_config(variant: str = ''):
  """The ImageNet ResNet-50 config; `variant` is '' or 'smoke'."""
  config = default_config()
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  config.model = 'resnet50'
  config.dtype = 'bfloat16'
  config.image_size = 224
  config.data_placement = 'stream'
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 90
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.learning_rate = 0.4
  config.warmup_epochs = 5
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (30, 60, 80)
  config.lr_decay_factor = 0.1
  config.weight_decay = 1e-4
  config.augment.inception_crop = True
  config.augment.flip = True
  config.log_every_steps = 500
  if variant == 'smoke':
    config.model = 'resnet18'  # ResNet-50 compiles for minutes on a CPU; the pipeline is the same.
    config.dtype = 'float32'
    config.image_size = 64
    config.synthetic.num_classes = 1000
    shrink_for_smoke(config, num_train_steps=6, batch_size=8, eval_batch_size=40, num_train=64,
                     num_eval=40)
  elif variant:
    raise unknown_variant('configs/imagenet_resnet50.py', variant, ('', 'smoke'))
  return config
