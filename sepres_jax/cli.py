"""Dispatch of main.py's modes, and the rule that user errors are one line, not a traceback."""

import sys

from absl import logging

from sepres_jax import train
from sepres_jax.data.camvid import DataError

USER_ERRORS = (train.RunError, DataError, FileNotFoundError, NotADirectoryError)


class _QuietLibraries:
  """Drops INFO lines of the libraries (orbax logs every file it renames); keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or '/sepres_jax/' in record.pathname or 'main.py' in record.pathname


def run(mode: str, config, workdir: str, verbose: bool = False) -> int:
  """Runs one mode; returns the exit status."""
  if not verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if mode == 'train':
      train.train_and_evaluate(config, workdir)
    elif mode == 'evaluate':
      from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate(config, workdir)
    else:
      raise train.RunError(f'unknown mode {mode!r}')
  except USER_ERRORS as e:
    if verbose:
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {msg}', file=sys.stderr)
    logging.flush()
    return 1
  return 0
