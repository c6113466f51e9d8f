"""Evaluation of a trained network on a split, and loading trained weights from anywhere.

Scores come from one confusion matrix summed over the whole split, always against the labels at
the images' native resolution: `eval.input=resize` resizes the images to data.image_size and the
logits back, `eval.input=native` pads each image to a multiple of 32 (the padding never counted).
Scores go into eval/<split>.json and pictures into eval/<split>/ (`result_name`: with test-time
averaging or an ensemble, `<split>_<settings>`, so one evaluation keeps another's; an earlier one of
other weights or another eval.input is moved to `<name>.<k>`): iou.png,
confusion_matrix.png, and panels.png (image / prediction / truth) of `eval.num_panels` images, the
lowest per-image mIoU first with `eval.worst_first` (from per-image confusion matrices of the same
pass).
"""

import functools
import json
import os
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sepres_jax import checkpoints
from sepres_jax import input_pipeline
from sepres_jax import metrics
from sepres_jax import models
from sepres_jax import train
from sepres_jax import visualize

WEIGHTS_DIR = 'weights'  # pretrained/<name>/weights: an orbax checkpoint of params + batch_stats.


def load_weights(path: str, state, new_layers_ok: bool = False, which: str = 'best') -> dict:
  """{'params', 'batch_stats'} from a workdir's best (or `which`) checkpoint or a
  pretrained/<name> folder (which holds one set of weights).

  Every array the checkpoint holds must be in this model with the same shape, and (evaluation,
  prediction) every array of this model in the checkpoint. With `new_layers_ok` (fine-tuning a
  grown model, e.g. more `model.fine_skips`), arrays the checkpoint lacks keep their values in
  `state`. Only the weights are read, so any optimiser's checkpoint loads.
  """
  path = os.path.abspath(os.path.expanduser(path))
  stored, location, _, under = _stored_weights(path, which)
  return _fitted(path, state, stored, location, new_layers_ok, under)


