"""RandAugment, TrivialAugment and AutoAugment: every operation against PIL's, the policies'
draws, and a run that uses them."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxcnn import trainer
from jaxcnn.config import config_from_json
from jaxcnn.data import augment, randaugment
from jaxcnn.errors import ConfigError

from conftest import tiny_config

FILL = (10, 20, 30)


def structured_image(channels: int = 3, height: int = 24, width: int = 20) -> np.ndarray:
  """Gradients, rings and noise: every level of every channel in use, edges everywhere."""
  rows, cols = np.mgrid[0:height, 0:width]
  planes = [(cols * 11 + rows * 3) % 256, (rows * 9 + 40) % 256,
            ((cols - 10) ** 2 + (rows - 12) ** 2) % 256][:channels]
  noise = np.random.default_rng(0).integers(-20, 20, (height, width, channels))
  return np.clip(np.stack(planes, -1) + noise, 0, 255).astype(np.uint8)


def as_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(image: Image.Image, channels: int) -> np.ndarray:
  return np.asarray(image, np.float64).reshape(image.size[1], image.size[0], channels)


def assert_within_one_level(ours, reference):
  """PIL rounds to whole levels after every operation; these stay in floats."""
  difference = np.abs(np.round(np.asarray(ours)) - reference)
  assert difference.max() <= 1, (difference.max(), np.argwhere(difference > 1)[:5])


PIXEL_CASES = [
    ('auto_contrast', lambda x: randaugment.auto_contrast(x), ImageOps.autocontrast),
    ('equalize', lambda x: randaugment.equalize(x), ImageOps.equalize),
    ('solarize', lambda x: randaugment.solarize(x, 128), lambda p: ImageOps.solarize(p, 128)),
    ('posterize', lambda x: randaugment.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    ('invert', lambda x: randaugment.invert(x), ImageOps.invert),
] + [(f'{name} {factor}', lambda x, f=fn, k=factor: f(x, k),
      lambda p, e=enhancer, k=factor: e(p).enhance(k))
     for name, fn, enhancer in (('color', randaugment.color, ImageEnhance.Color),
                                ('contrast', randaugment.contrast, ImageEnhance.Contrast),
                                ('brightness', randaugment.brightness, ImageEnhance.Brightness),
                                ('sharpness', randaugment.sharpness, ImageEnhance.Sharpness))
     for factor in (0.1, 0.6, 1.9)]


@pytest.mark.parametrize('channels', [3, 1])
@pytest.mark.parametrize('name, ours, pils', PIXEL_CASES, ids=[case[0] for case in PIXEL_CASES])
def test_each_pixel_operation_is_pils_to_within_one_grey_level(name, ours, pils, channels):
  del name
  image = structured_image(channels)
  assert_within_one_level(ours(jnp.asarray(image, jnp.float32)),
                          from_pil(pils(as_pil(image)), channels))


RANGES = {'randaugment': randaugment.RANDAUGMENT,
          'trivialaugment_wide': randaugment.TRIVIALAUGMENT_WIDE,
          'autoaugment': randaugment.AUTOAUGMENT}


@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('level', [0.25, 1.0])
@pytest.mark.parametrize('ranges', RANGES.values(), ids=RANGES.keys())
def test_each_geometric_operation_is_pils_to_within_one_grey_level(ranges, level, sign):
  """Fill beyond the edges included: PIL's bilinear sampling and the same inverse maps, over
  RandAugment's ranges (30 degrees, shear 0.3, 45% of the side), TrivialAugmentWide's (135
  degrees, 0.99, 32 pixels) and AutoAugment's (30 degrees, 0.3, 150/331 of the side)."""
  image = structured_image()
  height, width, _ = image.shape
  shear = ranges.shear * level * sign
  shift = lambda side: (ranges.translate_fraction * side + ranges.translate_pixels) * level * sign
  pil = as_pil(image)
  affine = lambda data: pil.transform(pil.size, Image.AFFINE, data, resample=Image.BILINEAR,
                                      fillcolor=FILL)
  references = {
      'rotate': pil.rotate(ranges.rotate * level * sign, resample=Image.BILINEAR, fillcolor=FILL),
      'shear_x': affine((1, shear, 0, 0, 1, 0)), 'shear_y': affine((1, 0, 0, shear, 1, 0)),
      'translate_x': affine((1, 0, shift(width), 0, 1, 0)),
      'translate_y': affine((1, 0, 0, 0, 1, shift(height))),
  }
  matrices = randaugment.geometric_matrices(level, sign, height, width, ranges)
  for name, matrix in zip(randaugment.GEOMETRIC_OPERATIONS, matrices):
    warped = randaugment.warp(jnp.asarray(image, jnp.float32), matrix, jnp.asarray(FILL, float))
    assert_within_one_level(warped, from_pil(references[name], 3))
    assert (np.asarray(warped) == FILL).all(-1).any(), name  # Some of the fill came in.


