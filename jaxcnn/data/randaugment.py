"""RandAugment (Cubuk et al. 2020), TrivialAugment (Muller & Hutter 2021), AutoAugment (Cubuk et
al. 2019) and AugMix (Hendrycks et al. 2020) on the device, under `jit`.

Each training image goes through `num_ops` operations, each drawn uniformly (with replacement)
from the paper's fourteen, all at one magnitude: identity, auto-contrast, equalize, rotate,
solarize, color, posterize, contrast, brightness, sharpness, shear and translation along x and y.
ImageNet's ResNet-50 recipe in the paper is 2 operations at magnitude 9.

Magnitudes run from 0 to 10, the scale of the paper's code and of timm, and every operation
grows stronger with it, as timm's 'increasing' variants (`rand-m9-n2-inc1`) do. At level
l = magnitude / 10:

  rotate             by 30·l degrees about the centre;
  shear x, y         by 0.3·l (the shift of a row or column per pixel from the top or left);
  translate x, y     by 0.45·l of the image's side (timm's `translate_pct`);
  color, contrast,   PIL's ImageEnhance with factor 1 ± 0.9·l (0.1 or 1.9 at magnitude 10),
  brightness,          which blends away from a grey image, the mean grey, black and a
  sharpness            smoothed image respectively;
  solarize           inverts the pixels at or above 256·(1 - l);
  posterize          keeps the 8 - int(4·l) highest bits (torchvision's range, 8 to 4;
                       timm's 'increasing' posterize keeps 4 - int(4·l), down to none);

the direction of each geometric operation and the sign of each factor's change drawn at random,
each with probability 1/2. Auto-contrast and equalize have no magnitude. Every operation is
PIL's (`ImageOps`, `ImageEnhance`, `Image.transform` with bilinear sampling) to within one grey
level, computed on float pixels in [0, 255] without rounding to uint8 between operations.
Pixels that a geometric operation brings in from outside the image are the training images'
mean, as timm fills them: after normalisation they are 0, as Cutout's square is.

timm's two refinements are options (`draw_layer`): noise on the magnitude of each drawn
operation (`mstd`), and applying each drawn operation only with some probability (timm's
default is 1/2, so that an image goes through fewer than `num_ops` operations on average).

TrivialAugment (`trivial_augment`) draws one of the same fourteen operations for each image, at
a level drawn uniformly from 31 (0, 1/30, ..., 1), over the wider ranges of torchvision's
TrivialAugmentWide (`TRIVIALAUGMENT_WIDE`): rotations up to 135 degrees, shears up to 0.99,
translations up to 32 pixels, enhancement factors from 0.01 to 1.99, posterizing to 2 bits and
solarizing from 255 down. It has no setting to tune. Its geometric operations sample bilinearly
and fill with the mean, as RandAugment's here and timm's do (torchvision's defaults are the
nearest pixel and black).

AutoAugment (`auto_augment`) applies one of a policy's 25 sub-policies to each image, drawn
uniformly: two operations, each applied with its own probability at its own magnitude bin (0 to 9)
of torchvision's AutoAugment ranges (`AUTOAUGMENT`: rotations up to 30 degrees, shears up to 0.3,
translations up to 150/331 of the side, enhancement factors 1 +- 0.9, posterizing to 4 bits,
solarizing from 255 down), the direction or factor's sign drawn as above. The policies
(`AUTOAUGMENT_POLICIES`) are the paper's, learned on ImageNet, CIFAR-10 and SVHN, with the bins
torchvision gives them; they add a fifteenth operation, invert. Geometric operations sample
bilinearly and fill with the mean here too (torchvision's defaults: the nearest pixel and black),
and translate by fractions of a pixel where torchvision rounds toward zero.

AugMix (`augmix`) mixes each image with `width` (3) chains of 1 to 3 operations drawn from the
paper's nine (auto-contrast, equalize, posterize, solarize and the five geometric ones; with
`all_ops` the four enhancements too) at a level drawn from the `severity` (3) lowest of 10 bins
of torchvision's AugMix ranges (`AUGMIX`: as AutoAugment's, but translations up to a third of
the side and posterizing to 4 bits at level 0 and to none at 1), with Beta and Dirichlet weights.
The paper's Jensen-Shannon consistency loss, which compares three views of each image, is not
part of the transform, as it is not of torchvision's: the train step adds it
(`augment.augmix_jsd_weight`, `Preprocessor.augmix_views`, `train_step.jensen_shannon`).

Under `vmap` a drawn operation is a select over all of them, so each layer computes the ten
pixel operations and one bilinear warp (the five geometric ones differ only in their matrix).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_MAGNITUDE = 10.0
TRIVIALAUGMENT_LEVELS = 31  # torchvision's num_magnitude_bins.
AUTOAUGMENT_BINS = 10  # The magnitude bins that AutoAugment's policies name.
CHANNELS = (1, 3)  # Grey and RGB images: those its colour operations are defined on.
# PIL's luma weights (ITU-R 601-2), with which ImageEnhance and ImageOps take an image's grey.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Ranges:
  """What each operation with a magnitude does at level l in [0, 1].

  Attributes:
    rotate: degrees of rotation at level 1.
    shear: shift of a row or column per pixel at level 1.
    translate_fraction: translation at level 1, as a fraction of the side...
    translate_pixels: ...plus this many pixels.
    enhance: change of the enhancement factor at level 1 (factor 1 +- enhance).
    posterize_bits: bits that posterize drops at level 1...
    posterize_round: ...at level l, round(bits * l) of them; else int(bits * l).
    solarize_top: the threshold at level 0, down to 0 at level 1.
    posterize_kept: the bits that posterize keeps at level 0, from which it drops those above
      (8 but for AugMix's 4).
  """
  rotate: float
  shear: float
  translate_fraction: float
  translate_pixels: float
  enhance: float
  posterize_bits: int
  posterize_round: bool
  solarize_top: float
  posterize_kept: int = 8


# timm's RandAugment ('inc1' variants) and torchvision's TrivialAugmentWide.
RANDAUGMENT = Ranges(rotate=30.0, shear=0.3, translate_fraction=0.45, translate_pixels=0.0,
                     enhance=0.9, posterize_bits=4, posterize_round=False, solarize_top=256.0)
TRIVIALAUGMENT_WIDE = Ranges(rotate=135.0, shear=0.99, translate_fraction=0.0,
                             translate_pixels=32.0, enhance=0.99, posterize_bits=6,
                             posterize_round=True, solarize_top=255.0)
AUTOAUGMENT = Ranges(rotate=30.0, shear=0.3, translate_fraction=150 / 331, translate_pixels=0.0,
                     enhance=0.9, posterize_bits=4, posterize_round=True, solarize_top=255.0)
# torchvision's AugMix: posterize keeps 4 bits at level 0 and none at level 1.
AUGMIX = Ranges(rotate=30.0, shear=0.3, translate_fraction=1 / 3, translate_pixels=0.0,
                enhance=0.9, posterize_bits=4, posterize_round=True, solarize_top=255.0,
                posterize_kept=4)


# ---------------------------------------------------------------- Pixel operations
# Each takes one float32 HWC image in [0, 255] and returns one.

def grey(image: jax.Array) -> jax.Array:
  """The image's luma as one channel (HW1); a one-channel image is its own."""
  if image.shape[-1] == 1:
    return image
  return (image @ jnp.asarray(_LUMA, image.dtype))[..., None]


def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """PIL's ImageEnhance: `degenerate` at factor 0, the image at 1, extrapolated beyond."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def auto_contrast(image: jax.Array) -> jax.Array:
  """Stretches each channel to span 0 to 255 (ImageOps.autocontrast); flat channels stay."""
  low = image.min(axis=(0, 1))
  high = image.max(axis=(0, 1))
  spread = high - low
  stretched = (image - low) * (255.0 / jnp.where(spread > 0, spread, 1.0))
  return jnp.where(spread > 0, stretched, image)


def equalize(image: jax.Array) -> jax.Array:
  """Equalizes each channel's histogram of (rounded) levels as ImageOps.equalize does."""

  def channel(values):  # HW float -> HW float.
    levels = jnp.clip(jnp.round(values), 0, 255).astype(jnp.int32)
    histogram = jnp.zeros(256, jnp.int32).at[levels.ravel()].add(1)
    highest_count = histogram[levels.max()]  # PIL leaves the last used level out of the step.
    step = (values.size - highest_count) // 255
    below = jnp.cumsum(histogram) - histogram
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[levels].astype(values.dtype), values)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def invert(image: jax.Array) -> jax.Array:
  """Each level's complement, 255 - level (ImageOps.invert)."""
  return 255.0 - image


