"""Batch preprocessing under `jit`: augmentation of uint8 images, then normalisation.

Augmentations work on uint8 NHWC batches (a quarter of the bytes of float32) and draw every random
number from per-example keys, so a step's augmentation is a pure function of (seed, step) and of
each example's position in the global batch, whatever the number of devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data import randaugment


def example_keys(key: jax.Array, num_examples: int, first_example: int | jax.Array = 0) -> jax.Array:
  """One key per example, `fold_in(key, global index)`.

  Keying each example by its index in the global batch makes augmentation independent of how the
  batch is split across devices: 1 device and 8 devices draw the same crop for the same example.
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_example + jnp.arange(num_examples))


def random_crop_with_padding(images: jax.Array, keys: jax.Array, padding: int,
                             mode: str = 'constant') -> jax.Array:
  """Pads each image by `padding` pixels on every side and crops it back at a random offset.

  This is the standard 'random crop with padding' (and, for MNIST, a random shift of up to
  `padding` pixels in each direction). The padding is zeros (`mode` 'constant', as torchvision's
  RandomCrop) or the image mirrored at its edges ('reflect', as Wide ResNets and airbench pad).
  `keys` holds one key per image.
  """
  if padding <= 0:
    return images
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
  offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * padding + 1))(keys)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


def random_flip_left_right(images: jax.Array, keys: jax.Array) -> jax.Array:
  """Mirrors each image horizontally with probability 1/2; `keys` holds one key per image."""
  flip = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(keys)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_resized_crop(images: jax.Array, keys: jax.Array, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """The Inception crop on the device: a random area and aspect ratio, resized back to full size.

  For each image a box of `scale` of its area (uniform) and aspect ratio `ratio` (log-uniform) is
  drawn at a random place and resized bilinearly to the image's size. Boxes that would not fit
  are clipped to the image instead of redrawn (the host pipeline redraws, as torchvision does).
  Returns float32 pixels in [0, 255].
  """
  _, height, width, channels = images.shape

  def crop(image, key):
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = jax.random.uniform(area_key, minval=scale[0], maxval=scale[1]) * height * width
    aspect = jnp.exp(jax.random.uniform(ratio_key, minval=jnp.log(ratio[0]),
                                        maxval=jnp.log(ratio[1])))
    crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    top = jax.random.uniform(top_key) * (height - crop_h)
    left = jax.random.uniform(left_key) * (width - crop_w)
    zoom = jnp.stack([height / crop_h, width / crop_w])
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (height, width, channels), spatial_dims=(0, 1), scale=zoom,
        translation=-jnp.stack([top, left]) * zoom, method='linear', antialias=False)

  return jax.vmap(crop)(images, keys)


def cutout(images: jax.Array, keys: jax.Array, size: int) -> jax.Array:
  """Cutout (DeVries & Taylor 2017): zeroes a `size` x `size` square of each normalised image
  (zero is the training images' mean), centred at a uniformly random pixel and, as in the paper,
  clipped at the image's edges. `keys` holds one key per image."""
  _, height, width, _ = images.shape
  centres = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, jnp.array([height, width])))(keys)
  top, left = (centres - size // 2).T
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  cut = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + size)
         & (cols >= left[:, None, None]) & (cols < left[:, None, None] + size))
  return jnp.where(cut[..., None], jnp.zeros((), images.dtype), images)


RANDOM_ERASING_MODES = ('pixel', 'rand', 'const')