@functools.cache
def _apply_operation_over(ranges: randaugment.Ranges):
  # Compiled once for each ranges: run eagerly, every call would compile (and keep) programs of
  # its own.
  return jax.jit(lambda *args: randaugment.apply_operation(*args, ranges=ranges))


def apply(image, name, level, sign=1.0, ranges=randaugment.RANDAUGMENT):
  index = randaugment.OPERATIONS.index(name)
  apply_operation = _apply_operation_over(ranges)
  return np.asarray(apply_operation(jnp.asarray(image, jnp.float32), index, level, sign,
                                    jnp.asarray(FILL, jnp.float32)))


def assert_uniform_over_randaugments_operations(index):
  """Drawn operation indices: each of RandAugment's fourteen about as often, invert never."""
  counts = np.bincount(index, minlength=len(randaugment.OPERATIONS))
  assert len(counts) == len(randaugment.OPERATIONS), counts
  assert counts[randaugment.OPERATIONS.index('invert')] == 0, counts
  drawn = np.delete(counts, randaugment.OPERATIONS.index('invert'))
  assert np.abs(drawn / len(index) * len(drawn) - 1).max() < 0.15, counts


def test_trivialaugment_wides_pixel_operations_are_torchvisions_levels_of_pils():
  """torchvision's TrivialAugmentWide at bin m of 31: enhancement factors 1 +- 0.99 m/30,
  posterize to 8 - round(m/5) bits, solarize from 255 (1 - m/30)."""
  image = structured_image()
  pil = as_pil(image)
  cases = [('contrast', 1.0, -1.0, ImageEnhance.Contrast(pil).enhance(0.01)),
           ('brightness', 0.5, 1.0, ImageEnhance.Brightness(pil).enhance(1.495)),
           ('posterize', 13 / 30, 1.0, ImageOps.posterize(pil, 5)),  # round(2.6) = 3 bits off.
           ('posterize', 1.0, 1.0, ImageOps.posterize(pil, 2)),
           ('solarize', 0.0, 1.0, ImageOps.solarize(pil, 255)),
           ('solarize', 0.5, 1.0, ImageOps.solarize(pil, 127.5))]
  for name, level, sign, reference in cases:
    assert_within_one_level(apply(image, name, level, sign, randaugment.TRIVIALAUGMENT_WIDE),
                            from_pil(reference, 3))


def test_trivialaugment_draws_one_operation_at_one_of_31_levels_for_each_image():
  keys = jax.random.split(jax.random.key(0), 20_000)
  index, level, sign = map(np.asarray, jax.jit(jax.vmap(randaugment.draw_trivial))(keys))
  assert_uniform_over_randaugments_operations(index)
  counts = np.bincount(np.round(level * 30).astype(int), minlength=31)
  assert len(counts) == 31 and np.abs(counts / len(keys) * 31 - 1).max() < 0.15, counts
  assert level.min() == 0.0 and level.max() == 1.0 and abs(sign.mean()) < 0.03
  # The batch: each image through the operation that its own key draws, over the wide ranges.
  images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (64, 9, 8, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(4), 64)

  @jax.jit
  def both(images, keys):
    drawn = jax.vmap(randaugment.draw_trivial)(keys)
    expected = jax.vmap(lambda image, index, level, sign: randaugment.apply_operation(
        image, index, level, sign, jnp.asarray(FILL, jnp.float32),
        randaugment.TRIVIALAUGMENT_WIDE))(images.astype(jnp.float32), *drawn)
    return randaugment.trivial_augment(images, keys, FILL), expected

  augmented, expected = both(images, keys)
  np.testing.assert_array_equal(augmented, expected)
  assert (np.abs(np.asarray(augmented) - np.asarray(images)).max(axis=(1, 2, 3)) > 0).mean() > 0.7


