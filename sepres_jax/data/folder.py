"""Any folder of image/label pairs: classes, label encodings, splits and a TensorFlow-free builder.

Labels are either class ids (single-channel PNG, `data.folder.encoding='ids'`) or colours (RGB PNG,
`'colors'`) mapped through the palette. The palette comes from `data.folder.class_names` and
`data.folder.colors`, or from a classes file (`data.folder.classes_file`) with one class per line:

    # name  id  R G B        (or comma-separated, or #rrggbb; lines starting with # are comments)
    road    0   128 64 128
    car     1   64 0 128
    void    255 0 0 0        <- the line whose id is data.folder.ignore_value names the void colour

Ids must be 0..K-1. Pixels with the ignore value (ids) or the ignore colour (colours) become the
void label K, as CamVid's void is 11; any other value or colour is an error naming the file.

Splits (`data.folder.splits`):
  'folders': <root>/<images>/<split>/ and <root>/<labels>/<split>/ (or <root>/<split>/<images>/ and
             <root>/<split>/<labels>/) for split in train, val, test (test optional);
  'lists':   <root>/<split>.txt list file names or stems of <root>/<images>/ (one per line);
  'random':  every pair of <root>/<images>/ and <root>/<labels>/, split with data.folder.fractions
             (train, val, test) and data.split_seed.
Images and labels are matched by file stem.
"""

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
import tensorflow_datasets as tfds

from sepres_jax.data import camvid
from sepres_jax.data.camvid import DataError

SPLITS = ('train', 'val', 'test')
VOID_COLOR_DEFAULT = (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Classes: names, ids and colours.
# ---------------------------------------------------------------------------------------------


def _parse_color(text, where):
  text = text.strip()
  try:
    if text.startswith('#') and len(text) == 7:
      return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
    parts = [int(v) for v in text.replace(',', ' ').split()]
  except ValueError:
    raise DataError(f'{where}: not a colour: {text!r} (use R G B or #rrggbb)') from None
  if len(parts) != 3 or not all(0 <= v <= 255 for v in parts):
    raise DataError(f'{where}: not a colour: {text!r} (use R G B, each 0..255, or #rrggbb)')
  return tuple(parts)


def read_classes_file(path, ignore_value):
  """Parses a classes file -> (names, colors, void_color or None), names/colors in id order."""
  path = Path(os.path.expanduser(path))
  try:
    lines = path.read_text(encoding='utf-8-sig').splitlines()  # A Windows editor's BOM too.
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: classes file is not UTF-8 text ({e.reason} at byte {e.start})'
                   ) from None
  except OSError as e:
    raise DataError(f'{path}: cannot read classes file ({e.strerror or e})') from None
  entries, void_color, void_line, names_seen = {}, None, None, {}
  for n, line in enumerate(lines, 1):
    fields = line.replace(',', ' ').split()
    if not fields or fields[0].startswith('#'):  # Blank and comment lines.
      continue
    where = f'{path}:{n}'
    if len(fields) not in (3, 5):
      raise DataError(f'{where}: expected "name id R G B" or "name id #rrggbb", got {line.strip()!r}')
    name = fields[0]
    try:
      class_id = int(fields[1])
    except ValueError:
      raise DataError(f'{where}: class id {fields[1]!r} is not an integer') from None
    color = _parse_color(' '.join(fields[2:]), where)
    if class_id == ignore_value:
      if void_line is not None:
        raise DataError(f'{where}: the ignore value {ignore_value} listed twice (first on line '
                        f'{void_line})')
      void_color, void_line = color, n
      continue
    if class_id in entries:
      raise DataError(f'{where}: class id {class_id} listed twice')
    if name in names_seen:
      raise DataError(f'{where}: class name {name!r} listed twice (first on line '
                      f'{names_seen[name]})')
    names_seen[name] = n
    entries[class_id] = (name, color)
  ids = sorted(entries)
  if ids != list(range(len(ids))):
    raise DataError(f'{path}: class ids must be 0..K-1 (plus the ignore value {ignore_value}), '
                    f'got {ids}')
  if not ids:
    raise DataError(f'{path}: no classes')
  return (tuple(entries[i][0] for i in ids), np.asarray([entries[i][1] for i in ids], np.uint8),
          void_color)


