"""The network's shapes and its parameter count against the Keras original."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sepres_jax import models


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('impl', ['xla', 'fast_cpu'])
def test_parameter_count_matches_keras(impl):
  model = models.SepResFCN8(num_classes=12, impl=impl)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert _count(variables['params']) == 17_530_712
  assert _count(variables['batch_stats']) == 2_144


@pytest.mark.parametrize('depth', [1, 2, 4])
def test_block_depth_adds_or_removes_separable_units(depth):
  """Each unit a block gains at input width f: depthwise 9f, pointwise f*f, bias f, BN 2f (+2f stats)."""
  model = models.SepResFCN8(num_classes=12, block_depth=depth)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  per_unit = sum(9 * f + f * f + f + 2 * f for f in (16, 32, 64, 96))
  assert _count(variables['params']) == 17_530_712 + (depth - 3) * per_unit
  assert _count(variables['batch_stats']) == 2_144 + (depth - 3) * 2 * sum((16, 32, 64, 96))
  assert f'sep{depth}' in variables['params']['block1']
  assert f'sep{depth + 1}' not in variables['params']['block1']


def test_six_channel_input_and_eleven_classes():
  model = models.SepResFCN8(num_classes=11)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 6)), train=False))
  assert variables['params']['stem']['kernel'].shape == (3, 3, 6, 16)
  assert variables['params']['up_final']['kernel'].shape == (8, 8, 11, 11)


def test_output_shape_any_size_divisible_by_32():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32,
                            impl='fast_cpu')
  x = jnp.ones((2, 64, 96, 3))
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 64, 96, 5) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Training mode updated the BatchNorm running statistics.
  before = variables['batch_stats']['stem_bn']['mean']
  assert not np.allclose(updates['batch_stats']['stem_bn']['mean'], before)


def test_rejects_size_not_divisible_by_32():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32)
  with pytest.raises(ValueError, match='divisible by 32'):
    model.init(jax.random.key(0), jnp.ones((1, 60, 64, 3)))


def test_bfloat16_activations_keep_float32_parameters():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32,
                            dtype=jnp.bfloat16, impl='fast_cpu')
  x = jnp.ones((1, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert model.apply(variables, x).dtype == jnp.float32


@pytest.mark.parametrize('fine_skips', [1, 2])
def test_fine_skips_start_as_fcn8_and_then_learn(fine_skips):
  """Finer skips add a score conv and a zero-initialised transposed conv each: at init the network
  computes FCN-8's logits, and the new layers get gradients."""
  kw = dict(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, impl='fast_cpu')
  fcn8, finer = models.SepResFCN8(**kw), models.SepResFCN8(**kw, fine_skips=fine_skips)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  variables = finer.init(jax.random.key(0), x)
  names = ['pool2', 'pool1'][:fine_skips]
  added = {f'{p}_{n}' for n in names for p in ('score', 'up')}
  assert set(variables['params']) - set(fcn8.init(jax.random.key(0), x)['params']) == added
  assert variables['params'][f'up_{names[0]}']['kernel'].shape == (4, 4, 5, 5)
  base = {'params': {k: v for k, v in variables['params'].items() if k not in added},
          'batch_stats': variables['batch_stats']}
  np.testing.assert_array_equal(finer.apply(variables, x), fcn8.apply(base, x))

  def loss(params):
    return jnp.mean(finer.apply({'params': params, 'batch_stats': variables['batch_stats']}, x) ** 2)
  grads = jax.grad(loss)(variables['params'])
  for n in names:
    assert float(jnp.abs(grads[f'up_{n}']['kernel']).max()) > 0


def test_fine_skips_out_of_range_is_rejected():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, fine_skips=3)
  with pytest.raises(ValueError, match='fine_skips'):
    model.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)))