def test_every_operation_with_a_magnitude_grows_from_none_at_0():
  image = structured_image()
  for name in randaugment.OPERATIONS:
    changes = [np.abs(apply(image, name, level) - image).mean() for level in (0.0, 0.5, 1.0)]
    if name in ('identity', 'auto_contrast', 'equalize', 'invert'):  # No magnitude.
      assert changes[0] == changes[1] == changes[2], name
    else:
      assert changes[0] == 0 < changes[1] < changes[2], (name, changes)
  assert (apply(image, 'identity', 1.0) == image).all()


def test_each_image_goes_through_operations_drawn_uniformly_from_its_own_key():
  """With one operation per image at magnitude 10, every output is one of the fourteen
  operations (either sign) of its input, each of them is drawn, and the same key draws it again."""
  count = 280
  images = np.stack([np.roll(structured_image(3, 8, 8), i, axis=1) for i in range(count)])
  keys = augment.example_keys(jax.random.key(3), count)
  rand_augment = jax.jit(randaugment.rand_augment, static_argnums=(2, 3, 4))
  augmented = np.asarray(rand_augment(jnp.asarray(images), keys, 1, 10.0, FILL))
  # Every (operation, sign) of every image, in one compiled call: [image, operation, sign].
  every = jax.jit(jax.vmap(jax.vmap(jax.vmap(
      randaugment.apply_operation, (None, None, None, 0, None)), (None, 0, None, None, None)),
      (0, None, None, None, None)))(jnp.asarray(images, jnp.float32),
                                    jnp.arange(len(randaugment.OPERATIONS)), 1.0,
                                    jnp.array([1.0, -1.0]), jnp.asarray(FILL, jnp.float32))
  close = np.isclose(np.asarray(every), augmented[:, None, None], atol=1e-4).all(axis=(3, 4, 5))
  assert close.any(axis=(1, 2)).all(), 'an output that no operation gives'
  drawn = [{name for name, match in zip(randaugment.OPERATIONS, image_close.any(-1)) if match}
           for image_close in close]
  for name in randaugment.RANDAUGMENT_OPERATIONS:
    assert sum(name in matches for matches in drawn) >= 5, name  # 20 expected of each.
  # Invert is not one of RandAugment's: only solarize at 10, which inverts every level, gives it.
  assert all('solarize' in matches for matches in drawn if 'invert' in matches)
  again = rand_augment(jnp.asarray(images), keys, 1, 10.0, FILL)
  np.testing.assert_array_equal(again, augmented)
  # Two operations per image are a second draw after the first: most images differ.
  twice = np.asarray(rand_augment(jnp.asarray(images), keys, 2, 10.0, FILL))
  assert (np.abs(twice - augmented).max(axis=(1, 2, 3)) > 0).mean() > 0.8


def test_layers_draw_timms_magnitude_noise_and_probability():
  """20,000 draws of a layer: uniform operations and signs, the magnitude as given or with
  Gaussian (mstd) or uniform (mstd = inf) noise clipped to [0, 10], applied with the probability."""
  keys = jax.random.split(jax.random.key(0), 20_000)
  draw = jax.jit(jax.vmap(randaugment.draw_layer, (0, None, None, None)), static_argnums=(1, 2, 3))

  index, magnitude, sign, applied = map(np.asarray, draw(keys, 9.0, 0.0, 1.0))
  assert_uniform_over_randaugments_operations(index)  # ~1,430 each.
  assert set(np.unique(sign)) == {-1.0, 1.0} and abs(sign.mean()) < 0.03
  assert (magnitude == 9.0).all() and applied.all()

  _, magnitude, _, applied = map(np.asarray, draw(keys, 9.0, 0.5, 0.5))
  assert abs(applied.mean() - 0.5) < 0.02
  assert abs(magnitude.mean() - 9.0) < 0.02 and abs(magnitude.std() - 0.5) < 0.02
  # Clipped at 10: P(N(9, 0.5) > 10) = 2.3%.
  assert magnitude.max() == 10.0 and 0.015 < (magnitude == 10.0).mean() < 0.03

  _, magnitude, _, _ = map(np.asarray, draw(keys, 9.0, np.inf, 1.0))  # Uniform on [0, 9].
  assert 0.0 <= magnitude.min() < 0.01 and 8.99 < magnitude.max() <= 9.0
  assert abs(magnitude.mean() - 4.5) < 0.06 and abs(magnitude.std() - 9 / 12 ** 0.5) < 0.04

  _, magnitude, _, _ = map(np.asarray, draw(keys, 0.3, 1.0, 1.0))  # Clipped at 0: 38%.
  assert magnitude.min() == 0.0 and abs((magnitude == 0.0).mean() - 0.382) < 0.02


