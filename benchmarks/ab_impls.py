"""The whole train step (forward and backward), or inference, of each `model.impl`, timed in turns.

    python benchmarks/ab_impls.py --batch=32 --rounds=6 --impls=fast_cpu,native_cpu
    python benchmarks/ab_impls.py --batch=32 --rounds=30 --impls=native_cpu --against=HEAD~1

An A/B in one process: every round runs each impl's compiled step once, in an order that reverses
from one round to the next, so a change in this shared machine's load hits them alike; prints the
median seconds per step and each impl's speed relative to the first: the ratio of the medians,
the median of the rounds' ratios (paired) and the fastest step (`--series`: every round's too).
One round's steps vary by about 10% on this machine, and the same code timed against itself gave
0.93x, 0.97x and 1.00x in three runs of 10-12 rounds (2026-12-04): a change of a few percent
needs 30 rounds or more. With --against=REV each impl also runs as that git revision's sepres_jax
(its package extracted by `git archive` and imported beside this one), listed first, so that a
change is timed against the code before it. The network is configs/seed.py's (224x224, 12
outputs), on random data; `--shipped` takes the shipped weights' network instead, at the size of
its training crops (both read from pretrained/camvid_sepres_w192_h512/config.py; `--batch=8` is
its batch):

    python benchmarks/ab_impls.py --shipped --batch=8 --rounds=8 --impls=native_cpu --against=HEAD~1

`--infer` times inference instead (the class of every pixel, at the config's
`benchmark.infer_size`, 384x480), as `--mode=benchmark` measures it:

    python benchmarks/ab_impls.py --infer --batch=8 --rounds=20 --impls=native_cpu --against=HEAD~1

Like main.py, it restarts itself with glibc's malloc on transparent huge pages
(sepres_jax/host_memory.py) unless `--small_pages` is given; unlike main.py's default, malloc still
returns freed memory (start it with host_memory.KEEP in GLIBC_TUNABLES to time that too).

Each `--compiler_options=JSON` adds each impl compiled with those XLA options (a JSON object, e.g.
'{"xla_cpu_prefer_vector_width": 512}'; `XLA_FLAGS=--help` lists them) to the same rounds.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from configs import seed
from sepres_jax import host_memory
from sepres_jax import metrics
from sepres_jax import models
from sepres_jax import train
import shipped  # pylint: disable=g-bad-import-order


def package_at(rev, into):
  """The models module of git revision `rev`'s sepres_jax, imported from a copy under `into`."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  archive = subprocess.run(['git', 'archive', rev, 'sepres_jax'], cwd=root, check=True,
                           capture_output=True).stdout
  subprocess.run(['tar', '-x', '-C', into], input=archive, check=True)
  # Its compiled kernels register under other FFI names: XLA refuses a second library's handler
  # under a name this checkout's kernels already hold.
  native_py = os.path.join(into, 'sepres_jax', 'native.py')
  if os.path.exists(native_py):
    with open(native_py) as f:
      text = f.read()
    with open(native_py, 'w') as f:
      f.write(text.replace("'sepres_", "'rev_sepres_"))
  ours = {k: sys.modules.pop(k) for k in list(sys.modules)
          if k == 'sepres_jax' or k.startswith('sepres_jax.')}
  sys.path.insert(0, into)
  try:
    return importlib.import_module('sepres_jax.models')
  finally:
    sys.path.remove(into)
    for k in [k for k in sys.modules if k == 'sepres_jax' or k.startswith('sepres_jax.')]:
      del sys.modules[k]
    sys.modules.update(ours)


