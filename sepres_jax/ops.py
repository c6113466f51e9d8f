"""Layer kernels of the network, each in exact forms that compute the same function.

`xla` is the textbook form (lax convolutions, reduce_window pooling). `fast_cpu` computes the same
function as shifted multiply-adds and matrix products, whose forward and backward passes XLA's CPU
backend runs many times faster (see README.md, "Speed on this CPU"). `native_cpu` is
fast_cpu with the backward passes of the depthwise convolutions and of the stem's kernel in
compiled C++ kernels (sepres_jax/native.py); its forward pass gives fast_cpu's numbers, to the
bit (with compiled calls that write the stem's output and the pools' residual out). Both
CPU forms train BatchNorm with its activation through `batch_norm_act`, whose gradient is written
out. All forms take the same parameters, so checkpoints are interchangeable; tests/test_ops.py
checks values and gradients agree.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sepres_jax import native

IMPLS = ('xla', 'fast_cpu', 'native_cpu')
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str) -> str:
  """'auto' -> on CPU 'native_cpu' if its kernels build here, else 'fast_cpu'; 'xla' (library
  kernels) on accelerators. 'native_cpu' asked for where its kernels cannot build is an error."""
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    return 'native_cpu' if native.available()[0] else 'fast_cpu'
  if impl not in IMPLS:
    raise ValueError(f"model.impl must be 'auto' or one of {IMPLS}, got {impl!r}")
  if impl == 'native_cpu':
    ok, why = native.available()
    if not ok:
      raise ValueError(f"model.impl='native_cpu': the compiled kernels are not available ({why}); "
                       "use 'fast_cpu'")
  return impl


def depthwise_conv3x3(x, kernel, impl, rate: int = 1):
  """3x3 depthwise convolution, stride 1, SAME padding, dilated by `rate`. kernel: [3, 3, 1, C].

  A dilated one (only the context module's, on the stride-32 map, where it costs little) is the
  plain XLA convolution whatever `impl` says."""
  if impl == 'xla' or rate != 1:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), 'SAME', rhs_dilation=(rate, rate), dimension_numbers=_NHWC,
        feature_group_count=x.shape[-1])
  if impl == 'native_cpu' and x.dtype == kernel.dtype == jnp.float32:
    return _depthwise_native(x, kernel)
  return _depthwise_shifted(x, kernel)


def _shifted_sum(x, k):
  """sum_ij pad(x)[:, i:i+h, j:j+w] * k[i, j]: the 3x3 depthwise conv as 9 multiply-adds."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = None
  for i in range(3):
    for j in range(3):
      term = xp[:, i:i + h, j:j + w, :] * k[i, j]
      out = term if out is None else out + term
  return out


_KERNEL_GRAD_BLOCK_BYTES = 1 << 20  # Rows of x per step of the kernel gradient: fits in L2.


def _depthwise_kernel_grad(x, g):
  """dL/dk[i, j, c] = sum_{b,h,w} pad(x)[b, h+i, w+j, c] g[b, h, w, c], by blocks of rows.

  XLA fuses each of the 9 products into its own reduction, so computed over the whole arrays the
  9 passes stream x and g from memory 9 times (2-3x slower at 112x112). A loop over blocks of rows
  that fit in cache reads them from memory once.
  """
  b, h, w, c = x.shape
  rows = max([r for r in range(1, h + 1)
              if h % r == 0 and b * (r + 2) * (w + 2) * c * x.dtype.itemsize
              <= _KERNEL_GRAD_BLOCK_BYTES] or [1])
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def block(r, acc):
    xs = lax.dynamic_slice_in_dim(xp, r * rows, rows + 2, axis=1)
    gs = lax.dynamic_slice_in_dim(g, r * rows, rows, axis=1)
    return acc + jnp.stack([jnp.sum(xs[:, i:i + rows, j:j + w, :] * gs, axis=(0, 1, 2))
                            for i in range(3) for j in range(3)])

  acc = jnp.zeros((9, c), jnp.promote_types(x.dtype, jnp.float32))
  return lax.fori_loop(0, h // rows, block, acc).reshape(3, 3, 1, c)


@jax.custom_vjp
def _depthwise_shifted(x, kernel):
  return _shifted_sum(x, kernel[:, :, 0, :])


def _depthwise_fwd(x, kernel):
  return _shifted_sum(x, kernel[:, :, 0, :]), (x, kernel)


def _depthwise_bwd(res, g):
  x, kernel = res
  dx = _shifted_sum(g, kernel[::-1, ::-1, 0, :])  # The transposed conv: the flipped kernel.
  return dx, _depthwise_kernel_grad(x, g).astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


@jax.custom_vjp
def _depthwise_native(x, kernel):
  return _shifted_sum(x, kernel[:, :, 0, :])


def _depthwise_native_bwd(res, g):
  # Both gradients as compiled kernels: each reads its inputs from memory once. The forward pass
  # stays XLA's fusion (as fast here, and the same bits as fast_cpu for inference and export).
  # A custom call is opaque to XLA's fusion, so g is written to memory first; with only one of
  # the two gradients compiled, XLA recomputed g's producers for the other (0.92-0.97x).
  x, kernel = res
  return (native.depthwise3x3(g, kernel[::-1, ::-1]),
          native.depthwise3x3_kernel_grad(x, g))


_depthwise_native.defvjp(_depthwise_fwd, _depthwise_native_bwd)


def _saving_inputs(f):
  """The forward rule of a custom VJP whose backward rule reads f's two inputs."""
  return lambda a, b: (f(a, b), (a, b))


def pointwise_conv(x, kernel, impl='xla'):
  """1x1 convolution as a matrix product over the channel axis. kernel: [1, 1, Cin, Cout].

  With impl other than 'xla' its gradient is written out (_pointwise_bwd); with 'xla', XLA's.
  """
  if impl == 'xla':
    return jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0])
  return _pointwise_by_product(x, kernel[0, 0])


