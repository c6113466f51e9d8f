"""Runs a network written by `--mode=export` with nothing but jax and numpy.

This module imports only numpy, jax and the standard library (PIL, if installed, for
`read_image`), so a folder written by `--mode=export` can be used without flax, orbax, OpenCV or
the rest of this package:

    from sepres_jax import exported
    model = exported.load('runs/default/export')
    ids = model.predict(rgb)              # uint8 RGB [H, W, 3] -> uint8 class ids [H, W]
    picture = model.colorize(ids)         # uint8 [H, W, 3] in the classes' colours
    print(model.class_names[ids[0, 0]])

The labels equal `--mode=predict`'s for the same images: the images go through the same steps
(`resize_linear` is OpenCV's INTER_LINEAR to the bit, the same scaling to [-1, 1], the same zero
padding) and the logits through the same jax functions, where conv6 takes the same form (predict
batches below 8 on CPU; at 8 or more predict computes it by Fourier transform, equal up to float
rounding, see the README's export section).
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 'sepres-jax-export'
VERSION = 1
META_FILE = 'meta.json'
MODEL_FILE = 'model.jax'
WEIGHTS_FILE = 'weights.npz'


class Model:
  """An exported network with its preprocessing, class names and colours.

  Attributes: `meta` (the folder's meta.json), `class_names` (void last), `colors` (uint8
  [classes + 1, 3], void last), `input_mode` ('resize' or 'native'), `image_size` ((h, w) of
  'resize', else None), `platforms` (those the function was exported for).
  """

  def __init__(self, folder: str):
    with open(os.path.join(folder, META_FILE)) as f:
      self.meta = meta = json.load(f)
    if meta.get('format') != FORMAT or meta.get('version') != VERSION:
      raise ValueError(f'{folder}: not a {FORMAT} folder of version {VERSION}')
    for name, digest in meta.get('sha256', {}).items():  # Absent from exports before 2026-12-05.
      if file_digest(os.path.join(folder, name)) != digest:
        raise ValueError(f'{os.path.join(folder, name)} is not the file {META_FILE} was written '
                         'with (an export stopped between its files, or a file was replaced): '
                         'export again')
    with open(os.path.join(folder, MODEL_FILE), 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    self.platforms = tuple(self.exported.platforms)
    # jax.export names platforms 'cpu', 'cuda', 'rocm', 'tpu'; jax.default_backend() says 'gpu'
    # on NVIDIA and AMD cards, so it never matched 'cuda' and a GPU refused every export.
    here = jax.export.default_export_platform()
    if here not in self.platforms:
      raise ValueError(f'{folder} was exported for {", ".join(self.platforms)}, not for this '
                       f'machine\'s {here}')
    with np.load(os.path.join(folder, WEIGHTS_FILE)) as weights:
      self._weights = jax.device_put([weights[name] for name in meta['weights']])
    self.class_names = tuple(meta['class_names'])
    self.colors = np.asarray(meta['colors'], np.uint8)
    self.input_mode = meta['input']['mode']
    self.image_size = tuple(meta['input']['size']) if self.input_mode == 'resize' else None
    self._scale = np.float32(meta['input']['scale'])
    self._offset = np.float32(meta['input']['offset'])
    self._call = jax.jit(self.exported.call)
    self._ids = jax.jit(_ids_at, static_argnums=1)

  def model_input(self, rgb) -> np.ndarray:
    """uint8 RGB [h, w, 3] (or grey [h, w], or RGBA) -> the network's float32 input image."""
    rgb = as_rgb(rgb)
    if self.input_mode == 'resize':
      rgb = resize_linear(rgb, self.image_size)
    x = rgb.astype(np.float32) * self._scale + self._offset  # [0, 255] -> [-1, 1].
    return x if self.input_mode == 'resize' else pad_to_multiple(x, self.meta['input']['multiple'])

  def logits(self, images):
    """float32 model inputs [b, H, W, 3] -> the network's logits [b, H, W, classes] (device).

    With test-time flips or scales (meta.json's `flip`, `scales`) these are the log of the
    averaged class probabilities.
    """
    return self._call(self._weights, jnp.asarray(images, jnp.float32))

  def predict(self, images, batch_size: int = 8):
    """Class ids of one image (uint8 [H, W, 3] -> uint8 [H, W]) or of a list of images (a list).

    Images may have any size; consecutive images of one model input shape share a batch.
    """
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
      return self.predict([images], batch_size)[0]
    rgbs = [as_rgb(rgb) for rgb in images]
    inputs = [self.model_input(rgb) for rgb in rgbs]
    ids, start = [], 0
    while start < len(rgbs):
      stop = start + 1
      while (stop < len(rgbs) and stop - start < batch_size
             and inputs[stop].shape == inputs[start].shape):
        stop += 1
      logits = self.logits(np.stack(inputs[start:stop]))
      for k, rgb in enumerate(rgbs[start:stop]):
        h, w = rgb.shape[:2]
        if self.input_mode == 'native':  # Crop the padding off.
          ids.append(np.asarray(self._ids(logits[k:k + 1], tuple(logits.shape[1:3])))[0, :h, :w])
        else:  # The logits back to the image's size.
          ids.append(np.asarray(self._ids(logits[k:k + 1], (h, w)))[0])
      start = stop
    return ids

  def colorize(self, ids) -> np.ndarray:
    """uint8 [H, W, 3]: each class id in its colour; ids out of range in void's colour."""
    ids = np.asarray(ids).astype(np.int64)
    return self.colors[np.where((ids >= 0) & (ids < len(self.colors)), ids, len(self.colors) - 1)]

  def overlay(self, rgb, ids, alpha: float = 0.5) -> np.ndarray:
    """The class colours blended over the image (as `--mode=predict`'s <stem>_overlay.png)."""
    rgb = as_rgb(rgb)
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * self.colorize(ids).astype(np.float32)
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    ids = np.asarray(ids).astype(np.int64)
    void = (ids < 0) | (ids >= len(self.colors) - 1)
    out[void] = rgb[void]
    return out


