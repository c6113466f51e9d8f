"""The compiled CPU kernels: their build, their failures, and their sums against float64."""

import ctypes
import os
import re
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_devices
from sepres_jax import native
from sepres_jax import ops

HAS_COMPILER = native._compiler() is not None  # pylint: disable=protected-access
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')


@needs_compiler
def test_kernels_build_and_register_where_a_compiler_is():
  ok, where = native.available()
  assert ok, where
  assert os.path.exists(where)


@needs_compiler
def test_fresh_build_exports_the_handlers(tmp_path):
  path = native.library_path(str(tmp_path))
  native.build(path)
  lib = ctypes.cdll.LoadLibrary(path)
  for symbol in native.TARGETS.values():
    assert getattr(lib, symbol)
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # No temporary file left behind.


@needs_compiler
def test_a_cached_library_that_does_not_load_is_rebuilt(tmp_path):
  """A truncated cache file turned the kernels off for good (every later run fell back)."""
  path = native.library_path(str(tmp_path))
  with open(path, 'wb') as f:
    f.write(b'\x7fELF truncated')
  lib = native.open_library(path)
  for symbol in native.TARGETS.values():
    assert getattr(lib, symbol)
  assert os.path.getsize(path) > 1000


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(native, '_compiler', lambda: None)
  with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
    native.build(str(tmp_path / 'k.so'))


@needs_compiler
def test_compile_error_names_the_source_and_leaves_nothing(tmp_path, monkeypatch):
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++\n')
  monkeypatch.setattr(native, 'SOURCE', str(bad))
  out = tmp_path / 'cache' / 'k.so'
  with pytest.raises(RuntimeError, match='bad.cc'):
    native.build(str(out))
  assert os.listdir(out.parent) == []


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv('SEPRES_JAX_NATIVE', '0')
  ok, why = native._load.__wrapped__()  # pylint: disable=protected-access
  assert not ok and 'SEPRES_JAX_NATIVE=0' in why


def test_library_name_follows_the_source(tmp_path, monkeypatch):
  src = tmp_path / 'k.cc'
  shutil.copy(native.SOURCE, src)
  monkeypatch.setattr(native, 'SOURCE', str(src))
  before = native.library_path(str(tmp_path))
  src.write_text(src.read_text() + '\n// changed\n')
  assert native.library_path(str(tmp_path)) != before


@pytest.mark.skipif(not native.available()[0], reason='compiled kernels unavailable')
def test_kernel_grad_against_float64():
  """The kernel gradient sums per-task partials in float64: within float32 rounding of the
  exact sum over 4x40x24 positions."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 40, 24, 37)).astype(np.float32)
  g = rng.standard_normal((4, 40, 24, 37)).astype(np.float32)
  got = np.asarray(jax.jit(native.depthwise3x3_kernel_grad)(jnp.asarray(x), jnp.asarray(g)))
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  exact = np.stack([(xp[:, i:i + 40, j:j + 24] * g).sum((0, 1, 2))
                    for i in range(3) for j in range(3)]).reshape(3, 3, 1, 37)
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-3)
  y = np.asarray(jax.jit(native.depthwise3x3)(jnp.asarray(x), jnp.asarray(got)))
  k = got[:, :, 0].astype(np.float64)
  ref = sum(xp[:, i:i + 40, j:j + 24] * k[i, j] for i in range(3) for j in range(3))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-2)


@pytest.mark.skipif(not native.available()[0], reason='compiled kernels unavailable')
@pytest.mark.parametrize('shape, k, cout', [((3, 7, 5, 3), 3, 5), ((2, 1, 9, 1), 5, 17),
                                            ((5, 12, 10, 2), 3, 16), ((4, 9, 11, 3), 3, 24),
                                            ((2, 2, 6, 3), 3, 16), ((3, 5, 1, 3), 3, 40)])
def test_dense_kernel_grad_against_float64(shape, k, cout):
  """The stem's kernel gradient: borders of a single row, odd output counts, many tasks; the
  3x3x3 kernel's register-blocked interior with whole and partial blocks of 16 outputs, and
  inputs with no interior pixel."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal(shape[:3] + (cout,)).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, g: native.dense_kernel_grad(x, g, (k, k, shape[-1], cout)))(
      jnp.asarray(x), jnp.asarray(g)))
  p = (k - 1) // 2
  xp = np.pad(x.astype(np.float64), ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
  h, w = shape[1:3]
  exact = np.stack([np.stack([np.einsum('bhwc,bhwo->co', xp[:, i:i + h, j:j + w], g)
                              for j in range(k)]) for i in range(k)])
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not native.available()[0], reason='compiled kernels unavailable')
def test_materialize_is_the_identity_and_keeps_the_pool_residual():
  """Any dtype, under jit; and the native_cpu max-pool's gradient reads its int8
  residual from the call rather than recomputing the layers before it, the stem-like conv (few
  taps) writes its output through it, and the pool's undifferentiated form (inference) writes
  the pooled map out through it."""
  for dtype in (np.float32, np.int8):
    x = (np.arange(2 * 3 * 4 * 5) % 7).reshape(2, 3, 4, 5).astype(dtype)
    np.testing.assert_array_equal(jax.jit(lambda v: native.materialize(v + 1))(x), x + 1)
  img = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  k = np.random.default_rng(1).standard_normal((3, 3, 3, 4)).astype(np.float32)
  f = lambda k: jnp.sum(ops.max_pool2x2(jax.nn.relu(ops.conv(img, k, 'native_cpu')),
                                        'native_cpu') ** 2)
  hlo = jax.jit(jax.grad(f)).lower(k).compile().as_text()
  assert re.search(r's8\[2,4,4,4\]\{[^}]*\} custom-call\(.*"sepres_materialize"', hlo), hlo
  assert re.search(r'f32\[2,8,8,4\]\{[^}]*\} custom-call\(.*"sepres_materialize"', hlo), hlo
  want = jax.grad(lambda k: jnp.sum(ops.max_pool2x2(jax.nn.relu(ops.conv(img, k, 'xla')),
                                                    'xla') ** 2))(k)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(k), want, rtol=1e-4, atol=1e-4)
  # Undifferentiated (inference), the pooled map itself is written out, and equals fast_cpu's.
  pooled = lambda impl: jax.jit(lambda k: ops.max_pool2x2(jax.nn.relu(ops.conv(img, k, impl)),
                                                          impl) * 2.0)
  hlo = pooled('native_cpu').lower(k).compile().as_text()
  assert re.search(r'f32\[2,4,4,4\]\{[^}]*\} custom-call\(.*"sepres_materialize"', hlo), hlo
  np.testing.assert_array_equal(pooled('native_cpu')(k), pooled('fast_cpu')(k))


