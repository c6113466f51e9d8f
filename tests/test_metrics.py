"""Loss and metrics against small hand-computed arrays."""

import math
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sepres_jax import metrics
from sepres_jax import native

# 2x3 labels with void (3) and padding (-1); 3 real classes.
LABELS = np.array([[0, 1, 2], [3, -1, 1]])
PREDS = np.array([[0, 2, 2], [1, 0, 1]])


def test_confusion_matrix_ignores_void_and_padding():
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(PREDS), jnp.asarray(LABELS), 3))
  # Counted pixels: (0->0), (1->2), (2->2), (1->1).
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_counts_void_as_class():
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(PREDS), jnp.asarray(LABELS), 4))
  expected = np.zeros((4, 4), int)
  expected[0, 0] = expected[1, 2] = expected[2, 2] = expected[1, 1] = expected[3, 1] = 1
  np.testing.assert_array_equal(cm, expected)


def test_scores_to_the_digit():
  cm = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  s = metrics.scores_from_confusion(cm, ['a', 'b', 'c'])
  # IoU: a 1/1, b 1/(1+0+1)=0.5, c 1/(1+1+0)=0.5.
  assert [r['iou'] for r in s['per_class']] == [1.0, 0.5, 0.5]
  assert [(r['tp'], r['fp'], r['fn']) for r in s['per_class']] == [(1, 0, 0), (1, 0, 1), (1, 1, 0)]
  assert s['miou'] == pytest.approx(2 / 3)
  assert s['pixel_accuracy'] == 0.75
  assert s['mean_class_accuracy'] == pytest.approx((1 + 0.5 + 1) / 3)
  assert [r['name'] for r in s['per_class']] == ['a', 'b', 'c']


def test_absent_class_is_left_out_of_the_mean():
  cm = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
  s = metrics.scores_from_confusion(cm)
  assert math.isnan(s['per_class'][2]['iou'])
  assert s['miou'] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_cross_entropy_by_hand():
  logits = jnp.log(jnp.array([[[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
                               [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6]]]]))
  labels = jnp.array([[[0, 1], [3, -1]]])  # Two counted pixels.
  loss_sum, weight = metrics.cross_entropy(logits, labels)
  assert float(weight) == 2.0
  assert float(loss_sum) == pytest.approx(-math.log(0.5) - math.log(0.8), rel=1e-6)
  # Void as a 4th class: same logits padded with a 4th class are not needed; use 3-class weights.
  loss_w, weight_w = metrics.cross_entropy(logits, labels, class_weights=[2.0, 0.5, 1.0])
  assert float(weight_w) == 2.5
  assert float(loss_w) == pytest.approx(-2 * math.log(0.5) - 0.5 * math.log(0.8), rel=1e-6)


def test_cross_entropy_counts_void_when_it_is_a_class():
  logits = jnp.log(jnp.array([[[[0.1, 0.2, 0.3, 0.4]]]]))
  loss_sum, weight = metrics.cross_entropy(logits, jnp.array([[[3]]]))
  assert float(weight) == 1.0
  assert float(loss_sum) == pytest.approx(-math.log(0.4), rel=1e-6)


def test_label_smoothing():
  logits = jnp.log(jnp.array([[[[0.5, 0.25, 0.25]]]]))
  loss_sum, _ = metrics.cross_entropy(logits, jnp.array([[[0]]]), label_smoothing=0.3)
  expected = 0.7 * -math.log(0.5) + 0.3 * -(math.log(0.5) + 2 * math.log(0.25)) / 3
  assert float(loss_sum) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('smoothing, weighted', [(0.0, False), (0.0, True), (0.2, True)])
