"""Pictures of images, label maps, predictions and training runs.

Everything here is a pure function of numpy arrays (jax arrays work too, they are
converted with ``np.asarray``): no jax, no flax, no file reading.

Conventions shared by every function:

* ``colors`` is a uint8 ``[K+1, 3]`` palette whose last row is void, and
  ``class_names`` the matching ``K+1`` names with ``'void'`` last, so a class has
  the same colour (and name) in every picture.
* Labels are int arrays: ``0..K-1`` are classes, ``K`` is void, and anything else
  (``-1`` padding, ``255``) is drawn as void, i.e. ``colors[-1]``.
* Images are uint8 RGB, or floats in ``[-1, 1]`` as fed to the model (only the first
  three channels are used, so the 6-channel RGB+LAB input works), or grey.
* Each ``save_*`` writes one PNG to ``path`` (parent folders are created) and returns
  the path as a string.  Figures are built with ``matplotlib.figure.Figure`` and the
  Agg canvas directly, never through pyplot, so nothing touches the global backend
  and nothing is left open after saving.
* ``colorize``, ``overlay``, ``to_uint8`` and ``prediction_strip`` return arrays and
  do not use matplotlib at all (fast enough for TensorBoard image summaries).
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

_EDGE = '0.25'  # dark edge around patches/bars so light colours stay visible
_DPI = 100


# ---------------------------------------------------------------- array helpers
def colorize(label, colors):
    """Palette colours of a label map: uint8 ``[..., 3]``; out-of-range -> ``colors[-1]``."""
    colors = np.asarray(colors, dtype=np.uint8)
    label = np.asarray(label).astype(np.int64)
    idx = np.where((label >= 0) & (label < len(colors)), label, len(colors) - 1)
    return colors[idx]


def _void_mask(label, num_classes):
    label = np.asarray(label).astype(np.int64)
    return (label < 0) | (label >= num_classes)


def to_uint8(image):
    """Any image the project handles -> uint8 RGB ``[H, W, 3]``.

    uint8 passes through; floats are taken to be model inputs in ``[-1, 1]``;
    ``[H, W]`` and ``[H, W, 1]`` grey becomes RGB; extra channels (LAB) are dropped.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f'expected an [H, W], [H, W, 1] or [H, W, >=3] image, got {image.shape}')
    image = image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = (image.astype(np.float64) + 1.0) * 127.5
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def overlay(image_uint8, label, colors, alpha=0.5):
    """Label colours blended over the image; void pixels keep the image unchanged."""
    image = to_uint8(image_uint8)
    colour = colorize(label, colors).astype(np.float32)
    if colour.shape[:2] != image.shape[:2]:
        raise ValueError(f'image {image.shape[:2]} and label {colour.shape[:2]} differ in size')
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    void = _void_mask(label, len(colors) - 1)
    out[void] = image[void]
    return out


