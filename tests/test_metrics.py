"""Loss and metrics against small hand-computed arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sepres_jax import metrics

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
