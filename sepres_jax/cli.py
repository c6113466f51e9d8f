"""Dispatch of main.py's modes, and the rule that user errors are one line, not a traceback."""

import sys

from absl import logging

from sepres_jax import checkpoints
from sepres_jax import train
from sepres_jax.data.camvid import DataError

USER_ERRORS = (train.RunError, checkpoints.CheckpointError, DataError, FileNotFoundError,
               NotADirectoryError)


class _QuietLibraries:
  """Drops INFO lines of the libraries (orbax logs every file it renames); keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or '/sepres_jax/' in record.pathname or 'main.py' in record.pathname


def run(mode: str, config, workdir: str, verbose: bool = False) -> int:
  """Runs one mode; returns the exit status."""
  if not verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    return _dispatch(mode, config, workdir) or 0
  except USER_ERRORS as e:
    if verbose:
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {msg}', file=sys.stderr)
    logging.flush()
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
