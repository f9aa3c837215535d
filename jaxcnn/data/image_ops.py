"""Per-image operations on uint8 HWC NumPy arrays, for the host side of the data path.

Used where images have their own sizes: decoding a dataset of varied sizes into a fixed-size
array, the streaming pipeline's workers, and prediction from image files.
"""

import math

import numpy as np
from PIL import Image


def to_uint8(image: Image.Image, mode: str) -> np.ndarray:
  """`image`'s pixels as a uint8 array in PIL `mode` ('L' for grey, 'RGB').

  A 16-bit grey image (a PNG of mode 'I;16', or a 16-bit PGM or TIFF that PIL opens as 32-bit
  'I' with values above 255) is scaled to 8 bits first: PIL's own conversion clips every value
  above 255, which turns all but the darkest pixels white. An 'I' image whose values all fit in
  8 bits is taken as 8-bit, as PIL keeps no bit depth for it: a 16-bit frame that dark would come
  out 257 times too bright.
  """
  if image.mode.startswith('I;16') or image.mode == 'I':
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    if image.mode != 'I' or wide.max(initial=0) > 255:
      image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # 65535 -> 255, rounded.
  return np.asarray(image.convert(mode), np.uint8)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 HWC image (a no-op at the same size)."""
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  pixels = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), np.uint8)
  return pixels.reshape(height, width, channels)


# The share of an image's shorter side that the evaluation transform keeps, as ImageNet's does.
CENTRE_CROP_FRACTION = 0.875


def resize_and_center_crop(image: np.ndarray, height: int, width: int,
                           crop_fraction: float = CENTRE_CROP_FRACTION) -> np.ndarray:
  """The standard evaluation transform: resize the shorter side to the larger target side /
  `crop_fraction` (0.875, as ImageNet evaluation does), and crop the centre.

  Images already of the target size are returned as they are.
  """
  if image.shape[:2] == (height, width):
    return image
  scale = max(height, width) / crop_fraction / min(image.shape[:2])
  resized_h = max(height, round(image.shape[0] * scale))
  resized_w = max(width, round(image.shape[1] * scale))
  image = resize(image, resized_h, resized_w)
  top, left = (resized_h - height) // 2, (resized_w - width) // 2
  return image[top:top + height, left:left + width]


def random_resized_crop(image: np.ndarray, height: int, width: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """The Inception crop: a random area (8%-100%) and aspect ratio (3/4-4/3), resized to the target.

  Falls back to a centre crop when ten draws find no box that fits, as torchvision does.
  """
  image_h, image_w = image.shape[:2]
  area = image_h * image_w
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    crop_w = round(math.sqrt(target_area * aspect))
    crop_h = round(math.sqrt(target_area / aspect))
    if 0 < crop_w <= image_w and 0 < crop_h <= image_h:
      top = int(rng.integers(0, image_h - crop_h + 1))
      left = int(rng.integers(0, image_w - crop_w + 1))
      return resize(image[top:top + crop_h, left:left + crop_w], height, width)
  return resize_and_center_crop(image, height, width, crop_fraction=1.0)
