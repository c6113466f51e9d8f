"""Checks a data folder once and lists every problem in it (--mode=verify, and before training).

A problem is one line that starts with the offending file (or folder): a missing or empty folder,
an image without its label or a label without its image, a zero-byte, corrupt or truncated file,
a label map of another size than its image, a label value (or, for colour labels, a colour) that
is neither a class nor void. For CamVid a colour (RGB) label map is a problem too. A folder that
passed is remembered by its fingerprint (paths, sizes, mtimes, and the palette) in the cache dir,
so training checks it only once. `--mode=verify` also reports the image sizes found and the class
pixel frequencies of every split.
"""

import collections
import concurrent.futures
import dataclasses
import os
from pathlib import Path
import sys

import numpy as np

from sepres_jax.data import camvid
from sepres_jax.data import folder as folder_data
from sepres_jax.data.camvid import DataError

VERIFIED_DIR = 'verified'


@dataclasses.dataclass
class Report:
  """What a scan of a data folder found."""
  problems: list  # One line each, starting with the file or folder.
  class_names: tuple = ()  # K names and 'void'.
  pairs: dict = dataclasses.field(default_factory=dict)  # Split -> number of pairs.
  sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (w, h).
  pixels: dict = dataclasses.field(default_factory=dict)  # Split -> int64 [K + 1], void last.
  notes: list = dataclasses.field(default_factory=list)  # Not problems, but worth knowing.


def nested_image_folders(root: Path) -> list[str]:
  """Sub-folders (with images at any depth) of folders that hold images themselves: the data
  folders are read flat, so their files are silently not data (images/train/cityB/*.png)."""
  notes = []
  for d, dirs, files in os.walk(root, followlinks=False):
    if any(Path(f).suffix.lower() in camvid.IMAGE_SUFFIXES for f in files):
      for sub in sorted(dirs):
        n = sum(Path(f).suffix.lower() in camvid.IMAGE_SUFFIXES
                for _, _, fs in os.walk(Path(d, sub)) for f in fs)
        if n:
          notes.append(f'{Path(d, sub)}: {n} image file(s) in a sub-folder of {d}, not read (the '
                       'image and label folders are read flat)')
      dirs[:] = []  # Their sub-folders are named above, not walked again.
  return notes


def _usable_root(root: Path) -> list[str]:
  if not root.is_dir():
    what = 'is a file, not a folder' if root.exists() else 'does not exist'
    return [f'{root}: data folder {what} (data.manual_dir)']
  if not any(root.iterdir()):
    return [f'{root}: data folder is empty (data.manual_dir)']
  return []


def _camvid_splits(root: Path):
  folder, splits = camvid.find_layout(root)
  out, problems = {}, []
  for split, (image_name, label_name) in splits.items():
    found, split_problems = _pairs_of_split(folder / image_name, folder / label_name)
    out[split] = found
    problems += split_problems
  return out, problems


def _folder_splits(root: Path, spec):
  problems = []

  def lister(image_dir, label_dir):
    found, more = _pairs_of_split(Path(image_dir), Path(label_dir))
    problems.extend(more)
    return found
  try:
    return folder_data.split_pairs(root, spec, lister=lister), problems
  except DataError as e:  # With the problems found before it (often its cause: a missing label).
    raise DataError('; '.join(problems + [str(e)])) from None


def scan(data_config) -> Report:
  """Checks every pair of the local data folder of `data_config` (CamVid or a custom folder)."""
  root = Path(os.path.abspath(os.path.expanduser(data_config.manual_dir)))
  is_folder = data_config.name == 'folder'
  try:
    names, _ = folder_data.class_palette(data_config)
    spec = folder_data.spec_of(data_config) if is_folder else None
  except DataError as e:
    return Report([str(e)])
  report = Report(_usable_root(root), tuple(names))
  if report.problems:
    return report
  try:
    splits, report.problems = _folder_splits(root, spec) if is_folder else _camvid_splits(root)
  except DataError as e:
    report.problems.append(str(e))
    return report
  report.notes = nested_image_folders(root)
  num_classes = len(names) - 1
  if is_folder:
    def decode(path):
      label, unknown = folder_data.decode_label(path, spec)
      return label, folder_data.describe_unknown(path, unknown, spec) if unknown else ''
  else:
    decode = lambda path: _camvid_label(path, num_classes)
  workers = min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for split, pairs in splits.items():
      report.pairs[split] = len(pairs)
      report.pixels[split] = np.zeros(num_classes + 1, np.int64)
      for problems, size, counts in pool.map(lambda pair: _check_pair(*pair, decode), pairs):
        report.problems += problems
        if size is not None:
          report.sizes[size] += 1
        if counts is not None:
          report.pixels[split] += counts[:num_classes + 1]
  return report