_PARTITION_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sepres_jax import metrics, ops

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 12, 10, 16)).astype(np.float32)
    img = rng.standard_normal((8, 12, 10, 3)).astype(np.float32)
    dw = rng.standard_normal((3, 3, 1, 16)).astype(np.float32)
    stem = rng.standard_normal((3, 3, 3, 16)).astype(np.float32)
    labels = rng.integers(0, 12, (8, 12, 10)).astype(np.int32)  # 11: void, ignored.

    def loss(x, img, dw, stem):
      h = ops.depthwise_conv3x3(x, dw, 'native_cpu') + ops.conv(img, stem, 'native_cpu')
      h = h + jnp.repeat(jnp.repeat(ops.max_pool2x2(h, 'native_cpu'), 2, 1), 2, 2)
      logits = h[..., :11]
      total, count = metrics.lovasz_softmax(logits, labels, use_native=True)
      return total / count + jnp.mean(h ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    out, hlo = {}, ''
    for name, devices in [('mesh4', jax.devices()), ('single', jax.devices()[:1])]:
      mesh = jax.sharding.Mesh(np.array(devices), ('data',))
      split = NamedSharding(mesh, P('data'))
      args = (jax.device_put(x, split), jax.device_put(img, split), dw, stem)
      f = jax.jit(lambda *a: (loss(*a), grad(*a)))
      if name == 'mesh4':
        hlo = f.lower(*args).compile().as_text()
      value, grads = f(*args)
      out[name] = [np.asarray(value).tolist()] + [np.asarray(g).ravel().tolist() for g in grads]
    calls = [l for l in hlo.splitlines() if 'custom_call_target="sepres_' in l]
    print('RESULT', json.dumps({
        'out': out, 'all_gather': hlo.count('all-gather'),
        'calls': [(re.search(r'target="(\\w+)"', l).group(1),
                   re.search(r'operand_layout_constraints=\\{\\w+\\[(\\d+)', l).group(1))
                  for l in calls]}))
""")


@pytest.mark.multidevice
@pytest.mark.skipif(not native.available()[0], reason='compiled kernels unavailable')
def test_kernels_are_partitioned_by_the_batch_over_a_mesh():
  """Under jit over 4 devices each compiled kernel runs on its device's 2 of the 8 images (no
  gather of the batch), and values and gradients equal those on one device."""
  r = run_on_devices(_PARTITION_SCRIPT, 4)
  targets = {t for t, _ in r['calls']}
  assert targets == {'sepres_depthwise3x3', 'sepres_depthwise3x3_kernel_grad',
                     'sepres_dense_kernel_grad', 'sepres_lovasz_softmax',
                     'sepres_materialize'}, r['calls']
  assert all(first == '2' for _, first in r['calls']), r['calls']  # 8 images / 4 devices.
  assert r['all_gather'] == 0
  for got, want in zip(r['out']['mesh4'], r['out']['single']):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
