"""Training: state, steps and the epoch loop (plateau decay, early stopping, checkpoints, logs).

Data parallel over every device: under `parallelism='jit'` the state is replicated over a Mesh and
the batch sharded on its 'data' axis, so BatchNorm normalises over the global batch; under
`parallelism='pmap'` the same step runs per device with gradients and BatchNorm statistics reduced
over the device axis. Both give the same numbers (tests/test_parallel.py).
"""

import functools
import json
import errno
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
from flax import traverse_util
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sepres_jax import checkpoints
from sepres_jax import distill
from sepres_jax import guards
from sepres_jax import input_pipeline
from sepres_jax import metrics
from sepres_jax import models
from sepres_jax import ops
from sepres_jax import verify

PMAP_AXIS = 'batch'


class TrainState(train_state.TrainState):
  batch_stats: Any
  # {'params', 'batch_stats'}: their moving average when config.ema_decay is set, else None.
  ema: Any = None


def eval_weights(state: TrainState) -> TrainState:
  """The state whose params and batch_stats are the ones to score: the moving average if kept."""
  if state.ema is None:
    return state
  return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


def with_fresh_ema(state: TrainState) -> TrainState:
  """`state` with its moving average (if it keeps one) restarted at its current weights."""
  if state.ema is None:
    return state
  return state.replace(ema=jax.tree.map(jnp.copy, {'params': state.params,
                                                   'batch_stats': state.batch_stats}))


class RunError(RuntimeError):
  """A run cannot go on; its message is one line meant for the user."""


def check_writable(path: str) -> None:
  """Raises OSError naming the place when the folder `path` could not be made or written to (a
  read-only file system, no permission, a file where a folder goes): before the work, not after.
  Creates nothing: a run that then fails leaves no folder behind."""
  place = os.path.abspath(path)
  while not os.path.exists(place):
    place = os.path.dirname(place)
  if not os.path.isdir(place):
    raise NotADirectoryError(errno.ENOTDIR, 'a file, not a folder', place)
  if not os.access(place, os.W_OK):
    raise PermissionError(errno.EACCES, 'cannot write there', place)


# What a resumed run may not change: what its checkpoints hold (the network, its dtype), the data
# they were trained on and its order (data.*, batch_size, seed), how the best is chosen
# (best_metric; eval.input, what validation scores) and what the rules' saved bests measure (the
# monitors). The data's paths and pipeline settings and the kernel forms (same numbers) are free;
# so are the optimiser's and the rules' other fields (a rate lowered for the last epochs, say):
# history.json records each epoch's rate. weight_decay may change, but not to or from 0: the
# optimiser's state has another structure with decay than without.
RESUME_FIXED = ('model.', 'data.', 'dtype', 'batch_size', 'seed', 'best_metric', 'eval.input',
                'eval.ignore_void', 'eval.val_counts_void', 'plateau.monitor',
                'early_stopping.monitor')
RESUME_FREE = ('model.impl', 'model.large_conv', 'data.manual_dir', 'data.cache_dir',
               'data.num_workers', 'data.num_threads', 'data.prefetch', 'data.cache_decoded_mb')


def check_resumed_config(config, workdir: str) -> list[str]:
  """Raises RunError when `workdir` holds a checkpoint trained with other RESUME_FIXED values.

  Compares with the run's config.json (fields it lacks, from an older version, are not compared).
  Returns the other fields that differ, 'key old -> new'; nothing is written.
  """
  path = os.path.join(workdir, 'config.json')
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  if not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
    return []
  if not os.path.isfile(path):  # Written before the first checkpoint: removed or not copied.
    raise RunError(f'{path}: missing, but {ckpt_dir} holds checkpoints: the resume cannot be '
                   'checked against the config they were trained with (restore the file, or use '
                   'another --workdir)')
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f'{path}: cannot read the run\'s config ({e})') from None
  if not isinstance(stored, dict):
    raise RunError(f'{path}: not a JSON object (the run\'s config)')
  stored = traverse_util.flatten_dict(stored, sep='.')
  now = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  changed = [k for k in sorted(stored.keys() & now.keys()) if stored[k] != now[k]]
  fixed = lambda k: k not in RESUME_FREE and any(k == f or (f.endswith('.') and k.startswith(f))
                                                 for f in RESUME_FIXED)
  says = lambda k: f'{k} {stored[k]!r} -> {now[k]!r}'
  refused = [says(k) for k in changed if fixed(k)]
  decay = 'weight_decay'
  if decay in changed and (not stored[decay]) != (not now[decay]):
    refused.append(f'{says(decay)} (to or from 0: the optimiser keeps other state)')
  if refused:
    raise RunError(f'{workdir} holds a run trained with another config: {"; ".join(refused)} '
                   '(resume with its values, as in its config.json, or use another --workdir)')
  return [says(k) for k in changed]