def timed_in_turns(fns, rounds):
  """{name: [seconds of each round]} of calling each of `fns` (name -> function of no
  arguments that blocks until its result is ready) once a round, `rounds` times.

  The order alternates (ABBA...): run in one fixed order, identical steps timed 7% apart
  (2026-12-04, HEAD against itself, the first listed faster), as what one step frees or leaves
  in the caches changes the next one's time.
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return times


def compiled_step(impl, config, images, labels, network=models, options=None, infer=False):
  config = config.copy_and_resolve_references()
  config.model.impl = impl
  model = network.create_model(config, train.num_outputs(config))
  variables = model.init(jax.random.key(2), images[:1])
  if infer:  # The benchmark's inference: the class of every pixel.
    predict = jax.jit(lambda v, x: jax.numpy.argmax(model.apply(v, x, train=False), -1))
    predict = predict.lower(variables, images).compile(compiler_options=options)
    jax.block_until_ready(predict(variables, images))
    return lambda: jax.block_until_ready(predict(variables, images))

  def loss(params, batch_stats, images, labels):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                            mutable=['batch_stats'])
    total, count = metrics.cross_entropy(logits, labels)  # The train step's loss and gradient.
    return total / count

  args = (variables['params'], variables['batch_stats'], images, labels)
  step = jax.jit(jax.grad(loss)).lower(*args).compile(compiler_options=options)
  jax.block_until_ready(step(*args))
  return lambda: jax.block_until_ready(step(*args))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--shipped', action='store_true',
                      help="the shipped network at its crop size (--size is then ignored)")
  parser.add_argument('--infer', action='store_true',
                      help="time inference (configs' benchmark.infer_size, 384x480) instead of "
                      'the train step; --size is then ignored')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--series', action='store_true', help="print every round's seconds too")
  parser.add_argument('--impls', default='fast_cpu,native_cpu')
  parser.add_argument('--against', default='', help='a git revision to time each impl against')
  parser.add_argument('--compiler_options', action='append', default=[], type=json.loads,
                      help='a JSON object of XLA options to time each impl with (repeatable)')
  parser.add_argument('--small_pages', action='store_true',
                      help="keep malloc's 4 KB pages (main.py's config.host_huge_pages=False)")
  args = parser.parse_args()
  if not args.small_pages:  # As main.py runs: see sepres_jax/host_memory.py.
    print('host memory:', host_memory.restart_with_huge_pages(), flush=True)
  config = shipped.config() if args.shipped else seed.get_config()
  if args.infer:
    h, w = tuple(config.benchmark.infer_size)
  else:
    h, w = tuple(config.data.image_size) if args.shipped else (args.size, args.size)
  images = jax.random.normal(jax.random.key(0), (args.batch, h, w, 3))
  labels = jax.random.randint(jax.random.key(1), (args.batch, h, w), 0, train.num_outputs(config))
  steps = {}
  with tempfile.TemporaryDirectory() as tmp:
    old = package_at(args.against, tmp) if args.against else None
    for impl in args.impls.split(','):
      if old:
        steps[f'{impl}@{args.against}'] = compiled_step(impl, config, images, labels, old,
                                                        infer=args.infer)
      steps[impl] = compiled_step(impl, config, images, labels, infer=args.infer)
      for options in args.compiler_options:
        steps[f'{impl}+{json.dumps(options)}'] = compiled_step(
            impl, config, images, labels, options=options, infer=args.infer)
  impls = list(steps)
  times = timed_in_turns(steps, args.rounds)
  if args.series:
    for impl in impls:
      print(impl, ' '.join(f'{t:.3f}' for t in times[impl]))
  base = float(np.median(times[impls[0]]))
  print(f"{'shipped' if args.shipped else 'seed'} network, "
        f"{'inference' if args.infer else 'train step'}, batch {args.batch}, {h}x{w}, "
        f'median of {args.rounds} rounds')
  width = max(24, *map(len, impls))
  for impl in impls:
    t = float(np.median(times[impl]))
    paired = float(np.median(np.divide(times[impls[0]], times[impl])))
    print(f'{impl:<{width}} {t:.3f} s/step  {args.batch / t:6.1f} img/s  {base / t:.3f}x  '
          f'(paired {paired:.3f}x, fastest {min(times[impl]):.3f} s)')


if __name__ == '__main__':
  main()