@jax.custom_vjp
def _pointwise_by_product(x, kernel):
  return jnp.einsum('bhwc,cd->bhwd', x, kernel)


def _pointwise_bwd(residuals, g):
  # The kernel's gradient sum_n x[n]^T g[n] as a product whose left operand is the narrower of x
  # and g, transposed (_gram): differentiated by XLA, this product transposed the wider one, or
  # took a slow strided form: alone, this gradient is 2.6-2.8x faster at block1's and block2's
  # sizes; the seed network's train step 1.07x.
  x, kernel = residuals
  cin, cout = kernel.shape
  x2, g2 = x.reshape(-1, cin), g.reshape(-1, cout)
  return (g2 @ kernel.T).reshape(x.shape), _gram(x2, g2)


def _gram(a, b):
  """a^T b of two [N, *] matrices, the narrower one transposed."""
  return a.T @ b if a.shape[1] <= b.shape[1] else (b.T @ a).T


_pointwise_by_product.defvjp(_saving_inputs(_pointwise_by_product), _pointwise_bwd)


LARGE_CONV_FORMS = ('auto', 'rows', 'dft')

# With large_conv='auto', a KxK conv of at least this many taps (conv6's 7x7) whose batch is at
# least _DFT_MIN_BATCH runs as products of its discrete Fourier transforms (_conv_by_dft): the
# kernel's transform costs the same whatever the batch, so small batches keep the products per
# kernel row.
_DFT_MIN_TAPS = 25
_DFT_MIN_BATCH = 8


def check_large_conv(large_conv: str) -> None:
  """Raises ValueError naming model.large_conv unless it is one of LARGE_CONV_FORMS."""
  if large_conv not in LARGE_CONV_FORMS:
    raise ValueError(f'model.large_conv must be one of {LARGE_CONV_FORMS}, got {large_conv!r}')