def test_each_drawn_operation_is_applied_with_the_probability_at_its_drawn_magnitude():
  count = 400
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (count, 8, 8, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(5), count)
  rand_augment = jax.jit(randaugment.rand_augment, static_argnums=(2, 3, 4, 5, 6))
  changed = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(axis=(1, 2, 3)) > 0

  always = rand_augment(images, keys, 1, 10.0, FILL, 0.0, 1.0)
  np.testing.assert_array_equal(rand_augment(images, keys, 1, 10.0, FILL, 0.0, 0.0), images)
  # At 1/2 the same keys draw the same operations: each image is its input or as at 1.
  half = rand_augment(images, keys, 1, 10.0, FILL, 0.0, 0.5)
  skipped, as_always = ~changed(half, images), ~changed(half, always)
  assert (skipped | as_always).all()
  assert abs(skipped.mean() - 0.5) < 0.1  # Binomial: 0.025 of spread; identity adds 0.04.

  # Magnitude 0 changes only through the three operations without one; noise reaches the rest.
  at_zero = rand_augment(images, keys, 1, 0.0, FILL, 0.0, 1.0)
  np.testing.assert_array_equal(rand_augment(images, keys, 1, 0.0, FILL, np.inf, 1.0), at_zero)
  noisy = changed(rand_augment(images, keys, 1, 0.0, FILL, 3.0, 1.0), at_zero)
  assert 0.25 < noisy.mean() < 0.55, noisy.mean()  # 11 of 14 operations, half of them above 0.


WITHOUT_MAGNITUDE = ('auto_contrast', 'equalize', 'invert')


@pytest.mark.parametrize('policy', list(randaugment.AUTOAUGMENT_POLICIES))
def test_autoaugments_policies_are_25_pairs_of_operations_with_a_bin_where_they_have_a_magnitude(
    policy):
  sub_policies = randaugment.AUTOAUGMENT_POLICIES[policy]
  assert len(sub_policies) == 25 and all(len(sub_policy) == 2 for sub_policy in sub_policies)
  for name, probability, bin_ in (operation for pair in sub_policies for operation in pair):
    assert name in randaugment.OPERATIONS and name != 'identity', name
    assert 0 <= probability <= 1 and round(probability, 1) == probability, (name, probability)
    if name in WITHOUT_MAGNITUDE:
      assert bin_ is None, (name, bin_)
    else:
      assert bin_ in range(randaugment.AUTOAUGMENT_BINS), (name, bin_)
  # As arrays: each operation's index, level (bin / 9) and probability, in the same places.
  table = randaugment.policy_table(policy)
  assert table.operations.shape == table.levels.shape == table.probabilities.shape == (25, 2)
  names = [[randaugment.OPERATIONS[int(index)] for index in row] for row in table.operations]
  assert names == [[name for name, _, _ in sub_policy] for sub_policy in sub_policies]
  np.testing.assert_allclose(table.probabilities, [[p for _, p, _ in s] for s in sub_policies])
  np.testing.assert_allclose(table.levels * 9, [[b or 0 for _, _, b in s] for s in sub_policies],
                             atol=1e-6)
  with pytest.raises(ValueError, match="AutoAugment policy must be one of imagenet, cifar10, svhn, "
                                       "got 'mnist'"):
    randaugment.policy_table('mnist')


