"""The stem's compiled kernel gradient alone, this checkout's against a git revision's.

    python benchmarks/stem_grad.py --against=HEAD~1 --rounds=15

`native.dense_kernel_grad` (dL/dkernel of the 3x3 stem convolution over 3 input channels) at the
seed network's training shape (32x224x224, 16 outputs) and the shipped network's (8x352x480, 24
outputs), on random data, jitted. Every round runs both versions once, in an order that reverses
from one round to the next; prints the median milliseconds of each, the speed ratio and the
largest difference between the two results relative to the result's largest entry.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from ab_impls import package_at, timed_in_turns  # pylint: disable=g-bad-import-order
from sepres_jax import native


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--against', default='HEAD~1', help='the git revision to time against')
  parser.add_argument('--rounds', type=int, default=15)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    run(package_at(args.against, tmp).ops.native, args)


def run(old, args):
  for b, h, w, cout in [(32, 224, 224, 16), (8, 352, 480, 24)]:
    x = jax.random.normal(jax.random.key(0), (b, h, w, 3))
    g = jax.random.normal(jax.random.key(1), (b, h, w, cout))
    fns = {name: jax.jit(lambda x, g, m=m: m.dense_kernel_grad(x, g, (3, 3, 3, cout)))
           for name, m in [(args.against, old), ('this checkout', native)]}
    results = {name: np.asarray(f(x, g)) for name, f in fns.items()}
    times = timed_in_turns({name: lambda f=f: jax.block_until_ready(f(x, g))
                            for name, f in fns.items()}, args.rounds)
    t_old, t_new = (float(np.median(t)) * 1e3 for t in times.values())
    a, b_ = results.values()
    diff = float(np.abs(a - b_).max() / np.abs(a).max())
    print(f'{b}x{h}x{w}, {cout} outputs: {args.against} {t_old:.1f} ms, this checkout '
          f'{t_new:.1f} ms, {t_old / t_new:.2f}x; largest difference {diff:.1e} of the largest '
          'entry')


if __name__ == '__main__':
  main()