def conv(x, kernel, impl, large_conv: str = 'auto'):
  """KxK convolution, stride 1, SAME padding. kernel: [K, K, Cin, Cout].

  `large_conv` picks the CPU form of a large kernel (above the stem's size): 'rows' (a matrix
  product per kernel row, _conv_by_rows), 'dft' (products of discrete Fourier transforms,
  _conv_by_dft) or 'auto' (dft for kernels of 5x5 and more at a batch of 8 or more). With
  impl='xla' the library convolution runs whatever it says.
  """
  kh, kw = kernel.shape[:2]
  check_large_conv(large_conv)
  if kh == kw == 1:
    return pointwise_conv(x, kernel, impl)
  if impl == 'xla':
    return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_NHWC)
  if kh * kw * x.shape[-1] <= _DIRECT_MAX_TAPS:
    if impl == 'native_cpu' and x.dtype == kernel.dtype == jnp.float32:
      return _conv_direct_native(x, kernel)
    return _conv_direct(x, kernel)
  static = all(isinstance(n, int) for n in x.shape[:3])  # Not a symbolic (exported) shape.
  if static and x.dtype == kernel.dtype == jnp.float32 and (large_conv == 'dft' or (
      large_conv == 'auto' and kh * kw >= _DFT_MIN_TAPS and x.shape[0] >= _DFT_MIN_BATCH)):
    return _conv_by_dft(x, kernel)
  return _conv_by_rows(x, kernel)


def _conv_by_dft(x, kernel):
  """A KxK SAME conv as a product per frequency of the input's and the kernel's 2-D discrete
  Fourier transforms, each transform a matrix product.

  The H x W map is transformed at (H + K/2) x (W + K/2) points, enough that the cyclic
  correlation equals the zero-padded one on the map; only the frequencies of a real signal's
  half spectrum are kept (about (H + 3)(W + 3) / 2 for a 7x7 kernel), and each frequency's complex
  product [B, Cin] x [Cin, Cout] is one real product of twice the size. On conv6's 7x7 map that
  is 52 frequencies of 4 real multiply-adds against _conv_by_rows' 37 rows x 49 taps: a ninth of
  its products' work, a fifth with the transforms at batch 32. The kernel's transform costs the
  same at any batch, which is why small batches keep _conv_by_rows. Equal to the direct
  convolution to float32 rounding (tests/test_ops.py).
  """
  kh, kw, _, _ = kernel.shape
  _, h, w, _ = x.shape
  return _dft_conv(x, kernel, (h, w, kh, kw))


