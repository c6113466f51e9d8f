"""Distillation: a trained model's averaged predictions on the training images as soft targets.

With `config.distill.weight` > 0 and `config.distill.teacher` (a workdir or a pretrained/<name>
folder holding weights of this run's architecture, or several comma-separated: an ensemble whose
probabilities are averaged, as `eval.ensemble` averages them), each training image is predicted
once, before the first step, at its native size the way --mode=evaluate predicts (`eval.input`),
averaged over `distill.flip` and `distill.scales` (a teacher with test-time augmentation, which
one forward pass of the student then learns to match). The probabilities are kept as uint8 per
pixel and class (11 bytes a pixel for CamVid: 0.7 GB for its 367 training images) and go through
the same scale, crop and flip as the labels. The loss adds `weight` times the cross-entropy of the student's
softmax against them, over the pixels the labels count (crop padding excluded, and void where it is ignored).

Only training images are predicted, so the protocol holds: val/ still selects, test/ only reports.
With `distill.cache` (default on) the targets are kept in `<workdir>/distill_targets.npz` (zlib;
one file per process in a multi-process run) beside a fingerprint of what they depend on: the
teachers' weights, the training images, the model and data settings, `distill.flip`,
`distill.scales` and `eval.input`. A resumed run whose fingerprint matches loads them instead of
predicting again; any difference, or a file that cannot be read, recomputes them (logged) and
writes the file anew (atomically, so an interrupted write leaves no half file behind).
"""

import hashlib
import json
import os
import time

from absl import logging
import cv2
import jax
import jax.numpy as jnp
import numpy as np

from sepres_jax import checkpoints
from sepres_jax import metrics
from sepres_jax import models

SOFT_KEY = 'soft'


def enabled(config) -> bool:
  d = config.get('distill')
  if not d or not float(d.get('weight', 0.0)):
    return False
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  if float(d.weight) < 0:
    raise train.RunError(f'config.distill.weight must be >= 0, got {d.weight}')
  if not checkpoints.path_list(config.distill.teacher, 'distill.teacher'):
    raise train.RunError('config.distill.weight > 0 needs config.distill.teacher (a workdir or a '
                         'pretrained/<name> folder)')
  return True


class SoftTargets:
  """A training source whose examples also hold the teacher's uint8 probabilities [H, W, K]."""

  def __init__(self, parent, probs):
    self.parent = parent
    self.probs = probs

  def __len__(self):
    return len(self.parent)

  def __getitem__(self, i):
    return dict(self.parent[i], **{SOFT_KEY: self.probs[i]})

  def __repr__(self):
    return f'SoftTargets({self.parent!r})'


def cache_path(workdir: str) -> str:
  name = 'distill_targets.npz'
  if jax.process_count() > 1:  # Workdirs may be shared between hosts: one file each.
    name = f'distill_targets.{jax.process_index()}.npz'
  return os.path.join(workdir, name)


# config.data fields that change where or how fast the data is read, not the targets.
_NOT_IN_FINGERPRINT = ('augment', 'manual_dir', 'cache_dir', 'cache_decoded_mb', 'num_threads',
                       'num_workers', 'prefetch')


def fingerprint(config, variables, source) -> str:
  """A digest of everything the teacher's targets depend on (not the paths it was read from)."""
  h = hashlib.sha256()
  data = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
  # The kernels' form (model.impl, model.large_conv) gives the same numbers (resuming may change
  # it); the activations' dtype does not.
  model = {k: v for k, v in config.model.to_dict().items() if k not in ('impl', 'large_conv')}
  settings = {'data': data, 'model': model, 'dtype': str(config.dtype), 'input': config.eval.input,
              'flip': bool(config.distill.flip),
              'scales': [float(s) for s in config.distill.scales], 'count': len(source)}
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  for member in variables:
    for leaf in jax.tree.leaves(member):
      leaf = np.asarray(leaf)
      h.update(str((leaf.shape, leaf.dtype)).encode())
      h.update(leaf.tobytes())
  for i in range(len(source)):
    image = np.ascontiguousarray(source[i]['image'])
    h.update(str(image.shape).encode())
    h.update(image.tobytes())
  return h.hexdigest()


