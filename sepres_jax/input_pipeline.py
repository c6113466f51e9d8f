"""Input pipeline: built CamVid records -> decoded, resized, normalised, batched numpy arrays.

`load_sources` builds the tfds dataset once (array_record, no TensorFlow) and opens random-access
sources; `train_iterator` and `eval_batches` turn a source into grain iterators of batches.

Batches are dicts of numpy arrays:
  image: float32 [b, H, W, C] in [-1, 1]; C = 3 (RGB), or 6 with data.lab (RGB then CIELAB).
  label: int32 [b, H, W]; 0..num_classes-1 classes, num_classes void, -1 padding.
Each process gets its slice [process_index * b, (process_index + 1) * b) of every global batch of
size b * process_count, so concatenating the processes' batches in process order gives the
single-process batch.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
import shutil
import tempfile
import threading

import cv2
import grain
import numpy as np
import tensorflow_datasets as tfds

from sepres_jax import augment
from sepres_jax import distill
from sepres_jax.data import camvid
from sepres_jax.data import folder as folder_data
from sepres_jax.data import synthetic
from sepres_jax.data.camvid import DataError

RANDOM85_VAL_FRACTION = 0.15
PAD_MULTIPLE = 32  # Native-size evaluation pads images to a multiple of the network's stride.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]  # num_classes names + 'void' last.
  colors: np.ndarray  # uint8 [num_classes + 1, 3], void last.
  num_classes: int  # Real classes (11 for CamVid).
  void_label: int  # == num_classes.
  num_examples: dict  # Split name -> count.


class SubsetSource:
  """Random-access view of `parent` restricted to `indices` (in the given order)."""

  def __init__(self, parent, indices):
    self.parent = parent
    self.indices = np.asarray(indices, dtype=np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.parent[int(self.indices[i])]

  def __repr__(self):
    return f'SubsetSource({len(self)} of {len(self.parent)})'


class DecodedCache:
  """Random-access view of `parent` that keeps decoded examples in memory, up to `max_bytes`.

  Reading an example from the built records decodes its PNG image and label (about 6 ms for a
  360x480 CamVid pair here, 2 CPU seconds per epoch of the seed config's 312 images, which the
  reader threads take from the training step's two cores). Kept decoded, the second and later
  epochs read memory. Examples past the budget are decoded on every read, as without the cache.
  Cached arrays are read-only, so a caller that wrote into one would fail rather than change
  what later epochs read. Each process (and each grain worker process) holds its own.
  """

  def __init__(self, parent, max_bytes: int):
    self.parent = parent
    self.max_bytes = int(max_bytes)
    self.bytes = 0
    self._examples = {}
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.parent)

  def __getitem__(self, i):
    i = int(i)
    example = self._examples.get(i)
    if example is not None:
      return dict(example)
    example = dict(self.parent[i])
    size = sum(np.asarray(v).nbytes for v in example.values())
    with self._lock:
      if i not in self._examples and self.bytes + size <= self.max_bytes:
        for v in example.values():
          if isinstance(v, np.ndarray):
            v.flags.writeable = False
        self._examples[i] = example
        self.bytes += size
    return dict(example)

  def __getstate__(self):  # A grain worker process gets the parent and an empty cache of its own.
    return {'parent': self.parent, 'max_bytes': self.max_bytes}

  def __setstate__(self, state):
    self.__init__(state['parent'], state['max_bytes'])

  def __repr__(self):
    return f'DecodedCache({len(self._examples)} of {len(self)} examples, {self.bytes >> 20} MB)'


# ---------------------------------------------------------------------------------------------
# Building and opening the data sources.
# ---------------------------------------------------------------------------------------------


def folder_fingerprint(folder, exclude=None):
  """Hash of a folder's absolute path and every file's relative path, size and mtime.

  `exclude` (the data cache, when a user puts it inside the data folder) is left out, or the
  cache's own files would change the fingerprint at every run.

  Linked folders are followed (a data folder whose images/ links elsewhere: its files were left
  out, so edits there reused the old build), each real folder once (no loop on a link cycle); a
  dangling link counts as itself. Names are hashed as bytes (any name, UTF-8 or not).
  """
  folder = Path(folder).resolve()
  exclude = Path(exclude).resolve() if exclude is not None else None
  h = hashlib.sha256(f'{camvid.CamVid.VERSION}\0{camvid.RECORDS_VERSION}\0{folder}\0'.encode())
  seen = set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:  # A link back to a folder already walked.
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    dirs[:] = sorted(d for d in dirs if exclude is None or (Path(root) / d).resolve() != exclude)
    for name in sorted(files):
      path = Path(root) / name
      try:
        st = path.stat()
      except FileNotFoundError:  # A dangling link: its own entry, not an error here.
        st = path.lstat()
      h.update(os.fsencode(path.relative_to(folder)) +
               f'\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:16]


def _synthetic_folder(data_config, cache_dir):
  """Writes the synthetic scenes once into <cache_dir>/synthetic-<hash of params>."""
  params = dict(num_train=data_config.synthetic.num_train, num_val=data_config.synthetic.num_val,
                num_test=data_config.synthetic.num_test, height=data_config.synthetic.height,
                width=data_config.synthetic.width, seed=data_config.synthetic.get('seed', 0))
  key = hashlib.sha256(json.dumps(dict(params, version=synthetic.SCENES_VERSION),
                                  sort_keys=True).encode()).hexdigest()[:12]
  folder = cache_dir / f'synthetic-{key}'
  if not folder.is_dir():
    # Write beside, then rename: an interrupted run leaves only a tmp folder behind.
    tmp = cache_dir / f'.tmp-synthetic-{key}-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.write_synthetic_camvid(tmp, **params)
    try:
      os.rename(tmp, folder)
    except OSError:  # Another process finished first.
      shutil.rmtree(tmp, ignore_errors=True)
  return folder


def _data_folder(data_config, cache_dir):
  """The local folder to build from, or None to download the public archive."""
  if data_config.name == 'synthetic':
    return _synthetic_folder(data_config, cache_dir)
  if data_config.name not in ('camvid', 'folder'):
    raise DataError(f"data.name={data_config.name!r}: expected 'camvid', 'folder' or 'synthetic'")
  if not data_config.manual_dir:
    if data_config.name == 'folder':
      raise DataError("data.name='folder' needs the data folder: --config.data.manual_dir=PATH")
    return None
  folder = Path(os.path.abspath(os.path.expanduser(data_config.manual_dir)))
  if not folder.is_dir():
    raise DataError(f'{folder}: data folder does not exist (data.manual_dir)')
  if not any(folder.iterdir()):
    raise DataError(f'{folder}: data folder is empty (data.manual_dir)')
  return folder


@contextlib.contextmanager
def _tfds_scratch():
  """Points `tempfile` at a folder removed afterwards, while a tfds builder is made.

  A builder whose data folder is not prepared yet calls `DatasetInfo.initialize_from_bucket`,
  which makes an empty `/tmp/tmp*tfds` folder (for metadata that, with GCS disabled, never comes)
  and leaves it behind: one per build, hundreds over the test suite.
  """
  with tempfile.TemporaryDirectory(prefix='sepres_tfds_') as scratch:
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous


def build_dataset(data_config):
  """Builds (or reuses) the tfds dataset; returns the prepared builder."""
  with _tfds_scratch():
    return _build_dataset(data_config)


def _build_dataset(data_config):
  cache_dir = Path(os.path.abspath(os.path.expanduser(data_config.cache_dir)))
  cache_dir.mkdir(parents=True, exist_ok=True)
  if data_config.name == 'folder':
    spec = folder_data.spec_of(data_config)  # Checks the classes before touching the folder.
  folder = _data_folder(data_config, cache_dir)
  if folder is not None and Path(folder).resolve() == cache_dir.resolve():
    # Its own builds would change the folder's fingerprint: a new full copy at every run.
    raise DataError(f'config.data.cache_dir={data_config.cache_dir} is the data folder itself; '
                    'give the cache its own folder (or a sub-folder of the data, e.g. DATA/cache)')
  if folder is None:
    builder = camvid.CamVid(data_dir=os.fspath(cache_dir / 'tfds' / 'download'),
                            file_format='array_record')
    builder.download_and_prepare()
    return builder
  if data_config.name == 'folder':
    # The records depend on the palette, encoding and splits too: they are part of the key.
    key = f'{folder_fingerprint(folder, cache_dir)}-{folder_data.spec_key(spec)}'
    data_dir = cache_dir / 'tfds' / f'folder-{key}'
    builder = folder_data.FolderDataset(spec=spec, data_dir=os.fspath(data_dir),
                                        file_format='array_record')
  else:
    camvid.find_layout(folder)  # Fail early, naming the folder, if it is not CamVid.
    data_dir = cache_dir / 'tfds' / folder_fingerprint(folder, cache_dir)
    builder = camvid.CamVid(data_dir=os.fspath(data_dir), file_format='array_record')
  # tfds writes into an `incomplete.*` folder and renames it when done, so an interrupted build
  # is never mistaken for a finished one; an existing finished build is only opened.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(folder)))
  return builder


def random85_split(num_examples, seed):
  """Disjoint (train, val) index arrays: a fixed-seed 85:15 split of range(num_examples)."""
  perm = np.random.default_rng(seed).permutation(num_examples)
  num_val = int(round(RANDOM85_VAL_FRACTION * num_examples))
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def _open_split(builder, split):
  """builder's `split` as a random-access source, read at both ends before use: a shard damaged
  after its build (truncated or deleted by a disk cleaner or a partial copy) is a DataError
  naming the folder to delete, not a grain traceback in the middle of a run."""
  try:
    source = builder.as_data_source(split=split)
    if len(source):
      source[0], source[len(source) - 1]  # pylint: disable=pointless-statement
  except (RuntimeError, OSError, ValueError) as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    raise DataError(f'{builder.data_dir}: the built data set is damaged ({split}: '
                    f'{lines[-1][:200]}); delete this folder and the next run rebuilds it'
                    ) from None
  return source


def load_sources(data_config):
  """Returns ({'train', 'val', 'test'} -> random-access source, DatasetInfo).

  Each source element is a dict: image uint8 [H, W, 3], label uint8 [H, W, 1], file_name bytes.
  """
  builder = build_dataset(data_config)
  available = set(builder.info.splits.keys())
  if data_config.name == 'folder':  # Its splits were made when it was built (data.folder.splits).
    sources = {s: _open_split(builder, s) for s in ('train', 'val', 'test') if s in available}
  elif data_config.split == 'official':
    if 'val' not in available:
      raise DataError('this CamVid folder (prepped layout) has no val split; use '
                      '--config.data.split=random85')
    sources = {s: _open_split(builder, s) for s in ('train', 'val', 'test')}
  elif data_config.split == 'random85':
    full_train = _open_split(builder, 'train')
    train_idx, val_idx = random85_split(len(full_train), data_config.split_seed)
    sources = {'train': SubsetSource(full_train, train_idx),
               'val': SubsetSource(full_train, val_idx),
               'test': _open_split(builder, 'test')}
  else:
    raise DataError(f"data.split={data_config.split!r}: expected 'official' or 'random85'")

  budget = int(data_config.get('cache_decoded_mb', 0)) << 20
  if budget > 0:
    # Only the splits training reads every epoch; evaluate and predict read test/ once, where a
    # cache would only hold memory. Each split its own budget (CamVid decoded: train 242 MiB,
    # val 67 MiB).
    sources = {s: DecodedCache(src, budget) if s in ('train', 'val') else src
               for s, src in sources.items()}

  meta = builder.info.metadata
  num_classes = len(meta['class_names']) - 1
  if data_config.num_classes != num_classes:
    raise DataError(f'data.num_classes={data_config.num_classes} but the dataset has '
                     f'{num_classes} classes')
  info = DatasetInfo(
      class_names=tuple(meta['class_names']),
      colors=np.asarray(meta['colors'], dtype=np.uint8),
      num_classes=num_classes,
      void_label=int(meta['void_label']),
      num_examples={s: len(src) for s, src in sources.items()})
  return sources, info


# ---------------------------------------------------------------------------------------------
# Per-example preprocessing.
# ---------------------------------------------------------------------------------------------


def preprocess_image(rgb_uint8, data_config, size=None):
  """uint8 RGB [H, W, 3] -> float32 [h, w, C] in [-1, 1]; C = 6 with data.lab (RGB then LAB).

  `size` (h, w) resizes bilinearly first; None keeps the native size.
  """
  rgb = np.asarray(rgb_uint8)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f'expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}')
  if size is not None and tuple(rgb.shape[:2]) != tuple(size):
    rgb = cv2.resize(rgb, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
  channels = [rgb]
  if data_config.lab:
    # cv2's uint8 LAB stores L*255/100, a+128, b+128: all in 0..255 like RGB.
    channels.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB))
  x = np.concatenate(channels, axis=-1) if len(channels) > 1 else rgb
  return x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def preprocess_label(label_uint8, size=None):
  """uint8 [H, W] or [H, W, 1] -> int32 [h, w], nearest-neighbour resized to `size` if given."""
  label = np.asarray(label_uint8)
  if label.ndim == 3:
    label = label[..., 0]
  if size is not None and tuple(label.shape) != tuple(size):
    label = cv2.resize(label, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST_EXACT)
  return label.astype(np.int32)


def class_pixel_counts(source, num_classes: int):
  """(pixels of each class, pixels of the images that contain it) over a split's labels."""
  counts = np.zeros(num_classes, np.int64)
  present = np.zeros(num_classes, np.int64)
  for i in range(len(source)):
    label = np.asarray(source[i]['label']).reshape(-1)
    c = np.bincount(label, minlength=num_classes + 1)[:num_classes]
    counts += c
    present += np.where(c > 0, label.size, 0)
  return counts, present


def steps_per_epoch(num_examples, global_batch_size):
  """Training steps per epoch: the last incomplete batch of every epoch is dropped."""
  return num_examples // global_batch_size


def _local_batch_size(global_batch_size, process_index, process_count):
  if global_batch_size % process_count:
    raise ValueError(f'global batch {global_batch_size} not divisible by {process_count} processes')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return global_batch_size // process_count


def _read_options(data_config):
  threads = max(1, int(data_config.num_threads))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(int(data_config.prefetch), threads))


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


