"""The camvid_best train step with the Lovasz-softmax loss in XLA's form and as the compiled kernel.

    python benchmarks/lovasz_ab.py --rounds=8

An A/B in one process: every round runs both compiled gradients (cross-entropy + weight x Lovasz,
the shipped network: widths 24-192, a 512-channel head, fine skips, native_cpu) once on the same
random batch, so a change in this shared machine's load hits them alike; prints the median seconds
of each and the compiled kernel's speed relative to the XLA form (the code before it), and the
Lovasz loss alone (value and gradient) the same way.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from sepres_jax import metrics
from sepres_jax import models
from sepres_jax import train
import shipped  # pylint: disable=g-bad-import-order


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--height', type=int, default=352)
  parser.add_argument('--width', type=int, default=480)
  parser.add_argument('--weight', type=float, default=5.0, help='lovasz_weight')
  parser.add_argument('--rounds', type=int, default=8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  images = jax.numpy.asarray(rng.uniform(-1, 1, (args.batch, args.height, args.width, 3)),
                             np.float32)
  labels = jax.numpy.asarray(rng.integers(0, 12, (args.batch, args.height, args.width)), np.int32)
  config = shipped.config()
  config.model.impl = 'native_cpu'
  model = models.create_model(config, train.num_outputs(config))
  variables = model.init(jax.random.key(0), images[:1])
  params, batch_stats = variables['params'], variables['batch_stats']

  def step(use_native):
    def loss(p):
      logits, _ = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                              mutable=['batch_stats'])
      ce, pixels = metrics.cross_entropy(logits, labels)
      lovasz, count = metrics.lovasz_softmax(logits, labels, use_native=use_native)
      return ce / pixels + args.weight * lovasz / count
    return jax.jit(jax.grad(loss)).lower(params).compile(), params

  def alone(use_native):
    logits = jax.numpy.asarray(rng.normal(size=(*labels.shape, 11)), np.float32)
    f = lambda x: metrics.lovasz_softmax(x, labels, use_native=use_native)[0]
    return jax.jit(jax.value_and_grad(f)).lower(logits).compile(), logits

  for name, make in (('train step', step), ('Lovasz loss alone', alone)):
    fns = {'xla': make(False), 'native': make(True)}
    times = {k: [] for k in fns}
    for _ in range(args.rounds + 1):  # The first round warms up and is dropped.
      for k, (f, x) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times[k].append(time.perf_counter() - start)
    med = {k: float(np.median(v[1:])) for k, v in times.items()}
    wins = sum(a > b for a, b in zip(times['xla'][1:], times['native'][1:]))
    print(f'{name}: XLA form {med["xla"]:.3f} s, compiled {med["native"]:.3f} s, '
          f'{med["xla"] / med["native"]:.3f}x (compiled faster in {wins} of {args.rounds} rounds)')


if __name__ == '__main__':
  main()
