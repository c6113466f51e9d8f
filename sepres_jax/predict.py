"""Prediction on any images and videos: a file, a folder or a glob -> class ids and overlays.

Images of any size are either padded (bottom/right, with the value 0 that padding has in
evaluation) to a multiple of 32 and the prediction cropped back ('native'), or resized to
`data.image_size` with the logits resized back bilinearly to the input's size ('resize'), exactly
as `--mode=evaluate` scores them, so a prediction here equals the evaluation path's argmax (up to
float rounding: on CPU, `model.large_conv='auto'` computes conv6 another way at a batch of 8 or
more, so a pixel whose two best classes tie to rounding can differ with the batch size).
Grey, RGB, RGBA (alpha dropped), palette and 16-bit PNGs, JPEGs (EXIF orientation applied) and
anything else PIL reads are accepted. Per input `<stem>`, the output folder gets `<stem>.png`
(class ids, uint8, the input's height and width), `<stem>_color.png` and `<stem>_overlay.png`
(`output_stems` numbers an input whose names another input's outputs take). An output never
replaces an input, nor a file predict did not write: the folder is marked with `MARKER` at its
first output, and an unmarked folder holding a file of an output's name is refused.
Videos (by suffix, or files PIL cannot read that OpenCV decodes) are predicted frame by frame into
`<stem>_overlay.mp4` and, with `predict.save_frames`, `<stem>_frames/` (see sepres_jax/video.py).
"""

import glob
import os
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image as PILImage

from sepres_jax import drawing
from sepres_jax import exported
from sepres_jax import input_pipeline
from sepres_jax import models
from sepres_jax import train
from sepres_jax import video
from sepres_jax.data import folder

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm')
SKIPPED_STATUS = 3  # Exit status when some inputs could not be read (the others were predicted).


class Forward:
  """Jitted inference over this process's devices: float images -> logits or class ids.

  The batch is split over the local devices when it divides evenly (else it runs replicated).
  One compilation per input shape; `class_ids` resizes logits to `out_hw` in a second small jit.
  """

  def __init__(self, apply_fn, variables=None, flip: bool = False, scales=(1.0,)):
    devices = np.asarray(jax.local_devices())
    self.mesh = jax.sharding.Mesh(devices, ('data',))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('data'))
    scales = tuple(scales)  # Flip and multi-scale averaging as --mode=evaluate does it.
    self._logits = jax.jit(lambda v, x: models.averaged_logits(apply_fn, v, x, flip, scales))
    self._ids = jax.jit(_ids_at, static_argnums=1)
    self.variables = None
    if variables is not None:
      self.load(variables)

  def load(self, variables) -> None:
    """Uses these {'params', 'batch_stats'} from now on (same shapes: no recompilation)."""
    # The state may span processes: each process uses its own copy of the replicated arrays.
    local = jax.tree.map(lambda x: x.addressable_data(0) if hasattr(x, 'addressable_data') else x,
                         variables)
    self.variables = jax.device_put(local, self.replicated)

  def _put(self, images):
    images = np.asarray(images, np.float32)
    if images.shape[0] % self.mesh.devices.size == 0:
      return jax.device_put(images, self.data_sharding)
    return images

  def logits(self, images):
    """float32 [b, H, W, C] (H, W multiples of 32) -> device logits [b, H, W, classes]."""
    return self._logits(self.variables, self._put(images))

  def class_ids(self, logits, out_hw=None) -> np.ndarray:
    """uint8 [b, h, w] argmax of logits, resized bilinearly to `out_hw` first when it differs."""
    out_hw = tuple(logits.shape[1:3]) if out_hw is None else tuple(int(s) for s in out_hw)
    return np.asarray(self._ids(logits, out_hw))


def _ids_at(logits, out_hw):
  if tuple(logits.shape[1:3]) != out_hw:  # As train.eval_step scores resized inputs.
    logits = jax.image.resize(logits, (logits.shape[0], *out_hw, logits.shape[-1]), 'bilinear')
  return jnp.argmax(logits, -1).astype(jnp.uint8)


def pad_to_multiple(image, multiple: int = input_pipeline.PAD_MULTIPLE) -> np.ndarray:
  """[h, w, C] -> [H, W, C] padded bottom/right with 0, H and W the next multiples."""
  h, w = image.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  return np.pad(image, ((0, ph), (0, pw), (0, 0))) if ph or pw else image


def input_mode(config) -> str:
  key, mode = (('predict.resize', config.predict.resize) if config.predict.resize
               else ('eval.input', config.eval.input))
  if mode not in ('resize', 'native'):
    allowed = "'resize', 'native' or '' (eval.input's)" if key == 'predict.resize' else (
        "'resize' or 'native'")
    raise train.RunError(f'config.{key} must be {allowed}, got {mode!r}')
  return mode


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------

