"""Orbax checkpoints of a run: the latest (for resuming) and the best by a validation metric.

Each checkpoint holds three items: `state` (the TrainState arrays), `meta` (JSON: epoch, plateau
and early-stopping state, history) and `data` (the grain iterator's position), so a resumed run
continues at exactly the next batch. Orbax writes each step into a temporary folder and renames it
when complete, so a half-written checkpoint is never restored.
"""

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = 'checkpoints'


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
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


def save(manager, step: int, state, meta: dict, data_iterator=None,
         metrics: Optional[dict] = None) -> None:
  """Starts an asynchronous save of `step`; `metrics` ranks it for the best checkpoint."""
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager, step: int, abstract_state, data_iterator=None) -> tuple[Any, dict]:
  """Restores (state, meta) of `step` into `abstract_state`'s shapes and shardings.

  When `data_iterator` is given its position is restored in place too.
  """
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], restored['meta']


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