@functools.lru_cache(maxsize=None)
def _dft_matrices(h, w, kh, kw):
  """(T [2Q, H*W], S [2Q, Kh*Kw], U [2Q, H*W]) float32: the input's and the kernel's transforms
  and the inverse transform, with rows (frequency, real/imaginary part) for Q frequencies.

  The kernel's transform is conjugated (so the product is a correlation, as a conv layer
  computes), and U weighs each kept frequency by how many of the full spectrum it stands for.
  """
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  nh, nw = h + max(ph, kh - 1 - ph), w + max(pw, kw - 1 - pw)
  freqs, weights = [], []
  for v in range(nw // 2 + 1):
    self_conjugate = (2 * v) % nw == 0  # Columns v and nw - v coincide: keep u <= nh / 2.
    for u in range(nh // 2 + 1 if self_conjugate else nh):
      freqs.append((u, v))
      weights.append(1.0 if self_conjugate and (2 * u) % nh == 0 else 2.0)
  u = np.array([f[0] for f in freqs], np.float64)[:, None, None]
  v = np.array([f[1] for f in freqs], np.float64)[:, None, None]
  weights = np.array(weights)[:, None, None] / (nh * nw)
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  i, j = np.meshgrid(np.arange(kh) - ph, np.arange(kw) - pw, indexing='ij')
  at_map = 2 * np.pi * (u * r / nh + v * c / nw)  # [Q, H, W]
  at_taps = 2 * np.pi * (u * i / nh + v * j / nw)  # [Q, Kh, Kw]
  t = np.stack([np.cos(at_map), -np.sin(at_map)], 1)
  s = np.stack([np.cos(at_taps), np.sin(at_taps)], 1)
  inverse = t * weights[:, None]  # Re(Y e^{+i at_map}) = Re(Y) cos - Im(Y) sin: t's rows.
  q = len(freqs)
  return (t.reshape(2 * q, h * w).astype(np.float32), s.reshape(2 * q, kh * kw).astype(np.float32),
          inverse.reshape(2 * q, h * w).astype(np.float32))


def _complex_rows(xf):
  """[[Re, -Im], [Im, Re]] of xf [Q, 2, B, C] as [Q, 2B, 2C]: times [Re; Im] of a [C, D]
  complex matrix it gives [Re; Im] of the complex product."""
  re, im = xf[:, 0], xf[:, 1]
  return jnp.concatenate([jnp.concatenate([re, -im], -1), jnp.concatenate([im, re], -1)], 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dft_conv(x, kernel, sizes):
  return _dft_conv_fwd(x, kernel, sizes)[0]


def _dft_conv_fwd(x, kernel, sizes):
  h, w, kh, kw = sizes
  t, s, u = _dft_matrices(*sizes)
  q, p = t.shape[0] // 2, h * w
  b, c, d = x.shape[0], x.shape[-1], kernel.shape[-1]
  xf = jnp.einsum('fp,bpc->fbc', t, x.reshape(b, p, c)).reshape(q, 2, b, c)
  x2 = _complex_rows(xf)  # [Q, 2B, 2C]
  k2 = (s @ kernel.reshape(kh * kw, c * d)).reshape(q, 2 * c, d)  # [Q, (Re; Im) of C, D]
  yf = jnp.einsum('qbc,qcd->qbd', x2, k2)  # [Q, (Re; Im) of B, D]
  y = (u.T @ yf.reshape(2 * q, b * d)).reshape(p, b, d)
  return y.transpose(1, 0, 2).reshape(b, h, w, d), (x2, k2)


def _dft_conv_bwd(sizes, residuals, g):
  # The forward pass's products transposed, each written as a product whose operands need no
  # transposing of the large [Q, 2C, D] array.
  h, w, kh, kw = sizes
  t, s, u = _dft_matrices(*sizes)
  x2, k2 = residuals
  q, p = t.shape[0] // 2, h * w
  b, c, d = g.shape[0], k2.shape[1] // 2, g.shape[-1]
  gp = g.reshape(b, p, d).transpose(1, 0, 2).reshape(p, b * d)
  dyf = (u @ gp).reshape(q, 2 * b, d)
  dx2 = jnp.einsum('qbd,qcd->qbc', dyf, k2)
  dk2 = jnp.einsum('qcb,qbd->qcd', x2.transpose(0, 2, 1), dyf)
  dk = (s.T @ dk2.reshape(2 * q, c * d)).reshape(kh, kw, c, d)
  dre = dx2[:, :b, :c] + dx2[:, b:, c:]
  dim = dx2[:, b:, :c] - dx2[:, :b, c:]
  dxf = jnp.stack([dre, dim], 1).reshape(2 * q, b, c)
  dx = jnp.einsum('fp,fbc->bpc', t, dxf).reshape(b, h, w, c)
  return dx, dk


_dft_conv.defvjp(_dft_conv_fwd, _dft_conv_bwd)


def _conv_by_rows(x, kernel):
  """A KxK conv as matrix products over its patches, one product per kernel row.

  Kernel row i reaches input row r + i - ph from output row r; only the output rows for which
  that input row exists take part, so the zero padding above and below is never multiplied. Each
  product takes the W-direction patches (kw taps) of those rows. On conv6 (7x7 kernel, 7x7 input
  at 224x224) that skips a quarter of the im2col product's multiply-adds and writes a 7x smaller
  patch array: 1.3x (forward) and 1.25x (backward) the single im2col product's speed here;
  1.1-1.2x on 12x15 inputs. With a symbolic height (jax.export) the rows are padded instead: the
  same function for any height.
  """
  kh, kw, c, d = kernel.shape
  b, h, w, _ = x.shape
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  if not isinstance(h, int):  # A symbolic height (an exported model): pad above and below.
    x = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (0, 0), (0, 0)))
  xp = jnp.pad(x, ((0, 0), (0, 0), (pw, kw - 1 - pw), (0, 0)))
  rows = jnp.stack([xp[:, :, j:j + w, :] for j in range(kw)], axis=3)
  rows = rows.reshape(b, x.shape[1], w, kw * c)
  if not isinstance(h, int):
    return sum(jnp.einsum('bhwk,kd->bhwd', rows[:, i:i + h], kernel[i].reshape(kw * c, d))
               for i in range(kh))
  return _row_products(rows, kernel)


def _row_ranges(kh, h):
  """(kernel row, first output row, end output row, first input row) of each product."""
  ph = (kh - 1) // 2
  for i in range(kh):
    lo, hi = max(0, ph - i), min(h, h + ph - i)  # Output rows whose input row r + i - ph exists.
    if lo < hi:
      yield i, lo, hi, lo + i - ph


@jax.custom_vjp
def _row_products(rows, kernel):
  """sum_i rows[:, r_i:r_i + n_i] @ kernel[i], each into its output rows (_row_ranges)."""
  kh, kw, c, d = kernel.shape
  b, h, w, _ = rows.shape
  out = jnp.zeros((b, h, w, d), jnp.result_type(rows, kernel))
  for i, lo, hi, r in _row_ranges(kh, h):
    product = jnp.einsum('bhwk,kd->bhwd', rows[:, r:r + hi - lo], kernel[i].reshape(kw * c, d))
    out = out.at[:, lo:hi].add(product)
  return out


def _row_products_bwd(residuals, g):
  # Each kernel row's gradient by _gram, which transposes the patches (Kw*Cin columns, 896 on
  # conv6) instead of the output gradient (Cout, 2048) as XLA's own gradient did.
  rows, kernel = residuals
  kh, kw, c, d = kernel.shape
  b, h, w, _ = rows.shape
  d_rows = jnp.zeros_like(rows)
  dk = jnp.zeros_like(kernel)
  for i, lo, hi, r in _row_ranges(kh, h):
    gi = g[:, lo:hi].reshape(-1, d)
    ki = kernel[i].reshape(kw * c, d)
    d_rows = d_rows.at[:, r:r + hi - lo].add((gi @ ki.T).reshape(b, hi - lo, w, kw * c))
    dk = dk.at[i].set(_gram(rows[:, r:r + hi - lo].reshape(-1, kw * c), gi).reshape(kw, c, d))
  return d_rows, dk


_row_products.defvjp(_saving_inputs(_row_products), _row_products_bwd)


# A conv with at most this many input taps (K*K*Cin; the stem's 3x3x3 = 27) runs as broadcast
# multiply-adds: a matrix product that narrow wastes most of each vector load (5x slower here).
_DIRECT_MAX_TAPS = 32


def _direct_sum(x, kernel):
  """sum_{i,j,c} pad(x)[:, i:i+h, j:j+w, c] * kernel[i, j, c, :], SAME padding."""
  kh, kw, cin, _ = kernel.shape
  h, w = x.shape[1], x.shape[2]
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      for c in range(cin):
        term = xp[:, i:i + h, j:j + w, c:c + 1] * kernel[i, j, c]
        out = term if out is None else out + term
  return out


@jax.custom_vjp
def _conv_direct(x, kernel):
  return _direct_sum(x, kernel)


def _conv_direct_bwd(res, g):
  # The gradients of the matrix-product form (_conv_by_rows); differentiating the multiply-adds
  # instead makes 27 passes over the output gradient (the whole train step 0.85x).
  x, kernel = res
  return jax.vjp(_conv_by_rows, x, kernel)[1](g)


_conv_direct.defvjp(_saving_inputs(_conv_direct), _conv_direct_bwd)


@jax.custom_vjp
def _conv_direct_native(x, kernel):
  # Its output (the stem's) written to memory once: otherwise XLA recomputed the 27 taps inside
  # each consumer (the BatchNorm statistics, the pool and its residual, three backward fusions):
  # XLA's FLOPs per image 5.06 -> 4.84 at the seed network, the train step 1.01-1.02x (with
  # malloc on huge pages; 0.92x under 4 KB pages, when each fresh 103 MB buffer page-faulted).
  return native.materialize(_direct_sum(x, kernel))


def _conv_direct_native_bwd(res, g):
  # The kernel gradient compiled: one pass over g, where the matrix-product form first writes
  # its row patches (3x the stem's input) to memory. The input gradient (unused for the stem,
  # whose input is the image, and then removed by XLA) stays the matrix-product form's.
  x, kernel = res
  dx = jax.vjp(lambda x: _conv_by_rows(x, kernel), x)[1](g)[0]
  return dx, native.dense_kernel_grad(x, g, kernel.shape)


_conv_direct_native.defvjp(_saving_inputs(_conv_direct_native), _conv_direct_native_bwd)


def upsample_conv(x, kernel, impl):
  """Transposed convolution whose kernel equals its stride (no overlap). kernel: [s, s, Cin, Cout].

  out[b, y*s + i, x*s + j, o] = sum_c x[b, y, x, c] * kernel[i, j, c, o].
  """
  s = kernel.shape[0]
  if impl == 'xla':
    return lax.conv_transpose(
        x, kernel[::-1, ::-1], (s, s), 'VALID', dimension_numbers=_NHWC)
  return _upsample_by_product(x, kernel)


@jax.custom_vjp
def _upsample_by_product(x, kernel):
  # One product [B*H*W, Cin] x [Cin, s*s*Cout], its rows' s x s tiles moved into place.
  b, h, w, _ = x.shape
  s, cout = kernel.shape[0], kernel.shape[-1]
  y = jnp.einsum('bhwc,ijco->bhwijo', x, kernel)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, cout)