def restore_weights(workdir: str, which: str, state) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, step) of the workdir's 'best' or 'latest' checkpoint.

  The same checks as load_weights without `new_layers_ok`: only the weights are read (so a
  checkpoint written with another optimiser still evaluates and predicts), and they must be
  exactly this model's arrays.
  """
  if not os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
    raise train.RunError(f'no checkpoint in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}')
  stored, location, step, under = _stored_weights(workdir, which)
  return _fitted(f'checkpoint {step} in {workdir}', state, stored, location, False, under), step


def _fitted(name: str, state, stored: dict, location: str, new_layers_ok: bool,
            under: Optional[str] = None) -> dict:
  """`state`'s weights with those `stored` holds read from `location` (below its key `under`, if
  given); errors begin with `name`."""
  weights = {'params': state.params, 'batch_stats': state.batch_stats}
  hint = 'pass the config they were trained with'
  if os.path.isfile(os.path.join(name, 'config.py')):  # A pretrained/<name> folder.
    hint += f' (--config={os.path.join(name, "config.py")})'
  try:
    target, new = _prune_to(weights, stored, name)
  except train.RunError as e:
    raise train.RunError(f'{e}; {hint}') from None
  if new and not new_layers_ok:
    more = f' and {len(new) - 3} more' if len(new) > 3 else ''
    raise train.RunError(f'{name}: weights do not fit this model, which also has '
                         f'{", ".join(new[:3])}{more}; {hint}')
  if new:
    logging.info('%s lacks %d arrays of this model; they keep their initial values: %s',
                 name, len(new), ', '.join(new))
  target = checkpoints.abstract_like(target)
  restored = _restore(location, {under: target} if under else target,
                      f'{name}: cannot read its weights')  # Shapes matched: a bad file.
  return _merged(weights, restored[under] if under else restored)


def _not_weights(path):
  return train.RunError(f'{path}: neither a workdir with {checkpoints.CHECKPOINT_DIR}/ nor a '
                        f'pretrained folder with {WEIGHTS_DIR}/')


def _stored_weights(path: str, which: str = 'best'):
  """(the stored {'params', 'batch_stats'} metadata tree, the pytree's directory, the checkpoint's
  step or None for a pretrained folder, the key they are under or None) of `path`.

  A checkpoint of a run with config.ema_decay holds the moving average under 'ema': those are the
  weights its validation scored, so they are the ones read.
  """
  try:
    if os.path.isdir(os.path.join(path, WEIGHTS_DIR)):
      location, step = os.path.join(path, WEIGHTS_DIR), None
      tree = ocp.StandardCheckpointer().metadata(location)
      tree = getattr(tree, 'item_metadata', tree)
      tree = getattr(tree, 'tree', tree)
      if not isinstance(tree, dict):  # An empty or incomplete weights/ folder.
        raise train.RunError(f'{location}: no weights metadata (an incomplete copy, or corrupt)')
    elif os.path.isdir(os.path.join(path, checkpoints.CHECKPOINT_DIR)):
      best_metric = _best_metric(path)
      if which == 'best' and not best_metric:  # Orbax's best_step() would be the latest step.
        raise train.RunError(f'{os.path.join(path, "config.json")}: missing or names no '
                             'best_metric, so the best checkpoint is unknown (restore the file, '
                             'or pass --config.eval.checkpoint=latest)')
      manager = checkpoints.create_manager(path, read_only=True, best_metric=best_metric)
      step = checkpoints.select_step(manager, which)
      if step is None:
        manager.close()
        ckpt_dir = os.path.join(path, checkpoints.CHECKPOINT_DIR)
        if which == 'best' and any(n.isdigit() for n in os.listdir(ckpt_dir)):
          raise train.RunError(f'{ckpt_dir}: no checkpoint records its {best_metric} (their '
                               'metrics are missing: an incomplete copy?); pass '
                               '--config.eval.checkpoint=latest')
        raise train.RunError(f'no checkpoint in {ckpt_dir}')
      tree = manager.item_metadata(step)['state']
      tree = getattr(tree, 'tree', tree)
      if tree is None:
        manager.close()
        raise train.RunError(f'{path}: checkpoint {step} has no metadata (an incomplete copy, '
                             'or corrupt)')
      location = os.path.join(os.fspath(manager.directory), str(step), 'state')
      manager.close()
    else:
      raise _not_weights(path)
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise train.RunError(f'{path}: cannot read its weights ({checkpoints.short_reason(e)})') from None
  ema = tree['ema'] if 'ema' in tree else None
  under = 'ema' if isinstance(ema, dict) and 'params' in ema else None
  tree = tree[under] if under else tree
  return {k: tree[k] for k in ('params', 'batch_stats') if k in tree}, location, step, under


def _prune_to(weights: dict, stored: dict, path: str, prefix: str = ''):
  """(the part of `weights` that `stored` holds, ['the/keys/it/lacks']); raises on a mismatch."""
  out, new = {}, []
  for key in stored:
    if key not in weights:
      raise train.RunError(f'{path}: {prefix}{key} is not in this model')
  for key, value in weights.items():
    name = f'{prefix}{key}'
    if key not in stored:
      new.append(name)
    elif isinstance(value, dict):
      if not isinstance(stored[key], dict):
        raise train.RunError(f'{path}: {name} is an array there, a layer in this model')
      out[key], more = _prune_to(value, stored[key], path, name + '/')
      new += more
    else:
      shape = tuple(getattr(stored[key], 'shape', ()) or ())
      if shape != tuple(value.shape):
        raise train.RunError(f'{path}: {name}: checkpoint shape {shape}, this model {value.shape}')
      out[key] = value
  return out, new


def _restore(location: str, target, failure: str):
  """The arrays of `target` (a part of the stored tree) from the pytree checkpoint at `location`."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      return checkpointer.restore(location, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exception too.
    raise train.RunError(f'{failure} ({checkpoints.short_reason(e)})') from None


def _merged(base: dict, update: dict) -> dict:
  return {k: (_merged(v, update[k]) if isinstance(v, dict) else update[k]) if k in update else v
          for k, v in base.items()}