class _TrainBatch:
  """Global batch of example indices -> this process's decoded, preprocessed slice."""

  def __init__(self, source, data_config, local_batch, process_index, seed):
    self.source = source
    self.size = tuple(int(s) for s in data_config.image_size)
    self.data_config = data_config
    self.start = process_index * local_batch
    self.stop = self.start + local_batch
    self.random_flip = bool(data_config.get('random_flip', False))
    self.augmented = 'augment' in data_config and augment.is_active(data_config)
    self.seed = seed

  def __call__(self, step, global_indices):
    global_indices = np.asarray(global_indices)
    if self.random_flip:  # Drawn for the whole global batch, so slices agree across processes.
      flips = np.random.default_rng([self.seed, step]).random(len(global_indices)) < 0.5
    else:
      flips = np.zeros(len(global_indices), bool)
    images, labels, softs = [], [], []
    for i in range(self.start, self.stop):
      example = self.source[int(global_indices[i])]
      soft = example.get(distill.SOFT_KEY)  # Distillation targets, moved with the label.
      if self.augmented:
        rng = np.random.default_rng([self.seed, step, i])
        rgb, label, soft = augment.augment(example['image'], example['label'], rng,
                                           self.data_config, bool(flips[i]), soft)
        image = preprocess_image(rgb, self.data_config)
      else:
        image = preprocess_image(example['image'], self.data_config, self.size)
        label = preprocess_label(example['label'], self.size)
        if soft is not None:
          soft = distill.resize_soft(soft, self.size)
        if flips[i]:
          image, label = image[:, ::-1], label[:, ::-1]
          soft = None if soft is None else soft[:, ::-1]
      images.append(image)
      labels.append(label)
      softs.append(soft)
    batch = {'image': np.stack(images), 'label': np.stack(labels)}
    if softs and softs[0] is not None:
      batch[distill.SOFT_KEY] = np.stack(softs)
    return batch


