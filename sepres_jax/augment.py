"""Training augmentation of (image, label) pairs: random scale and crop, flip, photometric jitter,
hue rotation and Gaussian blur.

All off by default (and in configs/seed.py). Each example's randomness comes from its own numpy
generator seeded by (seed, step, position in the global batch), so a run is reproducible, a
resumed run draws the same augmentations, and processes agree on a global batch.
"""

import cv2
import numpy as np

from sepres_jax import distill
from sepres_jax.data.camvid import DataError

IGNORE = -1  # Label of pixels that a crop padded: never counted.


def is_active(data_config) -> bool:
  a = data_config.augment
  check(a)
  return bool(a.crop or tuple(a.scale) != (1.0, 1.0) or a.jitter > 0 or a.get('hue', 0) > 0
              or a.get('blur', 0) > 0)


def check(a):
  """One-line errors for augmentation settings out of range or of the wrong type, naming the key
  (config_check runs it before any work; the input pipeline again)."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  scale = a.scale
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2 or not all(map(number, scale))
      or not 0 < scale[0] <= scale[1]):
    raise DataError(f'config.data.augment.scale must be (low, high) with 0 < low <= high, got '
                    f'{scale!r}')
  for key, ok, what in (('jitter', lambda v: 0 <= v < 1, 'in [0, 1)'),
                        ('hue', lambda v: 0 <= v <= 90, 'in [0, 90] degrees'),
                        ('blur', lambda v: 0 <= v <= 1, 'a probability in [0, 1]')):
    value = a.get(key, 0)
    if not number(value) or not ok(value):
      raise DataError(f'config.data.augment.{key} must be {what}, got {value!r}')


def scale_and_crop(rgb, label, rng, size, scale_range, crop: bool, soft=None):
  """Resizes so that the height matches size[0] times a random scale, keeping the aspect, then
  takes a random crop of `size` (padding with IGNORE labels where the image is smaller).

  Without `crop` the image is squashed to `size` (the plain resize); the scale then has no effect.
  `soft` (per-pixel class probabilities [H, W, K], distillation's targets) is resized bilinearly
  and cropped with the label; returns (rgb, label, soft), soft None when not given.

  The padding is black (-1 once normalised) while evaluation and predict pad with 0 (mid grey).
  Measured on val with the shipped weights (trained this way): 67.28 mIoU with grey padding at
  evaluation, 67.18 with black, so evaluation keeps grey; the recipes' figures were trained so.
  """
  h, w = size
  if not crop:
    return (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32),
            None if soft is None else distill.resize_soft(soft, size))
  s = rng.uniform(*scale_range) * h / rgb.shape[0]
  nh, nw = max(1, round(rgb.shape[0] * s)), max(1, round(rgb.shape[1] * s))
  rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32)
  if soft is not None:
    soft = distill.resize_soft(soft, (nh, nw))
  ph, pw = max(h - nh, 0), max(w - nw, 0)
  if ph or pw:
    rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    if soft is not None:
      soft = np.pad(soft, ((0, ph), (0, pw), (0, 0)))
  y = rng.integers(0, rgb.shape[0] - h + 1)
  x = rng.integers(0, rgb.shape[1] - w + 1)
  crop_of = lambda a: None if a is None else a[y:y + h, x:x + w]
  return crop_of(rgb), crop_of(label), crop_of(soft)


def jitter(rgb, rng, strength: float):
  """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s]."""
  x = rgb.astype(np.float32)
  grey = x @ np.float32([0.299, 0.587, 0.114])
  brightness = rng.uniform(1 - strength, 1 + strength)
  x = x * brightness
  mean = grey.mean() * brightness  # The brightened image's: contrast keeps a flat image flat.
  x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # Contrast.
  g = (x @ np.float32([0.299, 0.587, 0.114]))[..., None]
  x = (x - g) * rng.uniform(1 - strength, 1 + strength) + g  # Saturation.
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def rotate_hue(rgb, rng, degrees: float):
  """Rotates every pixel's hue by one random angle in [-degrees, degrees] (OpenCV's 8-bit HSV,
  whose hue runs 0-179 in steps of 2 degrees); saturation and value are kept."""
  shift = int(round(rng.uniform(-degrees, degrees) / 2))
  if not shift:
    return rgb
  hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
  hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


BLUR_SIGMA = (0.3, 1.5)  # Range of the blur's standard deviation, in pixels.


def blur(rgb, rng, probability: float):
  """With the given probability, a Gaussian blur of a random sigma in BLUR_SIGMA (as a softer
  lens or focus in another camera or sequence might give); the label is not blurred."""
  if rng.random() >= probability:
    return rgb
  return cv2.GaussianBlur(np.ascontiguousarray(rgb), (0, 0), rng.uniform(*BLUR_SIGMA))


def augment(rgb, label, rng, data_config, flip: bool, soft=None):
  """uint8 RGB [H, W, 3] and uint8 label [H, W] -> (uint8 RGB, int32 label, soft) at image_size.

  `soft` ([H, W, K] distillation targets, or None) is moved with the label (scale, crop, flip) and
  returned third (None stays None). It draws no random numbers, so the augmentation is the same
  with or without it.
  """
  a = data_config.augment
  size = tuple(int(s) for s in data_config.image_size)
  label = np.asarray(label)
  if label.ndim == 3:
    label = label[..., 0]
  rgb, label, soft = scale_and_crop(np.asarray(rgb), label, rng, size, tuple(a.scale),
                                    bool(a.crop), soft)
  if a.jitter > 0:
    rgb = jitter(rgb, rng, float(a.jitter))
  if a.get('hue', 0) > 0:  # Drawn only when on, so runs without it keep their random streams.
    rgb = rotate_hue(rgb, rng, float(a.hue))
  if a.get('blur', 0) > 0:
    rgb = blur(rgb, rng, float(a.blur))
  if flip:
    rgb, label = rgb[:, ::-1], label[:, ::-1]
    soft = None if soft is None else soft[:, ::-1]
  soft = None if soft is None else np.ascontiguousarray(soft)
  return np.ascontiguousarray(rgb), np.ascontiguousarray(label), soft
