"""sepres-jax against the same network in PyTorch and Keras, measured in one run on one machine.

    python benchmarks/compare.py --torch_python=/tmp/venv-torch/bin/python \
        --keras_python=/tmp/venv-keras/bin/python --rounds=2

Runs, in turn and `--rounds` times over (so that a change in the machine's load hits every row
alike), `main.py --mode=benchmark` at batch 32 and at batch 8 with `--config` (configs/seed.py),
benchmarks/pytorch_reference.py, and benchmarks/keras_reference.py with and without XLA. Each
run is a fresh process. Prints a Markdown table of the median over rounds of each figure and the
ratio of sepres-jax's to each framework's, then one JSON line with every run's figures. A
framework whose interpreter is not given is left out. Standard library only.

main.py restarts itself with glibc's malloc on transparent huge pages (sepres_jax/host_memory.py;
the frameworks run as they start, with malloc's defaults). `--huge_pages` adds rows for PyTorch
and Keras started with the same GLIBC_TUNABLES=glibc.malloc.hugetlb=1, to see what that setting
alone is worth to each.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _last_json(cmd, env=None):
  out = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, check=False,
                       env=None if env is None else dict(os.environ, **env))
  for line in reversed(out.stdout.splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise SystemExit(f'{" ".join(cmd)} printed no JSON line (exit {out.returncode}): '
                   f'{(out.stderr.strip().splitlines() or [""])[-1]}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--python', default=sys.executable, help="sepres-jax's interpreter")
  parser.add_argument('--torch_python', default='')
  parser.add_argument('--keras_python', default='')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--huge_pages', action='store_true',
                      help='also run PyTorch and Keras with glibc.malloc.hugetlb=1')
  args = parser.parse_args()

  ours = [args.python, 'main.py', f'--config={args.config}', '--mode=benchmark',
          f'--config.benchmark.repeats={args.repeats}', '--config.eval_batch_size=8']
  runs = {'sepres-jax b32': ours + ['--config.batch_size=32'],
          'sepres-jax b8': ours + ['--config.batch_size=8']}
  ref = ['--repeats', str(args.repeats)]
  if args.torch_python:
    runs['PyTorch'] = [args.torch_python, os.path.join(_HERE, 'pytorch_reference.py')] + ref
  if args.keras_python:
    keras = [args.keras_python, os.path.join(_HERE, 'keras_reference.py')] + ref
    runs['Keras'] = keras
    runs['Keras, jit_compile'] = keras + ['--jit_compile']
  huge = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  envs = {}
  if args.huge_pages:
    for name in ('PyTorch', 'Keras'):
      if name in runs:
        runs[f'{name}, huge pages'] = runs[name]
        envs[f'{name}, huge pages'] = huge

  results = {name: [] for name in runs}
  for r in range(args.rounds):
    for name, cmd in runs.items():
      results[name].append(_last_json(cmd, envs.get(name)))
      print(f'round {r + 1}, {name}: {results[name][-1]}', file=sys.stderr, flush=True)

  def med(name, key):
    return statistics.median(res[key] for res in results[name])

  rows = {'sepres-jax': (med('sepres-jax b8', 'train_images_per_sec'),
                         med('sepres-jax b32', 'train_images_per_sec'),
                         med('sepres-jax b32', 'infer_images_per_sec'))}
  for name in runs:
    if not name.startswith('sepres-jax'):
      rows[name] = tuple(med(name, k) for k in (
          'train_images_per_sec_batch8', 'train_images_per_sec_batch32', 'infer_images_per_sec'))
  ours_row = rows['sepres-jax']
  print('| | train, batch 8 | train, batch 32 | inference 384x480, batch 8 | '
        'sepres-jax / this (b8, b32, infer) |')
  print('| --- | --- | --- | --- | --- |')
  for name, row in rows.items():
    ratio = ', '.join(f'{a / b:.2f}x' for a, b in zip(ours_row, row))
    print(f'| {name} | ' + ' | '.join(f'{v:.1f} img/s' for v in row) +
          f' | {"" if name == "sepres-jax" else ratio} |')
  matmul = med('sepres-jax b32', 'matmul_gflops_per_sec')
  print(f'float32 matmul in the same runs: {matmul:.0f} GFLOP/s; '
        f'{args.rounds} rounds, median of each figure')
  print(json.dumps({'rounds': args.rounds, 'runs': results}))


if __name__ == '__main__':
  main()