def find_inputs(pattern: str) -> list[str]:
  """An image or video, a folder's images and videos (sorted, not recursive) or a glob's files."""
  if not pattern:
    raise train.RunError('set --config.predict.input=PATH (an image, a video, a folder or a glob)')
  path = os.path.expanduser(pattern)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    suffixes = IMAGE_SUFFIXES + video.VIDEO_SUFFIXES
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith('.') and f.lower().endswith(suffixes)
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
      raise train.RunError(f'{path}: no image or video files ({", ".join(suffixes)}) in the folder')
    return files
  files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
  if not files:
    raise train.RunError(f'{pattern}: no such image, video, folder or glob match')
  return files


def read_rgb(path: str) -> np.ndarray:
  """Any image PIL reads -> uint8 RGB [H, W, 3] as displayed (EXIF orientation applied)."""
  return exported.read_image(path)  # One reader, so exported models see the same pixels.


# The names one input writes beside <stem>: .png (ids), _color.png, _overlay.png or .mp4/.avi
# (video), _frames/ (video frames).
OUTPUT_SUFFIXES = ('', '_color', '_overlay', '_frames')


def output_stems(paths) -> list[str]:
  """Output names: the file stems, numbered (<stem>_2, ...) where one would write another's files.

  Two inputs share a stem (a.jpg, a.png), or one's stem is another's output name (x.png writes
  x_color.png, which is also x_color.png's own id map): the later one is numbered, with a number
  no other input's name already takes (compared without case, as some file systems do): with
  a.jpg, a.png and a_2.png, a.png writes a_3.png.
  """
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  inputs = {stem.casefold() for stem in stems}
  taken = set()
  out = []
  for stem in stems:
    name, n = stem, 1
    while (any((name + s).casefold() in taken for s in OUTPUT_SUFFIXES)
           or (name != stem and name.casefold() in inputs)):
      n += 1
      name = f'{stem}_{n}'
    taken.update((name + s).casefold() for s in OUTPUT_SUFFIXES)
    out.append(name)
  return out


def output_names(stem) -> list[str]:
  """The files and folder one input may write into the output folder."""
  return ([f'{stem}.png', f'{stem}_color.png', f'{stem}_overlay.png', f'{stem}_frames']
          + [f'{stem}_overlay{suffix}' for _, suffix in video.CODECS])


# Written into an output folder with its first output: files there that an output would replace
# are predict's own (an earlier run's), so a later run may replace them.
MARKER = '.sepres-predictions'


def check_inputs_kept(paths, stems, out_dir) -> None:
  """Refuses an output folder where an output would replace an input or a file predict did not
  write (e.g. --config.predict.output naming a folder of ground-truth labels)."""
  outputs = {}
  for path, stem in zip(paths, stems):
    for name in output_names(stem):
      outputs[os.path.realpath(os.path.join(out_dir, name))] = path
  for path in paths:
    if os.path.realpath(path) in outputs:
      raise train.RunError(
          f'{path}: predicting into {out_dir} would overwrite this input with the output of '
          f'{outputs[os.path.realpath(path)]}; set --config.predict.output to another folder')
  if os.path.exists(os.path.join(out_dir, MARKER)):
    return
  for output, path in outputs.items():
    if os.path.lexists(output):
      raise train.RunError(
          f'{output}: predicting {path} into {out_dir} would replace this, which --mode=predict '
          f'did not write (the folder has no {MARKER} file); set --config.predict.output to '
          'another folder')


def claim_output(out_dir) -> None:
  """Creates the output folder (at the first output, so a run that reads nothing leaves nothing)
  and marks it as predict's."""
  os.makedirs(out_dir, exist_ok=True)
  marker = os.path.join(out_dir, MARKER)
  if not os.path.exists(marker):
    with open(marker, 'w') as f:
      f.write('Written by sepres-jax --mode=predict: its outputs here may be replaced by a later '
              'run.\n')


# ---------------------------------------------------------------------------------------------
# The mode.
# ---------------------------------------------------------------------------------------------

def predict(config, workdir: str) -> int:
  """--mode=predict: writes ids, colours and overlays; returns the exit status."""
  mode = input_mode(config)
  paths = find_inputs(config.predict.input)
  out_dir = os.path.abspath(os.path.expanduser(
      config.predict.output or os.path.join(workdir, 'predictions')))
  stems = output_stems(paths)
  check_inputs_kept(paths, stems, out_dir)
  for path, stem in zip(paths, stems):
    if stem != os.path.splitext(os.path.basename(path))[0]:
      print(f'{path}: written as {stem}.png (another input has its name)')
  from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
  _, state, _, origin = evaluate.trained_state(config, workdir)
  train.check_writable(out_dir)  # Before the work, not after it.
  ensemble = evaluate.members(config, state)
  if len(ensemble) > 1:
    origin += f' and {len(ensemble) - 1} ensemble member(s)'
  forward = Forward(state.apply_fn, ensemble, config.eval.flip, config.eval.scales)
  print(f'predicting {len(paths)} file(s) with the {origin}, input {mode}, into {out_dir}')
  done, skipped = predict_files(config, forward, paths, out_dir)
  print(f'predicted {done} of {len(paths)} file(s) into {out_dir}'
        + (f'; skipped {len(skipped)}: {", ".join(skipped)}' if skipped else ''))
  if not done:
    raise train.RunError(f'none of the {len(paths)} input file(s) could be read')
  return SKIPPED_STATUS if skipped else 0


