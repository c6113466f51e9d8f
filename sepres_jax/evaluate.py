"""Evaluation of a trained network on a split, and loading trained weights from anywhere.

Scores come from one confusion matrix summed over the whole split, at the images' native
resolution (padded to a multiple of 32, the padding never counted) unless `data.eval_resize`.
"""

import json
import os

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from sepres_jax import checkpoints
from sepres_jax import input_pipeline
from sepres_jax import metrics
from sepres_jax import models
from sepres_jax import train

WEIGHTS_DIR = 'weights'  # pretrained/<name>/weights: an orbax checkpoint of params + batch_stats.


def load_weights(path: str, state) -> dict:
  """{'params', 'batch_stats'} from a workdir's best checkpoint or a pretrained/<name> folder."""
  path = os.path.abspath(os.path.expanduser(path))
  target = checkpoints.abstract_like({'params': state.params, 'batch_stats': state.batch_stats})
  if os.path.isdir(os.path.join(path, WEIGHTS_DIR)):
    try:
      return ocp.StandardCheckpointer().restore(os.path.join(path, WEIGHTS_DIR), target)
    except (ValueError, KeyError) as e:
      raise train.RunError(f'{path}: weights do not fit this model ({_first_line(e)})') from None
  if os.path.isdir(os.path.join(path, checkpoints.CHECKPOINT_DIR)):
    restored, _ = restore_state(path, 'best', state)
    return {'params': restored.params, 'batch_stats': restored.batch_stats}
  raise train.RunError(f'{path}: neither a workdir with {checkpoints.CHECKPOINT_DIR}/ nor a '
                       f'pretrained folder with {WEIGHTS_DIR}/')


def restore_state(workdir: str, which: str, state):
  """(state, step) of the workdir's 'best' or 'latest' checkpoint, restored into `state`'s form."""
  manager = checkpoints.create_manager(workdir, read_only=True, best_metric=_best_metric(workdir))
  step = checkpoints.select_step(manager, which)
  if step is None:
    raise train.RunError(f'no checkpoint in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}')
  try:
    restored, _ = checkpoints.restore(manager, step, checkpoints.abstract_like(state))
  except (ValueError, KeyError) as e:
    raise train.RunError(f'checkpoint {step} in {workdir} does not fit this model '
                         f'({_first_line(e)})') from None
  manager.close()
  return restored, step


def _best_metric(workdir: str):
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return json.load(f).get('best_metric')
  except OSError:
    return None


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def trained_state(config, workdir: str):
  """The network and its trained state: from config.init_from if set, else the workdir."""
  mesh = train.make_mesh()
  model = models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(config.seed), mesh)
  if config.init_from:
    return model, state.replace(**load_weights(config.init_from, state)), mesh, config.init_from
  state, step = restore_state(os.path.abspath(workdir), config.eval.checkpoint, state)
  return model, state, mesh, f'{config.eval.checkpoint} checkpoint (step {step})'


def evaluate(config, workdir: str) -> dict:
  """Evaluates config.eval.split; prints the per-class table and writes eval/<split>.json."""
  split = config.eval.split
  if config.eval.input not in ('resize', 'native'):
    raise train.RunError(f"config.eval.input must be 'resize' or 'native', got {config.eval.input!r}")
  sources, info = input_pipeline.load_sources(config.data)
  if split not in sources:
    raise train.RunError(f'config.eval.split={split!r}: the data has splits {sorted(sources)}')
  _, state, mesh, origin = trained_state(config, workdir)
  train.check_batch_sizes(config, mesh)
  stepper = train.Stepper(config, mesh, train.class_weights(config))
  batches = input_pipeline.eval_batches(
      sources[split], config.data, global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      resize=config.eval.input == 'resize', native_labels=config.eval.input == 'resize')
  scores = train.evaluate_split(stepper, stepper.to_step_state(state), batches)
  cm = scores.pop('confusion')
  names = list(info.class_names)[:train.num_outputs(config)]
  scores.update(metrics.scores_from_confusion(cm, names))
  scores.update({'split': split, 'num_images': len(sources[split]), 'checkpoint': origin,
                 'confusion_matrix': cm.tolist(), 'class_names': names})
  print(f'{split}: {len(sources[split])} images at native resolution ({config.eval.input}), {origin}')
  print(metrics.format_table(scores))
  if jax.process_index() == 0:
    out_dir = os.path.join(os.path.abspath(workdir), 'eval')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{split}.json'), 'w') as f:
      json.dump(scores, f, indent=1, default=_json_default)
    logging.info('Wrote %s', os.path.join(out_dir, f'{split}.json'))
  return scores


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  raise TypeError(type(x))