def test_cross_entropy_gradient_equals_autodiff_of_the_formula(smoothing, weighted):
  """The written-out gradient of pixel_nll against jax.grad of log_softmax and a gather."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 3, 4)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(-1, 5, (2, 5, 3)))  # -1 padding and 4 (void) do not count.
  weights = [0.5, 2.0, 1.0, 3.0] if weighted else None

  def plain(logits):
    mask = metrics.valid_mask(labels, 4)
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    nll = (1 - smoothing) * nll - smoothing * logp.mean(axis=-1)
    w = mask * (jnp.asarray(weights)[safe] if weighted else 1.0)
    return jnp.sum(nll * w)

  value, grad = jax.value_and_grad(
      lambda x: metrics.cross_entropy(x, labels, weights, smoothing)[0])(logits)
  want_value, want_grad = jax.value_and_grad(plain)(logits)
  assert float(value) == pytest.approx(float(want_value), rel=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  assert not np.any(grad[np.asarray(labels) < 0])  # Uncounted pixels get no gradient.
  half = jax.grad(lambda x: metrics.cross_entropy(x, labels, weights, smoothing)[0])(
      logits.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), want_grad, rtol=0.05, atol=0.05)


def _sorted_lovasz(logits, labels):
  """Berman et al.'s per-image Lovasz-softmax written plainly: a sort per image and class."""
  n, k = logits.shape[0], logits.shape[-1]
  probs = np.asarray(jax.nn.softmax(logits, -1)).reshape(n, -1, k)
  labels = np.asarray(labels).reshape(n, -1)
  total, images = 0.0, 0
  for i in range(n):
    counted = (labels[i] >= 0) & (labels[i] < k)
    losses = []
    for c in range(k):
      fg = (labels[i][counted] == c).astype(np.float64)
      if not fg.any():
        continue
      errors = np.abs(fg - probs[i][counted][:, c])
      order = np.argsort(-errors, kind='stable')
      fg_sorted = fg[order]
      jaccard = 1 - (fg.sum() - np.cumsum(fg_sorted)) / (fg.sum() + np.cumsum(1 - fg_sorted))
      losses.append(np.dot(errors[order], np.diff(jaccard, prepend=0.0)))
    if losses:
      total, images = total + np.mean(losses), images + 1
  return total, images


@pytest.mark.parametrize('bins', [1 << 22, metrics.LOVASZ_BINS])
def test_lovasz_softmax_equals_the_sorted_definition(bins):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 9, 7, 5)) * 3, jnp.float32)
  labels = rng.integers(-1, 6, (3, 9, 7))  # -1 padding and 5 (void) do not count.
  labels[2] = 5  # An image without a counted pixel is left out of the count.
  value, images = metrics.lovasz_softmax(logits, jnp.asarray(labels), bins=bins)
  want, want_images = _sorted_lovasz(logits, labels)
  assert float(images) == want_images == 2
  # Histogram bins of width 1/bins: within 1/bins per class of the sorted order's value.
  assert float(value) == pytest.approx(want, abs=max(2e-6, 2 / bins))
  # Its gradient is the sorted definition's (finite differences, distinct errors).
  grad = jax.grad(lambda x: metrics.lovasz_softmax(x, jnp.asarray(labels), bins=1 << 22)[0])(
      logits)
  assert not np.any(np.asarray(grad)[labels == 5]) and not np.any(np.asarray(grad)[labels < 0])
  for index in [(0, 1, 2, 3), (1, 8, 6, 0), (0, 4, 0, 4)]:
    step = np.zeros(logits.shape, np.float32)
    step[index] = 1e-3
    numeric = (_sorted_lovasz(logits + step, labels)[0]
               - _sorted_lovasz(logits - step, labels)[0]) / 2e-3
    assert float(grad[index]) == pytest.approx(numeric, rel=1e-2, abs=1e-5)