def solarize(image: jax.Array, threshold) -> jax.Array:
  """Inverts the pixels at or above `threshold` (ImageOps.solarize)."""
  return jnp.where(image >= threshold, 255.0 - image, image)


def posterize(image: jax.Array, bits) -> jax.Array:
  """Keeps the `bits` highest bits of each level (ImageOps.posterize)."""
  quantum = 2.0 ** (8 - bits)
  return jnp.floor(image / quantum) * quantum


def color(image: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Color: blends with the image's grey."""
  return blend(grey(image), image, factor)


def contrast(image: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Contrast: blends with the mean grey level."""
  return blend(grey(image).mean(), image, factor)


def brightness(image: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Brightness: blends with black."""
  return blend(jnp.zeros((), image.dtype), image, factor)


def sharpness(image: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Sharpness: blends with the image smoothed by PIL's 3x3 SMOOTH kernel (centre
  weight 5, the others 1, over 13), whose border pixels are the image's own."""
  height, width, _ = image.shape
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
  neighbours = sum(padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  smoothed = (neighbours + 4.0 * image) / 13.0
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return blend(jnp.where(interior, smoothed, image), image, factor)


# ---------------------------------------------------------------- Geometric operations

def warp(image: jax.Array, matrix: jax.Array, fill: jax.Array) -> jax.Array:
  """Samples `image` at `matrix` @ (row, column, 1) for each output pixel (the inverse map, as
  PIL's Image.transform takes it), bilinearly as PIL does: a source point within half a pixel
  beyond the edge pixels' centres takes the edge's values, one further out `fill` (per channel)."""
  height, width, _ = image.shape
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing='ij')
  source = matrix @ jnp.stack([rows.ravel(), cols.ravel(), jnp.ones(height * width)])
  inside = ((source[0] >= -0.5) & (source[0] < height - 0.5)
            & (source[1] >= -0.5) & (source[1] < width - 0.5)).reshape(height, width, 1)
  sample = lambda values: jax.scipy.ndimage.map_coordinates(
      values, list(source), order=1, mode='nearest').reshape(height, width)
  sampled = jax.vmap(sample, in_axes=-1, out_axes=-1)(image)
  return jnp.where(inside, sampled, fill)


def geometric_matrices(level, sign, height: int, width: int,
                       ranges: Ranges = RANDAUGMENT) -> jax.Array:
  """The inverse maps (2x3, over (row, column, 1)) of rotate, shear x, shear y, translate x and
  translate y at `level` in [0, 1] of `ranges`, in the direction of `sign` (+1 or -1).

  They are those of PIL for the same arguments, pixel centres included: sign +1 is
  `Image.rotate(ranges.rotate * level)` (counter-clockwise) and `Image.transform` with AFFINE
  data (1, s, 0, 0, 1, 0), (1, 0, 0, s, 1, 0), (1, 0, t, 0, 1, 0) and (1, 0, 0, 0, 1, t) for
  s = ranges.shear * level and t the translation at `level` along the width or height.
  """
  angle = sign * level * math.radians(ranges.rotate)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
  # Rotation about the centre: source = R (output - centre) + centre.
  rotate = jnp.array([[cos, sin, centre_row - cos * centre_row - sin * centre_col],
                      [-sin, cos, centre_col + sin * centre_row - cos * centre_col]])
  shear = sign * level * ranges.shear
  one, zero = jnp.ones(()), jnp.zeros(())
  # Column += shear * row, measured from the top edge (PIL's pixel centres are at + 0.5).
  shear_x = jnp.array([[one, zero, zero], [shear, one, shear / 2]])
  shear_y = jnp.array([[one, shear, shear / 2], [zero, one, zero]])
  shift = lambda side: sign * level * (ranges.translate_fraction * side + ranges.translate_pixels)
  translate_x = jnp.array([[one, zero, zero], [zero, one, shift(width)]])
  translate_y = jnp.array([[one, zero, shift(height)], [zero, one, zero]])
  return jnp.stack([rotate, shear_x, shear_y, translate_x, translate_y])


# ---------------------------------------------------------------- The policy

PIXEL_OPERATIONS = ('identity', 'auto_contrast', 'equalize', 'solarize', 'color', 'posterize',
                    'contrast', 'brightness', 'sharpness', 'invert')
GEOMETRIC_OPERATIONS = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
OPERATIONS = PIXEL_OPERATIONS + GEOMETRIC_OPERATIONS  # `apply_operation`'s indices.
# The fourteen that RandAugment and TrivialAugment draw from: all but invert, which only
# AutoAugment's policies use.
RANDAUGMENT_OPERATIONS = tuple(name for name in OPERATIONS if name != 'invert')
# AugMix's: the paper's nine, none of which ImageNet-C's corruptions repeat, and with `all_ops`
# the four enhancements besides (torchvision's option).
AUGMIX_OPERATIONS = ('auto_contrast', 'equalize', 'posterize', 'solarize', *GEOMETRIC_OPERATIONS)
AUGMIX_ALL_OPERATIONS = AUGMIX_OPERATIONS + ('brightness', 'color', 'contrast', 'sharpness')


def apply_operation(image: jax.Array, index, level, sign, fill: jax.Array,
                    ranges: Ranges = RANDAUGMENT) -> jax.Array:
  """`OPERATIONS[index]` of one float32 HWC image at `level` in [0, 1] of `ranges` (RandAugment's
  magnitude / 10), its direction or enhancement factor signed by `sign` (+1 or -1); `fill` is the
  per-channel value that geometric operations bring in."""
  factor = 1.0 + sign * level * ranges.enhance
  dropped_bits = (jnp.round if ranges.posterize_round else jnp.floor)(ranges.posterize_bits * level)
  pixel_branches = [
      lambda x: x,
      auto_contrast,
      equalize,
      lambda x: solarize(x, ranges.solarize_top * (1.0 - level)),
      lambda x: color(x, factor),
      lambda x: posterize(x, ranges.posterize_kept - dropped_bits),
      lambda x: contrast(x, factor),
      lambda x: brightness(x, factor),
      lambda x: sharpness(x, factor),
      invert,
  ]
  num_pixel = len(PIXEL_OPERATIONS)
  pixel = jax.lax.switch(jnp.minimum(index, num_pixel - 1), pixel_branches, image)
  height, width, _ = image.shape
  matrix = geometric_matrices(level, sign, height, width,
                              ranges)[jnp.maximum(index - num_pixel, 0)]
  geometric = warp(image, matrix, fill)
  return jnp.where(index >= num_pixel, geometric, pixel)


def _draw_operation(choice_key: jax.Array, sign_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The index in `OPERATIONS` of one of `RANDAUGMENT_OPERATIONS` (uniform) and a sign (+1 or -1,
  even odds)."""
  return _draw_operations(choice_key, RANDAUGMENT_OPERATIONS), _draw_sign(sign_key)


def _draw_operations(key: jax.Array, names: Sequence[str],
                     shape: tuple[int, ...] = ()) -> jax.Array:
  """Indices in `OPERATIONS` of operations drawn uniformly (with replacement) from `names`."""
  indices = jnp.asarray([OPERATIONS.index(name) for name in names])
  return indices[jax.random.randint(key, shape, 0, len(names))]


def _draw_sign(key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, shape=shape), 1.0, -1.0)


def draw_layer(key: jax.Array, magnitude: float, magnitude_std: float = 0.0,
               probability: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One layer's draw for one image from its `key`: the operation's index in `OPERATIONS`
  (uniform over `RANDAUGMENT_OPERATIONS`), its magnitude, its sign (+1 or -1, even odds) and
  whether it is applied.

  As timm's `rand-mM-mstdS` and per-operation probability (`p`) do: with `magnitude_std` S > 0
  the magnitude is drawn from a normal around `magnitude` with that deviation, with S = inf
  uniformly from 0 to `magnitude`, and clipped to [0, 10]; the operation is applied with
  `probability` (timm: 0.5; the paper: 1).
  """
  choice_key, sign_key, magnitude_key, apply_key = jax.random.split(key, 4)
  index, sign = _draw_operation(choice_key, sign_key)
  if magnitude_std == math.inf:
    drawn = jax.random.uniform(magnitude_key, (), maxval=magnitude)
  elif magnitude_std > 0:
    drawn = magnitude + magnitude_std * jax.random.normal(magnitude_key, ())
  else:
    drawn = jnp.asarray(magnitude, jnp.float32)
  applied = jax.random.bernoulli(apply_key, probability) if probability < 1 else jnp.bool_(True)
  return index, jnp.clip(drawn, 0.0, MAX_MAGNITUDE), sign, applied


def rand_augment(images: jax.Array, keys: jax.Array, num_ops: int, magnitude: float,
                 fill: Sequence[float], magnitude_std: float = 0.0,
                 probability: float = 1.0) -> jax.Array:
  """RandAugment of an NHWC batch (uint8, or floats in [0, 255]): `num_ops` layers drawn for
  each image from its key in `keys` by `draw_layer`, at `magnitude` (0 to 10) with
  `magnitude_std` of noise, each applied with `probability`. Geometric operations fill with
  `fill`, one value per channel in [0, 255] (the training images' mean). Returns float32
  pixels in [0, 255]."""
  if not 0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(f'RandAugment magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude}')
  if not magnitude_std >= 0:
    raise ValueError(f'RandAugment magnitude_std must be >= 0 (inf: uniform), got {magnitude_std}')
  if not 0 <= probability <= 1:
    raise ValueError(f'RandAugment probability must be in [0, 1], got {probability}')
  fill = _fill_per_channel(images, fill)

  draw_layers = jax.vmap(draw_layer, in_axes=(0, None, None, None))

  def augment(image, key):
    indices, magnitudes, signs, applied = draw_layers(jax.random.split(key, num_ops), magnitude,
                                                      magnitude_std, probability)
    return _apply_in_turn(image, indices, magnitudes / MAX_MAGNITUDE, signs, applied, fill,
                          RANDAUGMENT)

  return jax.vmap(augment)(images.astype(jnp.float32), keys)


def _apply_in_turn(image: jax.Array, indices: jax.Array, levels: jax.Array, signs: jax.Array,
                   applied: jax.Array, fill: jax.Array, ranges: Ranges) -> jax.Array:
  """`image` through drawn operations one after another (arrays over the steps, as
  `apply_operation` takes them), each only where `applied`. A scan, not a Python loop: the
  program holds one operation's, however many there are."""
  def step(image, drawn):
    index, level, sign, apply = drawn
    augmented = apply_operation(image, index, level, sign, fill, ranges)
    return jnp.where(apply, augmented, image), None

  return jax.lax.scan(step, image, (indices, levels, signs, applied))[0]


def _fill_per_channel(images: jax.Array, fill: Sequence[float]) -> jax.Array:
  """`fill` as one float32 value per channel of `images`, which must be grey or RGB."""
  channels = images.shape[-1]
  if channels not in CHANNELS:
    raise ValueError(f'RandAugment, TrivialAugment, AutoAugment and AugMix take images of 1 or '
                     f'3 channels, not {channels}')
  return jnp.broadcast_to(jnp.asarray(fill, jnp.float32), (channels,))


def draw_trivial(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TrivialAugment's draw for one image from its `key`: the operation's index in `OPERATIONS`
  (uniform over `RANDAUGMENT_OPERATIONS`), its level (uniform over 0, 1/30, ..., 1) and its sign
  (+1 or -1, even odds)."""
  choice_key, level_key, sign_key = jax.random.split(key, 3)
  index, sign = _draw_operation(choice_key, sign_key)
  level = jax.random.randint(level_key, (), 0, TRIVIALAUGMENT_LEVELS) / (TRIVIALAUGMENT_LEVELS - 1)
  return index, level, sign


def trivial_augment(images: jax.Array, keys: jax.Array, fill: Sequence[float]) -> jax.Array:
  """TrivialAugmentWide of an NHWC batch (uint8, or floats in [0, 255]): one operation for each
  image, drawn with its level from its key in `keys` by `draw_trivial`, over
  `TRIVIALAUGMENT_WIDE`'s ranges. Geometric operations fill with `fill`, one value per channel
  in [0, 255] (the training images' mean). Returns float32 pixels in [0, 255]."""
  fill = _fill_per_channel(images, fill)

  def augment(image, key):
    index, level, sign = draw_trivial(key)
    return apply_operation(image, index, level, sign, fill, TRIVIALAUGMENT_WIDE)

  return jax.vmap(augment)(images.astype(jnp.float32), keys)


# ---------------------------------------------------------------- AutoAugment

# The policies of the AutoAugment paper (its appendix), each 25 sub-policies of two operations:
# (operation, probability of applying it, magnitude bin of 0 to 9, or None for the operations
# without a magnitude), in torchvision's order and bins.
AUTOAUGMENT_POLICIES = {
    'imagenet': (
        (('posterize', 0.4, 8), ('rotate', 0.6, 9)),
        (('solarize', 0.6, 5), ('auto_contrast', 0.6, None)),
        (('equalize', 0.8, None), ('equalize', 0.6, None)),
        (('posterize', 0.6, 7), ('posterize', 0.6, 6)),
        (('equalize', 0.4, None), ('solarize', 0.2, 4)),
        (('equalize', 0.4, None), ('rotate', 0.8, 8)),
        (('solarize', 0.6, 3), ('equalize', 0.6, None)),
        (('posterize', 0.8, 5), ('equalize', 1.0, None)),
        (('rotate', 0.2, 3), ('solarize', 0.6, 8)),
        (('equalize', 0.6, None), ('posterize', 0.4, 6)),
        (('rotate', 0.8, 8), ('color', 0.4, 0)),
        (('rotate', 0.4, 9), ('equalize', 0.6, None)),
        (('equalize', 0.0, None), ('equalize', 0.8, None)),
        (('invert', 0.6, None), ('equalize', 1.0, None)),
        (('color', 0.6, 4), ('contrast', 1.0, 8)),
        (('rotate', 0.8, 8), ('color', 1.0, 2)),
        (('color', 0.8, 8), ('solarize', 0.8, 7)),
        (('sharpness', 0.4, 7), ('invert', 0.6, None)),
        (('shear_x', 0.6, 5), ('equalize', 1.0, None)),
        (('color', 0.4, 0), ('equalize', 0.6, None)),
        (('equalize', 0.4, None), ('solarize', 0.2, 4)),
        (('solarize', 0.6, 5), ('auto_contrast', 0.6, None)),
        (('invert', 0.6, None), ('equalize', 1.0, None)),
        (('color', 0.6, 4), ('contrast', 1.0, 8)),
        (('equalize', 0.8, None), ('equalize', 0.6, None)),
    ),
    'cifar10': (
        (('invert', 0.1, None), ('contrast', 0.2, 6)),
        (('rotate', 0.7, 2), ('translate_x', 0.3, 9)),
        (('sharpness', 0.8, 1), ('sharpness', 0.9, 3)),
        (('shear_y', 0.5, 8), ('translate_y', 0.7, 9)),
        (('auto_contrast', 0.5, None), ('equalize', 0.9, None)),
        (('shear_y', 0.2, 7), ('posterize', 0.3, 7)),
        (('color', 0.4, 3), ('brightness', 0.6, 7)),
        (('sharpness', 0.3, 9), ('brightness', 0.7, 9)),
        (('equalize', 0.6, None), ('equalize', 0.5, None)),
        (('contrast', 0.6, 7), ('sharpness', 0.6, 5)),
        (('color', 0.7, 7), ('translate_x', 0.5, 8)),
        (('equalize', 0.3, None), ('auto_contrast', 0.4, None)),
        (('translate_y', 0.4, 3), ('sharpness', 0.2, 6)),
        (('brightness', 0.9, 6), ('color', 0.2, 8)),
        (('solarize', 0.5, 2), ('invert', 0.0, None)),
        (('equalize', 0.2, None), ('auto_contrast', 0.6, None)),
        (('equalize', 0.2, None), ('equalize', 0.6, None)),
        (('color', 0.9, 9), ('equalize', 0.6, None)),
        (('auto_contrast', 0.8, None), ('solarize', 0.2, 8)),
        (('brightness', 0.1, 3), ('color', 0.7, 0)),
        (('solarize', 0.4, 5), ('auto_contrast', 0.9, None)),
        (('translate_y', 0.9, 9), ('translate_y', 0.7, 9)),
        (('auto_contrast', 0.9, None), ('solarize', 0.8, 3)),
        (('equalize', 0.8, None), ('invert', 0.1, None)),
        (('translate_y', 0.7, 9), ('auto_contrast', 0.9, None)),
    ),
    'svhn': (
        (('shear_x', 0.9, 4), ('invert', 0.2, None)),
        (('shear_y', 0.9, 8), ('invert', 0.7, None)),
        (('equalize', 0.6, None), ('solarize', 0.6, 6)),
        (('invert', 0.9, None), ('equalize', 0.6, None)),
        (('equalize', 0.6, None), ('rotate', 0.9, 3)),
        (('shear_x', 0.9, 4), ('auto_contrast', 0.8, None)),
        (('shear_y', 0.9, 8), ('invert', 0.4, None)),
        (('shear_y', 0.9, 5), ('solarize', 0.2, 6)),
        (('invert', 0.9, None), ('auto_contrast', 0.8, None)),
        (('equalize', 0.6, None), ('rotate', 0.9, 3)),
        (('shear_x', 0.9, 4), ('solarize', 0.3, 3)),
        (('shear_y', 0.8, 8), ('invert', 0.7, None)),
        (('equalize', 0.9, None), ('translate_y', 0.6, 6)),
        (('invert', 0.9, None), ('equalize', 0.6, None)),
        (('contrast', 0.3, 3), ('rotate', 0.8, 4)),
        (('invert', 0.8, None), ('translate_y', 0.0, 2)),
        (('shear_y', 0.7, 6), ('solarize', 0.4, 8)),
        (('invert', 0.6, None), ('rotate', 0.8, 4)),
        (('shear_y', 0.3, 7), ('translate_x', 0.9, 3)),
        (('shear_x', 0.1, 6), ('invert', 0.6, None)),
        (('solarize', 0.7, 2), ('translate_y', 0.6, 7)),
        (('shear_y', 0.8, 4), ('invert', 0.8, None)),
        (('shear_x', 0.7, 9), ('translate_y', 0.8, 3)),
        (('shear_y', 0.8, 5), ('auto_contrast', 0.7, None)),
        (('shear_x', 0.7, 2), ('invert', 0.1, None)),
    ),
}


@dataclasses.dataclass(frozen=True)
class PolicyTable:
  """A policy as arrays over [sub-policy, operation]: indices in `OPERATIONS`, levels in [0, 1]
  of `AUTOAUGMENT` (bin / 9; 0 for operations without a magnitude) and probabilities."""
  operations: jax.Array
  levels: jax.Array
  probabilities: jax.Array


def policy_table(policy: str) -> PolicyTable:
  """`AUTOAUGMENT_POLICIES[policy]` as arrays; an unknown name is a one-line ValueError."""
  if policy not in AUTOAUGMENT_POLICIES:
    raise ValueError(f'AutoAugment policy must be one of {", ".join(AUTOAUGMENT_POLICIES)}, '
                     f'got {policy!r}')
  sub_policies = AUTOAUGMENT_POLICIES[policy]
  column = lambda value: jnp.asarray([[value(*operation) for operation in sub_policy]
                                      for sub_policy in sub_policies])
  return PolicyTable(
      operations=column(lambda name, probability, bin_: OPERATIONS.index(name)),
      levels=column(lambda name, probability, bin_: (bin_ or 0) / (AUTOAUGMENT_BINS - 1)),
      probabilities=column(lambda name, probability, bin_: probability))


def draw_sub_policy(key: jax.Array, table: PolicyTable) -> tuple[jax.Array, jax.Array, jax.Array]:
  """AutoAugment's draw for one image from its `key`: a sub-policy (uniform), and for each of its
  operations a sign (+1 or -1, even odds) and whether it is applied (with its probability)."""
  choice_key, sign_key, apply_key = jax.random.split(key, 3)
  num_sub_policies, num_operations = table.operations.shape
  sub_policy = jax.random.randint(choice_key, (), 0, num_sub_policies)
  applied = jax.random.uniform(apply_key, (num_operations,)) < table.probabilities[sub_policy]
  return sub_policy, _draw_sign(sign_key, (num_operations,)), applied


def auto_augment(images: jax.Array, keys: jax.Array, policy: str,
                 fill: Sequence[float]) -> jax.Array:
  """AutoAugment of an NHWC batch (uint8, or floats in [0, 255]) with the named policy of
  `AUTOAUGMENT_POLICIES`: one sub-policy for each image, drawn with its operations' signs and
  applications from its key in `keys` by `draw_sub_policy`, over `AUTOAUGMENT`'s ranges.
  Geometric operations fill with `fill`, one value per channel in [0, 255] (the training images'
  mean). Returns float32 pixels in [0, 255]."""
  table = policy_table(policy)
  fill = _fill_per_channel(images, fill)

  def augment(image, key):
    sub_policy, signs, applied = draw_sub_policy(key, table)
    return _apply_in_turn(image, table.operations[sub_policy], table.levels[sub_policy], signs,
                          applied, fill, AUTOAUGMENT)

  return jax.vmap(augment)(images.astype(jnp.float32), keys)


# ---------------------------------------------------------------- AugMix

AUGMIX_BINS = 10  # Its magnitude bins; `severity` draws from the lowest ones.
AUGMIX_MAX_RANDOM_DEPTH = 3  # A chain of depth -1 holds 1 to 3 operations.


class AugMixDraw(NamedTuple):
  """AugMix's draw for one image: each chain's operations (indices in `OPERATIONS`), their levels
  and signs and which of them are applied ([chain, step], `active` False past the chain's
  depth), and the weights of the original image and of each chain (summing to 1)."""
  operations: jax.Array
  levels: jax.Array
  signs: jax.Array
  active: jax.Array
  original_weight: jax.Array
  chain_weights: jax.Array


def draw_augmix(key: jax.Array, severity: int = 3, width: int = 3, depth: int = -1,
                alpha: float = 1.0, all_ops: bool = False) -> AugMixDraw:
  """AugMix's draw for one image from its `key`, as torchvision's `AugMix`: `width` chains of
  `depth` operations (1 to 3, uniformly, for -1), each uniform over `AUGMIX_OPERATIONS` (or
  `AUGMIX_ALL_OPERATIONS`) at a bin uniform over the `severity` lowest of 10, with a random sign;
  the original's weight m ~ Beta(alpha, alpha) and the chains' (1 - m) Dirichlet(alpha, ...)."""
  steps = depth if depth > 0 else AUGMIX_MAX_RANDOM_DEPTH
  choice_key, bin_key, sign_key, depth_key, beta_key, dirichlet_key = jax.random.split(key, 6)
  operations = _draw_operations(choice_key,
                                AUGMIX_ALL_OPERATIONS if all_ops else AUGMIX_OPERATIONS,
                                (width, steps))
  levels = jax.random.randint(bin_key, (width, steps), 0, severity) / (AUGMIX_BINS - 1)
  if depth > 0:
    active = jnp.ones((width, steps), bool)
  else:
    depths = jax.random.randint(depth_key, (width, 1), 1, AUGMIX_MAX_RANDOM_DEPTH + 1)
    active = jnp.arange(steps) < depths
  original_weight = jax.random.beta(beta_key, alpha, alpha)
  chain_weights = (1 - original_weight) * jax.random.dirichlet(dirichlet_key,
                                                               jnp.full((width,), alpha))
  return AugMixDraw(operations, levels, _draw_sign(sign_key, (width, steps)), active,
                    original_weight, chain_weights)


def augmix(images: jax.Array, keys: jax.Array, fill: Sequence[float], severity: int = 3,
           width: int = 3, depth: int = -1, alpha: float = 1.0,
           all_ops: bool = False) -> jax.Array:
  """AugMix (Hendrycks et al. 2020) of an NHWC batch (uint8, or floats in [0, 255]), as
  torchvision's `AugMix` (the paper's Jensen-Shannon consistency loss is the train step's:
  `Preprocessor.augmix_views`, `train_step.jensen_shannon`): each image is the mix, with weights
  drawn by `draw_augmix` from its key in `keys`, of itself and of `width` chains of operations
  over `AUGMIX`'s ranges (`severity` 1 to 10). Geometric operations fill with `fill`, one value
  per channel in [0, 255] (the training images' mean). Returns float32 pixels in [0, 255]."""
  if not 1 <= severity <= AUGMIX_BINS:
    raise ValueError(f'AugMix severity must be an integer from 1 to {AUGMIX_BINS}, got {severity}')
  if not width >= 1:
    raise ValueError(f'AugMix width must be an integer >= 1, got {width}')
  if not (depth == -1 or depth >= 1):
    raise ValueError(f'AugMix depth must be -1 (1 to 3 at random) or an integer >= 1, got {depth}')
  if not alpha > 0:
    raise ValueError(f'AugMix alpha must be a number > 0, got {alpha}')
  fill = _fill_per_channel(images, fill)

  def augment(image, key):
    drawn = draw_augmix(key, severity, width, depth, alpha, all_ops)

    def chain(mix, operations):
      weight, *steps = operations
      return mix + weight * _apply_in_turn(image, *steps, fill, AUGMIX), None

    # Scans over the chains and their steps: the program holds one operation's, not width x depth.
    mix = jax.lax.scan(chain, drawn.original_weight * image,
                       (drawn.chain_weights, drawn.operations, drawn.levels, drawn.signs,
                        drawn.active))[0]
    return jnp.clip(mix, 0.0, 255.0)  # A convex mix, but for rounding.

  return jax.vmap(augment)(images.astype(jnp.float32), keys)
