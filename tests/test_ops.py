"""Each fast kernel equals the plain XLA one: values and gradients, to float tolerance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sepres_jax import models
from sepres_jax import native
from sepres_jax import ops

RNG = np.random.default_rng(0)
NATIVE, NATIVE_WHY = native.available()
# The forms checked against 'xla': native_cpu where its kernels build (tests/test_native.py checks
# that they build wherever a C++ compiler is installed).
FAST = ('fast_cpu', 'native_cpu') if NATIVE else ('fast_cpu',)


def _rand(*shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _assert_same(fn, *args):
  """fn(impl, *args) agrees between impls, and so do its gradients wrt every argument."""
  plain = fn('xla', *args)
  cot = _rand(*plain.shape)
  for impl in FAST:
    np.testing.assert_allclose(fn(impl, *args), plain, rtol=1e-4, atol=1e-4, err_msg=impl)
    for i in range(len(args)):
      g = lambda impl: jax.grad(lambda *a: jnp.sum(fn(impl, *a) * cot), argnums=i)(*args)
      np.testing.assert_allclose(g(impl), g('xla'), rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize('block_bytes', [1 << 20, 2 * 4 * 14 * 5 * 4])
def test_depthwise_conv3x3(block_bytes, monkeypatch):
  """The second block size makes the kernel gradient loop over blocks of 2 rows; jitted too."""
  monkeypatch.setattr(ops, '_KERNEL_GRAD_BLOCK_BYTES', block_bytes)
  _assert_same(lambda impl, x, k: ops.depthwise_conv3x3(x, k, impl), _rand(2, 8, 12, 5),
               _rand(3, 3, 1, 5))
  x, k = _rand(2, 8, 12, 5), _rand(3, 3, 1, 5)
  grad = lambda impl: jax.jit(jax.grad(
      lambda x, k: jnp.sum(jnp.sin(ops.depthwise_conv3x3(x, k, impl))), argnums=(0, 1)))(x, k)
  for impl in FAST:
    for fast, plain in zip(grad(impl), grad('xla')):
      np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.skipif(not NATIVE, reason=f'compiled kernels unavailable: {NATIVE_WHY}')
@pytest.mark.parametrize('shape', [(1, 1, 1, 1), (3, 1, 7, 2), (2, 5, 1, 3), (4, 40, 24, 37),
                                   (9, 6, 6, 16)])
def test_depthwise_native_shapes(shape):
  """Edge sizes (a single row or column), a channel count that is no multiple of the vector
  width, and batches that split into many tasks over the thread pool: jitted, against lax."""
  x, k, cot = _rand(*shape), _rand(3, 3, 1, shape[-1]), _rand(*shape)
  grad = lambda impl: jax.jit(jax.grad(
      lambda x, k: jnp.sum(ops.depthwise_conv3x3(x, k, impl) * cot), argnums=(0, 1)))(x, k)
  for fast, plain in zip(grad('native_cpu'), grad('xla')):
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
  # The forward pass is fast_cpu's, to the bit: predictions and exported models do not change.
  forward = lambda impl: jax.jit(lambda x, k: ops.depthwise_conv3x3(x, k, impl))(x, k)
  np.testing.assert_array_equal(forward('native_cpu'), forward('fast_cpu'))


@pytest.mark.parametrize('k, h, w', [(3, 9, 7), (7, 9, 7), (7, 7, 7), (7, 2, 3), (5, 1, 6)])
def test_conv_by_rows(k, h, w):
  """The product per kernel row, also where the kernel overhangs the input on both sides."""
  _assert_same(lambda impl, x, w: ops.conv(x, w, impl, 'rows'), _rand(2, h, w, 4),
               _rand(k, k, 4, 6))


@pytest.mark.parametrize('k, h, w', [(7, 7, 7), (7, 12, 15), (7, 2, 3), (7, 1, 1), (5, 5, 9),
                                     (4, 6, 4), (3, 5, 5)])
def test_conv_by_dft(k, h, w):
  """Products of Fourier transforms: conv6's maps (7x7 at 224x224, 12x15 at 384x480), a kernel
  larger than the map, odd and even sizes (an even kernel pads one more row below)."""
  _assert_same(lambda impl, x, w: ops.conv(x, w, impl, 'dft'), _rand(2, h, w, 4),
               _rand(k, k, 4, 6))
  x, kernel, cot = _rand(3, h, w, 5), _rand(k, k, 5, 2), _rand(3, h, w, 2)
  grad = lambda form: jax.jit(jax.grad(
      lambda x, kernel: jnp.sum(ops.conv(x, kernel, 'fast_cpu', form) * cot), argnums=(0, 1)))
  for dft, rows in zip(grad('dft')(x, kernel), grad('rows')(x, kernel)):
    np.testing.assert_allclose(dft, rows, rtol=1e-4, atol=1e-4)


def test_large_conv_auto_takes_the_dft_from_a_batch_of_8(monkeypatch):
  calls, dft = [], ops._conv_by_dft
  monkeypatch.setattr(ops, '_conv_by_dft', lambda *a: calls.append(a[0].shape[0]) or dft(*a))
  for b in (4, 8):
    ops.conv(_rand(b, 7, 7, 3), _rand(7, 7, 3, 4), 'fast_cpu')
  ops.conv(_rand(8, 7, 7, 3), _rand(7, 7, 3, 4), 'fast_cpu', 'rows')
  ops.conv(_rand(2, 7, 7, 3), _rand(7, 7, 3, 4), 'fast_cpu', 'dft')
  ops.conv(_rand(8, 7, 7, 3), _rand(3, 3, 3, 4), 'fast_cpu')  # 3x3: never the dft.
  assert calls == [8, 2]
  with pytest.raises(ValueError, match='model.large_conv'):
    ops.conv(_rand(8, 7, 7, 3), _rand(7, 7, 3, 4), 'fast_cpu', 'fft')


def test_conv_with_a_symbolic_height_equals_the_concrete_one():
  """jax.export traces with symbolic sizes; the product per kernel row then pads its rows."""
  from jax import export  # pylint: disable=g-import-not-at-top
  x, w = _rand(2, 5, 3, 4), _rand(7, 7, 4, 6)
  h, = export.symbolic_shape('h')
  exported = export.export(jax.jit(lambda x, w: ops.conv(x, w, 'fast_cpu')))(
      jax.ShapeDtypeStruct((2, h, 3, 4), jnp.float32), jax.ShapeDtypeStruct(w.shape, jnp.float32))
  for rows in (5, 1):
    np.testing.assert_allclose(exported.call(x[:, :rows], w), ops.conv(x[:, :rows], w, 'xla'),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k, cin', [(3, 3), (5, 1)])
def test_conv_direct(k, cin, monkeypatch):
  """Convs of at most _DIRECT_MAX_TAPS taps (the stem's) take the multiply-add form."""
  calls, direct_sum = [], ops._direct_sum
  monkeypatch.setattr(ops, '_direct_sum', lambda *a: calls.append(1) or direct_sum(*a))
  _assert_same(lambda impl, x, w: ops.conv(x, w, impl), _rand(2, 10, 6, cin),
               _rand(k, k, cin, 16))
  assert calls


def test_pointwise_conv_equals_lax_conv():
  x, w = _rand(2, 5, 6, 4), _rand(1, 1, 4, 3)
  plain = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(ops.pointwise_conv(x, w), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cin, cout', [(3, 7), (7, 3), (5, 5)])
def test_pointwise_conv_gradients(cin, cout):
  """The 1x1 conv's own gradient: the kernel's as a product with either operand transposed."""
  _assert_same(lambda impl, x, w: ops.conv(x, w, impl), _rand(2, 5, 6, cin),
               _rand(1, 1, cin, cout))


@pytest.mark.parametrize('s', [2, 4, 8])
def test_upsample_conv(s):
  _assert_same(lambda impl, x, w: ops.upsample_conv(x, w, impl), _rand(2, 3, 4, 5),
               _rand(s, s, 5, 6))


def test_upsample_conv_layout():
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(1.0)
  w = jnp.arange(4.0).reshape(2, 2, 1, 1)
  for impl in ops.IMPLS:
    y = ops.upsample_conv(x, w, impl)[0, :, :, 0]
    np.testing.assert_allclose(y[2:4, 0:2], [[0, 1], [2, 3]])
    assert float(jnp.abs(y).sum()) == 6.0


def test_max_pool2x2():
  _assert_same(lambda impl, x: ops.max_pool2x2(x, impl), _rand(2, 8, 6, 3))


def test_max_pool2x2_many_ties():
  """After a ReLU most windows hold several zeros: the gradient goes where reduce_window's goes."""
  x = jnp.maximum(jnp.round(_rand(2, 8, 6, 3)), 0.0)
  assert float((x == 0).mean()) > 0.4
  _assert_same(lambda impl, x: ops.max_pool2x2(x, impl), x)


def test_max_pool2x2_ties_go_to_one_element():
  x = jnp.ones((1, 2, 2, 1))
  for impl in ops.IMPLS:
    g = jax.grad(lambda v: ops.max_pool2x2(v, impl).sum())(x)
    assert float(g.sum()) == 1.0


@pytest.mark.parametrize('act', [None, 'relu', 'elu'])
@pytest.mark.parametrize('fused', [False, True])
def test_batch_norm_act_equals_flax_batch_norm(act, fused):
  """BatchNormAct has nn.BatchNorm's variables, values, gradients and running averages, in
  training mode (fused or not) and in evaluation mode (to the bit)."""
  x = _rand(4, 6, 10, 5) * 3 + 1
  cot = _rand(4, 6, 10, 5)
  fn = {'relu': jax.nn.relu, 'elu': jax.nn.elu, None: lambda v: v}[act]
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  new = models.BatchNormAct(use_running_average=False, momentum=0.9, epsilon=1e-3, act=act,
                            fused=fused)
  variables = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, new.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, variables)
  variables = {'params': {'scale': _rand(5) + 1, 'bias': _rand(5)},
               'batch_stats': {'mean': _rand(5), 'var': _rand(5) ** 2 + 0.5}}

  def loss(module, post, params, x):
    y, stats = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            mutable=['batch_stats'])
    return jnp.sum(post(y) * cot), stats

  (l_ref, s_ref), g_ref = jax.value_and_grad(
      lambda p, v: loss(ref, fn, p, v), argnums=(0, 1), has_aux=True)(variables['params'], x)
  (l_new, s_new), g_new = jax.value_and_grad(
      lambda p, v: loss(new, lambda v: v, p, v), argnums=(0, 1), has_aux=True)(
          variables['params'], x)
  np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(same, s_new, s_ref)
  jax.tree.map(same, g_new, g_ref)
  assert float(jnp.abs(g_new[1]).max()) > 0.1  # Gradients flowed.

  ref_eval = ref.clone(use_running_average=True).apply(variables, x)
  new_eval = new.clone(use_running_average=True).apply(variables, x)
  np.testing.assert_array_equal(new_eval, fn(ref_eval))


