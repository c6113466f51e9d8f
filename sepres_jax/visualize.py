"""Pictures of the data, the training and the model's output, in the dataset's own colours.

`--mode=visualize` draws, with `visualize.what`:
  'data'   for `visualize.num_images` images of `visualize.split` (spread evenly over it) into
           <workdir>/pictures/data/<split>/: <stem>_masks.png (one binary mask per class),
           <stem>_labels.png (image beside its coloured label map), <stem>_resize.png (image and
           label before and after the plain resize to data.image_size: training without crops, and
           resized validation), then
           class_frequencies.png (pixel share of every class over the whole split) and legend.png;
  'curves' <workdir>/pictures/training_curves.png from <workdir>/history.json (also drawn at the
           end of every training run that completes, stopped early or not);
  'all'    both, the curves only when history.json exists.
Training writes `visualize.num_tensorboard_images` fixed validation images with their predictions
to TensorBoard each epoch (`ValidationPictures`); evaluation draws IoU bars, the confusion matrix
and prediction panels (`evaluation_pictures`). Drawing itself lives in sepres_jax/drawing.py.
"""

import heapq
import json
import os

from absl import logging
import numpy as np

from sepres_jax import drawing
from sepres_jax import input_pipeline

PICTURES_DIR = 'pictures'


def visualize(config, workdir: str):
  """--mode=visualize; returns None (exit status 0) or raises a one-line error."""
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  what = config.visualize.what
  if what not in ('all', 'data', 'curves'):
    raise train.RunError(f"config.visualize.what must be 'all', 'data' or 'curves', got {what!r}")
  history = os.path.join(os.path.abspath(workdir), 'history.json')
  if what == 'curves' and not os.path.isfile(history):
    raise train.RunError(f'{history}: no such file (train first, or pass the run\'s --workdir)')
  if what in ('all', 'data'):
    draw_data(config, workdir)
  if what == 'curves' or os.path.isfile(history):
    try:
      path = training_curves(workdir)
    except (ValueError, TypeError) as e:  # json's errors; not a list of epoch records of numbers.
      raise train.RunError(f'{history}: not a history of epochs ({e})') from None
    if path is None and what == 'curves':
      raise train.RunError(f'{history}: no epoch recorded yet')
    if path is not None:
      print(f'wrote {path}')


# ---------------------------------------------------------------------------------------------
# The data.
# ---------------------------------------------------------------------------------------------

def draw_data(config, workdir: str) -> list[str]:
  """Class masks, label panels and resize comparisons of a few images; the class frequencies."""
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  split = config.visualize.split
  sources, info = input_pipeline.load_sources(config.data)
  if split not in sources:
    raise train.RunError(f'config.visualize.split={split!r}: the data has splits {sorted(sources)}')
  source = sources[split]
  out_dir = os.path.join(os.path.abspath(workdir), PICTURES_DIR, 'data', split)
  names, colors = list(info.class_names), info.colors
  size = tuple(int(s) for s in config.data.image_size)
  written = []
  for i in spread(len(source), config.visualize.num_images):
    example = source[int(i)]
    stem = _stem(example, i)
    image, label = example['image'], input_pipeline.preprocess_label(example['label'])
    written.append(drawing.save_class_masks(image, label, names,
                                            os.path.join(out_dir, f'{stem}_masks.png')))
    written.append(drawing.save_label_panel(image, label, colors, names,
                                            os.path.join(out_dir, f'{stem}_labels.png'),
                                            title=f'{split}: {stem}'))
    # What a resize feeds the network (training without crops, resized validation): the shared
    # preprocessing, back to uint8. With data.augment.crop, training takes scaled random crops.
    resized = drawing.to_uint8(input_pipeline.preprocess_image(image, config.data, size)[..., :3])
    written.append(drawing.save_resize_comparison(
        image, label, resized, input_pipeline.preprocess_label(example['label'], size), colors,
        names, os.path.join(out_dir, f'{stem}_resize.png')))
  counts = class_pixel_counts(source, len(names))
  written.append(drawing.save_class_frequencies(
      counts, names, colors, os.path.join(out_dir, 'class_frequencies.png'),
      title=f'{split}: class pixel frequencies ({len(source)} images, {int(counts.sum()):,} '
            'pixels)'))
  written.append(drawing.save_legend(names, colors, os.path.join(out_dir, 'legend.png')))
  print(f'wrote {len(written)} pictures into {out_dir}')
  return written


def spread(n: int, k: int) -> list[int]:
  """k indices spread evenly over range(n), first and last included."""
  k = max(0, min(int(k), n))
  return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())) if k else []


def class_pixel_counts(source, num_labels: int) -> np.ndarray:
  """Pixels per label value 0..num_labels-1 over a split (values above count as the last)."""
  counts = np.zeros(num_labels, np.int64)
  for i in range(len(source)):
    label = np.asarray(source[i]['label']).reshape(-1)
    counts += np.bincount(np.minimum(label, num_labels - 1), minlength=num_labels)[:num_labels]
  return counts


def _stem(example, index) -> str:
  name = example.get('file_name', b'')
  name = name.decode() if isinstance(name, bytes) else str(name)
  return os.path.splitext(os.path.basename(name))[0] or f'{index:05d}'


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------