def check_one_batch(num_examples: int, global_batch_size: int) -> None:
  """DataError when the training split holds fewer examples than one batch."""
  if steps_per_epoch(num_examples, global_batch_size) == 0:
    raise DataError(f'{num_examples} training examples, fewer than one batch (config.batch_size='
                    f'{global_batch_size})')


def train_iterator(source, data_config, *, global_batch_size, seed, process_index=0,
                   process_count=1, start_step=0):
  """Infinite grain iterator of training batches, reshuffled every epoch, from `start_step` on.

  Epoch e is a permutation of the source drawn from (seed, e); its last incomplete global batch is
  dropped, so every epoch has steps_per_epoch(len(source), global_batch_size) steps. Batch n
  (its examples, augmentation and flips) depends only on (seed, n), so a resumed run starts its
  iterator at its checkpoint's step and reads exactly the batches an uninterrupted run would,
  with any number of workers or processes.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  check_one_batch(len(source), global_batch_size)
  ds = (grain.MapDataset.range(len(source))
        .shuffle(seed=seed)
        .batch(global_batch_size, drop_remainder=True)
        .repeat()  # Reseeds the shuffle for each epoch.
        .map_with_index(_TrainBatch(source, data_config, local_batch, process_index, seed))
        [int(start_step):]
        .to_iter_dataset(_read_options(data_config)))
  if data_config.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_config.num_workers)))
  return iter(ds)


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def _round_up(x, multiple):
  return int(math.ceil(x / multiple) * multiple)


class _EvalBatch:
  """Global batch number -> this process's slice, padded (label -1) to the batch's shape."""

  def __init__(self, source, data_config, plan, process_index, process_count,
               size=None, native_labels=False):
    self.native_labels = native_labels
    self.source = source
    self.data_config = data_config
    self.plan = plan  # [(source indices of the global batch, -1 padding; its (H, W))].
    self.process_index = process_index
    self.process_count = process_count
    self.size = size

  def __call__(self, batch_number):
    global_indices, plan_hw = self.plan[batch_number]
    # With `size` the plan groups by native size (the labels'), else by padded image size.
    height, width = self.size or plan_hw
    local_batch = len(global_indices) // self.process_count
    indices = global_indices[self.process_index * local_batch:
                             (self.process_index + 1) * local_batch]
    valid = indices >= 0
    images, labels = [], []
    for i in indices[valid]:
      example = self.source[int(i)]
      images.append(preprocess_image(example['image'], self.data_config, self.size))
      labels.append(preprocess_label(example['label'], None if self.native_labels else self.size))
    label_hw = tuple(plan_hw) if self.native_labels else (height, width)
    channels = 6 if self.data_config.lab else 3
    image_batch = np.zeros((local_batch, height, width, channels), np.float32)
    label_batch = np.full((local_batch, *label_hw), -1, np.int32)
    for k, (image, label) in enumerate(zip(images, labels)):  # Valid examples come first.
      image_batch[k, :image.shape[0], :image.shape[1]] = image
      label_batch[k, :label.shape[0], :label.shape[1]] = label
    return {'image': image_batch, 'label': label_batch, 'valid': valid,
            'index': indices.astype(np.int32)}


_SHAPES = {}  # id(source) -> (source, shapes): one pass per source, not one per epoch.


def native_shapes(source) -> list[tuple[int, int]]:
  """Each example's image (H, W) (reads every example once per source)."""
  cached = _SHAPES.get(id(source))
  if cached is not None and cached[0] is source:
    return cached[1]
  shapes = [tuple(source[i]['image'].shape[:2]) for i in range(len(source))]
  if len(_SHAPES) >= 8:
    _SHAPES.clear()
  _SHAPES[id(source)] = (source, shapes)
  return shapes