def load_cached(path: str, key: str, count: int):
  """The cached targets when `path` holds them for `key`, else None (logged why)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      if str(z['key']) != key:  # The key covers the image count too.
        logging.info('Distillation targets in %s are for another teacher, data or settings: '
                     'computing them again', path)
        return None
      return [z[f'p{i}'] for i in range(count)]
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Distillation targets in %s could not be read (%s): computing them again',
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None


def save_cached(path: str, key: str, probs) -> None:
  """Writes the targets atomically; a failure (a full disk) is logged and training goes on."""
  tmp = path + '.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, key=np.asarray(key), count=np.asarray(len(probs)),
                          **{f'p{i}': p for i, p in enumerate(probs)})
    os.replace(tmp, path)
    logging.info('Wrote the distillation targets to %s (%.0f MB)', path,
                 os.path.getsize(path) / 2**20)
  except OSError as e:
    logging.warning('Could not write the distillation targets to %s: %s', path, e)
    if os.path.exists(tmp):
      os.remove(tmp)


def teacher_probabilities(config, source, mesh, workdir: str | None = None) -> list[np.ndarray]:
  """The teacher's uint8 class probabilities of every example of `source`, at its native size;
  read from and written to `workdir`'s cache when given and `distill.cache` is on."""
  # Imported here: input_pipeline and augment import this module for its helpers.
  from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sepres_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from sepres_jax import predict  # pylint: disable=g-import-not-at-top
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  d = config.distill
  model = models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(0), mesh)
  teachers = checkpoints.path_list(config.distill.teacher, 'distill.teacher')
  for p in teachers:
    evaluate.check_trained_with(config, p)
  variables = [evaluate.load_weights(p, state) for p in teachers]
  path = cache_path(workdir) if workdir and d.cache else None
  if path:
    key = fingerprint(config, variables, source)
    cached = load_cached(path, key, len(source))
    if cached is not None:
      logging.info('Distillation targets of %d training images read from %s', len(cached), path)
      return cached
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  flip, scales = bool(d.flip), tuple(float(s) for s in d.scales)
  native = config.eval.input == 'native'
  size = tuple(int(s) for s in config.data.image_size)

  @jax.jit
  def probabilities(variables, image):
    logits = models.averaged_logits(model.apply, variables, image, flip, scales)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  start = time.time()
  out = []
  for i in range(len(source)):
    rgb = np.asarray(source[i]['image'])
    h, w = rgb.shape[:2]
    if native:
      x = predict.pad_to_multiple(input_pipeline.preprocess_image(rgb, config.data))
    else:
      x = input_pipeline.preprocess_image(rgb, config.data, size)
    p = np.asarray(probabilities(variables, jax.device_put(x[None], replicated)))[0]
    if native:
      p = p[:h, :w]
    elif p.shape[:2] != (h, w):
      p = cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR)
    out.append(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8))
    if (i + 1) % 50 == 0:
      logging.info('Distillation targets: %d of %d images, %.0f s', i + 1, len(source),
                   time.time() - start)
  logging.info('Distillation targets of %d training images from %s in %.0f s', len(out),
               ', '.join(teachers), time.time() - start)
  if path:
    save_cached(path, key, out)
  return out


def with_teacher(config, source, mesh, workdir: str | None = None):
  """`source` with soft targets when distillation is on, else `source` itself."""
  if not enabled(config):
    return source
  return SoftTargets(source, teacher_probabilities(config, source, mesh, workdir))


def resize_soft(soft, size):
  """uint8 [H, W, K] -> [h, w, K] resized bilinearly (cv2 keeps K channels, K <= 512)."""
  h, w = size
  if soft.shape[:2] == (h, w):
    return soft
  out = cv2.resize(np.ascontiguousarray(soft), (w, h), interpolation=cv2.INTER_LINEAR)
  return out.reshape(h, w, soft.shape[-1])


def soft_cross_entropy(logits, soft, labels, num_classes: int):
  """(sum over counted pixels of -sum_k q_k log p_k, pixels counted); q = the uint8 targets
  renormalised to 1 (their rounding), p = softmax(logits)."""
  q = soft.astype(jnp.float32)
  q = q / jnp.maximum(jnp.sum(q, -1, keepdims=True), 1.0)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  mask = metrics.valid_mask(labels, num_classes)
  per_pixel = -jnp.sum(q * log_p, -1)
  return jnp.sum(jnp.where(mask, per_pixel, 0.0)), jnp.sum(mask, dtype=jnp.float32)