def training_curves(workdir: str):
  """<workdir>/pictures/training_curves.png from history.json; the path, or None without one."""
  workdir = os.path.abspath(workdir)
  try:
    with open(os.path.join(workdir, 'history.json')) as f:
      history = json.load(f)
  except FileNotFoundError:
    return None
  if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
    raise ValueError('expected a list of epoch records')
  if not history:
    return None
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      metric = json.load(f).get('best_metric', 'val_miou')
  except (OSError, ValueError, AttributeError):  # Missing, not JSON, or not an object.
    metric = 'val_miou'
  best = [r for r in history if r.get('best') and metric in r]
  title = f'{os.path.basename(workdir)}: {len(history)} epochs'
  if best:
    title += f', best {metric} {best[-1][metric]:.4g} (epoch {best[-1]["epoch"]})'
  path = drawing.save_training_curves(history, os.path.join(workdir, PICTURES_DIR,
                                                            'training_curves.png'), title=title)
  logging.info('Wrote %s', path)
  return path


class ValidationPictures:
  """A few fixed validation images; after each epoch, image | prediction | truth in TensorBoard.

  The images are preprocessed as validation feeds them to the network (resized to
  data.image_size with data.eval_resize or eval.input='resize', else native padded to a multiple
  of 32, each its own, as validation pads it), stacked once into one batch per padded shape: the
  forward pass compiles once per shape (once for CamVid).
  """

  def __init__(self, config, source, info, apply_fn):
    from sepres_jax import predict  # pylint: disable=g-import-not-at-top
    from sepres_jax import train  # pylint: disable=g-import-not-at-top
    resized = train.validation_resizes(config)
    size = tuple(int(s) for s in config.data.image_size) if resized else None
    self.colors = info.colors
    self.images, self.labels = [], []
    for i in spread(len(source), config.visualize.num_tensorboard_images):
      example = source[i]
      self.images.append(input_pipeline.preprocess_image(example['image'], config.data, size))
      self.labels.append(input_pipeline.preprocess_label(example['label'], size))
    padded = [predict.pad_to_multiple(im) for im in self.images]
    groups = {}  # Padded shape -> indices of the images padded to it.
    for k, im in enumerate(padded):
      groups.setdefault(im.shape, []).append(k)
    self.batches = [(members, np.stack([padded[k] for k in members]))
                    for members in groups.values()]
    self.forward = predict.Forward(apply_fn)

  def __len__(self):
    return len(self.images)

  def write(self, writer, state, epoch: int) -> None:
    if not self.images:
      return
    self.forward.load({'params': state.params, 'batch_stats': state.batch_stats})
    ids = {}
    for members, batch in self.batches:
      for k, pred in zip(members, self.forward.class_ids(self.forward.logits(batch))):
        ids[k] = pred
    for k, (image, label) in enumerate(zip(self.images, self.labels)):
      h, w = label.shape
      strip = drawing.prediction_strip(image, ids[k][:h, :w], label, self.colors)
      writer.add_image(f'val_predictions/{k}', strip, epoch, dataformats='HWC')


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------

class PanelPicker:
  """Keeps, in one pass, the predictions of the n worst-scoring examples (or of the first n)."""

  def __init__(self, n: int, worst_first: bool):
    self.n, self.worst_first = max(0, int(n)), worst_first
    self._kept = []  # Heap of (-score, index, prediction) when worst_first, else a list.

  def offer(self, score: float, index: int, prediction) -> None:
    if not self.n or not np.isfinite(score):
      return
    item = (-score, index, np.array(prediction))  # A copy: the batch buffer is reused.
    if not self.worst_first:  # The split's first n, in whatever order the batches come.
      self._kept.append(item)
      if len(self._kept) > self.n:
        self._kept.remove(max(self._kept, key=lambda t: t[1]))
    elif len(self._kept) < self.n:
      heapq.heappush(self._kept, item)
    elif score < -self._kept[0][0]:
      heapq.heapreplace(self._kept, item)

  def picked(self) -> list[tuple[float, int, np.ndarray]]:
    """(score, index, prediction): worst first, or in the split's order."""
    items = sorted(self._kept, key=lambda t: (t[0], -t[1]), reverse=True) if self.worst_first \
        else sorted(self._kept, key=lambda t: t[1])
    return [(-s, i, p) for s, i, p in items]


def evaluation_pictures(out_dir: str, scores: dict, cm, info, picked, source) -> list[str]:
  """iou.png, confusion_matrix.png and panels.png (image / prediction / truth, void black)."""
  names, colors = list(info.class_names), info.colors
  k = np.asarray(cm).shape[0]
  split = scores.get('split', '')
  written = [
      drawing.save_iou_bars(scores['per_class'], os.path.join(out_dir, 'iou.png'),
                            miou=scores['miou'], colors=colors,
                            title=f'{split}: IoU per class, {scores.get("checkpoint", "")}'),
      drawing.save_confusion_matrix(cm, names[:k], os.path.join(out_dir, 'confusion_matrix.png'),
                                    title=f'{split}: confusion matrix (rows sum to 1)'),
  ]
  if picked:
    images, preds, labels, titles = [], [], [], []
    for score, index, pred in picked:
      example = source[index]
      label = input_pipeline.preprocess_label(example['label'])
      h, w = label.shape
      images.append(example['image'])
      preds.append(pred[:h, :w])  # Native evaluation pads bottom/right: crop it off.
      labels.append(label)
      titles.append(f'{_stem(example, index)}: mIoU {score:.3f}')
    written.append(drawing.save_panels(images, preds, labels, colors, names,
                                       os.path.join(out_dir, 'panels.png'), titles=titles))
  return written