def padded_shapes(source) -> list[tuple[int, int]]:
  """Each example's image (H, W) rounded up to multiples of PAD_MULTIPLE."""
  return [(_round_up(h, PAD_MULTIPLE), _round_up(w, PAD_MULTIPLE))
          for h, w in native_shapes(source)]


def eval_plan(shapes, global_batch_size: int, multiple: int = 1):
  """[(source indices padded with -1 to the batch's size, (H, W))] covering every example once.

  Examples are grouped by shape (in order of each shape's first example), so that an image is
  padded only to its own multiple of 32, as `--mode=predict` pads it: a network whose receptive
  field reaches the padding then labels it the same whichever images share its batch. Each group
  is cut into batches by `even_batch_size`.
  """
  groups = {}
  for i, hw in enumerate(shapes):
    groups.setdefault(tuple(hw), []).append(i)
  plan = []
  for hw, members in groups.items():
    batch = even_batch_size(len(members), global_batch_size, multiple)
    for start in range(0, len(members), batch):
      chunk = np.full(batch, -1, np.int64)
      part = members[start:start + batch]
      chunk[:len(part)] = part
      plan.append((chunk, hw))
  return plan


def even_batch_size(num_examples: int, max_batch: int, multiple: int = 1) -> int:
  """The batch that cuts `num_examples` into as few batches as `max_batch` does, most evenly.

  A multiple of `multiple` (the devices a batch is split over), and never above `max_batch` when
  `max_batch` is itself a multiple of it (as check_batch_sizes makes it): CamVid's 101 validation
  images at 32 take 4 batches of 26 (3 padded) instead of 4 of 32 (27 padded, a fifth of the work).
  """
  if num_examples <= 0:
    return max_batch
  num_batches = math.ceil(num_examples / max_batch)
  return min(max_batch, _round_up(math.ceil(num_examples / num_batches), multiple))