def test_lovasz_softmax_of_certain_predictions_is_one_minus_the_iou():
  """With 0/1 probabilities, each present class's term is its Jaccard loss, 1 - IoU."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, (2, 20, 20))  # 4 classes and void (4).
  preds = np.where(rng.random((2, 20, 20)) < 0.7, labels % 4, rng.integers(0, 4, (2, 20, 20)))
  logits = jnp.asarray(np.eye(4)[preds] * 1e3, jnp.float32)
  want = 0.0
  for i in range(2):
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(preds[i]), jnp.asarray(labels[i]), 4))
    ious = [s['iou'] for s in metrics.scores_from_confusion(cm)['per_class']]
    want += np.mean([1 - iou for c, iou in enumerate(ious) if (labels[i] == c).any()])
  assert float(metrics.lovasz_softmax(logits, jnp.asarray(labels))[0]) == pytest.approx(want, 1e-5)


needs_native = pytest.mark.skipif(not native.available()[0], reason='compiled kernels unavailable')


def _lovasz_labels(rng, shape, k):
  labels = rng.integers(-1, k + 1, shape)  # -1 padding and k (void) do not count.
  labels[-1] = k  # An image without a counted pixel.
  labels[0][labels[0] == 1] = 0  # A class absent from an image.
  return jnp.asarray(labels, jnp.int32)


@needs_native
@pytest.mark.parametrize('bins', [metrics.LOVASZ_BINS, metrics.NATIVE_MAX_BINS])
def test_lovasz_native_equals_the_xla_form(bins):
  """The compiled kernel: the XLA form's loss, image count and gradient, jitted."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 24, 32, 6)) * 3, jnp.float32)
  labels = _lovasz_labels(rng, (3, 24, 32), 6)

  def run(use_native):
    f = lambda x: metrics.lovasz_softmax(x, labels, bins, use_native=use_native)
    value, images = jax.jit(f)(logits)
    grad = jax.jit(jax.grad(lambda x: f(x)[0]))(logits)
    return float(value), float(images), np.asarray(grad)

  value, images, grad = run(True)
  want_value, want_images, want_grad = run(False)
  assert images == want_images == 2
  assert value == pytest.approx(want_value, rel=1e-6)
  # A pixel whose error sits on a bin's edge may land in the next bin when the two softmaxes
  # differ in the last bit, moving its weight by a small fraction of the largest.
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-4 * np.abs(want_grad).max())
  assert not np.any(grad[np.asarray(labels) == 6]) and not np.any(grad[np.asarray(labels) < 0])
  assert not np.any(grad[-1])


@needs_native
def test_lovasz_native_keeps_the_logits_dtype_and_falls_back_above_its_bins():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 4, (2, 8, 8)), jnp.int32)
  grad = jax.grad(lambda x: metrics.lovasz_softmax(x, labels, use_native=True)[0])(logits)
  want = jax.grad(lambda x: metrics.lovasz_softmax(x, labels)[0])(logits)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(np.float32), want.astype(np.float32), rtol=0.05,
                             atol=0.01 * float(jnp.abs(want.astype(jnp.float32)).max()))
  # More bins than the kernel's histograms hold: the XLA form, the same value.
  big = metrics.NATIVE_MAX_BINS * 2
  x = logits.astype(jnp.float32)
  assert float(metrics.lovasz_softmax(x, labels, big, use_native=True)[0]) == float(
      metrics.lovasz_softmax(x, labels, big)[0])
  # Non-finite logits give a non-finite loss (for the training guards), not a wild bin.
  bad = x.at[0, 3, 3, 1].set(jnp.nan)
  assert not np.isfinite(float(metrics.lovasz_softmax(bad, labels, use_native=True)[0]))


def test_format_table_lists_every_class():
  s = metrics.scores_from_confusion(np.array([[3, 1], [0, 4]]), ['road', 'sky'])
  table = metrics.format_table(s)
  assert 'road' in table and 'sky' in table and 'mean IoU 77.50' in table


def test_void_learned_as_a_class_is_left_out_of_the_scores():
  # 3 real classes + void (index 3) as a 4th output.
  cm = np.array([[5, 0, 0, 1],   # one class-0 pixel predicted as void: a miss
                 [0, 4, 0, 0],
                 [0, 1, 3, 0],
                 [2, 0, 0, 9]])  # void pixels: not scored at all
  s = metrics.scores_from_confusion(cm, ['a', 'b', 'c', 'void'], num_scored=3)
  assert [r['name'] for r in s['per_class']] == ['a', 'b', 'c']
  assert [(r['tp'], r['fp'], r['fn']) for r in s['per_class']] == [(5, 0, 1), (4, 1, 0), (3, 0, 1)]
  assert s['pixel_accuracy'] == 12 / 14
  assert s['miou'] == pytest.approx((5 / 6 + 4 / 5 + 3 / 4) / 3)


def test_scores_file_is_strict_json_with_absent_classes_null():
  from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
  cm = np.zeros((3, 3), np.int64)
  cm[0, 0], cm[1, 0] = 5, 2  # Class 2 appears in neither labels nor predictions.
  scores = metrics.scores_from_confusion(cm, ['a', 'b', 'c'])
  text = json.dumps(evaluate._nan_to_none(scores), allow_nan=False)
  back = json.loads(text)
  assert back['per_class'][2]['iou'] is None and back['miou'] == pytest.approx(scores['miou'])