def _best_metric(workdir: str):
  """The run's best_metric from its config.json; None when the file is missing or names none."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise train.RunError(f'{path}: cannot read the run\'s config ({e})') from None
  return stored.get('best_metric') if isinstance(stored, dict) else None


# model.* fields that change no array's shape and no result: how the layers are computed, and
# the statistics' momentum (training only). The others must equal the weights' own.
FREE_MODEL_FIELDS = ('impl', 'large_conv', 'bn_momentum')


def stored_model_fields(path: str) -> Optional[dict]:
  """The model.* fields that `path`'s weights were trained with: a workdir's config.json, a
  pretrained folder's config.py; None when it has neither (the shapes are still checked)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, 'config.json')):
    try:
      with open(os.path.join(path, 'config.json')) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      return None  # Whoever needs the file (resume, the best metric) says why.
    model = stored.get('model') if isinstance(stored, dict) else None
    return model if isinstance(model, dict) else None
  config_py = os.path.join(path, 'config.py')
  if os.path.isfile(config_py) and os.path.isdir(os.path.join(path, WEIGHTS_DIR)):
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location('_trained_with', config_py)
    try:
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module.get_config().model.to_dict()
    except Exception:  # pylint: disable=broad-except  # Not ours to judge: the shapes still are.
      return None
  return None


def check_trained_with(config, path: str) -> None:
  """A RunError when `path`'s weights were trained with model.* values (bn_epsilon, say) that
  this config changes: such weights load (same shapes) and silently predict other labels."""
  stored = stored_model_fields(path)
  if not stored:
    return
  now = config.model.to_dict()
  for key in sorted(now):
    if key in FREE_MODEL_FIELDS or key not in stored:
      continue
    old, new = stored[key], now[key]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
      old, new = list(old), list(new)
    if old != new:
      if os.path.isdir(os.path.join(path, WEIGHTS_DIR)):  # A pretrained folder: its config.py.
        hint = f'pass the config it was trained with (--config={os.path.join(path, "config.py")})'
      else:
        hint = f'pass the values its {os.path.join(path, "config.json")} holds'
      raise train.RunError(f'{path} was trained with model.{key}={stored[key]!r}, this config has '
                           f'{now[key]!r}; {hint}')


def trained_state(config, workdir: str):
  """The network and its trained state: from config.init_from if set, else the workdir."""
  for path in [config.init_from or workdir, *ensemble_paths(config, workdir)]:
    check_trained_with(config, path)
  mesh = train.make_mesh()
  model = models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(config.seed), mesh)
  if config.init_from:  # eval.checkpoint picks among a workdir's checkpoints there too.
    which = config.eval.checkpoint
    weights = load_weights(config.init_from, state, which=which)
    origin = config.init_from
    folder = os.path.expanduser(origin)
    if which != 'best' and not os.path.isdir(os.path.join(folder, WEIGHTS_DIR)):
      origin += f' ({which} checkpoint)'
    return model, state.replace(**weights), mesh, origin
  weights, step = restore_weights(os.path.abspath(workdir), config.eval.checkpoint, state)
  state = state.replace(**weights)
  return model, state, mesh, f'{config.eval.checkpoint} checkpoint (step {step})'


def members(config, state) -> list[dict]:
  """{'params', 'batch_stats'} of `state`, then of each config.eval.ensemble path.

  Each member is a workdir (its best checkpoint) or a pretrained/<name> folder holding weights of
  the config's network; their class probabilities are averaged (models.averaged_logits).
  """
  own = {'params': state.params, 'batch_stats': state.batch_stats}
  return [own] + [load_weights(p, state) for p in ensemble_paths(config)]


def ensemble_paths(config, workdir: str | None = None) -> list[str]:
  """config.eval.ensemble's paths, in order ([] when unset); one named twice, or the evaluated
  weights again (init_from, else `workdir` when given), would silently count twice: an error."""
  own = config.init_from or workdir
  return checkpoints.path_list(config.eval.get('ensemble', ''), 'eval.ensemble',
                               (own,) if own else ())