# ---------------------------------------------------------------------------------------------
# Model, loss weights, optimiser and state.
# ---------------------------------------------------------------------------------------------

def num_outputs(config) -> int:
  """Logits per pixel: the real classes, plus void when it is learned as a class."""
  return config.data.num_classes + (0 if config.data.ignore_void else 1)


def validation_resizes(config) -> bool:
  """Whether validation feeds the network images resized to data.image_size (data.eval_resize,
  or eval.input='resize', scored at native size) rather than native images padded to 32."""
  return bool(config.data.eval_resize or config.eval.input == 'resize')


def scored_classes(config, validation: bool = False) -> int:
  """How many of the outputs the scores count: the real classes (void ignored, the CamVid
  protocol), or void too where it is learned as a class (data.ignore_void=False) and either
  eval.ignore_void is off or, for validation during training, eval.val_counts_void is on
  (configs/seed.py: Keras' accuracy counted void). Validation and --mode=evaluate agree otherwise,
  so the best checkpoint is chosen by the measure that is reported."""
  counts_void = not config.eval.ignore_void or (validation and config.eval.val_counts_void)
  return num_outputs(config) if counts_void else config.data.num_classes


def class_weights(config, train_source=None) -> Optional[np.ndarray]:
  """Per-class loss weights from `config.data.class_weights`, or None.

  'median_frequency' (SegNet: median(f) / f_c, f_c = pixels of c / pixels of the images that
  contain c) and 'inverse_log' (ENet: 1 / ln(1.02 + p_c), p_c = share of c among labelled pixels)
  are computed from the training labels; CamVid's median-frequency weights are SegNet's published
  ones.
  """
  spec = config.data.class_weights
  if not spec:
    return None
  if spec == 'median_frequency' and config.data.name == 'camvid':
    from sepres_jax.data import camvid  # pylint: disable=g-import-not-at-top
    w = list(camvid.MEDIAN_FREQUENCY_WEIGHTS)
  elif spec in ('median_frequency', 'inverse_log'):
    if train_source is None:
      raise RunError(f'config.data.class_weights={spec!r} needs the training labels')
    counts, present = input_pipeline.class_pixel_counts(train_source, config.data.num_classes)
    w = list(metrics.frequency_weights(counts, present, spec))
  else:
    try:
      w = [float(v) for v in str(spec).split(',')]
    except ValueError:
      raise RunError(f"config.data.class_weights: expected 'median_frequency', 'inverse_log' or a "
                     f'list of numbers, got {spec!r}') from None
  if len(w) == config.data.num_classes < num_outputs(config):
    w.append(0.0)  # Void learned as a class gets weight 0 unless given.
  if len(w) != num_outputs(config):
    raise RunError(f'config.data.class_weights has {len(w)} values for {num_outputs(config)} classes')
  return np.asarray(w, np.float32)