def random_erasing(images: jax.Array, keys: jax.Array, probability: float, mode: str = 'pixel',
                   area: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> jax.Array:
  """Random Erasing (Zhong et al. 2020) of normalised images, as timm's RandomErasing does it.

  With `probability`, a box of each image is erased: its area a uniform fraction `area` of the
  image's, its aspect ratio (height over width) log-uniform in `ratio`, its place uniform among
  those where it fits. Of `attempts` boxes drawn the first that fits is erased; when none fits
  (in images of a few pixels), the image stays whole. The box is filled with normal noise for
  each pixel and channel (`mode` 'pixel', timm's training default), one normal value per channel
  ('rand'), or zeros, the training images' mean ('const'). `keys` holds one key per image.
  """
  if mode not in RANDOM_ERASING_MODES:
    raise ValueError(f'random erasing mode must be one of {RANDOM_ERASING_MODES}, got {mode!r}')
  _, height, width, channels = images.shape
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]

  def erase(image, key):
    apply_key, area_key, ratio_key, top_key, left_key, fill_key = jax.random.split(key, 6)
    box_area = jax.random.uniform(area_key, (attempts,), minval=area[0],
                                  maxval=area[1]) * height * width
    aspect = jnp.exp(jax.random.uniform(ratio_key, (attempts,), minval=np.log(ratio[0]),
                                        maxval=np.log(ratio[1])))
    box_heights = jnp.round(jnp.sqrt(box_area * aspect)).astype(jnp.int32)
    box_widths = jnp.round(jnp.sqrt(box_area / aspect)).astype(jnp.int32)
    fits = (box_heights < height) & (box_widths < width)  # timm's test, strict as there.
    first = jnp.argmax(fits)
    box_height, box_width = box_heights[first], box_widths[first]
    top = jax.random.randint(top_key, (), 0, height - box_height + 1)
    left = jax.random.randint(left_key, (), 0, width - box_width + 1)
    inside = ((rows >= top) & (rows < top + box_height) & (cols >= left)
              & (cols < left + box_width))
    erased = inside & fits[first] & jax.random.bernoulli(apply_key, probability)
    if mode == 'pixel':
      fill = jax.random.normal(fill_key, image.shape, image.dtype)
    elif mode == 'rand':
      fill = jax.random.normal(fill_key, (channels,), image.dtype)
    else:
      fill = jnp.zeros((), image.dtype)
    return jnp.where(erased, fill, image)

  return jax.vmap(erase)(images, keys)


