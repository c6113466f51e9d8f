"""Orbax checkpoints of a run: the latest (for resuming) and the best by a validation metric.

Each checkpoint holds two items: `state` (the TrainState arrays) and `meta` (JSON: epoch, plateau
and early-stopping state, history). The data position is the step: training batch n depends only
on (seed, n), so a resumed run's iterator starts at its checkpoint's step and continues at exactly
the next batch, with any number of processes or data workers. Orbax writes each step into a
temporary folder and renames it when complete, so a half-written checkpoint is never restored
(leftover temporary folders of a killed run are removed when the next run opens the manager).
"""

import os
import re
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or does not fit; the message is one line for the user."""


def metric_mode(name: str) -> str:
  """'min' for losses, 'max' for accuracies and IoUs."""
  return 'min' if name.endswith('loss') else 'max'


def create_manager(workdir: str, best_metric: Optional[str] = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager in <workdir>/checkpoints keeping the latest step and the best by `best_metric`."""
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
  keep = [policies.LatestN(n=1)]
  best_fn = None
  mode = 'max'
  if best_metric:
    mode = metric_mode(best_metric)
    best_fn = lambda m: m[best_metric]
    keep.append(policies.BestN(get_metric_fn=best_fn, reverse=(mode == 'min'), n=1,
                               keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      best_fn=best_fn, best_mode=mode, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler(),
                     # Checkpoints written before 2026-12-05 also hold the data iterator's
                     # position; it is now the step itself (input_pipeline.train_iterator).
                     'data': grain.checkpoint.CheckpointHandler()})


def save(manager, step: int, state, meta: dict, metrics: Optional[dict] = None) -> None:
  """Starts an asynchronous save of `step`; `metrics` ranks it for the best checkpoint.

  A failure (of this save, or of the previous one still being written) raises CheckpointError
  naming the step that failed; the complete checkpoints already on disk are left as they were.
  """
  wait(manager)  # orbax waits for the previous save anyway; this names its step if it failed.
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  try:
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, step, e) from e


def wait(manager) -> None:
  """Waits for the asynchronous save in flight; its failure raises CheckpointError."""
  step = manager.latest_step()  # The step in flight, if any: orbax lists it when the save starts.
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, step, e) from e


def _save_error(manager, step: Optional[int], e: BaseException) -> CheckpointError:
  which = 'a checkpoint' if step is None else f'checkpoint {step}'
  return CheckpointError(f'could not save {which} in {manager.directory} ({short_reason(e)}); '
                         'the previous checkpoints are intact')


def short_reason(e: BaseException) -> str:
  """The useful part of an orbax/tensorstore error: the OS's words, without the store's spec."""
  while type(e) is Exception and e.__cause__ is not None:  # pylint: disable=unidiomatic-typecheck
    e = e.__cause__  # orbax wraps a read's error in a bare Exception that says less.
  text = ' '.join(str(e).split()) or type(e).__name__
  text = text.split(' [tensorstore_spec')[0]
  m = re.search(r'(Failed[^\[]*?: )?([^:\[]*(File too large|No space left on device|Permission '
                r'denied|Read-only file system|Disk quota exceeded)[^\[]*)', text)
  if m:
    text = m.group(2).strip()
  return text[:300]


def restore(manager, step: int, abstract_state) -> tuple[Any, dict]:
  """Restores (state, meta) of `step` into `abstract_state`'s shapes and shardings.

  A state of another shape raises CheckpointError naming the first array that differs; nothing is
  written. (The data position needs no restoring: the training iterator starts at `step`.)
  """
  try:
    stored = manager.item_metadata(step)['state']
    stored = getattr(stored, 'tree', stored)
  except Exception:  # pylint: disable=broad-except  # Unreadable: restore itself says why.
    stored = None
  else:
    if stored is None:  # Its _METADATA is gone: say so, as evaluate does.
      raise CheckpointError(f'checkpoint {step} in {manager.directory} has no metadata (an '
                            'incomplete copy, or corrupt); use another --workdir')
  mismatch = stored is not None and first_mismatch(stored, abstract_state)
  if mismatch:
    raise CheckpointError(f'checkpoint {step} in {manager.directory} holds another model '
                          f'({mismatch}); use another --workdir, or the config it was trained with')
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exception too.
    # The shapes matched above, so this is a file that is missing, cut short or corrupt.
    raise CheckpointError(f'checkpoint {step} in {manager.directory} cannot be read '
                          f'({short_reason(e)})') from e
  return restored['state'], restored['meta']


def first_mismatch(stored, abstract_state) -> Optional[str]:
  """'path: checkpoint shape vs model shape' of the first differing array of a checkpoint's
  state metadata tree `stored`, or None."""
  flat_stored, flat_model = _flat_shapes(stored), _flat_shapes(abstract_state)
  averaged = [any(k.startswith('ema/') for k in flat) for flat in (flat_stored, flat_model)]
  if averaged[0] != averaged[1]:
    return ('written with' if averaged[0] else 'written without') + (
        ' a moving average of the weights; resume with the config.ema_decay it was started with')
  for key in sorted(set(flat_stored) | set(flat_model)):
    if not key.startswith(('params/', 'batch_stats/')):
      continue  # Optimizer state mirrors the parameters; its layout is left to restore.
    if key not in flat_stored:
      return f'{key} is not in the checkpoint'
    if key not in flat_model:
      return f'{key} is not in this model'
    a, b = flat_stored[key], flat_model[key]
    if a is not None and b is not None and a != b:
      return f'{key}: checkpoint shape {a}, this model {b}'
  return None


def _flat_shapes(tree) -> dict:
  """'params/conv6/kernel' -> shape, whatever the containers (dicts, dataclasses, tuples)."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    out['/'.join(name(k) for k in path)] = None if shape is None else tuple(shape)
  return out


def select_step(manager, which: str) -> Optional[int]:
  """The step of the 'best' or 'latest' checkpoint, or None when there is none."""
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    return manager.best_step()
  raise ValueError(f"eval.checkpoint must be 'best' or 'latest', got {which!r}")


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


def path_list(value: str, field: str = '', taken: tuple[str, ...] = ()) -> list[str]:
  """The comma-separated paths of a config field (eval.ensemble, distill.teacher), in order.

  With `field` (its name, for the message), a path named twice, or naming one of `taken` (e.g.
  init_from's weights), raises CheckpointError: averaged weights would silently count it twice.
  """
  paths = [p.strip() for p in str(value).split(',') if p.strip()]
  if field:
    seen = {os.path.realpath(os.path.expanduser(t)) for t in taken if t}
    for path in paths:
      real = os.path.realpath(os.path.expanduser(path))
      if real in seen:
        with_taken = (' (in the list, or as the weights it adds to: init_from or the workdir)'
                      if any(taken) else '')
        raise CheckpointError(f'config.{field}: {path} is named twice{with_taken}: each member '
                              'counts once')
      seen.add(real)
  return paths
