"""conv6's forms, alone: one im2col product, `ops.conv`'s product per kernel row and its products
of discrete Fourier transforms (model.large_conv 'rows' and 'dft').

    python benchmarks/conv_forms.py --batch=32 --size=7 --rounds=5

Times the jitted forward pass and the forward and backward pass (`jax.vjp`) of a 7x7 SAME conv,
128 -> 2048 channels (configs/seed.py's conv6; --cin/--cout for others) on a [batch, size, size,
cin] input, the forms in turn in one process, and prints the median seconds of each and their
ratios to the product per row. Run it as main.py runs (malloc on huge pages:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), or the large temporaries fault in every call. --size=7 is conv6's
map at 224x224; --size=12 --width=15 is its map at 384x480.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from sepres_jax import ops


def im2col(x, kernel):
  """The single product over all KxK patches (the form before the product per kernel row)."""
  kh, kw = kernel.shape[:2]
  b, h, w, c = x.shape
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  patches = jnp.stack(
      [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=3)
  return jnp.einsum('bhwpc,pcd->bhwd', patches, kernel.reshape(kh * kw, c, -1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=7)
  parser.add_argument('--width', type=int, default=0)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--cin', type=int, default=128)
  parser.add_argument('--cout', type=int, default=2048)
  args = parser.parse_args()
  shape = (args.batch, args.size, args.width or args.size, args.cin)
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (7, 7, args.cin, args.cout)) * 0.01
  g = jnp.ones(shape[:3] + (args.cout,))
  forms = {'im2col': im2col, 'by rows': lambda x, k: ops.conv(x, k, 'fast_cpu', 'rows'),
           'dft': lambda x, k: ops.conv(x, k, 'fast_cpu', 'dft')}
  calls = {}
  for name, f in forms.items():
    forward = jax.jit(f)
    both = jax.jit(lambda x, k, f=f: jax.vjp(f, x, k)[1](g))
    calls[name] = {'forward': lambda fn=forward: jax.block_until_ready(fn(x, kernel)),
                   'forward+backward': lambda fn=both: jax.block_until_ready(fn(x, kernel))}
    for call in calls[name].values():
      call()
  for name in ('by rows', 'dft'):
    np.testing.assert_allclose(forms[name](x, kernel), im2col(x, kernel), rtol=1e-4, atol=1e-4)
  times = {(n, p): [] for n in calls for p in calls[n]}
  for _ in range(args.rounds):
    for n in calls:
      for p, call in calls[n].items():
        start = time.perf_counter()
        call()
        times[n, p].append(time.perf_counter() - start)
  print(f'conv 7x7 {args.cin}->{args.cout} on {shape}, median of {args.rounds} rounds')
  for p in ('forward', 'forward+backward'):
    a, b, c = (float(np.median(times[n, p])) for n in ('im2col', 'by rows', 'dft'))
    print(f'{p:17s} im2col {a:.4f} s  by rows {b:.4f} s  dft {c:.4f} s  '
          f'(by rows / im2col {a / b:.2f}x, dft / by rows {b / c:.2f}x)')


if __name__ == '__main__':
  main()
