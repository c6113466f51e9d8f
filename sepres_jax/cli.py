"""Dispatch of main.py's modes, and the rule that user errors are one line, not a traceback."""

import sys

from absl import logging

from sepres_jax import checkpoints
from sepres_jax import config_check
from sepres_jax import models
from sepres_jax import train
from sepres_jax.data.camvid import DataError

# OSError: a path that cannot be made or written (read-only, a file where a folder goes, disk
# full); its message names the path.
USER_ERRORS = (train.RunError, checkpoints.CheckpointError, DataError, OSError,
               models.ModelConfigError, config_check.ConfigError)


class _QuietLibraries:
  """Drops INFO lines of the libraries (orbax logs every file it renames); keeps warnings and
  errors, as one line each: a failure they log is raised to us too and said once, below."""

  def filter(self, record) -> bool:
    if '/sepres_jax/' in record.pathname or 'main.py' in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno > 20


def _quiet_unraisable(unraisable):
  """Drops the 'Event loop is closed' errors of a failed asynchronous save's late writes.

  When one write of an orbax save fails, orbax closes its event loop while tensorstore's other
  writes are still finishing; each then reports (to sys.unraisablehook) that it could not call
  back. The failure itself is raised to us and reported as one line, so these are noise.
  """
  e = unraisable.exc_value
  if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def _tolerant_output():
  """File names that are not UTF-8 (Python keeps their bytes as surrogates) print as \\x
  escapes: under a strict UTF-8 stdout a line naming one was a UnicodeEncodeError traceback."""
  for stream in (sys.stdout, sys.stderr):
    if hasattr(stream, 'reconfigure'):
      try:
        stream.reconfigure(errors='backslashreplace')
      except (ValueError, OSError):  # A stream that refuses (closed, or not a text stream).
        pass


def run(mode: str, config, workdir: str, verbose: bool = False) -> int:
  """Runs one mode; returns the exit status."""
  _tolerant_output()
  if not verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _quiet_unraisable
  try:
    config_check.check(mode, config)
    return _dispatch(mode, config, workdir) or 0
  except USER_ERRORS as e:
    if verbose:
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    logging.flush()
    sys.stderr.write(f'error: {msg}\n')  # One write: the line stays whole beside other threads.
    sys.stderr.flush()
    return 1


def _dispatch(mode, config, workdir):
  """Each mode lives in its own module, imported only when used."""
  # pylint: disable=g-import-not-at-top
  if mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode == 'evaluate':
    from sepres_jax import evaluate
    evaluate.evaluate(config, workdir)
  elif mode == 'visualize':
    from sepres_jax import visualize
    return visualize.visualize(config, workdir)
  elif mode == 'predict':
    from sepres_jax import predict
    return predict.predict(config, workdir)
  elif mode == 'export':
    from sepres_jax import export
    return export.export(config, workdir)
  elif mode == 'summary':
    from sepres_jax import summary
    return summary.summary(config)
  elif mode == 'verify':
    from sepres_jax import verify
    return verify.verify(config)
  elif mode == 'benchmark':
    from sepres_jax import benchmark
    return benchmark.benchmark(config)
  else:
    raise train.RunError(f'unknown mode {mode!r}')