def test_autoaugments_bins_are_torchvisions_magnitudes_of_pils_operations():
  """torchvision's AutoAugment at bin b of 10: enhancement factors 1 +- 0.9 b/9, posterize to
  8 - round(4 b/9) bits, solarize from 255 (1 - b/9), rotations of 30 b/9 degrees."""
  image = structured_image()
  pil = as_pil(image)
  cases = [('contrast', 8, -1.0, ImageEnhance.Contrast(pil).enhance(0.2)),
           ('color', 4, 1.0, ImageEnhance.Color(pil).enhance(1.4)),
           ('posterize', 8, 1.0, ImageOps.posterize(pil, 4)),  # round(3.56) = 4 bits off.
           ('posterize', 5, 1.0, ImageOps.posterize(pil, 6)),  # round(2.22) = 2.
           ('solarize', 5, 1.0, ImageOps.solarize(pil, 255 * 4 / 9)),
           ('rotate', 9, -1.0, pil.rotate(-30, resample=Image.BILINEAR, fillcolor=FILL)),
           ('invert', None, 1.0, ImageOps.invert(pil))]
  for name, bin_, sign, reference in cases:
    level = (bin_ or 0) / (randaugment.AUTOAUGMENT_BINS - 1)
    assert_within_one_level(apply(image, name, level, sign, randaugment.AUTOAUGMENT),
                            from_pil(reference, 3))


def test_autoaugment_draws_a_sub_policy_for_each_image_and_applies_each_operation_with_its_odds():
  table = randaugment.policy_table('imagenet')
  keys = jax.random.split(jax.random.key(0), 20_000)
  sub_policy, signs, applied = map(np.asarray, jax.jit(jax.vmap(
      lambda key: randaugment.draw_sub_policy(key, table)))(keys))
  counts = np.bincount(sub_policy, minlength=25)
  assert len(counts) == 25 and np.abs(counts / len(keys) * 25 - 1).max() < 0.15, counts
  assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.mean()) < 0.03
  # Each operation of each sub-policy (~800 draws) applied with its probability: 0 and 1 exactly.
  probabilities = np.asarray(table.probabilities)
  for chosen in range(25):
    rate = applied[sub_policy == chosen].mean(axis=0)
    np.testing.assert_allclose(rate, probabilities[chosen], atol=0.07)
    assert ((rate == 0) == (probabilities[chosen] == 0)).all()
    assert ((rate == 1) == (probabilities[chosen] == 1)).all()

  # The batch: each image through its own sub-policy's operations, in order, where applied.
  images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (64, 9, 8, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(4), 64)
  svhn = randaugment.policy_table('svhn')

  @jax.jit
  def both(images, keys):
    def reference(image, key):
      chosen, signs, applied = randaugment.draw_sub_policy(key, svhn)
      for slot in range(2):
        augmented = randaugment.apply_operation(
            image, svhn.operations[chosen, slot], svhn.levels[chosen, slot], signs[slot],
            jnp.asarray(FILL, jnp.float32), randaugment.AUTOAUGMENT)
        image = jnp.where(applied[slot], augmented, image)
      return image
    expected = jax.vmap(reference)(images.astype(jnp.float32), keys)
    return randaugment.auto_augment(images, keys, 'svhn', FILL), expected

  augmented, expected = both(images, keys)
  np.testing.assert_allclose(augmented, expected, atol=1e-4)
  # SVHN's sub-policies apply one of their operations or both with probability 0.91 on average.
  assert (np.abs(np.asarray(augmented) - np.asarray(images)).max(axis=(1, 2, 3)) > 0).mean() > 0.75


def test_augmixs_levels_are_torchvisions_augmix_bins_of_pils_operations():
  """torchvision's AugMix at bin b of 10: posterize to 4 - round(4 b/9) bits, translations of
  b/9 of a third of the side."""
  image = structured_image()
  pil = as_pil(image)
  affine = lambda data: pil.transform(pil.size, Image.AFFINE, data, resample=Image.BILINEAR,
                                      fillcolor=FILL)
  cases = [('posterize', 0, 1.0, ImageOps.posterize(pil, 4)),
           ('posterize', 2, 1.0, ImageOps.posterize(pil, 3)),  # round(0.89) = 1 bit fewer.
           ('posterize', 9, 1.0, None),  # No bit kept: black (PIL posterizes to 1 bit at least).
           ('translate_x', 9, -1.0, affine((1, 0, -image.shape[1] / 3, 0, 1, 0))),
           ('solarize', 2, 1.0, ImageOps.solarize(pil, 255 * 7 / 9))]
  for name, bin_, sign, reference in cases:
    level = bin_ / (randaugment.AUGMIX_BINS - 1)
    expected = np.zeros(image.shape) if reference is None else from_pil(reference, 3)
    assert_within_one_level(apply(image, name, level, sign, randaugment.AUGMIX), expected)