def folder_problems(root, num_classes: int = camvid.NUM_CLASSES) -> list[str]:
  """Every problem of the CamVid folder `root`, one line each; [] when it is sound."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'name': 'camvid', 'manual_dir': os.fspath(root),
                                      'num_classes': num_classes})
  return scan(config).problems


def _image_files(d: Path) -> list[Path]:
  return [p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in
          camvid.IMAGE_SUFFIXES]


def _pairs_of_split(image_dir: Path, label_dir: Path):
  problems = [f'{d}: folder missing' for d in (image_dir, label_dir) if not d.is_dir()]
  if problems:
    return [], problems
  images, labels = {}, {}
  for d, files in ((image_dir, images), (label_dir, labels)):
    for p in _image_files(d):
      bad_name = camvid.name_problem(p)
      if bad_name:
        problems.append(bad_name)
      elif p.stem in files:
        problems.append(f'{p}: two files with the same name stem as {files[p.stem].name}')
      else:
        files[p.stem] = p
  if not images:
    problems.append(f'{image_dir}: no images')
  problems += [f'{path}: image has no label in {label_dir}' for stem, path in images.items()
               if stem not in labels]
  problems += [f'{path}: label has no image in {image_dir}' for stem, path in labels.items()
               if stem not in images]
  pairs = [(images[s], labels[s]) for s in sorted(images) if s in labels]
  return pairs, problems


def _camvid_label(path, num_classes):
  """CamVid label -> (uint8 ids with void = num_classes, '' or the out-of-range problem)."""
  label = camvid.single_channel(
      np.asarray(camvid._open(path, 'label')), path,  # pylint: disable=protected-access
      f'label is a colour (RGB) image; expected single-channel class ids 0..{num_classes}')
  bad = np.setdiff1d(np.unique(label), np.arange(num_classes + 1))
  if not bad.size:
    return label, ''
  return label, (f'{path}: label values {bad[:5].tolist()} out of range 0..{num_classes - 1} '
                 f'(void: {num_classes})')


def _check_pair(image_path: Path, label_path: Path, decode):
  """-> (problems, (width, height) of the image or None, label pixel counts or None)."""
  problems = []
  image = label = None
  for path, what in ((image_path, 'image'), (label_path, 'label')):
    if path.stat().st_size == 0:
      problems.append(f'{path}: zero-byte {what} file')
      continue
    try:
      if what == 'image':
        image = camvid.open_image(path)  # As displayed: EXIF orientation applied.
        continue
      label, unknown = decode(path)  # unknown: '' or the problem's line.
    except DataError as e:
      problems.append(str(e))
      continue
    if unknown:
      problems.append(unknown)
  size = None if image is None else (image.width, image.height)
  if image is not None and label is not None and (image.height, image.width) != label.shape[:2]:
    problems.append(f'{label_path}: label size {label.shape[1]}x{label.shape[0]} != image size '
                    f'{image.width}x{image.height} of {image_path}')
  counts = None if label is None else np.bincount(np.asarray(label).reshape(-1), minlength=256)
  return problems, size, counts


def _folder(data_config):
  """The folder that data_config reads from, or None when there is no local folder to check."""
  if data_config.name not in ('camvid', 'folder') or not data_config.manual_dir:
    return None
  return Path(os.path.abspath(os.path.expanduser(data_config.manual_dir)))


def check_data(data_config, report=sys.stderr) -> None:
  """Raises DataError (after listing every problem on `report`) unless the folder is sound.

  Skipped when this folder, unchanged, passed before (a marker named by its fingerprint).
  """
  folder = _folder(data_config)
  if folder is None:
    return
  from sepres_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cache_dir = Path(os.path.abspath(os.path.expanduser(data_config.cache_dir)))
  marker = None
  if folder.is_dir() and any(folder.iterdir()):
    key = input_pipeline.folder_fingerprint(folder, cache_dir)
    if data_config.name == 'folder':
      key += '-' + folder_data.spec_key(folder_data.spec_of(data_config))
    marker = cache_dir / VERIFIED_DIR / key
    if marker.exists():
      return
  problems = scan(data_config).problems
  if problems:
    if len(problems) > 1:
      for line in problems:
        print(f'  {line}', file=report)
    raise DataError(problems[0] if len(problems) == 1 else
                    f'{len(problems)} problems in {folder} (listed above; first: {problems[0]})')
  if marker is not None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def format_report(report: Report) -> str:
  """The splits, image sizes and class pixel frequencies (% of each split's pixels)."""
  lines = ['pairs: ' + ', '.join(f'{s} {n}' for s, n in report.pairs.items())]
  sizes = ', '.join(f'{w}x{h} ({n})' for (w, h), n in report.sizes.most_common())
  lines.append(f'image sizes (width x height, images): {sizes or "none readable"}')
  splits = [s for s in report.pixels if report.pixels[s].sum()]
  width = max([len(n) for n in report.class_names] + [5])
  lines.append('class pixel frequencies (% of labelled and void pixels):')
  lines.append(f'  {"class":<{width}} ' + ' '.join(f'{s:>8}' for s in splits))
  for c, name in enumerate(report.class_names):
    row = ' '.join(f'{100 * report.pixels[s][c] / report.pixels[s].sum():8.3f}' for s in splits)
    absent = [s for s in splits if s == 'train' and report.pixels[s][c] == 0 and c < len(
        report.class_names) - 1]
    lines.append(f'  {name:<{width}} {row}' + ('   <- absent from train' if absent else ''))
  return '\n'.join(lines)


def verify(config) -> int:
  """--mode=verify: lists every problem of the data folder and what it holds; exit 1 on problems."""
  folder = _folder(config.data)
  if folder is None:
    print(f'nothing to verify: data.name={config.data.name!r} with no data.manual_dir')
    return 0
  report = scan(config.data)
  if report.pairs:
    print(f'{folder}:')
    print(format_report(report))
  for line in report.notes:
    print(f'note: {line}')
  for line in report.problems:
    print(line)
  if report.problems:
    print(f'error: {len(report.problems)} problem(s) in {folder}', file=sys.stderr)
    return 1
  print(f'{folder}: no problems found')
  return 0