def palette(data_config):
  """(names, colors) of a folder dataset, both with void last: K + 1 names, uint8 [K + 1, 3]."""
  f = data_config.folder
  if f.classes_file:
    names, colors, void_color = read_classes_file(f.classes_file, int(f.ignore_value))
  else:
    names = tuple(str(n) for n in f.class_names)
    if not names:
      raise DataError('data.folder.class_names (or data.folder.classes_file) must name the classes')
    if len(f.colors) != len(names):
      raise DataError(f'data.folder.colors has {len(f.colors)} colours for {len(names)} '
                      'data.folder.class_names')
    colors = np.asarray([_parse_color(' '.join(str(v) for v in c) if not isinstance(c, str) else c,
                                      f'data.folder.colors[{i}]')
                         for i, c in enumerate(f.colors)], np.uint8)
    void_color = None
  if tuple(f.ignore_color):
    void_color = _parse_color(' '.join(str(v) for v in f.ignore_color), 'data.folder.ignore_color')
  class_colors = {tuple(c) for c in colors.tolist()}
  if void_color is None:
    # The default void colour, or with class ids (where colours only draw the pictures) the first
    # of a few that no class has: black void would look like a black class in every picture.
    candidates = [VOID_COLOR_DEFAULT]
    if data_config.folder.encoding == 'ids':
      candidates += [(255, 255, 255), (128, 128, 128), (255, 0, 255), (64, 64, 64)]
    void_color = next((c for c in candidates if c not in class_colors), VOID_COLOR_DEFAULT)
  if len(names) != int(data_config.num_classes):
    raise DataError(f'data.num_classes={data_config.num_classes} but the palette names '
                    f'{len(names)} classes ({", ".join(names)})')
  if len({tuple(c) for c in colors.tolist()}) != len(colors):
    where = f.classes_file or 'data.folder.colors'
    raise DataError(f'{where}: two classes share a colour in the palette')
  if tuple(int(v) for v in void_color) in class_colors:
    raise DataError(f'the ignore colour {tuple(int(v) for v in void_color)} is also a class '
                    'colour (set data.folder.ignore_color to another)')
  return (*names, 'void'), np.concatenate([colors, np.uint8([void_color])])


def class_palette(data_config):
  """(names, colors) for any data.name, with void last; needs no data on disk."""
  if data_config.name == 'folder':
    return palette(data_config)
  return camvid.CLASS_NAMES, np.asarray(camvid.COLORS)


# ---------------------------------------------------------------------------------------------
# Label maps.
# ---------------------------------------------------------------------------------------------


def spec_of(data_config) -> dict:
  """Everything that decides the built records: the builder's input, and part of its cache key."""
  f = data_config.folder
  names, colors = palette(data_config)
  encoding = str(f.encoding)
  if encoding not in ('ids', 'colors'):
    raise DataError(f"data.folder.encoding must be 'ids' or 'colors', got {encoding!r}")
  num_classes = len(names) - 1
  if num_classes > 254:
    raise DataError(f'{num_classes} classes: at most 254 fit the uint8 label maps')
  ignore = int(f.ignore_value)
  if encoding == 'ids' and 0 <= ignore < num_classes:
    raise DataError(f'data.folder.ignore_value={ignore} is a class id (0..{num_classes - 1})')
  splits = str(f.splits)
  if splits not in ('folders', 'lists', 'random'):
    raise DataError(f"data.folder.splits must be 'folders', 'lists' or 'random', got {splits!r}")
  fractions = [float(v) for v in f.fractions]
  if splits == 'random' and (len(fractions) != 3 or min(fractions) < 0 or fractions[1] <= 0):
    raise DataError(f'data.folder.fractions must be 3 fractions (train, val, test) with val > 0, '
                    f'got {tuple(fractions)}')
  return {'class_names': list(names), 'colors': colors.tolist(), 'encoding': encoding,
          'ignore_value': ignore, 'images': str(f.images), 'labels': str(f.labels),
          'splits': splits, 'fractions': fractions, 'seed': int(data_config.split_seed)}