# Cutout, RandAugment, Random Erasing, TrivialAugment, AutoAugment and AugMix draw from streams of
# their own of the step's augmentation key, so that turning one on leaves what the others draw as
# it was.
_CUTOUT_STREAM = 3
_RANDAUGMENT_STREAM = 4
_RANDOM_ERASING_STREAM = 5
_TRIVIALAUGMENT_STREAM = 6
_AUTOAUGMENT_STREAM = 7
_AUGMIX_STREAM = 8
_AUGMIX_SECOND_VIEW_STREAM = 9  # The second AugMix view of `Preprocessor.augmix_views`.


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """Turns a uint8 batch into the model's input: augments (in training) and normalises.

  Attributes:
    mean: per-channel mean of the training images, in [0, 255].
    std: per-channel standard deviation of the training images, in [0, 255].
    crop_padding: pixels of padding for the random crop; 0 disables it.
    pad_mode: that padding, 'constant' (zeros) or 'reflect'.
    flip: random horizontal flips (off for digits, whose mirror images are other glyphs).
    inception_crop: random-resized crops (before the padded crop and the flip, if those are on).
    randaugment_ops: RandAugment's operations per training image (`jaxcnn.data.randaugment`),
      after the crops and the flip; 0 disables it.
    randaugment_magnitude: their magnitude, 0 to 10.
    randaugment_magnitude_std: the deviation of the noise on each operation's magnitude (timm's
      `mstd`; inf draws it uniformly from 0 to the magnitude); 0 disables it.
    randaugment_probability: the probability of applying each drawn operation (timm: 0.5).
    trivialaugment: TrivialAugmentWide (`randaugment.trivial_augment`) in RandAugment's place.
    autoaugment: the AutoAugment policy (`randaugment.auto_augment`) in RandAugment's place:
      'imagenet', 'cifar10' or 'svhn'; 'none' disables it.
    augmix: AugMix (`randaugment.augmix`) in RandAugment's place, with the next five settings:
    augmix_severity: its operations' levels come from this many of the lowest of 10 bins;
    augmix_width: the chains of operations mixed with each image;
    augmix_depth: the operations in each chain (-1: 1 to 3 at random);
    augmix_alpha: the concentration of the Beta and Dirichlet mixing weights;
    augmix_all_ops: whether its chains draw the four enhancements too.
    cutout: side of the square that Cutout erases from each normalised training image, after
      the other augmentations; 0 disables it.
    random_erasing: the probability with which Random Erasing (`random_erasing`) erases a box
      of each normalised training image, last; 0 disables it.
    random_erasing_mode: what fills that box: 'pixel', 'rand' or 'const'.
    dtype: the compute dtype of the model ('float32' or 'bfloat16').
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 0
  pad_mode: str = 'constant'
  flip: bool = False
  inception_crop: bool = False
  randaugment_ops: int = 0
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.0
  randaugment_probability: float = 1.0
  trivialaugment: bool = False
  autoaugment: str = 'none'
  augmix: bool = False
  augmix_severity: int = 3
  augmix_width: int = 3
  augmix_depth: int = -1
  augmix_alpha: float = 1.0
  augmix_all_ops: bool = False
  cutout: int = 0
  random_erasing: float = 0.0
  random_erasing_mode: str = 'pixel'
  dtype: str = 'float32'

  def __call__(self, images: jax.Array, key: jax.Array | None, train: bool,
               first_example: int | jax.Array = 0) -> jax.Array:
    """Augments (if `train`) and normalises a batch whose first example has global index
    `first_example` in the step's batch."""
    if not train:
      return self.normalize(images)
    stream_keys = self._stream_keys(key, images.shape[0], first_example)
    images = self._crop_and_flip(images, key, first_example)
    return self._augment_normalized(
        self.normalize(self._automatic_augmentation(images, stream_keys, _AUGMIX_STREAM)),
        stream_keys)

  def augmix_views(self, images: jax.Array, key: jax.Array,
                   first_example: int | jax.Array = 0) -> jax.Array:
    """The three views of each training image that AugMix's Jensen-Shannon consistency loss
    compares, as (batch, 3, height, width, channels): the image as `__call__` augments it but
    without AugMix, then two AugMix views of that same crop and flip, the first as `__call__`
    draws it and the second from a stream of its own. Cutout and Random Erasing, if on, erase
    the same box of all three."""
    if not self.augmix:
      raise ValueError('augmix_views needs AugMix on (Preprocessor.augmix=True)')
    stream_keys = self._stream_keys(key, images.shape[0], first_example)
    images = self._crop_and_flip(images, key, first_example)
    views = [images] + [self._automatic_augmentation(images, stream_keys, stream)
                        for stream in (_AUGMIX_STREAM, _AUGMIX_SECOND_VIEW_STREAM)]
    return jnp.stack([self._augment_normalized(self.normalize(view), stream_keys)
                      for view in views], axis=1)

  @staticmethod
  def _stream_keys(key: jax.Array, num_examples: int, first_example: int | jax.Array):
    """Each example's key in the stream of the step's key that one augmentation draws from."""
    return lambda stream: example_keys(jax.random.fold_in(key, stream), num_examples,
                                       first_example)

  def _crop_and_flip(self, images: jax.Array, key: jax.Array,
                     first_example: int | jax.Array) -> jax.Array:
    if not (self.crop_padding or self.flip or self.inception_crop):
      return images
    # The crops and the flip draw from the step's key itself, the others from streams of it.
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(
        example_keys(key, images.shape[0], first_example))
    if self.inception_crop:
      images = random_resized_crop(images, keys[:, 2])
    images = random_crop_with_padding(images, keys[:, 0], self.crop_padding, self.pad_mode)
    if self.flip:
      images = random_flip_left_right(images, keys[:, 1])
    return images

  def _automatic_augmentation(self, images: jax.Array, stream_keys,
                              augmix_stream: int) -> jax.Array:
    """RandAugment, TrivialAugment, AutoAugment or AugMix (from `augmix_stream`), whichever is
    on (the config allows one at most)."""
    if self.randaugment_ops:
      images = randaugment.rand_augment(
          images, stream_keys(_RANDAUGMENT_STREAM), self.randaugment_ops,
          self.randaugment_magnitude, fill=self.mean,
          magnitude_std=self.randaugment_magnitude_std,
          probability=self.randaugment_probability)
    if self.trivialaugment:
      images = randaugment.trivial_augment(images, stream_keys(_TRIVIALAUGMENT_STREAM),
                                           fill=self.mean)
    if self.autoaugment != 'none':
      images = randaugment.auto_augment(images, stream_keys(_AUTOAUGMENT_STREAM), self.autoaugment,
                                        fill=self.mean)
    if self.augmix:
      images = randaugment.augmix(images, stream_keys(augmix_stream), fill=self.mean,
                                  severity=self.augmix_severity, width=self.augmix_width,
                                  depth=self.augmix_depth, alpha=self.augmix_alpha,
                                  all_ops=self.augmix_all_ops)
    return images

  def _augment_normalized(self, images: jax.Array, stream_keys) -> jax.Array:
    """Cutout and Random Erasing, which work on normalised images."""
    if self.cutout:
      images = cutout(images, stream_keys(_CUTOUT_STREAM), self.cutout)
    if self.random_erasing:
      images = random_erasing(images, stream_keys(_RANDOM_ERASING_STREAM), self.random_erasing,
                              self.random_erasing_mode)
    return images

  def normalize(self, images: jax.Array) -> jax.Array:
    """Maps pixels (uint8, or floats in [0, 255]) to zero-mean, unit-variance channels in the
    compute dtype."""
    mean = jnp.asarray(self.mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.std, jnp.float32)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(self.dtype)


# Test-time augmentation: 'none', the mirror image beside each image ('flip'), or airbench's
# mirror images of it and of two one-pixel translations ('flip_translate').
TEST_TIME_AUGMENTATIONS = ('none', 'flip', 'flip_translate')


