"""Training augmentation: shapes, label alignment, determinism, padding that never counts."""

import cv2
import numpy as np
import pytest

from configs import default
from sepres_jax import augment
from sepres_jax import input_pipeline


def _pair(h=72, w=96):
  """An image whose red channel is 20 x the label, in 12x12 blocks, so alignment is checkable."""
  blocks = np.arange((h // 12) * (w // 12)).reshape(h // 12, w // 12) % 11
  label = blocks.repeat(12, 0).repeat(12, 1).astype(np.uint8)
  rgb = np.stack([label * 20, np.full_like(label, 100), np.zeros_like(label)], -1).astype(np.uint8)
  return rgb, label[..., None]


def _config(**augment_fields):
  config = default.get_config().data
  config.image_size = (64, 64)
  for k, v in augment_fields.items():
    config.augment[k] = v
  return config


def test_off_by_default():
  assert not augment.is_active(default.get_config().data)


@pytest.mark.parametrize('scale', [(0.5, 0.6), (1.0, 1.0), (1.5, 2.0)])
def test_scale_and_crop_keeps_image_and_label_aligned(scale):
  config = _config(crop=True, scale=scale)
  rgb, label = _pair()
  for seed in range(5):
    out_rgb, out_label, soft = augment.augment(rgb, label, np.random.default_rng(seed), config,
                                               False)
    assert soft is None
    assert out_rgb.shape == (64, 64, 3) and out_rgb.dtype == np.uint8
    assert out_label.shape == (64, 64) and out_label.dtype == np.int32
    counted = out_label >= 0
    assert counted.any()
    # The label and the (bilinear) red channel agree away from block edges.
    red = out_rgb[..., 0].astype(int)
    agree = (np.abs(red - 20 * out_label) <= 2)[counted].mean()
    shifted = (np.abs(red[:, 6:] - 20 * out_label[:, :-6]) <= 2)[counted[:, :-6]].mean()
    assert agree > 0.75 and agree > shifted + 0.1, (agree, shifted)
    if scale[1] < 1.0:  # The scaled image is smaller than the crop: padding is IGNORE.
      assert (out_label == augment.IGNORE).any()
      assert (out_rgb[out_label == augment.IGNORE] == 0).all()


@pytest.mark.parametrize('crop', [False, True])
def test_resized_labels_sit_on_the_image_pixels_they_label(crop):
  # Each column's red value is its index, and so is its label: after any resize the label must
  # name the source column nearest the pixel's centre, where bilinear samples the image. OpenCV's
  # INTER_NEAREST takes floor(x / scale) instead, about half a source pixel up-left (0.67 at
  # 480 -> 288 columns), which cost thin classes their edges.
  cols = np.tile(np.arange(240, dtype=np.uint8), (90, 1))
  rgb = np.repeat(cols[..., None], 3, axis=-1)
  config = _config(crop=crop, scale=(0.6, 1.7))
  config.image_size = (64, 96)
  for seed in range(6):
    out_rgb, out_label, _ = augment.augment(rgb, cols, np.random.default_rng(seed), config,
                                            False)
    inside = (out_label >= 2) & (out_label <= 237)  # Not padding, not the clamped borders.
    lag = (out_rgb[..., 0].astype(float) - out_label)[inside]
    assert abs(lag.mean()) < 0.15 and np.abs(lag).max() <= 1.0, (seed, lag.mean())
  resized = input_pipeline.preprocess_label(cols, (30, 144))
  image = cv2.resize(cols.astype(np.float32), (144, 30), interpolation=cv2.INTER_LINEAR)
  assert abs((image - resized)[:, 2:-2].mean()) < 0.15


def test_flip_and_determinism():
  config = _config(crop=True, scale=(1.0, 1.5), jitter=0.3)
  rgb, label = _pair()
  a = augment.augment(rgb, label, np.random.default_rng(7), config, False)
  b = augment.augment(rgb, label, np.random.default_rng(7), config, False)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  c = augment.augment(rgb, label, np.random.default_rng(7), config, True)
  np.testing.assert_array_equal(c[1], a[1][:, ::-1])


def test_jitter_changes_colours_not_labels():
  rgb, _ = _pair()
  out = augment.jitter(rgb, np.random.default_rng(0), 0.4)
  assert out.shape == rgb.shape and out.dtype == np.uint8
  assert not np.array_equal(out, rgb)
  assert np.array_equal(augment.jitter(rgb, np.random.default_rng(0), 0.0), rgb)


def test_jitter_contrast_keeps_a_flat_image_flat():
  """A flat grey image changes only by the brightness factor (contrast turns about the brightened
  image's mean: it was the original's, so contrast moved a flat 100 to 124 instead of 120)."""
  flat = np.full((8, 8, 3), 100, np.uint8)
  for seed in range(5):
    brightness = np.random.default_rng(seed).uniform(0.6, 1.4)  # jitter's first draw.
    out = augment.jitter(flat, np.random.default_rng(seed), 0.4)
    assert np.all(np.abs(out.astype(float) - 100 * brightness) <= 1), (seed, out[0, 0])


def test_hue_rotates_colours_keeps_grey_and_labels():
  rgb, label = _pair()
  rgb[:12, :12] = 128  # A grey block has no hue: it stays grey.
  out = augment.rotate_hue(rgb, np.random.default_rng(1), 60.0)
  assert out.shape == rgb.shape and out.dtype == np.uint8 and not np.array_equal(out, rgb)
  np.testing.assert_array_equal(out[:12, :12], rgb[:12, :12])
  # Value (the largest channel) is kept up to the 8-bit HSV round trip.
  assert np.abs(out.max(-1).astype(int) - rgb.max(-1).astype(int)).max() <= 2
  config = _config(crop=True, scale=(1.0, 1.5), hue=30.0)
  assert augment.is_active(config)
  on = augment.augment(rgb, label, np.random.default_rng(3), config, False)
  off = augment.augment(rgb, label, np.random.default_rng(3), _config(crop=True, scale=(1.0, 1.5)),
                        False)
  np.testing.assert_array_equal(on[1], off[1])  # Same crop; labels are never recoloured.
  assert not np.array_equal(on[0], off[0])


def test_blur_smooths_with_its_probability():
  rgb, _ = _pair()
  out = augment.blur(rgb, np.random.default_rng(0), 1.0)
  assert out.dtype == np.uint8 and out.shape == rgb.shape
  # Block edges are smoothed: the largest step between neighbours falls.
  step = lambda x: np.abs(np.diff(x[..., 0].astype(int), axis=1)).max()
  assert step(out) < step(rgb)
  assert np.array_equal(augment.blur(rgb, np.random.default_rng(0), 0.0), rgb)
  drawn = [not np.array_equal(augment.blur(rgb, np.random.default_rng(s), 0.3), rgb)
           for s in range(200)]
  assert 0.2 < np.mean(drawn) < 0.4


def test_new_draws_leave_existing_streams_alone():
  """hue and blur draw only when on, so a config without them augments exactly as before."""
  rgb, label = _pair()
  base = _config(crop=True, scale=(1.0, 1.5), jitter=0.3)
  off = _config(crop=True, scale=(1.0, 1.5), jitter=0.3, hue=0.0, blur=0.0)
  del base.augment['hue'], base.augment['blur']  # A config written before the fields existed.
  a = augment.augment(rgb, label, np.random.default_rng(5), base, True)
  b = augment.augment(rgb, label, np.random.default_rng(5), off, True)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize('key,value', [('hue', 120.0), ('hue', -1.0), ('blur', 1.5),
                                       ('jitter', 1.0), ('scale', (1.5, 1.0))])
def test_out_of_range_settings_name_the_key(key, value):
  config = _config(**{key: value})
  with pytest.raises(augment.DataError, match=f'config.data.augment.{key} '):
    augment.is_active(config)


def test_train_iterator_with_augmentation(tmp_path):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config().data
  config.cache_dir = str(tmp_path / 'cache')
  config.augment.crop, config.augment.scale, config.augment.jitter = True, (0.75, 1.5), 0.2
  config.random_flip = True
  sources, _ = input_pipeline.load_sources(config)
  it = input_pipeline.train_iterator(sources['train'], config, global_batch_size=4, seed=0)
  first = next(it)
  assert first['image'].shape == (4, 64, 64, 3) and first['label'].shape == (4, 64, 64)
  assert first['image'].min() >= -1 and first['image'].max() <= 1
  again = input_pipeline.train_iterator(sources['train'], config, global_batch_size=4, seed=0)
  np.testing.assert_array_equal(next(again)['image'], first['image'])