def test_augmix_draws_torchvisions_chains_and_mixing_weights():
  keys = jax.random.split(jax.random.key(0), 20_000)
  draw = jax.jit(jax.vmap(randaugment.draw_augmix, (0, None, None, None, None, None)),
                 static_argnums=(1, 2, 3, 4, 5))
  drawn = draw(keys, 3, 3, -1, 1.0, False)
  operations, levels, active = map(np.asarray, (drawn.operations, drawn.levels, drawn.active))
  assert operations.shape == levels.shape == active.shape == (20_000, 3, 3)
  names = [randaugment.OPERATIONS[i] for i in np.unique(operations)]
  assert sorted(names) == sorted(randaugment.AUGMIX_OPERATIONS)  # The paper's nine, no others.
  counts = np.bincount(operations.ravel())[np.unique(operations)]
  assert np.abs(counts / operations.size * 9 - 1).max() < 0.05, counts
  # Severity 3: bins 0, 1 and 2 of 10, equally often.
  np.testing.assert_allclose(np.unique(levels), [0, 1 / 9, 2 / 9])
  assert np.abs(np.bincount(np.round(levels.ravel() * 9).astype(int)) / levels.size * 3 - 1
                ).max() < 0.05
  # Depth -1: each chain's first 1, 2 or 3 operations, each depth as often.
  depths = active.sum(axis=-1)
  assert (active == (np.arange(3) < depths[..., None])).all()
  assert np.abs(np.bincount(depths.ravel())[1:] / depths.size * 3 - 1).max() < 0.05
  # Beta(1, 1) for the original, the rest Dirichlet-split between the chains: all sum to 1.
  original, chains = np.asarray(drawn.original_weight), np.asarray(drawn.chain_weights)
  np.testing.assert_allclose(original + chains.sum(-1), 1.0, rtol=1e-5)
  assert abs(original.mean() - 0.5) < 0.01 and abs(original.std() - 12 ** -0.5) < 0.01
  np.testing.assert_allclose(chains.mean(0), 1 / 6, atol=0.01)
  signs = np.asarray(drawn.signs)
  assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.mean()) < 0.02
  # all_ops adds the four enhancements; a fixed depth applies every step of it.
  drawn = draw(keys[:2000], 10, 2, 4, 1.0, True)
  names = {randaugment.OPERATIONS[i] for i in np.unique(np.asarray(drawn.operations))}
  assert names == set(randaugment.AUGMIX_ALL_OPERATIONS)
  assert drawn.active.shape == (2000, 2, 4) and np.asarray(drawn.active).all()
  assert np.asarray(drawn.levels).max() == 1.0  # Severity 10 reaches the top bin.


def test_augmix_mixes_each_image_with_its_own_chains():
  images = jnp.asarray(np.random.default_rng(5).integers(0, 256, (32, 9, 8, 3)), jnp.uint8)
  keys = augment.example_keys(jax.random.key(6), 32)

  @jax.jit
  def both(images, keys):
    def reference(image, key):
      drawn = randaugment.draw_augmix(key, 4, 2, -1, 0.5, True)
      mix = drawn.original_weight * image
      for chain in range(2):
        chained = image
        for step in range(3):
          augmented = randaugment.apply_operation(
              chained, drawn.operations[chain, step], drawn.levels[chain, step],
              drawn.signs[chain, step], jnp.asarray(FILL, jnp.float32), randaugment.AUGMIX)
          chained = jnp.where(drawn.active[chain, step], augmented, chained)
        mix = mix + drawn.chain_weights[chain] * chained
      return jnp.clip(mix, 0, 255)
    expected = jax.vmap(reference)(images.astype(jnp.float32), keys)
    return randaugment.augmix(images, keys, FILL, 4, 2, -1, 0.5, True), expected

  mixed, expected = both(images, keys)
  np.testing.assert_allclose(mixed, expected, atol=1e-3)
  mixed = np.asarray(mixed)
  assert (np.abs(mixed - np.asarray(images)).max(axis=(1, 2, 3)) > 0).all()
  with pytest.raises(ValueError, match='AugMix severity must be an integer from 1 to 10, got 0'):
    randaugment.augmix(images, keys, FILL, severity=0)