def spec_key(spec) -> str:
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _codes(rgb):
  rgb = np.asarray(rgb, np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_label(path, spec):
  """Reads a label map -> (uint8 [H, W] with void = K, sorted values or colours not in the palette).

  Unknown pixels are set to void in the returned map; the caller decides whether that is an error.
  """
  num_classes = len(spec['class_names']) - 1
  img = camvid._open(path, 'label')  # pylint: disable=protected-access
  if spec['encoding'] == 'ids':
    # A palette ('P') PNG gives its indices: the ids.
    arr = camvid.single_channel(
        np.asarray(img), path, "label is a colour (RGB) image but data.folder.encoding='ids' "
        "expects single-channel class ids (use encoding='colors' and a palette)")
    arr = arr.astype(np.int64)
    valid = (arr >= 0) & (arr < num_classes)
    ignore = arr == spec['ignore_value']
    unknown = np.unique(arr[~valid & ~ignore]).tolist()
    label = np.where(valid, arr, num_classes)
  else:
    if img.mode in ('L', 'I', 'I;16', '1', 'F'):
      raise DataError(f"{path}: label is single-channel but data.folder.encoding='colors' expects "
                      'RGB colours (use encoding=\'ids\')')
    rgb = np.asarray(img.convert('RGB'))
    palette_codes = _codes(np.asarray(spec['colors'], np.int32))  # K classes then void.
    order = np.argsort(palette_codes)
    codes = _codes(rgb)
    pos = np.clip(np.searchsorted(palette_codes[order], codes), 0, len(order) - 1)
    found = palette_codes[order][pos] == codes
    label = np.where(found, order[pos], num_classes)  # The void colour maps to K too.
    unknown = [tuple(int(v) for v in ((c >> 16) & 255, (c >> 8) & 255, c & 255))
               for c in np.unique(codes[~found]).tolist()]
  return np.ascontiguousarray(label, np.uint8), unknown


def describe_unknown(path, unknown, spec) -> str:
  what = 'label values' if spec['encoding'] == 'ids' else 'label colours'
  allowed = (f"0..{len(spec['class_names']) - 2} and ignore {spec['ignore_value']}"
             if spec['encoding'] == 'ids' else 'the palette and the ignore colour')
  shown = ', '.join(str(u) for u in unknown[:5]) + (', ...' if len(unknown) > 5 else '')
  return f'{path}: {what} not in the palette: {shown} (allowed: {allowed})'


# ---------------------------------------------------------------------------------------------
# Splits.
# ---------------------------------------------------------------------------------------------


def _read_list(list_file, pairs_by_stem, image_dir):
  chosen, seen = [], {}
  try:  # A Windows editor's BOM too, as the classes file.
    text = Path(list_file).read_text(encoding='utf-8-sig')
  except UnicodeDecodeError as e:
    raise DataError(f'{list_file}: not UTF-8 text ({e.reason} at byte {e.start}); save the '
                    'list as UTF-8') from None
  except OSError as e:
    raise DataError(f'{list_file}: cannot read the list ({e.strerror or e})') from None
  for n, line in enumerate(text.splitlines(), 1):
    entry = line.strip()
    if not entry or entry.startswith('#'):
      continue
    stem = Path(entry).stem if Path(entry).suffix.lower() in camvid.IMAGE_SUFFIXES else entry
    stem = Path(stem).name
    if stem not in pairs_by_stem:
      if any(Path(image_dir, stem + suffix).is_file() for suffix in camvid.IMAGE_SUFFIXES):
        raise DataError(f'{list_file}:{n}: {entry!r} has no label (the image is in {image_dir})')
      raise DataError(f'{list_file}:{n}: {entry!r} is not an image in {image_dir}')
    if stem in seen:  # It would count twice in the split: trained on twice, or scored twice.
      raise DataError(f'{list_file}:{n}: {entry!r} listed twice (first on line {seen[stem]})')
    seen[stem] = n
    chosen.append(pairs_by_stem[stem])
  if not chosen:
    raise DataError(f'{list_file}: lists no images')
  return chosen


def split_pairs(root, spec, lister=camvid.list_pairs) -> dict:
  """{split: [(image_path, label_path), ...]} for train, val and (when present) test.

  `lister(image_dir, label_dir)` matches the files of two folders (by default raising DataError on
  the first unmatched file; --mode=verify passes one that collects every problem instead).
  """
  root = Path(root)
  images, labels = spec['images'], spec['labels']
  if spec['splits'] == 'folders':
    out = {}
    for split in SPLITS:
      for image_dir, label_dir in ((root / images / split, root / labels / split),
                                   (root / split / images, root / split / labels)):
        if image_dir.is_dir() or label_dir.is_dir():
          out[split] = lister(image_dir, label_dir)
          break
      else:
        if split != 'test':
          raise DataError(f'{root}: no {split} split (expected {root / images / split}/ and '
                          f'{root / labels / split}/, or {root / split / images}/ and '
                          f'{root / split / labels}/)')
    return out
  image_dir, label_dir = root / images, root / labels
  if spec['splits'] == 'lists':
    # The lists name the data: an unlisted image without a label (an unlabelled video frame
    # beside the labelled ones) is not an error; a listed one without its label is (_read_list).
    pairs = camvid.list_pairs(image_dir, label_dir, unmatched_ok=True)
    by_stem = {p[0].stem: p for p in pairs}
    out, owner = {}, {}
    for split in SPLITS:
      list_file = root / f'{split}.txt'
      if not list_file.is_file():
        if split != 'test':
          raise DataError(f'{list_file}: split list missing (data.folder.splits=lists)')
        continue
      out[split] = _read_list(list_file, by_stem, image_dir)
      for pair in out[split]:
        if pair[0].stem in owner and owner[pair[0].stem] != split:
          raise DataError(f'{list_file}: {pair[0].name} is also in {owner[pair[0].stem]}.txt')
        owner[pair[0].stem] = split
    return out
  pairs = lister(image_dir, label_dir)
  # 'random': a seeded permutation, val and test rounded, train the rest.
  f = np.asarray(spec['fractions'], np.float64)
  f = f / f.sum()
  n = len(pairs)
  n_val = max(1, int(round(f[1] * n)))
  n_test = int(round(f[2] * n))
  if n - n_val - n_test < 1:
    raise DataError(f'{root}: {n} pairs are too few for the fractions {spec["fractions"]}')
  perm = np.random.default_rng(spec['seed']).permutation(n)
  pick = lambda idx: [pairs[i] for i in sorted(idx)]
  out = {'train': pick(perm[n_val + n_test:]), 'val': pick(perm[:n_val])}
  if n_test:
    out['test'] = pick(perm[n_val:n_val + n_test])
  return out


# ---------------------------------------------------------------------------------------------
# The builder.
# ---------------------------------------------------------------------------------------------


def read_pair(image_path, label_path, spec):
  """Validates one pair -> (image as the tfds feature stores it, PIL label with void = K)."""
  img = camvid.open_image(image_path)
  label, unknown = decode_label(label_path, spec)
  if unknown:
    raise DataError(describe_unknown(label_path, unknown, spec))
  if (img.height, img.width) != label.shape:
    raise DataError(f'{label_path}: label size {label.shape[1]}x{label.shape[0]} != image size '
                    f'{img.width}x{img.height} of {image_path}')
  return camvid.stored_image(img, image_path), PILImage.fromarray(label, mode='L')


class FolderDataset(tfds.core.GeneratorBasedBuilder):
  """A folder of image/label pairs (class ids or colours), as described by a spec (spec_of)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Class-id and colour labels; folder, list and random splits.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass the data folder as --config.data.manual_dir=PATH.'
  name = 'sepres_folder'

  def __init__(self, *, spec, **kwargs):
    self.spec = spec
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Image/label pairs from a local folder; void is the last label.',
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
            'file_name': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(
            class_names=self.spec['class_names'], colors=self.spec['colors'],
            void_label=len(self.spec['class_names']) - 1, spec=self.spec),
    )

  def _split_generators(self, dl_manager):
    pairs = split_pairs(dl_manager.manual_dir, self.spec)
    return {split: self._generate_examples(p) for split, p in pairs.items()}

  def _generate_examples(self, pairs):
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
      checked = pool.map(lambda pair: read_pair(*pair, self.spec), pairs)
      for key, ((image_path, _), (image, label)) in enumerate(zip(pairs, checked)):
        yield key, {'image': image, 'label': label, 'file_name': image_path.name}
