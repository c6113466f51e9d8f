"""Loss and segmentation metrics: pure functions of arrays.

Label convention: 0..num_classes-1 are classes; anything else (the void label when it is ignored,
-1 for padding) does not count. With void counted as a class, the model has num_classes + 1 outputs
and void is simply the last class. Metrics come from one confusion matrix summed over a whole split,
never from per-batch averages.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sepres_jax import native


def valid_mask(labels, num_classes: int):
  """True where a pixel counts: 0 <= label < num_classes."""
  return (labels >= 0) & (labels < num_classes)


def cross_entropy(logits, labels, class_weights=None, label_smoothing: float = 0.0):
  """Pixel softmax cross-entropy summed over counted pixels, and the (weighted) pixel count.

  Returns (loss_sum, weight_sum); the mean loss of a batch or split is loss_sum / weight_sum.
  """
  num_classes = logits.shape[-1]
  mask = valid_mask(labels, num_classes)
  safe = jnp.where(mask, labels, 0)
  nll = pixel_nll(logits, safe, float(label_smoothing))
  weights = mask.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe]
  return jnp.sum(nll * weights), jnp.sum(weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pixel_nll(logits, labels, label_smoothing: float = 0.0):
  """-sum_c q_c log softmax(logits)_c per pixel, q = (1 - e) one_hot(labels) + e / C.

  Its gradient is written out, (softmax - q) times the incoming one, a single elementwise pass:
  autodiff of log_softmax and of the label gather makes several passes and a scatter (the loss's
  value and gradient 1.6x faster at 32x224x224x12 here).
  """
  return _pixel_nll_fwd(logits, labels, label_smoothing)[0]


def _soft_target(labels, num_classes, label_smoothing):
  q = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return (1.0 - label_smoothing) * q + label_smoothing / num_classes if label_smoothing else q


@jax.named_scope('cross_entropy')  # The profile's 'loss' row (--config.benchmark.profile).
def _pixel_nll_fwd(logits, labels, label_smoothing):
  z = logits.astype(jnp.float32)
  top = jnp.max(z, axis=-1, keepdims=True)
  lse = top[..., 0] + jnp.log(jnp.sum(jnp.exp(z - top), axis=-1))
  nll = lse - jnp.sum(z * _soft_target(labels, z.shape[-1], label_smoothing), axis=-1)
  return nll, (logits, labels, lse)


@jax.named_scope('cross_entropy')  # Named transpose(jvp(cross_entropy)): the backward part.
def _pixel_nll_bwd(label_smoothing, residuals, g):
  logits, labels, lse = residuals
  z = logits.astype(jnp.float32)
  q = _soft_target(labels, z.shape[-1], label_smoothing)
  return ((jnp.exp(z - lse[..., None]) - q) * g[..., None]).astype(logits.dtype), None


pixel_nll.defvjp(_pixel_nll_fwd, _pixel_nll_bwd)


LOVASZ_BINS = 1024


NATIVE_MAX_BINS = 1 << 16  # The compiled form keeps two [K, bins] histograms per image.


def lovasz_softmax(logits, labels, bins: int = LOVASZ_BINS, use_native: bool = False):
  """Per-image Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU.

  For each image and each class present in its labels, the pixels' errors |[label = c] - p_c|,
  taken in decreasing order, are weighted by the increments of the Jaccard loss along that order;
  the image's loss is the mean over its present classes. Uncounted pixels (void, padding) are
  left out. Returns (loss summed over images, number of images with a counted pixel), so that
  data-parallel steps divide by the global count.

  Sorting 8 x 11 x 110k errors takes XLA's CPU sort seconds, so the order is taken by histogram:
  errors in the same 1/bins-wide bin share the bin's Jaccard increment, spread evenly. The
  increment over a bin is exact whatever the order inside it, so the loss is within 1/bins of the
  sorted one per class, and its gradient is each pixel's share of its bin's increment.

  With `use_native` (model.impl 'native_cpu'; up to NATIVE_MAX_BINS bins) the compiled kernel
  (sepres_jax/native.py) computes the loss and its gradient in two passes over the logits per
  image, with the same histograms and Jaccard increments; the XLA form's softmax, histograms,
  gathers and autodiff make many more (0.30 against 0.10 s at 8x352x480x11 here).
  """
  if use_native and bins <= NATIVE_MAX_BINS:
    return _lovasz_native(logits, labels, bins)
  return _lovasz_xla(logits, labels, bins)


@jax.named_scope('lovasz')  # The profile's 'loss' row (--config.benchmark.profile).
def _lovasz_xla(logits, labels, bins):
  n, k = logits.shape[0], logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, -1, k)
  labels = labels.reshape(n, -1)
  mask = valid_mask(labels, k)[..., None]
  fg = (labels[..., None] == jnp.arange(k)) & mask
  errors = jnp.abs(fg - probs)  # [n, pixels, k]
  weights = _lovasz_weights(jax.lax.stop_gradient(errors), fg, mask, bins)
  per_class = jnp.sum(errors * weights, axis=1)  # [n, k]
  present = jnp.any(fg, axis=1)
  per_image = (jnp.sum(jnp.where(present, per_class, 0.0), axis=-1)
               / jnp.maximum(jnp.sum(present, axis=-1), 1))
  counted = jnp.any(present, axis=-1)
  return jnp.sum(jnp.where(counted, per_image, 0.0)), jnp.sum(counted, dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lovasz_native(logits, labels, bins):
  return _lovasz_native_fwd(logits, labels, bins)[0]


@jax.named_scope('lovasz')
def _lovasz_native_fwd(logits, labels, bins):
  n, k = logits.shape[0], logits.shape[-1]
  per_image, counted, grad = native.lovasz_softmax(
      logits.astype(jnp.float32).reshape(n, -1, k), labels.astype(jnp.int32).reshape(n, -1), bins)
  return (jnp.sum(per_image), jnp.sum(counted)), (grad.reshape(logits.shape).astype(logits.dtype),)


@jax.named_scope('lovasz')  # Named transpose(jvp(lovasz)): the backward part.
def _lovasz_native_bwd(bins, residuals, cts):
  del bins
  (grad,), (g, _) = residuals, cts  # The image count has no gradient.
  return (grad * g.astype(grad.dtype), None)


_lovasz_native.defvjp(_lovasz_native_fwd, _lovasz_native_bwd)


def _lovasz_weights(errors, fg, mask, bins):
  """Each pixel's weight: its error bin's Jaccard increment over the bin's pixel count."""
  n, _, k = errors.shape
  # Bin 0 holds the largest errors; uncounted pixels go to a last bin that is dropped.
  rank = bins - 1 - jnp.clip((errors * bins).astype(jnp.int32), 0, bins - 1)
  rank = jnp.where(mask, rank, bins)
  index = (jnp.arange(n)[:, None, None] * k + jnp.arange(k)) * (bins + 1) + rank
  size = n * k * (bins + 1)
  count = jnp.bincount(index.reshape(-1), length=size).reshape(n, k, bins + 1)[..., :bins]
  hits = jnp.bincount(index.reshape(-1), weights=fg.reshape(-1).astype(jnp.float32),
                      length=size).reshape(n, k, bins + 1)[..., :bins]
  total = jnp.sum(hits, axis=-1, keepdims=True)
  intersection = total - jnp.cumsum(hits, axis=-1)
  union = total + jnp.cumsum(count - hits, axis=-1)
  jaccard = 1.0 - intersection / jnp.maximum(union, 1.0)  # 0 before the first bin.
  steps = jnp.diff(jaccard, axis=-1, prepend=0.0) / jnp.maximum(count, 1)
  steps = jnp.concatenate([steps, jnp.zeros((n, k, 1))], axis=-1).reshape(-1)
  return steps[index]