def tta_views(images: jax.Array, kind: str) -> list[tuple[jax.Array, float]]:
  """The views of a normalised NHWC batch whose logits test-time augmentation averages, each with
  its weight (the weights sum to 1); the first view is always `images` themselves.

  'none': the images alone. 'flip': the images and their mirror images, half each.
  'flip_translate' (airbench94's TTA): those two at a quarter each, and at an eighth each the
  images shifted by one pixel down and right and by one up and left, their edges reflected,
  and the mirror images of both.
  """
  if kind not in TEST_TIME_AUGMENTATIONS:
    raise ValueError(f'test-time augmentation must be one of {TEST_TIME_AUGMENTATIONS}, got '
                     f'{kind!r}')
  if kind == 'none':
    return [(images, 1.0)]
  mirrored = lambda x: x[:, :, ::-1, :]
  if kind == 'flip':
    return [(images, 0.5), (mirrored(images), 0.5)]
  _, height, width, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  shifted = [padded[:, :height, :width], padded[:, 2:, 2:]]
  return ([(images, 0.25), (mirrored(images), 0.25)]
          + [(view, 0.125) for x in shifted for view in (x, mirrored(x))])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 NHWC images, in pixel units."""
  pixels = images.reshape(-1, images.shape[-1])
  # Sum in chunks in float64: exact enough, and without a float copy of the whole dataset.
  total = np.zeros(pixels.shape[-1])
  total_sq = np.zeros(pixels.shape[-1])
  for begin in range(0, len(pixels), 1 << 22):
    chunk = pixels[begin:begin + (1 << 22)].astype(np.float64)
    total += chunk.sum(0)
    total_sq += (chunk * chunk).sum(0)
  mean = total / len(pixels)
  std = np.sqrt(np.maximum(total_sq / len(pixels) - mean * mean, 1e-12))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def mix_batch(images: jax.Array, targets: jax.Array, key: jax.Array, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al.) or CutMix (Yun et al.) of each pair of neighbouring examples.

  Examples 0 and 1 are mixed with each other, 2 and 3, and so on (an odd last example with
  itself): in a shuffled batch that is as random a partner as timm's reversed batch, and unlike
  it the partners stay the same when the batch is split over devices.

  With both enabled, each batch uses one of the two with probability 1/2. The mixing weight is
  drawn from Beta(alpha, alpha); for CutMix it is corrected to the area of the pasted box, which
  is clipped at the image border. `targets` are one-hot (or smoothed) class distributions.
  """
  choice_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
  partner_images, partner_targets = _swap_neighbours(images), _swap_neighbours(targets)
  candidates = []
  if mixup_alpha > 0:
    lam = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
    candidates.append((lam * images + (1 - lam) * partner_images, lam))
  if cutmix_alpha > 0:
    _, height, width, _ = images.shape
    lam = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha)
    cut = jnp.sqrt(1.0 - lam)
    center = jax.random.uniform(box_key, (2,)) * jnp.array([height, width])
    half = 0.5 * cut * jnp.array([height, width])
    top, left = jnp.clip(jnp.round(center - half), 0, jnp.array([height, width]))
    bottom, right = jnp.clip(jnp.round(center + half), 0, jnp.array([height, width]))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = jnp.where(box[None, :, :, None], partner_images, images)
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    candidates.append((mixed, lam))
  if not candidates:
    return images, targets
  if len(candidates) == 2:
    use_cutmix = jax.random.bernoulli(choice_key)
    mixed = jnp.where(use_cutmix, candidates[1][0], candidates[0][0])
    lam = jnp.where(use_cutmix, candidates[1][1], candidates[0][1])
  else:
    mixed, lam = candidates[0]
  lam = lam.astype(jnp.float32)
  return mixed.astype(images.dtype), lam * targets + (1 - lam) * partner_targets


def _swap_neighbours(x: jax.Array) -> jax.Array:
  """`x` with examples 0 and 1 swapped, 2 and 3, ...; an odd last example stays in place.

  A reshape rather than a gather with the partners' indices: XLA's partitioner sees that each
  device's partners are its own, where a gather of a batch sharded over devices (`jit` over a
  mesh) would first all-gather the whole batch onto every device.
  """
  num_pairs = x.shape[0] // 2
  pairs = x[:2 * num_pairs].reshape(num_pairs, 2, *x.shape[1:])[:, ::-1]
  swapped = pairs.reshape(2 * num_pairs, *x.shape[1:])
  return swapped if x.shape[0] % 2 == 0 else jnp.concatenate([swapped, x[-1:]])