def model_input(config, rgb) -> np.ndarray:
  """uint8 RGB [h, w, 3] -> the model's float32 input: resized ('resize') or padded ('native')."""
  if input_mode(config) == 'resize':
    return input_pipeline.preprocess_image(rgb, config.data, tuple(config.data.image_size))
  return pad_to_multiple(input_pipeline.preprocess_image(rgb, config.data))


def label_maps(config, forward: Forward, rgbs, images=None) -> list[np.ndarray]:
  """uint8 class ids [h, w] of each RGB image, in one batch of predict.batch_size (or fewer).

  `images` are their `model_input`s (computed when None), all of one shape.
  """
  images = [model_input(config, rgb) for rgb in rgbs] if images is None else images
  size = padded_batch(len(images), int(config.predict.batch_size), forward.mesh.devices.size)
  x = np.zeros((size, *images[0].shape), np.float32)
  x[:len(images)] = images
  logits = forward.logits(x)
  if input_mode(config) == 'native':  # Crop the padding off.
    all_ids = forward.class_ids(logits)
    return [all_ids[k, :rgb.shape[0], :rgb.shape[1]] for k, rgb in enumerate(rgbs)]
  # Resize: the logits back to each image's size, as evaluation does.
  return [forward.class_ids(logits[k:k + 1], rgb.shape[:2])[0] for k, rgb in enumerate(rgbs)]


def padded_batch(n: int, batch_size: int, devices: int = 1) -> int:
  """The batch that `n` images of one shape run in: the next power of two, at most batch_size,
  then a multiple of the devices. A few compilations per input shape (1, 2, 4, ... batch_size),
  and a single photo is not padded to batch_size copies of its memory."""
  size = 1
  while size < n:
    size *= 2
  size = max(n, min(size, max(1, batch_size)))
  return -(-size // devices) * devices


def predict_files(config, forward: Forward, paths, out_dir: str) -> tuple[int, list[str]]:
  """Predicts `paths` (images in batches of one input shape, videos); returns (done, skipped).

  An unreadable file is reported on stderr by name and skipped; the others are still predicted.
  `out_dir` is created with the first output, so a run that reads nothing leaves nothing behind.
  """
  batch_size = max(1, int(config.predict.batch_size))
  colors = folder.class_palette(config.data)[1]
  alpha = float(config.predict.alpha)
  skipped, done = [], 0
  pending = []  # (stem, rgb, model input), all of one model input shape.
  t0 = time.time()

  def flush():
    nonlocal done
    if not pending:
      return
    ids = label_maps(config, forward, [p[1] for p in pending], [p[2] for p in pending])
    claim_output(out_dir)
    for (stem, rgb, _), image_ids in zip(pending, ids):
      write_outputs(out_dir, stem, rgb, image_ids, colors, alpha)
    done += len(pending)
    logging.info('predicted %d/%d files (%.1f images/s)', done + len(skipped), len(paths),
                 done / max(time.time() - t0, 1e-9))
    pending.clear()

  def skip(path, what, e):
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {path}: cannot read {what}, skipped ({reason})', file=sys.stderr)
    skipped.append(path)

  def predict_video(path, stem):
    nonlocal done
    flush()  # Images first, in input order.
    try:
      video.predict_video(path, out_dir, stem, lambda rgbs: label_maps(config, forward, rgbs),
                          colors, alpha=alpha, batch_size=batch_size,
                          save_frames=bool(config.predict.save_frames), make_out_dir=claim_output)
    except video.VideoError as e:
      skip(path, 'video', e)
      return
    done += 1

  for path, stem in zip(paths, output_stems(paths)):
    if video.has_video_suffix(path):
      predict_video(path, stem)
      continue
    try:
      rgb = read_rgb(path)
    except Exception as e:  # pylint: disable=broad-except
      # PIL raises many types for zero-byte, truncated and non-image files. A file named as an
      # image is not tried as a video (FFmpeg decodes half a JPEG as a one-frame video).
      if not path.lower().endswith(IMAGE_SUFFIXES) and video.decodes(path):
        predict_video(path, stem)
      else:
        skip(path, 'image', e)
      continue
    image = model_input(config, rgb)
    if pending and (pending[0][2].shape != image.shape or len(pending) == batch_size):
      flush()
    pending.append((stem, rgb, image))
  flush()
  return done, skipped


def write_outputs(out_dir, stem, rgb, ids, colors, alpha=0.5) -> None:
  """<stem>.png (class ids), <stem>_color.png (palette) and <stem>_overlay.png, each written
  through a temporary file, so a kill or a full disk leaves an earlier run's file whole."""
  ids = np.ascontiguousarray(ids, np.uint8)
  for name, picture in ((f'{stem}.png', PILImage.fromarray(ids, mode='L')),
                        (f'{stem}_color.png', PILImage.fromarray(drawing.colorize(ids, colors))),
                        (f'{stem}_overlay.png',
                         PILImage.fromarray(drawing.overlay(rgb, ids, colors, alpha)))):
    path = os.path.join(out_dir, name)
    picture.save(path + '.tmp', format='PNG')
    os.replace(path + '.tmp', path)
