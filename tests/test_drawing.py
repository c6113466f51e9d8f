"""Tests of sepres_jax.drawing: exact palette colours and readable, non-trivial PNGs."""
import os
import warnings

import cv2
import numpy as np
import pytest

from sepres_jax import drawing as vis

# CamVid palette and names (shared/data/README.md), hard-coded so the test stands alone.
NAMES = ['Sky', 'Building', 'Pole', 'Road', 'Sidewalk', 'Tree', 'SignSymbol', 'Fence',
         'Car', 'Pedestrian', 'Bicyclist', 'void']
COLORS = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128],
                   [60, 40, 222], [128, 128, 0], [192, 128, 128], [64, 64, 128],
                   [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0]], np.uint8)
K = 11
H, W = 90, 120


@pytest.fixture
def scene():
    """A small synthetic street: gradient image, banded label with void, -1 and 255."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 2, yy * 2, (xx + yy)], -1).clip(0, 255).astype(np.uint8)
    label = (yy // 8 + xx // 40) % K
    label[:5, :5] = K
    label[-3:, :] = -1
    label[:, -2:] = 255
    pred = np.where(rng.random(label.shape) < 0.2, rng.integers(0, K, label.shape), label)
    return image, label.astype(np.int64), pred


def check_png(path, min_bytes=5000, min_hw=(100, 100)):
    assert os.path.isfile(path)
    assert os.path.getsize(path) > min_bytes
    img = cv2.imread(path)
    assert img is not None and img.ndim == 3
    assert img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1]
    assert img.std() > 5  # not a uniform picture
    return img


def test_colorize_exact_palette():
    label = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [-1, 255, 12, 3]])
    out = vis.colorize(label, COLORS)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    for k in range(K + 1):
        assert (out.reshape(-1, 3)[k] == COLORS[k]).all()
    black = np.zeros(3, np.uint8)
    assert (out[3, 0] == black).all() and (out[3, 1] == black).all() and (out[3, 2] == black).all()
    assert (out[3, 3] == COLORS[3]).all()
    # uint8 labels with 255 as padding
    assert (vis.colorize(np.array([[255, 3]], np.uint8), COLORS) == [[black, COLORS[3]]]).all()


def test_overlay_keeps_void(scene):
    image, label, _ = scene
    out = vis.overlay(image, label, COLORS, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    void = (label < 0) | (label >= K)
    assert void.any()
    np.testing.assert_array_equal(out[void], image[void])
    expected = np.rint(0.5 * image[~void] + 0.5 * COLORS[label[~void]]).astype(np.uint8)
    assert np.abs(out[~void].astype(int) - expected).max() <= 1


def test_to_uint8_round_trip_and_shapes(scene):
    image, _, _ = scene
    x = image.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(vis.to_uint8(x), image)
    lab6 = np.concatenate([x, np.zeros_like(x)], -1)  # RGB + LAB model input
    np.testing.assert_array_equal(vis.to_uint8(lab6), image)
    np.testing.assert_array_equal(vis.to_uint8(image), image)
    assert vis.to_uint8(np.full((4, 5), 2.0)).tolist() == np.full((4, 5, 3), 255).tolist()
    grey = vis.to_uint8(image[..., :1])
    assert grey.shape == (H, W, 3) and (grey[..., 0] == image[..., 0]).all()
    assert vis.to_uint8(image[..., 0]).shape == (H, W, 3)


def test_prediction_strip(scene):
    image, label, pred = scene
    strip = vis.prediction_strip(image, pred, label, COLORS)
    assert strip.shape == (H, 3 * W + 8, 3) and strip.dtype == np.uint8
    np.testing.assert_array_equal(strip[:, :W], image)
    np.testing.assert_array_equal(strip[:, -W:], vis.colorize(label, COLORS))
    assert vis.prediction_strip(image, pred, label, COLORS, gap=0).shape == (H, 3 * W, 3)


def test_image_pictures(scene, tmp_path):
    image, label, pred = scene
    small_img = cv2.resize(image, (60, 40), interpolation=cv2.INTER_LINEAR)
    small_lab = cv2.resize(label.astype(np.int32), (60, 40), interpolation=cv2.INTER_NEAREST_EXACT)
    paths = [
        vis.save_class_masks(image, label, NAMES, tmp_path / 'a' / 'masks.png'),
        vis.save_label_panel(image, label, COLORS, NAMES, tmp_path / 'panel.png'),
        vis.save_resize_comparison(image, label, small_img, small_lab, COLORS, NAMES,
                                   tmp_path / 'resize.png'),
        vis.save_panels([image, image / 127.5 - 1], [pred, label], [label, label], COLORS,
                        NAMES, tmp_path / 'panels.png', titles=['a.png  mIoU 0.50', 'b.png']),
        vis.save_legend(NAMES, COLORS, tmp_path / 'legend.png'),
    ]
    for p in paths:
        assert isinstance(p, str)
        check_png(p, min_bytes=3000)
    assert os.path.isdir(tmp_path / 'a')


@pytest.mark.parametrize('log', [False, True])
def test_class_frequencies(tmp_path, log):
    counts = np.array([10.7, 14.8, 0.62, 20.1, 2.8, 6.2, 0.74, 0.71, 3.7, 0.41, 0.0, 2.5]) * 1e6
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        path = vis.save_class_frequencies(counts, NAMES, COLORS, tmp_path / 'f.png',
                                          title='train', log=log)
    check_png(path)


def _history(n=12):
    hist = []
    for e in range(1, n + 1):
        hist.append({'epoch': e, 'train_loss': 2.0 / e, 'val_loss': 2.2 / e + 0.01 * e,
                     'train_accuracy': 1 - 0.5 / e, 'val_accuracy': 0.9 - 0.5 / e,
                     'val_miou': 0.6 - 0.4 / e, 'learning_rate': 1e-3 * (0.1 if e > 6 else 1),
                     'lr_cut': e == 6, 'best': e in (3, 8)})
    return hist


def test_training_curves(tmp_path):
    check_png(vis.save_training_curves(_history(), tmp_path / 'curves.png'))


def test_a_failed_save_keeps_the_earlier_picture(tmp_path, monkeypatch):
    """Pictures go through a temporary file: a kill or a full disk mid-write left a truncated
    PNG in place of training_curves.png (redrawn after every run)."""
    path = vis.save_training_curves(_history(), tmp_path / 'curves.png')
    before = open(path, 'rb').read()

    def broken(self, fname, **kwargs):
        with open(fname, 'wb') as f:
            f.write(b'\x89PNG half')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(vis.Figure, 'savefig', broken)
    with pytest.raises(OSError):
        vis.save_training_curves(_history(), tmp_path / 'curves.png')
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['curves.png']


def test_training_curves_partial_keys(tmp_path):
    hist = [{'epoch': 1, 'train_loss': 1.3}, {'epoch': 2, 'train_loss': 0.9, 'val_miou': 0.3},
            {'train_loss': 0.8, 'val_miou': None, 'best': True}]
    check_png(vis.save_training_curves(hist, tmp_path / 'partial.png'))
    check_png(vis.save_training_curves(_history(1), tmp_path / 'one.png'))


def test_iou_bars(tmp_path):
    per_class = [{'name': n, 'iou': v, 'support': 10}
                 for n, v in zip(NAMES[:K], np.linspace(0.1, 0.9, K))]
    per_class[4]['iou'] = float('nan')
    check_png(vis.save_iou_bars(per_class, tmp_path / 'iou.png', miou=0.5))
    check_png(vis.save_iou_bars(per_class, tmp_path / 'iou_c.png', colors=COLORS))


def test_confusion_matrix_zero_row_no_warnings(tmp_path):
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 50, (K, K)) + np.diag(rng.integers(500, 1000, K))
    cm[3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        path = vis.save_confusion_matrix(cm, NAMES, tmp_path / 'cm.png')  # names incl. void
    check_png(path)
    big = np.eye(25) * 10 + 1
    check_png(vis.save_confusion_matrix(big, [f'c{i}' for i in range(25)], tmp_path / 'big.png'))
