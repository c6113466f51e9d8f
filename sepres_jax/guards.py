"""Guards of a training run: a stop request (SIGTERM, SIGINT) and the watch for non-finite steps.

Both are read only at step boundaries, so a stopped run saves a consistent checkpoint and a
diverged state is never saved.
"""

import signal
import threading
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np


class StoppedBeforeTraining(KeyboardInterrupt):
  """A stop request that came during start-up (one process): nothing to save. A KeyboardInterrupt,
  so that no `except Exception` on the way (a file read's) turns it into another error."""


class StopRequest:
  """Turns SIGTERM and SIGINT into a flag the loop reads at step boundaries.

  Before the loop's first step (`started`), a single process stops at once (StoppedBeforeTraining).
  A second signal while the first is being handled stops at once (KeyboardInterrupt). Across
  processes the flag is agreed with one tiny all-gather, so every process stops at the same step
  (a preemption may signal only some of them).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: Optional[int] = None
    self.started = False  # Set by the loop at its first step.
    self._single_process = True
    self._previous = {}

  def __enter__(self):
    self._single_process = jax.process_count() == 1
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    if not self.started and self._single_process:
      # Start-up (data, teacher, compilation) has nothing to save: stop now, not at the first
      # step minutes later with an untrained checkpoint that would tie the workdir to this config.
      raise StoppedBeforeTraining(f'{signal.Signals(signum).name} received before the first '
                                  'training step: stopped; no checkpoint was saved')
    logging.warning('%s received: saving a checkpoint at the next step boundary',
                    signal.Signals(signum).name)

  def requested(self) -> bool:
    """Whether any process was asked to stop (a collective when there are several processes)."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


@jax.jit
def _track(first_bad, step, loss_sum, grad_norm):
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  return jnp.where((first_bad < 0) & ~finite, step, first_bad)


class FiniteWatch:
  """Remembers, on the device, the first step whose loss or gradient was not finite.

  `track` adds no host synchronisation; `first_bad` (one small fetch) is read before each
  checkpoint and at log steps.
  """

  def __init__(self):
    self._first_bad = jnp.int32(-1)

  def track(self, step: int, out: dict) -> None:
    """`out` holds the step's 'loss_sum' and 'grad_norm' (per device under pmap)."""
    self._first_bad = _track(self._first_bad, jnp.int32(step), out['loss_sum'], out['grad_norm'])

  def first_bad(self) -> Optional[int]:
    value = int(np.max(np.asarray(jax.device_get(self._first_bad))))
    return None if value < 0 else value


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
  """Whether every float in `tree` (e.g. the parameters about to be saved) is finite."""
  return bool(np.all(np.asarray(jax.device_get(_all_finite(tree)))))
