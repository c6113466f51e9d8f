"""Checks a CamVid folder once and lists every problem in it (--mode=verify, and before training).

A problem is one line that starts with the offending file (or folder): a missing or empty folder,
an image without its label or a label without its image, a zero-byte, corrupt or truncated file,
a colour (RGB) label map, a label map of another size than its image, a label value outside
0..num_classes-1 that is not the void value (num_classes). A folder that passed is remembered by
its fingerprint (paths, sizes, mtimes) in the cache dir, so training checks it only once.
"""

import concurrent.futures
import os
from pathlib import Path
import sys

import numpy as np

from sepres_jax.data import camvid
from sepres_jax.data.camvid import DataError

VERIFIED_DIR = 'verified'


def folder_problems(root, num_classes: int = camvid.NUM_CLASSES) -> list[str]:
  """Every problem of the CamVid folder `root`, one line each; [] when it is sound."""
  root = Path(os.path.abspath(os.path.expanduser(root)))
  if not root.is_dir():
    return [f'{root}: data folder does not exist (data.manual_dir)']
  if not any(root.iterdir()):
    return [f'{root}: data folder is empty (data.manual_dir)']
  try:
    folder, splits = camvid.find_layout(root)
  except DataError as e:
    return [str(e)]
  problems, pairs = [], []
  for image_name, label_name in splits.values():
    found, split_problems = _pairs_of_split(folder / image_name, folder / label_name)
    problems += split_problems
    pairs += found
  workers = min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for result in pool.map(lambda pair: _pair_problems(*pair, num_classes), pairs):
      problems += result
  return problems


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
      if p.stem in files:
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


def _pair_problems(image_path: Path, label_path: Path, num_classes: int) -> list[str]:
  problems = []
  image = label = None
  for path, what in ((image_path, 'image'), (label_path, 'label')):
    if path.stat().st_size == 0:
      problems.append(f'{path}: zero-byte {what} file')
      continue
    try:
      decoded = camvid._open(path, what)  # pylint: disable=protected-access
    except DataError as e:
      problems.append(str(e))
      continue
    if what == 'image':
      image = decoded
    else:
      label = np.asarray(decoded)
  if label is not None:
    if label.ndim == 3:
      c = label[..., :3]
      if not (np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 0], c[..., 2])):
        problems.append(f'{label_path}: label is a colour (RGB) image; expected single-channel '
                        f'class ids 0..{num_classes}')
        label = None
      else:
        label = c[..., 0]
  if label is not None:
    bad = np.setdiff1d(np.unique(label), np.arange(num_classes + 1))
    if bad.size:
      problems.append(f'{label_path}: label values {bad[:5].tolist()} out of range '
                      f'0..{num_classes - 1} (void: {num_classes})')
    if image is not None and (image.height, image.width) != label.shape[:2]:
      problems.append(f'{label_path}: label size {label.shape[1]}x{label.shape[0]} != image size '
                      f'{image.width}x{image.height} of {image_path}')
  return problems


def _folder(data_config):
  """The folder that data_config reads from, or None when there is no local folder to check."""
  if data_config.name != 'camvid' or not data_config.manual_dir:
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
    marker = cache_dir / VERIFIED_DIR / input_pipeline.folder_fingerprint(folder)
    if marker.exists():
      return
  problems = folder_problems(folder, int(data_config.num_classes))
  if problems:
    if len(problems) > 1:
      for line in problems:
        print(f'  {line}', file=report)
    raise DataError(problems[0] if len(problems) == 1 else
                    f'{len(problems)} problems in {folder} (listed above; first: {problems[0]})')
  if marker is not None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def verify(config) -> int:
  """--mode=verify: lists every problem of the data folder; exit status 1 when there is one."""
  folder = _folder(config.data)
  if folder is None:
    print(f'nothing to verify: data.name={config.data.name!r} with no data.manual_dir')
    return 0
  problems = folder_problems(folder, int(config.data.num_classes))
  for line in problems:
    print(line)
  if problems:
    print(f'error: {len(problems)} problem(s) in {folder}', file=sys.stderr)
    return 1
  print(f'{folder}: no problems found')
  return 0