@pytest.mark.parametrize('fine_skips', [0, 2])
def test_refine_decoder_starts_as_the_network_without_it_and_then_learns(fine_skips):
  """model.refine adds two SeparableConv+BatchNorm stages (on pool2, pool1) and a zero-started
  score conv: at init the logits are those of the network without it; the score conv gets
  gradients at once, and the stages get them once the score conv has moved."""
  kw = dict(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, impl='fast_cpu',
            fine_skips=fine_skips)
  plain, refined = models.SepResFCN8(**kw), models.SepResFCN8(**kw, refine=6)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  variables = refined.init(jax.random.key(0), x)
  added = {'refine4', 'refine2', 'refine4_bn', 'refine2_bn', 'refine_score'}
  assert set(variables['params']) - set(plain.init(jax.random.key(0), x)['params']) == added
  assert variables['params']['refine4']['pointwise_kernel'].shape == (1, 1, 5 + 8, 6)
  assert variables['params']['refine2']['pointwise_kernel'].shape == (1, 1, 6 + 4, 6)
  assert variables['params']['refine_score']['kernel'].shape == (1, 1, 6, 5)
  assert set(variables['batch_stats']) - set(plain.init(jax.random.key(0), x)['batch_stats']) == {
      'refine4_bn', 'refine2_bn'}
  base = {'params': {k: v for k, v in variables['params'].items() if k not in added},
          'batch_stats': {k: v for k, v in variables['batch_stats'].items()
                          if not k.startswith('refine')}}
  np.testing.assert_array_equal(refined.apply(variables, x), plain.apply(base, x))

  def loss(params):
    y, _ = refined.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                         train=True, mutable=['batch_stats'])
    return jnp.mean(y * jnp.arange(5.0))
  grads = jax.grad(loss)(variables['params'])
  assert float(jnp.abs(grads['refine_score']['kernel']).max()) > 0
  assert float(jnp.abs(grads['refine4']['pointwise_kernel']).max()) == 0  # Behind a zero conv.
  moved = dict(variables['params'], refine_score={
      'kernel': jnp.ones_like(variables['params']['refine_score']['kernel']),
      'bias': variables['params']['refine_score']['bias']})
  grads = jax.grad(loss)(moved)
  for name in ('refine4', 'refine2'):
    assert float(jnp.abs(grads[name]['pointwise_kernel']).max()) > 0
  assert not np.allclose(refined.apply({'params': moved, 'batch_stats': variables['batch_stats']}, x),
                         plain.apply(base, x))


def test_negative_refine_is_rejected():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, refine=-1)
  with pytest.raises(ValueError, match='model.refine'):
    model.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)))


def test_context_module_starts_as_the_network_without_it_and_then_learns():
  """model.context adds image pooling and two dilated separable convs on pool5, projected by a
  zero-started 1x1 conv into conv7's pre-activation: at init the logits are unchanged; the
  projection gets gradients at once, the branches once it has moved; every branch counts."""
  kw = dict(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, impl='fast_cpu')
  plain, wide = models.SepResFCN8(**kw), models.SepResFCN8(**kw, context=6)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  variables = wide.init(jax.random.key(0), x)
  added = {'context_pool', 'context_d3', 'context_d6', 'context_d3_bn', 'context_d6_bn',
           'context_proj'}
  plain_vars = plain.init(jax.random.key(0), x)
  assert set(variables['params']) - set(plain_vars['params']) == added
  assert variables['params']['context_pool']['kernel'].shape == (1, 1, 16, 6)
  assert variables['params']['context_d6']['depthwise_kernel'].shape == (3, 3, 1, 16)
  assert variables['params']['context_proj']['kernel'].shape == (1, 1, 18, 32)
  base = {'params': {k: v for k, v in variables['params'].items() if k not in added},
          'batch_stats': {k: v for k, v in variables['batch_stats'].items()
                          if not k.startswith('context')}}
  np.testing.assert_array_equal(wide.apply(variables, x), plain.apply(base, x))

  def loss(params, x=x):
    y, _ = wide.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                      train=True, mutable=['batch_stats'])
    return jnp.mean(y * jnp.arange(5.0))
  grads = jax.grad(loss)(variables['params'])
  assert float(jnp.abs(grads['context_proj']['kernel']).max()) > 0
  assert float(jnp.abs(grads['context_d3']['pointwise_kernel']).max()) == 0  # Behind a zero conv.
  moved = dict(variables['params'], context_proj={
      'kernel': jax.random.normal(jax.random.key(2), (1, 1, 18, 32))})
  # A larger input, so that the dilated taps reach inside the stride-32 map (4x6 here).
  big = jax.random.normal(jax.random.key(3), (2, 128, 192, 3))
  grads = jax.grad(loss)(moved, big)
  for name in ('context_pool', 'context_d3', 'context_d6'):
    for leaf in jax.tree.leaves(grads[name]):
      assert float(jnp.abs(leaf).max()) > 0, name
  for name in ('context_d3', 'context_d6'):
    assert float(jnp.abs(grads[name]['depthwise_kernel']).max()) > 0, name
  assert not np.allclose(wide.apply({'params': moved, 'batch_stats': variables['batch_stats']}, x),
                         plain.apply(base, x))


def test_context_dilated_conv_equals_a_dense_reference():
  """The dilated depthwise+pointwise conv against a numpy loop over its nine taps."""
  conv = models.SeparableConv(features=3, impl='fast_cpu', rate=2)
  x = jax.random.normal(jax.random.key(0), (1, 7, 9, 4))
  params = conv.init(jax.random.key(1), x)
  got = np.asarray(conv.apply(params, x))
  p = jax.tree.map(np.asarray, params['params'])
  xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  dw = sum(xp[:, 2 * i:2 * i + 7, 2 * j:2 * j + 9] * p['depthwise_kernel'][i, j, 0]
           for i in range(3) for j in range(3))
  want = dw @ p['pointwise_kernel'][0, 0] + p['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_context_out_of_range_is_rejected():
  model = models.SepResFCN8(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32, context=-1)
  with pytest.raises(ValueError, match='model.context'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