def _upsample_by_product_bwd(residuals, g):
  # The gradient moved back into tiles once, [B*H*W, s*s*Cout], and both products read it in that
  # row-major form. Differentiated by XLA, the kernel's product took that gradient transposed,
  # [s*s*Cout, B*H*W]: a second copy of the whole gradient (x8 at 224x224, batch 32: 77 MB, 0.04 s
  # of a 2 s step), where the input's transpose here is s*s*Cout/Cin times smaller.
  x, kernel = residuals
  b, h, w, cin = x.shape
  s, cout = kernel.shape[0], kernel.shape[-1]
  tiles = g.reshape(b, h, s, w, s, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b * h * w, -1)
  k = kernel.transpose(2, 0, 1, 3).reshape(cin, s * s * cout)
  dx = (tiles @ k.T).reshape(x.shape)
  dk = _gram(x.reshape(-1, cin), tiles).reshape(cin, s, s, cout).transpose(1, 2, 0, 3)
  return dx, dk


_upsample_by_product.defvjp(_saving_inputs(_upsample_by_product), _upsample_by_product_bwd)


def max_pool2x2(x, impl):
  """2x2 max-pooling, stride 2 (inputs of even size)."""
  if impl == 'xla':
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  if impl == 'native_cpu':
    return _max_pool2x2_native(x)
  return _max_pool2x2_reshape(x)