def schedule_factor(config, total_steps: Optional[int]):
  """Per-step multiplier of the learning rate: linear warm-up, then constant, cosine or polynomial.

  It multiplies the plateau rule's rate, so both can be used together. Without `total_steps`
  (a state built to evaluate, predict or benchmark, never to train a run) the rate is constant.
  """
  kind, warmup = config.schedule, int(config.warmup_steps)
  if kind not in ('constant', 'cosine', 'polynomial'):
    raise RunError(f"config.schedule must be 'constant', 'cosine' or 'polynomial', got {kind!r}")
  if not total_steps:
    kind, warmup = 'constant', 0
  decay_steps = max(int(total_steps or 0) - warmup, 1)

  def factor(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = jnp.minimum((count + 1) / warmup, 1.0) if warmup else 1.0
    t = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
    if kind == 'cosine':
      f = config.end_factor + (1 - config.end_factor) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    elif kind == 'polynomial':
      f = config.end_factor + (1 - config.end_factor) * (1 - t) ** config.poly_power
    else:
      f = 1.0
    return ramp * f
  return factor


def create_optimizer(config, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """RMSprop with its learning rate injected, so the plateau rule can scale it without retracing."""
  factor = schedule_factor(config, total_steps)

  def make(learning_rate):
    rate = lambda count: learning_rate * factor(count)
    in_sqrt = bool(config.get('rmsprop_eps_in_sqrt', True))
    if not config.weight_decay:
      return optax.rmsprop(rate, decay=config.rmsprop_decay, eps=config.rmsprop_eps,
                           eps_in_sqrt=in_sqrt)
    # Decoupled (AdamW-style): the decay joins the update after RMSprop's normalisation, so it
    # shrinks a kernel by rate * weight_decay per step whatever its gradient's size. BatchNorm
    # scales and biases (1-D arrays) are not decayed.
    return optax.chain(
        optax.scale_by_rms(decay=config.rmsprop_decay, eps=config.rmsprop_eps,
                           eps_in_sqrt=in_sqrt),
        optax.add_decayed_weights(config.weight_decay,
                                  mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)),
        optax.scale_by_learning_rate(rate))
  return optax.inject_hyperparams(make)(learning_rate=config.learning_rate)


def input_shape(config, batch: int = 1) -> tuple[int, ...]:
  channels = 6 if config.data.lab else 3
  return (batch, *config.data.image_size, channels)


def create_train_state(config, model, rng, mesh, total_steps: Optional[int] = None) -> TrainState:
  """Initialises the state directly replicated over `mesh` (no host copy of the parameters)."""
  tx = create_optimizer(config, total_steps)

  def init(rng):
    variables = model.init(rng, jnp.zeros(input_shape(config), jnp.float32), train=False)
    ema = None
    if config.get('ema_decay', 0.0):
      if not 0.0 < config.ema_decay < 1.0:
        raise RunError(f'config.ema_decay must be in (0, 1) or 0 (off), got {config.ema_decay}')
      ema = jax.tree.map(jnp.copy, dict(variables))
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'], ema=ema)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(init, out_shardings=replicated)(rng)


# ---------------------------------------------------------------------------------------------
# Update and evaluation steps.
# ---------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, weights=None, label_smoothing: float = 0.0,
               lovasz_weight: float = 0.0, distill_weight: float = 0.0,
               lovasz_native: bool = False, ema_decay: float = 0.0,
               axis_name: Optional[str] = None):
  """One RMSprop step on the mean loss over all counted pixels of the global batch.

  With `lovasz_weight`, the mean per-image Lovasz-softmax loss times it is added to the
  cross-entropy (`lovasz_native`: its compiled kernel, see metrics.lovasz_softmax); with
  `distill_weight` (and the batch's 'soft' targets), the mean cross-entropy
  against the teacher's probabilities times it. The step's 'loss_sum' stays the cross-entropy's
  with the labels (train_loss in the history). With `ema_decay` (and state.ema), the moving
  average moves towards the new weights and BatchNorm statistics by 1 - min(ema_decay,
  (1 + t) / (10 + t)), t the step's index (TensorFlow's ExponentialMovingAverage warm-up).
  """
  def total(x):
    return lax.psum(x, axis_name) if axis_name else x

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'])
    loss_sum, weight = metrics.cross_entropy(logits, batch['label'], weights, label_smoothing)
    # Dividing by the global weight makes the summed per-device gradients the global gradient.
    loss = loss_sum / jnp.maximum(total(weight), 1.0)
    if lovasz_weight:
      lovasz_sum, images = metrics.lovasz_softmax(logits, batch['label'],
                                                  use_native=lovasz_native)
      loss += lovasz_weight * lovasz_sum / jnp.maximum(total(images), 1.0)
    if distill_weight:
      soft_sum, pixels = distill.soft_cross_entropy(logits, batch[distill.SOFT_KEY],
                                                    batch['label'], logits.shape[-1])
      loss += distill_weight * soft_sum / jnp.maximum(total(pixels), 1.0)
    return loss, (logits, updates, loss_sum, weight)

  grads, (logits, updates, loss_sum, weight) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name:
    grads = lax.psum(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  if ema_decay and state.ema is not None:
    t = (state.step - 1).astype(jnp.float32)  # This step's index (apply_gradients counted it).
    d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    new = {'params': state.params, 'batch_stats': state.batch_stats}
    state = state.replace(ema=jax.tree.map(lambda e, w: d * e + (1.0 - d) * w, state.ema, new))
  mask = metrics.valid_mask(batch['label'], logits.shape[-1])
  correct = jnp.sum((jnp.argmax(logits, -1) == batch['label']) & mask, dtype=jnp.float32)
  out = {'loss_sum': loss_sum, 'weight': weight, 'correct': correct,
         'pixels': jnp.sum(mask, dtype=jnp.float32)}
  out = jax.tree.map(total, out)
  out['grad_norm'] = optax.global_norm(grads)
  return state, out


def logits_at_label_size(logits, labels):
  """Logits resized bilinearly to the labels' height and width (native labels of resized images)."""
  label_hw = labels.shape[1:3]
  if logits.shape[1:3] == label_hw:
    return logits
  return jax.image.resize(logits, (logits.shape[0], *label_hw, logits.shape[-1]), 'bilinear')


def eval_step(state: TrainState, batch, *, weights=None, axis_name: Optional[str] = None):
  """Loss sums and the confusion matrix of one batch (padding labelled -1 never counts).

  Labels of another size than the images (native labels of resized images) are scored against
  the logits resized bilinearly to the labels' size.
  """
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  logits = logits_at_label_size(logits, batch['label'])
  loss_sum, weight = metrics.cross_entropy(logits, batch['label'], weights)
  cm = metrics.confusion_matrix(jnp.argmax(logits, -1), batch['label'], logits.shape[-1])
  out = {'loss_sum': loss_sum, 'weight': weight, 'confusion': cm}
  if axis_name:
    out = jax.tree.map(lambda x: lax.psum(x, axis_name), out)
  return out


class Stepper:
  """Compiled train/eval steps and the host<->device moves of one parallelism mode."""

  def __init__(self, config, mesh, weights):
    self.mode = config.parallelism
    self.mesh = mesh
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    w = None if weights is None else jnp.asarray(weights)
    ls = float(config.label_smoothing)
    lw = float(config.lovasz_weight)
    # The Lovasz loss's compiled kernel goes with the network's (model.impl 'native_cpu').
    ln = bool(lw) and ops.resolve_impl(config.model.impl) == 'native_cpu'
    dw = float(config.distill.weight) if distill.enabled(config) else 0.0
    ed = float(config.get('ema_decay', 0.0))
    self.keys = ('image', 'label', distill.SOFT_KEY) if dw else ('image', 'label')
    if self.mode == 'jit':
      self.train = jax.jit(functools.partial(train_step, weights=w, label_smoothing=ls,
                                             lovasz_weight=lw, distill_weight=dw,
                                             lovasz_native=ln, ema_decay=ed),
                           donate_argnums=0, out_shardings=(self.replicated, self.replicated))
      self.eval = jax.jit(functools.partial(eval_step, weights=w),
                          out_shardings=self.replicated)
    elif self.mode == 'pmap':
      if jax.process_count() > 1:  # Its batches and state are placed for one process's devices.
        raise RunError(f'config.parallelism=pmap runs in one process, not {jax.process_count()}; '
                       "use 'jit' (the default) across processes")
      self.train = jax.pmap(
          functools.partial(train_step, weights=w, label_smoothing=ls, lovasz_weight=lw,
                            distill_weight=dw, lovasz_native=ln, ema_decay=ed,
                            axis_name=PMAP_AXIS),
          axis_name=PMAP_AXIS, donate_argnums=0, devices=mesh.devices.flat)
      self.eval = jax.pmap(functools.partial(eval_step, weights=w, axis_name=PMAP_AXIS),
                           axis_name=PMAP_AXIS, devices=mesh.devices.flat)
    else:
      raise RunError(f"config.parallelism must be 'jit' or 'pmap', got {self.mode!r}")

  def batch(self, local: dict) -> dict:
    """Process-local numpy batch -> global device batch (sharded, or stacked per device)."""
    local = {k: local[k] for k in self.keys if k in local}  # Eval batches have no 'soft'.
    if self.mode == 'pmap':
      n = self.mesh.devices.size
      return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), local)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), local)

  def to_step_state(self, state):
    if self.mode == 'pmap':
      n = self.mesh.devices.size
      return jax.tree.map(
          lambda x: jax.device_put(jnp.broadcast_to(x, (n, *x.shape)), self.data_sharding), state)
    return state

  def from_step_state(self, state):
    """The state as checkpointed: replicated over the mesh, whatever the mode."""
    if self.mode == 'pmap':
      return jax.device_put(jax.tree.map(lambda x: x[0], state), self.replicated)
    return state

  def fetch(self, out):
    """Device metrics -> host numpy (one per-device copy under pmap)."""
    out = jax.device_get(out)
    if self.mode == 'pmap':
      out = jax.tree.map(lambda x: x[0], out)
    return out


