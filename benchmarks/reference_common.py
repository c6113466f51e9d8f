"""What the reference benchmarks share: their command line and their timer (standard library only,
so that each framework's environment can import it)."""

import argparse
import statistics
import time


def parser(doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc.split('\n')[0])
  p.add_argument('--train_batch_sizes', default='8,32')
  p.add_argument('--train_size', default='224,224')
  p.add_argument('--infer_size', default='384,480')
  p.add_argument('--infer_batch_size', type=int, default=8)
  p.add_argument('--num_classes', type=int, default=12)
  p.add_argument('--repeats', type=int, default=5)
  return p


def sizes(text: str) -> tuple:
  return tuple(int(v) for v in text.split(','))


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of fn() after two warm-up calls."""
  for _ in range(2):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