def evaluate(config, workdir: str) -> dict:
  """Evaluates config.eval.split; prints the per-class table and writes eval/<result_name>.json."""
  split = config.eval.split
  if config.eval.input not in ('resize', 'native'):
    raise train.RunError(f"config.eval.input must be 'resize' or 'native', got {config.eval.input!r}")
  sources, info = input_pipeline.load_sources(config.data)
  if split not in sources:
    raise train.RunError(f'config.eval.split={split!r}: the data has splits {sorted(sources)}')
  _, state, mesh, origin = trained_state(config, workdir)
  train.check_batch_sizes(config, mesh)
  if jax.process_index() == 0:  # Where the scores go: writable before the work, not after.
    train.check_writable(os.path.join(os.path.abspath(workdir), 'eval'))
  batches = input_pipeline.eval_batches(
      sources[split], config.data, global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      resize=config.eval.input == 'resize', native_labels=config.eval.input == 'resize',
      multiple=mesh.devices.size)
  picker = visualize.PanelPicker(config.eval.get('num_panels', 0),
                                 config.eval.get('worst_first', True))
  loss_sum, weight, cm = 0.0, 0.0, None
  weights = train.class_weights(config, sources.get('train'))
  ensemble = members(config, state)
  if len(ensemble) > 1:
    origin += f' + {len(ensemble) - 1} ensemble member(s): {", ".join(ensemble_paths(config))}'
  scored = train.scored_classes(config)
  passes = eval_pass(state, mesh, batches, weights, config.eval.flip,
                     config.eval.scales, ensemble[1:])
  for batch, sums, per_example in passes:
    loss_sum += float(sums['loss_sum'])
    weight += float(sums['weight'])
    cm = sums['confusion'].astype(np.int64) if cm is None else cm + sums['confusion']
    for k in np.flatnonzero(batch['valid']):  # This process's examples; -1 labels never count.
      image_miou = metrics.scores_from_confusion(per_example['confusion'][k],
                                                 num_scored=scored)['miou']
      picker.offer(image_miou, int(batch['index'][k]), per_example['pred'][k])
  names = list(info.class_names)[:scored]
  scores = metrics.scores_from_confusion(cm, names, scored)
  scores['loss'] = loss_sum / max(weight, 1.0)
  scores.update({'split': split, 'num_images': len(sources[split]), 'checkpoint': origin,
                 'input': config.eval.input, 'dtype': str(config.dtype),
                 'flip': bool(config.eval.flip),
                 'scales': [float(s) for s in config.eval.scales],
                 'ensemble': ensemble_paths(config),
                 'confusion_matrix': cm.tolist(), 'class_names': names})
  picked = picker.picked()
  scores['panels'] = [{'index': i, 'miou': m} for m, i, _ in picked]
  print(f'{split}: {len(sources[split])} images at native resolution ({config.eval.input}), {origin}')
  print(metrics.format_table(scores))
  if jax.process_index() == 0:
    out_dir = os.path.join(os.path.abspath(workdir), 'eval')
    name = result_name(config, split)
    path = os.path.join(out_dir, f'{name}.json')
    try:
      os.makedirs(out_dir, exist_ok=True)
      _keep_earlier(out_dir, name, scores)
      # Strict JSON: a class absent from both labels and predictions has IoU null, not NaN.
      text = json.dumps(_nan_to_none(scores), indent=1, default=_json_default, allow_nan=False)
      # Through a temporary file: a full disk or a kill keeps the scores written before.
      train._write_json_atomic(path, text)  # pylint: disable=protected-access
    except OSError as e:
      raise train.RunError(f'{path}: cannot write the scores ({e.strerror or e})') from None
    logging.info('Wrote %s', path)
    pictures = visualize.evaluation_pictures(os.path.join(out_dir, name), scores, cm, info,
                                             picked, sources[split])
    print(f'wrote {path} and {len(pictures)} pictures into {os.path.join(out_dir, name)}')
  return scores


# Scores of other weights, input or activation dtype: kept, not replaced.
KEPT_FIELDS = ('checkpoint', 'input', 'dtype')