def test_the_preprocessor_applies_it_after_the_crops_and_flips_from_a_stream_of_its_own():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 255, (6, 10, 9, 3)), jnp.uint8)
  crops = dict(mean=(120.0, 110.0, 100.0), std=(50.0,) * 3, crop_padding=2, flip=True)
  key = jax.random.key(7)
  with_randaugment = augment.Preprocessor(**crops, randaugment_ops=2, randaugment_magnitude=6.0)
  cropped = augment.Preprocessor(**{**crops, 'std': (1.0,) * 3})  # Crops and flips, in pixels.

  @jax.jit  # One program each: run eagerly, every operation of the policy compiles on its own.
  def both(images, key):
    pixels = cropped(images, key, train=True) + jnp.asarray(crops['mean'])
    expected = randaugment.rand_augment(
        pixels, augment.example_keys(jax.random.fold_in(key, 4), 6), 2, 6.0, crops['mean'])
    return with_randaugment(images, key, train=True), with_randaugment.normalize(expected)

  np.testing.assert_allclose(*both(images, key), atol=1e-5)
  # Evaluation is untouched.
  np.testing.assert_array_equal(with_randaugment(images, None, train=False),
                                with_randaugment.normalize(images))


def test_the_preprocessor_applies_autoaugment_after_the_crops_from_a_stream_of_its_own():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 255, (6, 10, 9, 1)), jnp.uint8)
  crops = dict(mean=(120.0,), std=(50.0,), crop_padding=2)
  key = jax.random.key(7)
  with_autoaugment = augment.Preprocessor(**crops, autoaugment='svhn')
  cropped = augment.Preprocessor(**{**crops, 'std': (1.0,)})

  @jax.jit
  def both(images, key):
    pixels = cropped(images, key, train=True) + jnp.asarray(crops['mean'])
    expected = randaugment.auto_augment(
        pixels, augment.example_keys(jax.random.fold_in(key, 7), 6), 'svhn', crops['mean'])
    return with_autoaugment(images, key, train=True), with_autoaugment.normalize(expected)

  np.testing.assert_allclose(*both(images, key), atol=1e-5)


def test_augmix_views_are_the_image_and_two_augmix_views_of_the_same_crop_and_flip():
  images = jnp.asarray(np.random.default_rng(2).integers(0, 255, (6, 10, 9, 1)), jnp.uint8)
  settings = dict(mean=(120.0,), std=(50.0,), crop_padding=2, flip=True)
  key = jax.random.key(3)
  with_augmix = augment.Preprocessor(**settings, augmix=True)
  without = augment.Preprocessor(**settings)
  cropped = augment.Preprocessor(**{**settings, 'std': (1.0,)})

  @jax.jit
  def views_and_expected(images, key):
    pixels = cropped(images, key, train=True) + jnp.asarray(settings['mean'])
    second = randaugment.augmix(pixels, augment.example_keys(jax.random.fold_in(key, 9), 6),
                                settings['mean'])
    return (with_augmix.augmix_views(images, key), without(images, key, train=True),
            with_augmix(images, key, train=True), with_augmix.normalize(second))

  views, clean, first, second = views_and_expected(images, key)
  assert views.shape == (6, 3, 10, 9, 1)
  # Within float32 rounding: XLA may contract multiplies and adds differently in each program.
  np.testing.assert_allclose(views[:, 0], clean, atol=1e-5)
  np.testing.assert_allclose(views[:, 1], first, atol=1e-5)
  np.testing.assert_allclose(views[:, 2], second, atol=1e-5)
  assert np.abs(np.asarray(views[:, 2] - views[:, 1])).max() > 0.5  # Two draws, not one.
  with pytest.raises(ValueError, match='augmix_views needs AugMix on'):
    without.augmix_views(images, key)


def test_a_run_trains_with_augmixs_consistency_loss(fake_tfds, tmp_path):
  config = tiny_config(model='bn_cnn', num_train_steps=40, eval_every_steps=40,
                       **{'augment.augmix': True, 'augment.augmix_jsd_weight': 12.0})
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['test/accuracy'] > 0.5  # Ten classes: chance is 0.1.