def prediction_strip(image, pred, label, colors, gap=4):
    """``image | prediction | truth`` as one uint8 array ``[H, 3W + 2*gap, 3]``.

    The gaps are white so that black void borders stay visible.  No matplotlib.
    """
    parts = [to_uint8(image), colorize(pred, colors), colorize(label, colors)]
    if len({p.shape for p in parts}) != 1:
        raise ValueError(f'sizes differ: {[p.shape[:2] for p in parts]}')
    h = parts[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate([parts[0], sep, parts[1], sep, parts[2]], axis=1)


# ----------------------------------------------------------- figure helpers
def _figure(width, height):
    fig = Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, tight=False):
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    # through a temporary file: a kill or a full disk keeps the earlier picture whole
    tmp = os.path.join(parent, f'.{os.path.basename(path)}.partial')
    try:
        fig.savefig(tmp, dpi=_DPI, format='png', bbox_inches='tight' if tight else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fig.clear()  # a Figure without pyplot has nothing to close; drop its artists now
    return path


def _handles(class_names, colors):
    colors = np.asarray(colors, dtype=np.float64) / 255.0
    return [Patch(facecolor=c, edgecolor=_EDGE, label=n) for n, c in zip(class_names, colors)]


def _legend(target, class_names, colors, loc='center left', anchor=(1.0, 0.5), ncol=1):
    return target.legend(handles=_handles(class_names, colors), loc=loc, bbox_to_anchor=anchor,
                         ncol=ncol, fontsize=9, frameon=False, title='classes')


def _show(ax, picture, title=None):
    ax.imshow(picture, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def _size(array):
    h, w = np.asarray(array).shape[:2]
    return f'{w}x{h}'


# ---------------------------------------------------------------- pictures
def save_class_masks(image, label, class_names, path, ncols=5):
    """The image, then one binary mask per class (void last), titled with the name."""
    label = np.asarray(label)
    k = len(class_names) - 1
    masks = [label == c for c in range(k)] + [_void_mask(label, k)]
    n = 1 + len(masks)
    nrows = -(-n // ncols)
    h, w = label.shape[:2]
    fig = _figure(ncols * 2.6, nrows * 2.6 * h / w + 0.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    _show(axes[0], to_uint8(image), f'image ({_size(image)})')
    for ax, name, mask in zip(axes[1:], class_names, masks):
        ax.imshow(mask, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'{name} ({100.0 * mask.mean():.1f}%)', fontsize=10)
    for ax in axes[n:]:
        ax.set_axis_off()
    return _save(fig, path)


def save_label_panel(image, label, colors, class_names, path, title=None):
    """Image beside its coloured label map, with the class legend."""
    image = to_uint8(image)
    h, w = image.shape[:2]
    fig = _figure(2 * 4.5 + 1.6, 4.5 * h / w + 0.6)
    ax_img, ax_lab = fig.subplots(1, 2)
    _show(ax_img, image, 'image')
    _show(ax_lab, colorize(label, colors), 'label')
    _legend(fig, class_names, colors, loc='outside right center', anchor=None)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def save_resize_comparison(orig_image, orig_label, resized_image, resized_label,
                           colors, class_names, path):
    """Image and label before (top) and after (bottom) resizing, sizes in the titles.

    All four share one pixel scale, so the change of size and shape is visible."""
    big_h = max(np.shape(orig_image)[0], np.shape(resized_image)[0])
    big_w = max(np.shape(orig_image)[1], np.shape(resized_image)[1])
    fig = _figure(2 * 4.0 + 1.6, 2 * 4.0 * big_h / big_w + 0.8)
    axes = fig.subplots(2, 2)
    _show(axes[0, 0], to_uint8(orig_image), f'original image {_size(orig_image)}')
    _show(axes[0, 1], colorize(orig_label, colors), f'original label {_size(orig_label)}')
    _show(axes[1, 0], to_uint8(resized_image), f'resized image {_size(resized_image)}')
    _show(axes[1, 1], colorize(resized_label, colors), f'resized label {_size(resized_label)}')
    for ax in axes.ravel():
        ax.set_xlim(-0.5, big_w - 0.5)
        ax.set_ylim(big_h - 0.5, -0.5)
        ax.set_frame_on(False)
    _legend(fig, class_names, colors, loc='outside right center', anchor=None)
    return _save(fig, path)


def save_class_frequencies(pixel_counts, class_names, colors, path, title='', log=False):
    """Bar chart of the fraction of pixels per class (void included), in class colours."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.shape != (len(class_names),):
        raise ValueError(f'{counts.shape[0]} counts for {len(class_names)} class names')
    fractions = counts / max(counts.sum(), 1.0)
    fig = _figure(max(6.0, 0.65 * len(counts) + 1.5), 4.5)
    ax = fig.subplots()
    x = np.arange(len(counts))
    bars = ax.bar(x, fractions, color=np.asarray(colors, np.float64)[:len(counts)] / 255.0,
                  edgecolor=_EDGE, linewidth=0.8)
    for bar, f in zip(bars, fractions):
        ax.annotate(f'{100 * f:.1f}%', (bar.get_x() + bar.get_width() / 2, f),
                    xytext=(0, 2), textcoords='offset points', ha='center', va='bottom',
                    fontsize=8)
    ax.set_xticks(x, class_names, rotation=40, ha='right')
    ax.set_ylabel('fraction of pixels' + (' (log scale)' if log else ''))
    if log:
        positive = fractions[fractions > 0]
        ax.set_yscale('log')
        if positive.size:
            ax.set_ylim(positive.min() / 2, positive.max() * 3)
    else:
        ax.set_ylim(0, max(fractions.max(), 1e-9) * 1.15)
    ax.grid(axis='y', alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or f'class pixel frequencies ({int(counts.sum()):,} pixels)')
    return _save(fig, path)


def _series(history, key):
    xs, ys = [], []
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is None:
            continue
        value = float(value)
        if np.isfinite(value):
            xs.append(entry.get('epoch', i + 1))
            ys.append(value)
    return xs, ys


_CURVE_PANELS = (
    ('loss', ('train_loss', 'val_loss')),
    ('pixel accuracy', ('train_accuracy', 'val_accuracy')),
    ('mean IoU', ('train_miou', 'val_miou')),
    ('learning rate', ('learning_rate',)),
)
_CURVE_STYLE = {'train': dict(color='tab:blue'), 'val': dict(color='tab:orange'),
                'learning': dict(color='tab:green', drawstyle='steps-mid'),
                'step': dict(color='tab:green')}


def save_training_curves(history, path, title=None):
    """Loss, accuracy, mIoU and learning rate per epoch; plots whatever keys exist.

    Dotted vertical lines sit between an epoch with ``lr_cut`` and the next (the
    plateau cut takes effect there); a star marks the last epoch with ``best``.
    """
    history = list(history)
    epoch_of = [h.get('epoch', i + 1) for i, h in enumerate(history)]
    cuts = [e for e, h in zip(epoch_of, history) if h.get('lr_cut')]
    best = [e for e, h in zip(epoch_of, history) if h.get('best')]
    best = best[-1] if best else None
    fig = _figure(11, 7.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    scheduled = any('step_learning_rate' in h for h in history)
    for ax, (name, keys) in zip(axes, _CURVE_PANELS):
        if name == 'learning rate' and scheduled:
            keys = ('step_learning_rate',)  # The rate the steps used, schedule included.
        drawn = False
        for key in keys:
            xs, ys = _series(history, key)
            if not xs:
                continue
            drawn = True
            legend = key.replace('_', ' ').replace('miou', 'mIoU')
            ax.plot(xs, ys, marker='o', markersize=3, label=legend,
                    **_CURVE_STYLE[key.split('_')[0]])
            if best is not None and best in xs and not key.startswith('train'):
                y = ys[xs.index(best)]
                ax.plot([best], [y], marker='*', markersize=15, color='crimson',
                        markeredgecolor='k', linestyle='none', zorder=5,
                        label=f'best checkpoint (epoch {best})')
                if name != 'learning rate':
                    ax.annotate(f'{y:.3f}', (best, y), xytext=(6, 6),
                                textcoords='offset points', fontsize=8, color='crimson')
        for j, e in enumerate(cuts):
            ax.axvline(e + 0.5, color='0.4', linestyle=':', linewidth=1.2,
                       label='learning-rate cut' if j == 0 else None)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not drawn:
            ax.text(0.5, 0.5, 'not recorded', ha='center', va='center',
                    transform=ax.transAxes, color='0.5')
            ax.set_yticks([])
            continue
        if name == 'learning rate' and all(v > 0 for v in _series(history, keys[0])[1]):
            ax.set_yscale('log')
        ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel('epoch')
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def save_iou_bars(per_class, path, miou=None, colors=None, title=None):
    """Horizontal bar per class IoU (``{'name', 'iou', ...}`` dicts), values written
    at the bar ends, the mean IoU as a dashed line.  Missing/NaN IoU shows ``n/a``."""
    names = [str(c['name']) for c in per_class]
    ious = np.array([np.nan if c.get('iou') is None else float(c['iou']) for c in per_class])
    if miou is None:
        miou = float(np.nanmean(ious)) if np.isfinite(ious).any() else float('nan')
    if colors is None:
        face = 'tab:blue'
    else:
        face = np.asarray(colors, np.float64)[:len(names)] / 255.0
    fig = _figure(7.5, 0.42 * len(names) + 1.6)
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(ious), color=face, edgecolor=_EDGE, linewidth=0.8)
    for yi, v in zip(y, ious):
        ax.text((v if np.isfinite(v) else 0) + 0.01, yi, f'{v:.3f}' if np.isfinite(v) else 'n/a',
                va='center', fontsize=9)
    if np.isfinite(miou):
        ax.axvline(miou, color='crimson', linestyle='--', linewidth=1.5,
                   label=f'mean IoU {miou:.3f}')
        ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.06), frameon=False, fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(axis='x', alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or 'IoU per class')
    return _save(fig, path)


def save_confusion_matrix(cm, class_names, path, title=None):
    """Row-normalised confusion matrix (rows = true class, columns = predicted).

    ``class_names`` may carry the trailing 'void' of a ``[K, K]`` matrix; rows with no
    pixels stay 0 and are marked ``(no pixels)``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k):
        raise ValueError(f'confusion matrix must be square, got {cm.shape}')
    names = list(class_names)[:k]
    if len(names) != k:
        raise ValueError(f'{len(class_names)} class names for a {k}x{k} matrix')
    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    row_names = [n if t > 0 else f'{n} (no pixels)' for n, t in zip(names, totals[:, 0])]
    side = max(5.0, 0.55 * k + 2.5)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
    fig.colorbar(im, ax=ax, shrink=0.8, label='fraction of the true class')
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if totals[i, 0] > 0:
                    v = norm[i, j]
                    ax.text(j, i, f'{v:.2f}', ha='center', va='center',
                            fontsize=8 if k <= 12 else 6.5,
                            color='white' if v > 0.55 else 'black')
    ax.set_xticks(np.arange(k), names, rotation=45, ha='right')
    ax.set_yticks(np.arange(k), row_names)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    ax.set_title(title or 'confusion matrix (rows sum to 1)')
    return _save(fig, path)


def save_panels(images, preds, labels, colors, class_names, path, titles=None):
    """One row per example: original / prediction / ground truth, legend once below."""
    n = len(images)
    if not (len(preds) == len(labels) == n):
        raise ValueError(f'{n} images, {len(preds)} predictions, {len(labels)} labels')
    h, w = np.asarray(images[0]).shape[:2]
    row_h = 3.2 * h / w + 0.6
    legend_h = 0.9
    fig = _figure(3 * 3.2 + 0.4, n * row_h + legend_h)
    rows = fig.subfigures(n + 1, 1, height_ratios=[row_h] * n + [legend_h], squeeze=False)[:, 0]
    for i in range(n):
        axes = rows[i].subplots(1, 3)
        top = i == 0  # column headings on the first row only
        _show(axes[0], to_uint8(images[i]), 'image' if top else None)
        _show(axes[1], colorize(preds[i], colors), 'prediction' if top else None)
        _show(axes[2], colorize(labels[i], colors), 'ground truth' if top else None)
        if titles is not None and titles[i]:
            rows[i].suptitle(titles[i], fontsize=11, fontweight='bold')
    ncol = -(-len(class_names) // 2)
    rows[n].legend(handles=_handles(class_names, colors), loc='center', ncol=ncol,
                   fontsize=9, frameon=False, handlelength=1.5, columnspacing=1.2)
    return _save(fig, path)


def save_legend(class_names, colors, path):
    """Just the palette: a colour swatch and name per class."""
    fig = _figure(2.4, 0.3 * len(class_names) + 0.6)
    fig.legend(handles=_handles(class_names, colors), loc='center', fontsize=10,
               frameon=False, title='classes')
    return _save(fig, path, tight=True)