def _quarters(x):
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def _max_pool2x2_reshape(x):
  # The maximum of the four strided quarters: one elementwise fusion, 3-8x faster here than a
  # reduction over the reshaped window axes, which XLA's CPU backend runs as a strided loop.
  a, b, c, d = _quarters(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
  # The residual is which of the window's four entries is the maximum (the first one on ties, as
  # reduce_window's gradient does), as int8 at the pooled size: the backward pass then neither
  # keeps x alive nor recomputes it. With x as the residual, XLA fused the producers of x (the
  # stem's convolution, BatchNorm and ReLU) into the backward pass and recomputed them up to four
  # times per element.
  a, b, c, d = _quarters(x)
  y = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  where = jnp.where(a == y, 0, jnp.where(b == y, 1, jnp.where(c == y, 2, 3))).astype(jnp.int8)
  return y, where


def _max_pool_bwd(where, g):
  b, h2, w2, c = g.shape
  # dx[:, 2i + p, 2j + q] = g[:, i, j] where the maximum was entry 2p + q: a broadcast, then a
  # reshape that is free in the row-major layout.
  entry = (2 * lax.broadcasted_iota(jnp.int8, (1, 1, 2, 1, 2, 1), 2)
           + lax.broadcasted_iota(jnp.int8, (1, 1, 2, 1, 2, 1), 4))
  taken = where[:, :, None, :, None, :] == entry
  dx = jnp.where(taken, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (dx.reshape(b, 2 * h2, 2 * w2, c),)


_max_pool2x2_reshape.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def _max_pool2x2_native(x):
  # Undifferentiated (inference), the pooled map is written out by the same opaque identity: XLA
  # otherwise fused the stem's pool into block1's depthwise convolutions and recomputed the stem's
  # convolution, BatchNorm and ReLU for the window's four entries there, once per consumer.
  return native.materialize(_max_pool2x2_reshape(x))


def _max_pool_native_fwd(x):
  # The int8 residual written to memory by a compiled identity, which XLA cannot fuse through:
  # otherwise XLA fuses its computation into the backward pass, where the stem's pool recomputed
  # the stem's convolution, BatchNorm and ReLU for each of the window's four entries (0.16 s of a
  # 2 s step at batch 32; 0.08 s with it, the forward pass 0.03 s slower; the step 1.01-1.04x).
  y, where = _max_pool_fwd(x)
  return y, native.materialize(where)


_max_pool2x2_native.defvjp(_max_pool_native_fwd, _max_pool_bwd)


def batch_stats(x, axis_name=None):
  """(mean, var) of x over all axes but the last, as flax's BatchNorm computes them: in float32,
  E[x^2] - E[x]^2 clipped at zero, averaged over `axis_name`'s devices too under pmap."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  means = jnp.stack([jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)])
  mean, mean2 = lax.pmean(means, axis_name) if axis_name else means
  return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def normalize(x, mean, var, scale, bias, epsilon: float):
  """BatchNorm's affine normalisation, in flax's order of operations (so the values match)."""
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def activate(z, act):
  """None, 'relu' or 'elu' (the model's activations after BatchNorm)."""
  return {'relu': jax.nn.relu, 'elu': jax.nn.elu, None: lambda v: v}[act](z)


def batch_norm_act(x, scale, bias, epsilon: float, act, axis_name=None):
  """Training-mode BatchNorm over all axes but the last, then `act` (None, 'relu' or 'elu').

  Returns (y, mean, var), the batch statistics being batch_stats' (for the running averages). The
  gradient is written out (`_bn_act_bwd`): autodiff of the normalisation and the activation made
  XLA's CPU backend pass over the activations several times; this is two passes, one for the two
  per-channel sums and one for dx (1.8x faster forward and backward alone at 32x112x112x32).
  """
  return _bn_act(x, scale, bias, epsilon, act, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_act(x, scale, bias, epsilon, act, axis_name):
  return _bn_act_fwd(x, scale, bias, epsilon, act, axis_name)[0]


def _bn_act_fwd(x, scale, bias, epsilon, act, axis_name):
  mean, var = batch_stats(x, axis_name)
  y = activate(normalize(x, mean, var, scale, bias, epsilon), act).astype(x.dtype)
  return (y, mean, var), (x, y if act else None, mean, var, scale)


def _bn_act_bwd(epsilon, act, axis_name, res, cts):
  x, y, mean, var, scale = res
  gy, gmean, gvar = cts
  gz = gy.astype(mean.dtype)
  if act == 'relu':
    gz = jnp.where(y > 0, gz, 0)
  elif act == 'elu':
    gz = jnp.where(y > 0, gz, gz * (y + 1))  # elu'(z) = exp(z) = y + 1 below 0.
  inv = lax.rsqrt(var + epsilon)
  xhat = (x - mean) * inv
  axes = tuple(range(x.ndim - 1))
  dbias = jnp.sum(gz, axes)
  dscale = jnp.sum(gz * xhat, axes)
  # Per-channel means over the global batch (all devices under pmap): of gz and gz * xhat, and
  # the cotangents of the returned statistics (zero when, as in the model, they only feed the
  # running averages) spread over the elements they average.
  n = x.size // x.shape[-1]
  means = jnp.stack([dbias, dscale, gmean, gvar]) / n
  m_g, m_gx, m_mean, m_var = lax.pmean(means, axis_name) if axis_name else means
  dx = (scale * inv) * (gz - m_g - xhat * m_gx) + m_mean + 2 * m_var * (x - mean)
  return dx.astype(x.dtype), dscale, dbias


_bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)
