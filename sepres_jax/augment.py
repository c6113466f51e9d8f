"""Training augmentation of (image, label) pairs: random scale and crop, flip, photometric jitter.

All off by default (and in configs/seed.py). Each example's randomness comes from its own numpy
generator seeded by (seed, step, position in the global batch), so a run is reproducible, a
resumed run draws the same augmentations, and processes agree on a global batch.
"""

import cv2
import numpy as np

IGNORE = -1  # Label of pixels that a crop padded: never counted.


def is_active(data_config) -> bool:
  a = data_config.augment
  return bool(a.crop or tuple(a.scale) != (1.0, 1.0) or a.jitter > 0)


def scale_and_crop(rgb, label, rng, size, scale_range, crop: bool):
  """Resizes so that the height matches size[0] times a random scale, keeping the aspect, then
  takes a random crop of `size` (padding with IGNORE labels where the image is smaller).

  Without `crop` the image is squashed to `size` (the plain resize); the scale then has no effect.
  """
  h, w = size
  if not crop:
    return (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32))
  s = rng.uniform(*scale_range) * h / rgb.shape[0]
  nh, nw = max(1, round(rgb.shape[0] * s)), max(1, round(rgb.shape[1] * s))
  rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST).astype(np.int32)
  ph, pw = max(h - nh, 0), max(w - nw, 0)
  if ph or pw:
    rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
  y = rng.integers(0, rgb.shape[0] - h + 1)
  x = rng.integers(0, rgb.shape[1] - w + 1)
  return rgb[y:y + h, x:x + w], label[y:y + h, x:x + w]


def jitter(rgb, rng, strength: float):
  """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s]."""
  x = rgb.astype(np.float32)
  grey = x @ np.float32([0.299, 0.587, 0.114])
  x = x * rng.uniform(1 - strength, 1 + strength)  # Brightness.
  mean = grey.mean()
  x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # Contrast.
  g = (x @ np.float32([0.299, 0.587, 0.114]))[..., None]
  x = (x - g) * rng.uniform(1 - strength, 1 + strength) + g  # Saturation.
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment(rgb, label, rng, data_config, flip: bool):
  """uint8 RGB [H, W, 3] and uint8 label [H, W] -> uint8 RGB and int32 label at image_size."""
  a = data_config.augment
  size = tuple(int(s) for s in data_config.image_size)
  label = np.asarray(label)
  if label.ndim == 3:
    label = label[..., 0]
  rgb, label = scale_and_crop(np.asarray(rgb), label, rng, size, tuple(a.scale), bool(a.crop))
  if a.jitter > 0:
    rgb = jitter(rgb, rng, float(a.jitter))
  if flip:
    rgb, label = rgb[:, ::-1], label[:, ::-1]
  return np.ascontiguousarray(rgb), np.ascontiguousarray(label)
