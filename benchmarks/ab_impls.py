"""The whole train step (forward and backward) of each `model.impl`, timed in turns in one process.

    python benchmarks/ab_impls.py --batch=32 --rounds=6 --impls=fast_cpu,native_cpu

An A/B in one process: every round runs each impl's compiled step once, so a change in this shared
machine's load hits them alike; prints the median seconds per step and each impl's speed relative
to the first. The network is configs/seed.py's (224x224, 12 outputs), on random data.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from sepres_jax import models


def compiled_step(impl, images, labels):
  model = models.SepResFCN8(num_classes=12, impl=impl)
  variables = model.init(jax.random.key(2), images[:1])

  def loss(params, batch_stats, images, labels):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                            mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  args = (variables['params'], variables['batch_stats'], images, labels)
  step = jax.jit(jax.grad(loss)).lower(*args).compile()
  jax.block_until_ready(step(*args))
  return lambda: jax.block_until_ready(step(*args))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--impls', default='fast_cpu,native_cpu')
  args = parser.parse_args()
  impls = args.impls.split(',')
  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  labels = jax.random.randint(jax.random.key(1), (args.batch, args.size, args.size), 0, 12)
  steps = {impl: compiled_step(impl, images, labels) for impl in impls}
  times = {impl: [] for impl in impls}
  for _ in range(args.rounds):
    for impl, run in steps.items():
      start = time.perf_counter()
      run()
      times[impl].append(time.perf_counter() - start)
  base = float(np.median(times[impls[0]]))
  print(f'batch {args.batch}, {args.size}x{args.size}, median of {args.rounds} rounds')
  for impl in impls:
    t = float(np.median(times[impl]))
    print(f'{impl:<12} {t:.3f} s/step  {args.batch / t:6.1f} img/s  {base / t:.3f}x')


if __name__ == '__main__':
  main()