def test_a_run_trains_with_it_and_its_settings_are_checked_before_the_run_writes(fake_tfds,
                                                                                  tmp_path):
  config = tiny_config(model='bn_cnn', num_train_steps=40, eval_every_steps=40,
                       **{'augment.randaugment_ops': 2, 'augment.randaugment_magnitude': 5.0,
                          'augment.randaugment_magnitude_std': math.inf,
                          'augment.randaugment_probability': 0.5})
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['test/accuracy'] > 0.5  # Ten classes: chance is 0.1.
  # The run's config.json gives the uniform magnitude (inf) back.
  recorded = config_from_json(str(tmp_path / 'run' / 'config.json'))
  assert recorded.augment.randaugment_magnitude_std == math.inf
  # Each automatic augmentation on images of 4 channels: one line, before the run writes.
  for key, value, text, off in (('randaugment_ops', 1, 1, 0),
                                ('trivialaugment', True, 'true', 'false'),
                                ('autoaugment', 'imagenet', 'imagenet', 'none'),
                                ('augmix', True, 'true', 'false')):
    four_channels = tiny_config(dataset='synthetic', num_train_steps=4,
                                **{f'augment.{key}': value})
    four_channels.synthetic.image_shape = (8, 8, 4)
    with pytest.raises(ConfigError, match=re.escape(
        f"config key 'augment.{key}' ({text}) is for images of 1 or 3 channels, and these have "
        f'4: its colour operations are defined on grey and RGB images; set it to {off}') + '$'):
      trainer.train_and_evaluate(four_channels, str(tmp_path / 'four'))
  assert not (tmp_path / 'four').exists() or not list((tmp_path / 'four').iterdir())
  # Each mistake in the run's config on its own, likewise.
  mistakes = [
      ({'randaugment_magnitude': 11.0},
       "config key 'augment.randaugment_magnitude' must be a number from 0 to 10, got 11.0"),
      ({'randaugment_magnitude_std': -0.5},
       "config key 'augment.randaugment_magnitude_std' must be a number >= 0 (inf draws the "
       'magnitude uniformly from 0), got -0.5'),
      ({'trivialaugment': True},
       "config keys 'augment.randaugment_ops' (2) and 'augment.trivialaugment' (true) both ask "
       'for an automatic augmentation; choose one (randaugment_ops=0 or trivialaugment=false)'),
      ({'autoaugment': 'svhn'},
       "config keys 'augment.randaugment_ops' (2) and 'augment.autoaugment' (svhn) both ask for "
       'an automatic augmentation; choose one (randaugment_ops=0 or autoaugment=none)'),
      ({'randaugment_ops': 0, 'autoaugment': 'mnist'},
       "config key 'augment.autoaugment' must be one of none, imagenet, cifar10, svhn, got "
       "'mnist'"),
      ({'randaugment_ops': 0, 'trivialaugment': True, 'augmix': True},
       "config keys 'augment.trivialaugment' (true) and 'augment.augmix' (true) both ask for an "
       'automatic augmentation; choose one (trivialaugment=false or augmix=false)'),
      ({'randaugment_ops': 0, 'augmix': True, 'augmix_depth': 0},
       "config key 'augment.augmix_depth' must be an integer >= 1, or -1 for 1 to 3 operations "
       'at random, got 0'),
      ({'randaugment_ops': 0, 'augmix_jsd_weight': 12.0},
       "config key 'augment.augmix_jsd_weight' (12.0) weighs AugMix's consistency loss, and "
       'AugMix is off; set augment.augmix=true, or augmix_jsd_weight=0'),
      ({'randaugment_ops': 0, 'augmix': True, 'augmix_jsd_weight': -1.0},
       "config key 'augment.augmix_jsd_weight' must be a number >= 0 (12 in the AugMix paper; "
       '0: off), got -1.0'),
      ({'randaugment_ops': 0, 'augmix': True, 'augmix_jsd_weight': 12.0, 'mixup_alpha': 0.2,
        'cutmix_alpha': 1.0},
       "config key 'augment.augmix_jsd_weight' (12.0) compares three views of each image, which "
       "'augment.mixup_alpha' (0.2) would mix with other images; set mixup_alpha=0 and "
       'cutmix_alpha=0, or augmix_jsd_weight=0'),
  ]
  for overrides, message in mistakes:
    mistaken = config.copy_and_resolve_references()
    mistaken.augment.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message) + '$'):
      trainer.train_and_evaluate(mistaken, str(tmp_path / 'mistaken'))
  assert not (tmp_path / 'mistaken').exists()