def evaluate_split(stepper: Stepper, state, batches, num_scored: Optional[int] = None) -> dict:
  """Loss and confusion matrix summed over a whole split, then the scores of its first
  `num_scored` classes (all when None; `scored_classes`)."""
  loss_sum, weight, cm = 0.0, 0.0, None
  for batch in batches:
    out = stepper.fetch(stepper.eval(state, stepper.batch(batch)))
    loss_sum += float(out['loss_sum'])
    weight += float(out['weight'])
    cm = out['confusion'].astype(np.int64) if cm is None else cm + out['confusion']
  scores = metrics.scores_from_confusion(cm, num_scored=num_scored)
  scores['loss'] = loss_sum / max(weight, 1.0)
  scores['confusion'] = cm
  return scores


# ---------------------------------------------------------------------------------------------
# Plateau decay and early stopping, once per epoch.
# ---------------------------------------------------------------------------------------------

class EpochRules:
  """Plateau decay of the learning rate (optax.contrib.reduce_on_plateau) and early stopping.

  Both watch a history key; metrics ending in 'loss' are minimised, the others maximised.
  """

  def __init__(self, config):
    self.config = config
    p = config.plateau
    self.plateau = optax.contrib.reduce_on_plateau(
        factor=p.factor, patience=p.patience, cooldown=p.cooldown, min_scale=p.min_scale,
        # Keras' rule: an improvement beats the best by min_delta (optax wants a tolerance > 0,
        # so min_delta=0, any improvement, is the smallest one that still counts).
        rtol=0.0, atol=max(float(p.min_delta), 1e-12))
    self.plateau_state = self.plateau.init({})
    # Compiled once: run eagerly, its lax.cond was traced and compiled every epoch (0.07-0.1 s).
    self._plateau_update = jax.jit(self.plateau.update)
    self.stop_best = None
    self.stop_wait = 0

  def _signed(self, name, value):
    return value if checkpoints.metric_mode(name) == 'min' else -value

  @property
  def scale(self) -> float:
    return float(self.plateau_state.scale)

  @property
  def stopped_early(self) -> bool:
    """Early stopping has ended the run (a resumed run with a longer patience goes on)."""
    es = self.config.early_stopping
    return es.patience > 0 and self.stop_wait >= es.patience

  def update(self, record: dict) -> tuple[bool, bool]:
    """Feeds one epoch's record; returns (learning rate was cut, stop now)."""
    old = self.scale
    value = self._signed(self.config.plateau.monitor, record[self.config.plateau.monitor])
    _, self.plateau_state = self._plateau_update({}, self.plateau_state, value=jnp.float32(value))
    es = self.config.early_stopping
    stop = False
    if es.patience > 0:
      v = self._signed(es.monitor, record[es.monitor])
      if self.stop_best is None or v < self.stop_best:
        self.stop_best, self.stop_wait = v, 0
      else:
        self.stop_wait += 1
        stop = self.stop_wait >= es.patience
    return self.scale < old, stop

  def state_dict(self) -> dict:
    return {'plateau': {k: np.asarray(v).item() for k, v in self.plateau_state._asdict().items()},
            'stop_best': self.stop_best, 'stop_wait': self.stop_wait}

  def load_state_dict(self, d: dict) -> None:
    saved = dict(d['plateau'])
    # A resume may shorten plateau.patience or cooldown: optax cuts when the count *equals*
    # patience, so a saved count at or past the new one would never cut again. As Keras does
    # (wait >= patience), the next epoch without improvement then cuts.
    p = self.config.plateau
    if int(p.patience) > 0:
      saved['plateau_count'] = min(int(saved['plateau_count']), int(p.patience) - 1)
    saved['cooldown_count'] = min(int(saved['cooldown_count']), int(p.cooldown))
    self.plateau_state = type(self.plateau_state)(**{
        k: jnp.asarray(saved[k], getattr(self.plateau_state, k).dtype)
        for k in self.plateau_state._fields})
    self.stop_best, self.stop_wait = d['stop_best'], d['stop_wait']


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), ('data',))