def file_digest(path: str) -> str:
  """SHA-256 of a file, hex."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def load(folder: str) -> Model:
  """The network that `--mode=export` wrote into `folder`."""
  return Model(os.path.expanduser(folder))


def _ids_at(logits, out_hw):
  """uint8 argmax of logits [b, h, w, K], resized bilinearly to `out_hw` first (as predict)."""
  if tuple(logits.shape[1:3]) != out_hw:
    logits = jax.image.resize(logits, (logits.shape[0], *out_hw, logits.shape[-1]), 'bilinear')
  return jnp.argmax(logits, -1).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------
# Images, with numpy alone.
# ---------------------------------------------------------------------------------------------

def as_rgb(image) -> np.ndarray:
  """uint8 [H, W, 3]: grey [H, W] or [H, W, 1] repeated, RGBA's alpha dropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or not image.size:
    raise ValueError(f'expected an image [H, W, 3] (or grey, or RGBA), got shape {image.shape}')
  return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file as displayed (needs PIL; EXIF orientation applied).

  16-bit and float grey images are scaled to 8 bits by their maximum (or 255, whichever is
  larger), not clipped, as `--mode=predict` reads them. Raises ValueError for an empty image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    img.load()
    rgb = np.asarray(displayed_rgb(img), np.uint8)
  if rgb.size == 0:
    raise ValueError('empty image')
  return rgb


def displayed_rgb(img):
  """A loaded PIL image -> the PIL RGB image as displayed, as `read_image` reads files.

  EXIF orientation applied; 16-bit and float grey scaled to 8 bits by their maximum (or 255,
  whichever is larger), not clipped. Training's data builders store images this way too.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  img = ImageOps.exif_transpose(img)
  if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
    arr = np.asarray(img, np.float64)
    top = max(float(arr.max(initial=0.0)), 255.0)
    img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
  return img.convert('RGB')


def pad_to_multiple(image, multiple: int = 32) -> np.ndarray:
  """[h, w, C] -> [H, W, C] padded bottom/right with 0, H and W the next multiples."""
  h, w = image.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  return np.pad(image, ((0, ph), (0, pw), (0, 0))) if ph or pw else image


def resize_linear(image, size) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [h, w, C], equal to `cv2.resize(image, (w, h), cv2.INTER_LINEAR)`.

  OpenCV's bilinear resize of 8-bit images: half-pixel centres, no antialiasing, 11-bit weights,
  a horizontal pass in integers, then a vertical pass whose rounding is that of its SIMD code.
  An exact 2x reduction (OpenCV's 2x2 average) is the same formula with weights 1/2, 1/2.
  """
  image = np.asarray(image)
  h, w = int(size[0]), int(size[1])
  if image.shape[:2] == (h, w):
    return image
  xs0, xs1, xa0, xa1 = _linear_taps(image.shape[1], w, clamp_weights=True)
  ys0, ys1, ya0, ya1 = _linear_taps(image.shape[0], h, clamp_weights=False)
  x = image.astype(np.int32)
  rows = [x[ys][:, xs0] * xa0[:, None] + x[ys][:, xs1] * xa1[:, None] for ys in (ys0, ys1)]
  top = ((rows[0] >> 4) * ya0[:, None, None]) >> 16
  bottom = ((rows[1] >> 4) * ya1[:, None, None]) >> 16
  return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _linear_taps(src: int, dst: int, clamp_weights: bool):
  """OpenCV's source indices and fixed-point weights (sum 2048) for `dst` outputs of `src`.

  Outside the image, OpenCV sets the horizontal weight to (1, 0) but keeps the vertical one and
  repeats the edge row; `clamp_weights` picks the first.
  """
  scale = 1.0 / (dst / src)
  f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
  s = np.floor(f).astype(np.int64)
  f = f - s.astype(np.float32)
  if clamp_weights:
    low, high = s < 0, s >= src - 1
    f[low | high] = 0
    s = np.where(low, 0, np.where(high, src - 1, s))
  a0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
  a1 = np.rint(f * np.float32(2048)).astype(np.int32)
  return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), a0, a1