@pytest.mark.parametrize('act', [None, 'elu'])
def test_batch_norm_act_gradient_through_its_statistics(act):
  """ops.batch_norm_act's written-out gradient equals autodiff of the same function, also through
  the batch mean and variance it returns."""
  x, scale, bias = _rand(3, 4, 6, 7) * 2 - 1, _rand(7) + 1, _rand(7)
  cy, cm, cv = _rand(3, 4, 6, 7), _rand(7), _rand(7)

  def plain(x, scale, bias):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean ** 2)
    z = (x - mean) * (jax.lax.rsqrt(var + 1e-3) * scale) + bias
    return (jax.nn.elu(z) if act else z), mean, var

  def loss(f, *a):
    y, mean, var = f(*a)
    return jnp.sum(y * cy) + jnp.sum(mean * cm) + jnp.sum(var * cv)

  fused = lambda *a: ops.batch_norm_act(*a, 1e-3, act)
  for f in (plain, fused):  # Jitted, each equals the plain function run op by op.
    np.testing.assert_allclose(jax.jit(lambda *a: f(*a)[0])(x, scale, bias),
                               plain(x, scale, bias)[0], rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, scale, bias)
  g_fused = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(x, scale, bias)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_fused, g)


def test_whole_network_same_in_both_impls():
  kw = dict(num_classes=5, widths=(4, 8, 8, 16, 16), head_width=32)
  x = _rand(2, 64, 64, 3)
  variables = models.SepResFCN8(impl='xla', **kw).init(jax.random.key(1), x)

  def loss(impl, params):
    out, _ = models.SepResFCN8(impl=impl, **kw).apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats'])
    return jnp.mean(out ** 2)

  g_xla = jax.grad(lambda p: loss('xla', p))(variables['params'])
  for impl in FAST:
    np.testing.assert_allclose(loss(impl, variables['params']),
                               loss('xla', variables['params']), rtol=1e-4)
    g_fast = jax.grad(lambda p: loss(impl, p))(variables['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5), g_fast,
                 g_xla)


def test_resolve_impl(monkeypatch):
  cpu = 'native_cpu' if NATIVE else 'fast_cpu'
  assert ops.resolve_impl('auto') == (cpu if jax.default_backend() == 'cpu' else 'xla')
  monkeypatch.setattr(native, 'available', lambda: (False, 'RuntimeError: no C++ compiler'))
  if jax.default_backend() == 'cpu':
    assert ops.resolve_impl('auto') == 'fast_cpu'
  with pytest.raises(ValueError, match="native_cpu.*no C\\+\\+ compiler.*fast_cpu"):
    ops.resolve_impl('native_cpu')
  with pytest.raises(ValueError, match='model.impl'):
    ops.resolve_impl('cuda')