def check_batch_sizes(config, mesh) -> None:
  n = mesh.devices.size
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % n:
      raise RunError(f'config.{key}={config[key]} is not divisible by the {n} devices')


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  hp = state.opt_state.hyperparams
  old = hp['learning_rate']
  # Same dtype and sharding as before, or the jitted step would compile a second time.
  new = dict(hp, learning_rate=jax.device_put(jnp.asarray(lr, old.dtype), old.sharding))
  return state.replace(opt_state=state.opt_state._replace(hyperparams=new))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on train/, selects on val/; resumes from the latest checkpoint in `workdir`.

  SIGTERM or SIGINT saves a checkpoint at the next step boundary and returns (the record then has
  'stopped': True); during start-up (one process) it stops at once and saves nothing. Returns
  the last epoch's record of the history.
  """
  with guards.StopRequest() as stop:
    logging.info('Starting the run in %s (SIGTERM or Ctrl-C stops it)', workdir)
    try:
      return _train_and_evaluate(config, workdir, stop)
    except guards.StoppedBeforeTraining as e:
      logging.warning('%s', e)
      if jax.process_index() == 0:
        print(f'{e}.', flush=True)
      return {'stopped': True, 'step': 0}


def _train_and_evaluate(config, workdir, stop: guards.StopRequest) -> dict:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  check_writable(workdir)  # Before the data and the model are built, not after.
  config_changes = check_resumed_config(config, workdir)

  # --- Mesh and input ------------------------------------------------------------------------
  mesh = make_mesh()
  check_batch_sizes(config, mesh)
  verify.check_data(config.data)  # Every problem of the folder listed, once, before building.
  sources, info = input_pipeline.load_sources(config.data)
  # Before the teacher, the model and the run's folders: a split smaller than one batch.
  input_pipeline.check_one_batch(len(sources['train']), config.batch_size)
  # Distillation: the teacher's predictions of the training images join them as soft targets.
  train_source = distill.with_teacher(config, sources['train'], mesh, workdir)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(sources['train']), config.batch_size)
  # Validation scores what --mode=evaluate reports (eval.input), so the best checkpoint is chosen
  # by the same measure; data.eval_resize instead scores the resized copies (cheaper, as Keras).
  val_native_labels = not config.data.eval_resize and config.eval.input == 'resize'
  val_batches = functools.partial(
      input_pipeline.eval_batches, sources['val'], config.data,
      global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), resize=validation_resizes(config),
      native_labels=val_native_labels, multiple=mesh.devices.size)

  # --- Model and state -----------------------------------------------------------------------
  axis = PMAP_AXIS if config.parallelism == 'pmap' else None
  model = models.create_model(config, num_outputs(config), bn_axis_name=axis)
  state = create_train_state(config, model, jax.random.key(config.seed), mesh,
                             config.num_epochs * steps_per_epoch)
  stepper = Stepper(config, mesh, class_weights(config, sources['train']))
  rules = EpochRules(config)
  history: list[dict] = []
  epoch = 0

  # --- Checkpoints: resume where the last run stopped ---------------------------------------
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoints.create_manager(workdir, config.best_metric)
  latest = manager.latest_step()
  epoch_sums = None  # Train-metric sums of the part of an epoch done before a mid-epoch save.
  if latest is not None:
    state, meta = checkpoints.restore(manager, latest, checkpoints.abstract_like(state))
    trained_on = meta.get('num_train_examples')  # Absent from checkpoints before 2026-12-05.
    if trained_on is not None and trained_on != len(train_source):
      raise RunError(f'{workdir} was trained on {trained_on} training images, and '
                     f'{config.data.manual_dir or "the data"} has {len(train_source)}: its epochs '
                     'and data order would not continue; use the same data or another --workdir')
    rules.load_state_dict(meta['rules'])
    history, epoch = meta['history'], meta['epoch']
    epoch_sums = meta.get('epoch_sums')
    if is_main:  # A run killed between its last checkpoint and history.json: catch up.
      _write_history(workdir, history)
    logging.info('Resumed from step %d (epoch %d) in %s', latest, epoch, workdir)
  elif config.init_from:
    from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
    state = state.replace(**evaluate.load_weights(config.init_from, state, new_layers_ok=True))
    state = with_fresh_ema(state)  # The average starts at the weights fine-tuned from.
  # Batch n depends only on (seed, n): the iterator starts at the checkpoint's step.
  train_iter = input_pipeline.train_iterator(
      train_source, config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=latest or 0)
  if is_main:
    if latest is not None and config_changes:  # config.json is this run's; keep the one before.
      kept = os.path.join(workdir, f'config.until_step{latest}.json')
      n = 1
      while os.path.exists(kept):  # A start that changed the config and saved no step: keep both.
        n += 1
        kept = os.path.join(workdir, f'config.until_step{latest}.{n}.json')
      # A copy, then the atomic write: a kill between them leaves config.json (the old one), so
      # the next start still compares with it.
      shutil.copyfile(os.path.join(workdir, 'config.json'), kept)
      logging.info('Resumed with %s; the config of steps 1-%d is now %s',
                   '; '.join(config_changes), latest, kept)
    _write_json_atomic(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  writer = _create_writer(workdir) if is_main else None
  pictures = None  # Fixed validation images with their predictions, in TensorBoard each epoch.
  if is_main and config.get('visualize', {}).get('num_tensorboard_images', 0):
    from sepres_jax import visualize  # pylint: disable=g-import-not-at-top
    pictures = visualize.ValidationPictures(config, sources['val'], info, model.apply)

  # --- Guards: no diverged state is saved; a stop request saves and returns -------------------
  watch = guards.FiniteWatch()
  last_saved = latest

  def check_finite(params=None):
    """Raises RunError if a step so far (or `params`, about to be saved) was not finite."""
    bad = watch.first_bad()
    if bad is None and params is not None and not guards.all_finite(params):
      bad = step
    if bad is not None:
      checkpoints.wait(manager)  # The last good checkpoint in flight is completed, not lost.
      if last_saved is None:
        raise RunError(f'non-finite loss or gradient at step {bad}, before the first checkpoint: '
                       f'no checkpoint was saved in {workdir}')
      raise RunError(f'non-finite loss or gradient at step {bad}; nothing after step '
                     f'{last_saved} was saved, the checkpoints in {workdir} are intact')

  def save_mid_epoch():
    nonlocal last_saved
    check_finite(step_state.params)
    part = {k: float(v) for k, v in stepper.fetch(sums).items()} if sums else None
    checkpoints.save(manager, step, stepper.from_step_state(step_state),
                     _meta(epoch, rules, history, len(train_source), part))
    last_saved = step

  def close_run():
    checkpoints.wait(manager)
    manager.close()
    if writer:
      writer.close()

  def stopped():
    if step != last_saved and steps_this_run:
      save_mid_epoch()
    close_run()
    message = f'Stopped at step {step}; run the same command again to resume.'
    if last_saved is None:  # Several processes agree on a stop only at the first step.
      message = f'Stopped before the first training step; nothing was saved in {workdir}.'
    logging.warning(message)
    if is_main:
      print(message, flush=True)
    return dict(record, stopped=True, step=step)

  # --- Epochs --------------------------------------------------------------------------------
  step = int(state.step)
  step_state = stepper.to_step_state(state)
  record = history[-1] if history else {}
  total_steps = config.num_epochs * steps_per_epoch
  factor = schedule_factor(config, total_steps)
  t_run = time.time()
  steps_this_run = 0
  # epoch_time runs from the previous epoch's record to this one's, so it also counts the previous
  # epoch's checkpoint start, pictures and logs: the epochs' times add up to the run's wall time.
  t_record = None
  if rules.stopped_early and epoch < config.num_epochs:
    logging.info('Early stopping ended this run after epoch %d (%s had not improved for %d '
                 'epochs); a longer early_stopping.patience trains on', epoch,
                 config.early_stopping.monitor, rules.stop_wait)
  stop.started = True
  while epoch < config.num_epochs and not rules.stopped_early:
    lr = config.learning_rate * rules.scale
    step_state = stepper.to_step_state(set_learning_rate(stepper.from_step_state(step_state), lr))
    sums = None  # Device-side sums of the epoch's step metrics: no host sync per step.
    if epoch_sums and step > epoch * steps_per_epoch:  # Resumed mid-epoch: exact float32 sums.
      sums = {k: np.float32(v) for k, v in epoch_sums.items()}
    epoch_sums = None
    data_wait = 0.0  # Seconds the loop spent waiting for the input pipeline.
    t_epoch, t_log, n_log = time.time(), time.time(), 0
    start_in_epoch = step - epoch * steps_per_epoch
    for _ in range(start_in_epoch, steps_per_epoch):
      if stop.requested():
        return stopped()
      t_data = time.perf_counter()
      batch = next(train_iter)
      data_wait += time.perf_counter() - t_data
      step_state, out = stepper.train(step_state, stepper.batch(batch))
      summed = {k: out[k] for k in ('loss_sum', 'weight', 'correct', 'pixels')}
      sums = summed if sums is None else jax.tree.map(jnp.add, sums, summed)
      step += 1
      watch.track(step, out)
      steps_this_run += 1
      n_log += 1
      if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
        out = stepper.fetch(out)
        loss = float(out['loss_sum']) / max(float(out['weight']), 1.0)
        check_finite()
        rate = n_log * config.batch_size / (time.time() - t_log)
        eta = (total_steps - step) * (time.time() - t_run) / max(steps_this_run, 1)
        logging.info('epoch %d/%d step %d/%d  loss %.4f  %.1f img/s  ETA %s', epoch + 1,
                     config.num_epochs, step - epoch * steps_per_epoch, steps_per_epoch, loss,
                     rate, _hms(eta))
        if writer:
          writer.add_scalar('train/loss_step', loss, step)
          writer.add_scalar('train/grad_norm', float(out['grad_norm']), step)
          writer.add_scalar('train/images_per_sec', rate, step)
          writer.add_scalar('train/steps_per_sec', n_log / (time.time() - t_log), step)
        t_log, n_log = time.time(), 0
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
          and step % steps_per_epoch):
        save_mid_epoch()
    train_time = time.time() - t_epoch
    sums = {k: float(v) for k, v in stepper.fetch(sums).items()} if sums else {
        'loss_sum': float('nan'), 'weight': 1.0, 'correct': float('nan'), 'pixels': 1.0}

    # --- Validation, rules, checkpoint, logs --------------------------------------------------
    check_finite(step_state.params)
    state = stepper.from_step_state(step_state)
    val = evaluate_split(stepper, eval_weights(step_state), val_batches(),
                         scored_classes(config, validation=True))
    epoch += 1
    now = time.time()
    record = {
        'epoch': epoch, 'step': step, 'learning_rate': lr,
        # The rate of the epoch's last step: the plateau rule's rate times the schedule's factor.
        'step_learning_rate': float(lr * factor(max(step - 1, 0))),
        'train_loss': sums['loss_sum'] / max(sums['weight'], 1.0),
        'train_accuracy': sums['correct'] / max(sums['pixels'], 1.0),
        'val_loss': val['loss'], 'val_accuracy': val['pixel_accuracy'], 'val_miou': val['miou'],
        'val_mean_class_accuracy': val['mean_class_accuracy'],
        'epoch_time': now - (t_record or t_epoch), 'train_time': train_time,
        'data_wait_fraction': data_wait / max(train_time, 1e-9),
    }
    t_record = now
    if not np.isfinite(record['val_loss']):
      checkpoints.wait(manager)
      kept = (f'no checkpoint was saved in {workdir}' if last_saved is None else
              f'nothing after step {last_saved} was saved, the checkpoints in {workdir} are intact')
      raise RunError(f'non-finite validation loss after epoch {epoch} (step {step}); {kept}')
    record['best'] = _is_best(history, config.best_metric, record[config.best_metric])
    lr_cut, early_stop = rules.update(record)
    record['lr_cut'] = lr_cut
    history.append(record)
    last_saved = step
    checkpoints.save(manager, step, state, _meta(epoch, rules, history, len(train_source)),
                     metrics={config.best_metric: float(record[config.best_metric])})
    logging.info('epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f mIoU %.4f | lr %.2e'
                 '%s%s | %.1fs', epoch, record['train_loss'], record['train_accuracy'],
                 record['val_loss'], record['val_accuracy'], record['val_miou'],
                 record['step_learning_rate'],
                 ' | best' if record['best'] else '', ' | lr cut' if lr_cut else '',
                 record['epoch_time'])
    if is_main:
      _write_history(workdir, history)
      for k in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_miou',
                'learning_rate', 'step_learning_rate', 'epoch_time', 'data_wait_fraction'):
        writer.add_scalar(f'epoch/{k}', record[k], epoch)
      if pictures:
        # Process 0 draws alone: a host copy of the (replicated) state, not the global arrays.
        scored = eval_weights(state)
        pictures.write(writer, scored if jax.process_count() == 1 else jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)), scored), epoch)
      writer.flush()
    if early_stop:  # Before a stop request: a stopped run is finished, not to be resumed.
      logging.info('Early stopping after epoch %d: %s has not improved for %d epochs', epoch,
                   config.early_stopping.monitor, config.early_stopping.patience)
      break
    if stop.requested():
      return stopped()

  close_run()
  if is_main:
    from sepres_jax import visualize  # pylint: disable=g-import-not-at-top
    visualize.training_curves(workdir)
  return record


def _meta(epoch, rules, history, num_train, epoch_sums=None) -> dict:
  meta = {'epoch': epoch, 'rules': rules.state_dict(), 'history': history,
          'num_train_examples': int(num_train)}
  if epoch_sums:
    meta['epoch_sums'] = epoch_sums
  return meta


def _better(name, a, b) -> bool:
  return a < b if checkpoints.metric_mode(name) == 'min' else a > b


def _is_best(history, name, value) -> bool:
  """Whether an epoch's `value` of `name` is the best so far, as history.json marks it.

  A tie counts (orbax keeps the latest of equal checkpoints as the best); NaN (a metric with
  nothing to score) never does, nor does it hide a later epoch's value.
  """
  best_so_far = _best_value(history, name)
  return bool(np.isfinite(value)) and (best_so_far is None or
                                       not _better(name, best_so_far, value))


def _best_value(history, name):
  best = None
  for r in history:
    if not np.isfinite(r[name]):
      continue
    if best is None or _better(name, r[name], best):
      best = r[name]
  return best


def _write_json_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file: a crash leaves the old file or the new."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _write_history(workdir, history) -> None:
  _write_json_atomic(os.path.join(workdir, 'history.json'), json.dumps(history, indent=1))


def _create_writer(workdir):
  import tensorboardX  # pylint: disable=g-import-not-at-top
  return tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