def eval_batches(source, data_config, *, global_batch_size, process_index=0, process_count=1,
                 resize=None, native_labels=False, multiple=1):
  """Finite iterator over the whole split, the last batch of each shape padded.

  In the split's order when every example has one padded shape (CamVid); otherwise shape by shape
  (`eval_plan`), each batch's 'index' saying which examples it holds.

  `global_batch_size` is the largest batch: the split takes as many batches as it needs at that
  size, evened out to the smallest size (a multiple of `multiple` and of `process_count`) that
  still fits it in as many (`even_batch_size`), so little padding is computed.

  Native resolution (each image padded bottom/right to its own multiple of 32: images of
  different padded sizes go into different batches, see `eval_plan`) unless `resize` (default:
  data.eval_resize) resizes images to data.image_size; `native_labels` then keeps the labels at
  the native size, for scoring logits resized back (batches then group images of one native
  size, so a split of mixed sizes is scored too). Padded
  pixels and padded examples have label -1; `valid` marks real examples, `index` their position in
  the source (-1 for padding). Padded image pixels are 0.
  """
  _local_batch_size(global_batch_size, process_index, process_count)  # Checks the arguments.
  resize = data_config.eval_resize if resize is None else resize
  size = tuple(int(s) for s in data_config.image_size) if resize else None
  if size:
    shapes = native_shapes(source) if native_labels else [size] * len(source)
  else:
    shapes = padded_shapes(source)
  plan = eval_plan(shapes, global_batch_size, math.lcm(int(multiple), process_count))
  ds = (grain.MapDataset.range(len(plan))
        .map(_EvalBatch(source, data_config, plan, process_index, process_count, size,
                        native_labels))
        .to_iter_dataset(_read_options(data_config)))
  return iter(ds)
