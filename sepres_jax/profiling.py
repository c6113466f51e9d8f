"""Where a compiled step's time goes, layer by layer.

A few calls of the compiled step run under `jax.profiler`; every XLA operation in the trace is
attributed, through the `op_name` metadata of the compiled HLO, to the network layer that created
it (`stem`, `block1`, ..., `conv6`, `up_final`), forward or backward, or to the loss or the
optimiser and metrics. This is what the per-part table of the README is made from, and what to
read before rewriting a kernel (`--mode=benchmark --config.benchmark.profile=True`).
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

import jax

from sepres_jax import models

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', re.M)
_NETWORK = models.SepResFCN8.__name__  # Scopes read SepResFCN8/... or, traced, jvp(SepResFCN8)/...
_LAYER = re.compile(re.escape(_NETWORK) + r'\)*/(\w+)/')  # A named submodule: stem, conv6, ...
TOP_LEVEL = 'pool/relu/add'  # The network's own operations between its submodules.
_LOSS_WORDS = ('log_softmax', 'take_along_axis', 'cross_entropy', 'logsumexp', 'lovasz')


def op_layers(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata (what created it in the traced program)."""
  return {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(hlo_text)}


def part_of(op_name: str) -> tuple[str, str]:
  """(part, direction) of one operation: e.g. ('conv6', 'backward'), ('loss', 'forward')."""
  backward = 'transpose(' in op_name
  m = _LAYER.search(op_name)
  if m:
    part = m.group(1)
  elif any(w in op_name for w in _LOSS_WORDS):
    part = 'loss'
  elif _NETWORK in op_name:
    part = TOP_LEVEL
  else:
    return 'optimizer+metrics', 'other'
  return part, 'backward' if backward else 'forward'


def time_by_part(trace_events, op_names: dict[str, str], calls: int) -> dict:
  """Seconds per call of every part and direction, from complete ('X') trace events."""
  seconds = collections.defaultdict(float)
  for e in trace_events:
    if e.get('ph') != 'X' or e.get('name') not in op_names:
      continue
    part, direction = part_of(op_names[e['name']])
    seconds[(part, direction)] += e.get('dur', 0) / 1e6 / calls
  table = collections.defaultdict(dict)
  for (part, direction), s in seconds.items():
    table[part][direction] = s
  return dict(table)


def profile(compiled, call: Callable[[], object], calls: int) -> dict:
  """Traces `calls` calls of `call()` (which runs `compiled`) and returns time_by_part's table."""
  op_names = op_layers(compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(call())
    traces = sorted(glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'),
                              recursive=True), key=os.path.getmtime)
    if not traces:
      return {}
    with gzip.open(traces[-1]) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  return time_by_part(events, op_names, calls)


def format_table(table: dict) -> str:
  """The parts, most expensive first, with forward/backward seconds and their share."""
  total = sum(sum(d.values()) for d in table.values()) or 1.0
  rows = sorted(table.items(), key=lambda kv: -sum(kv[1].values()))
  lines = [f"{'part':<20}{'forward s':>11}{'backward s':>12}{'other s':>9}{'share':>8}"]
  for part, d in rows:
    s = sum(d.values())
    lines.append(f"{part:<20}{d.get('forward', 0):>11.4f}{d.get('backward', 0):>12.4f}"
                 f"{d.get('other', 0):>9.4f}{100 * s / total:>7.1f}%")
  lines.append(f"{'attributed total':<20}{total:>32.4f}")
  return '\n'.join(lines)