def confusion_matrix(preds, labels, num_classes: int):
  """[num_classes, num_classes] counts, rows = true class, columns = predicted; uncounted pixels skipped."""
  mask = valid_mask(labels, num_classes)
  index = jnp.where(mask, labels * num_classes + preds, num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def scores_from_confusion(cm, class_names: Optional[Sequence[str]] = None,
                          num_scored: Optional[int] = None) -> dict:
  """IoU per class (TP / (TP + FP + FN)), mean IoU, pixel accuracy and mean class accuracy.

  `num_scored` < cm's size scores only the first classes: pixels whose true class is beyond them
  (void learned as a class) are left out, and predicting such a class is a miss (an FN).
  Classes absent from both labels and predictions have IoU NaN and are left out of the means.
  """
  cm = np.asarray(cm, dtype=np.int64)
  k = cm.shape[0] if num_scored is None else num_scored
  names = list(class_names or [str(i) for i in range(k)])[:k]
  tp = np.diag(cm)[:k]
  fp = cm[:k, :k].sum(axis=0) - tp
  fn = cm[:k].sum(axis=1) - tp
  cm = cm[:k]
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = tp / (tp + fp + fn)
    class_acc = tp / (tp + fn)
  total = cm.sum()
  return {
      'miou': float(np.nanmean(iou)) if np.isfinite(iou).any() else float('nan'),
      'pixel_accuracy': float(tp.sum() / total) if total else float('nan'),
      'mean_class_accuracy': (
          float(np.nanmean(class_acc)) if np.isfinite(class_acc).any() else float('nan')),
      'per_class': [
          {'name': names[i], 'tp': int(tp[i]), 'fp': int(fp[i]), 'fn': int(fn[i]),
           'iou': float(iou[i]), 'accuracy': float(class_acc[i])}
          for i in range(k)],
  }


def format_table(scores: dict) -> str:
  """The per-class table printed by --mode=evaluate."""
  lines = [f"{'class':<14}{'TP':>12}{'FP':>12}{'FN':>12}{'IoU':>8}{'acc':>8}"]
  for row in scores['per_class']:
    lines.append(f"{row['name']:<14}{row['tp']:>12}{row['fp']:>12}{row['fn']:>12}"
                 f"{100 * row['iou']:>8.2f}{100 * row['accuracy']:>8.2f}")
  lines.append(f"mean IoU {100 * scores['miou']:.2f}  pixel accuracy "
               f"{100 * scores['pixel_accuracy']:.2f}  mean class accuracy "
               f"{100 * scores['mean_class_accuracy']:.2f}")
  return '\n'.join(lines)


def frequency_weights(counts, present, kind: str) -> np.ndarray:
  """Class weights from training-label statistics.

  counts[c]: pixels of class c; present[c]: pixels of the images that contain c.
  'median_frequency' (SegNet): f_c = counts / present, w_c = median(f) / f_c.
  'inverse_log' (ENet): p_c = counts / counts.sum(), w_c = 1 / ln(1.02 + p_c).
  A class absent from the training labels gets weight 1 (it never occurs in the loss anyway).
  """
  counts, present = np.asarray(counts, np.float64), np.asarray(present, np.float64)
  seen = counts > 0
  w = np.ones(len(counts))
  if kind == 'median_frequency':
    f = counts[seen] / present[seen]
    w[seen] = np.median(f) / f
  elif kind == 'inverse_log':
    p = counts[seen] / max(counts.sum(), 1.0)
    w[seen] = 1.0 / np.log(1.02 + p)
  else:
    raise ValueError(f'unknown class weighting {kind!r}')
  return w.astype(np.float32)