def _keep_earlier(out_dir: str, name: str, scores: dict) -> Optional[str]:
  """Moves eval/<name>.json and eval/<name>/ to <name>.<k>.json and <name>.<k>/ (the first free
  k) when they hold scores of other weights (`checkpoint`: another checkpoint, step or init_from),
  another `input` (resize/native) or `dtype`, so that comparing them keeps both; the same evaluation
  again replaces its own. Returns the new name, or None when nothing was moved."""
  path = os.path.join(out_dir, f'{name}.json')
  try:
    with open(path) as f:
      earlier = json.load(f)
  except (OSError, ValueError):  # None yet, or unreadable: replaced as before.
    return None
  if not isinstance(earlier, dict) or all(earlier.get(k, scores[k]) == scores[k]
                                          for k in KEPT_FIELDS):  # Older files lack 'dtype'.
    return None
  k = 1
  while any(os.path.exists(os.path.join(out_dir, f'{name}.{k}{ext}')) for ext in ('.json', '')):
    k += 1
  kept = f'{name}.{k}'
  if os.path.isdir(os.path.join(out_dir, name)):
    os.replace(os.path.join(out_dir, name), os.path.join(out_dir, kept))
  os.replace(path, os.path.join(out_dir, f'{kept}.json'))
  what = ', '.join(f'{f} {earlier[f]}' for f in KEPT_FIELDS if f in earlier)
  print(f'kept the earlier scores ({what}) as {os.path.join(out_dir, kept)}.json')
  return kept


def result_name(config, split: str) -> str:
  """The name of evaluate's files for these settings: `<split>` for one network's plain forward
  pass, else with the averaging added (`test_ens2_flip_x0.75-1-1.25`), so that one evaluation
  does not overwrite another's scores."""
  parts = [split]
  others = ensemble_paths(config)
  if others:
    parts.append(f'ens{len(others) + 1}')
  if config.eval.flip:
    parts.append('flip')
  scales = [float(s) for s in config.eval.scales]
  if scales != [1.0]:
    parts.append('x' + '-'.join(f'{s:g}' for s in scales))
  return '_'.join(parts)


def eval_step_per_example(state, batch, others=(), *, weights=None, flip=False, scales=(1.0,)):
  """train.eval_step's sums, plus each example's predicted classes and confusion matrix.

  Per-example confusion matrices give per-image scores (worst images first) in the same pass.
  `others`: more members' {'params', 'batch_stats'}, averaged with the state's (an ensemble).
  """
  variables = [{'params': state.params, 'batch_stats': state.batch_stats}, *others]
  logits = models.averaged_logits(state.apply_fn, variables, batch['image'], flip, scales)
  logits = train.logits_at_label_size(logits, batch['label'])
  k = logits.shape[-1]
  loss_sum, weight = metrics.cross_entropy(logits, batch['label'], weights)
  preds = jnp.argmax(logits, -1)
  cms = jax.vmap(lambda p, l: metrics.confusion_matrix(p, l, k))(preds, batch['label'])
  sums = {'loss_sum': loss_sum, 'weight': weight, 'confusion': cms.sum(0)}
  return sums, {'pred': preds.astype(jnp.uint8 if k <= 256 else jnp.int32), 'confusion': cms}


def eval_pass(state, mesh, batches, weights=None, flip=False, scales=(1.0,), others=()):
  """Yields (host batch, summed metrics, this process's per-example outputs) for every batch.

  Runs under jit over `mesh` whatever config.parallelism (the state is replicated either way).
  `others`: more ensemble members' weights (see eval_step_per_example).
  """
  others = tuple(others)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  w = None if weights is None else jnp.asarray(weights)
  step = jax.jit(functools.partial(eval_step_per_example, weights=w, flip=flip,
                                   scales=tuple(scales)),
                 out_shardings=(replicated, data))
  for batch in batches:
    device_batch = {k: jax.make_array_from_process_local_data(data, batch[k])
                    for k in ('image', 'label')}
    sums, per_example = step(state, device_batch, others)
    yield batch, jax.device_get(sums), jax.tree.map(lambda x: _process_local(x, mesh), per_example)


def _process_local(x, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded array."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, jax.sharding.PartitionSpec('data')))


def _nan_to_none(x):
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  if isinstance(x, (float, np.floating)) and not np.isfinite(x):
    return None
  return x


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  raise TypeError(type(x))
