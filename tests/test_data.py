"""Tests of the CamVid builder, the synthetic scenes and the input pipeline (small, CPU)."""

import hashlib
import math
import os
from pathlib import Path
import pickle
import shutil
import tempfile

from absl import flags
import cv2
import numpy as np
import pytest

from configs import test as test_config
from sepres_jax import input_pipeline
from sepres_jax.data import camvid
from sepres_jax.data import synthetic
from sepres_jax.data.camvid import DataError

SHARED_CAMVID = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'CamVid'


def data_config(cache_dir, **overrides):
  config = test_config.get_config().data
  config.cache_dir = os.fspath(cache_dir)
  config.num_threads = 2
  config.prefetch = 2
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def write_scenes(folder, num_train=12, num_val=4, num_test=3, height=24, width=32, seed=0):
  return synthetic.write_synthetic_camvid(folder, num_train=num_train, num_val=num_val,
                                          num_test=num_test, height=height, width=width, seed=seed)


def tree_digest(folder):
  h = hashlib.sha256()
  for path in sorted(Path(folder).rglob('*')):
    if path.is_file():
      h.update(os.fspath(path.relative_to(folder)).encode() + path.read_bytes())
  return h.hexdigest()


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  return write_scenes(tmp_path_factory.mktemp('scenes'))


class IndexSource:
  """Example i has every image pixel equal to i and every label pixel to i % 12."""

  def __init__(self, n, height=8, width=8):
    self.n, self.height, self.width = n, height, width

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {'image': np.full((self.height, self.width, 3), i, np.uint8),
            'label': np.full((self.height, self.width, 1), i % 12, np.uint8),
            'file_name': f'{i}.png'.encode()}


def example_ids(batch):
  return [int(round((x + 1) * 127.5)) for x in batch['image'][:, 0, 0, 0]]


# --- constants and synthetic scenes -------------------------------------------------------------


def test_constants():
  assert len(camvid.CLASS_NAMES) == 12 and camvid.CLASS_NAMES[-1] == 'void'
  assert camvid.COLORS.shape == (12, 3) and camvid.COLORS.dtype == np.uint8
  assert camvid.COLORS[-1].tolist() == [0, 0, 0] and camvid.COLORS[4].tolist() == [60, 40, 222]
  assert len(camvid.MEDIAN_FREQUENCY_WEIGHTS) == 11 and camvid.MEDIAN_FREQUENCY_WEIGHTS[6] == 9.6446


def test_synthetic_is_deterministic_and_well_formed(tmp_path, scenes):
  again = write_scenes(tmp_path / 'again')
  assert tree_digest(again) == tree_digest(scenes)
  other = write_scenes(tmp_path / 'other', seed=1)
  assert tree_digest(other) != tree_digest(scenes)
  for split, count in (('train', 12), ('val', 4), ('test', 3)):
    assert len(list((scenes / split).glob('*.png'))) == count
    assert len(list((scenes / f'{split}annot').glob('*.png'))) == count
  labels = np.stack([cv2.imread(os.fspath(p), cv2.IMREAD_UNCHANGED)
                     for p in sorted((scenes / 'trainannot').glob('*.png'))])
  assert labels.shape == (12, 24, 32) and labels.max() <= 11
  assert len(np.unique(labels)) >= 8  # Most classes appear.
  image = cv2.imread(os.fspath(sorted((scenes / 'train').glob('*.png'))[0]), cv2.IMREAD_UNCHANGED)
  assert image.shape == (24, 32, 3)


# --- building -----------------------------------------------------------------------------------


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_a_damaged_build_is_one_line_naming_the_folder(tmp_path, scenes, damage):
  """A shard truncated or deleted after its build was a grain RuntimeError traceback."""
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(scenes))
  input_pipeline.load_sources(config)
  shard = next((tmp_path / 'cache' / 'tfds').rglob('*-val.array_record-*'))
  if damage == 'truncate':
    os.truncate(shard, 100)
  else:
    shard.unlink()
  with pytest.raises(DataError, match='the built data set is damaged \\(val: .*delete this folder'):
    input_pipeline.load_sources(config)


def test_segnet_layout(tmp_path, scenes):
  before = tree_digest(scenes)
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(scenes))
  sources, info = input_pipeline.load_sources(config)
  assert tree_digest(scenes) == before  # Nothing written into the manual dir.
  assert info.num_examples == {'train': 12, 'val': 4, 'test': 3}
  assert info.class_names == camvid.CLASS_NAMES and info.num_classes == 11 and info.void_label == 11
  np.testing.assert_array_equal(info.colors, camvid.COLORS)
  example = sources['val'][1]
  assert example['image'].shape == (24, 32, 3) and example['image'].dtype == np.uint8
  assert example['label'].shape == (24, 32, 1) and example['label'].dtype == np.uint8
  assert example['file_name'] == b'synth_val_00001.png'  # Sorted file order.
  expected = cv2.imread(os.fspath(scenes / 'valannot' / 'synth_val_00001.png'), cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(example['label'][..., 0], expected)
  expected = cv2.imread(os.fspath(scenes / 'val' / 'synth_val_00001.png'))[..., ::-1]
  np.testing.assert_array_equal(example['image'], expected)


def test_prepped_layout(tmp_path, scenes):
  folder = tmp_path / 'prepped'
  for split in ('train', 'test'):
    shutil.copytree(scenes / split, folder / f'images_prepped_{split}')
    (folder / f'annotations_prepped_{split}').mkdir(parents=True)
    for path in (scenes / f'{split}annot').glob('*.png'):
      label = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
      # The prepped copy stores the class id in all three channels.
      cv2.imwrite(os.fspath(folder / f'annotations_prepped_{split}' / path.name),
                  np.repeat(label[..., None], 3, axis=-1))
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(folder))
  with pytest.raises(DataError, match='random85'):
    input_pipeline.load_sources(config)
  config.split = 'random85'
  sources, info = input_pipeline.load_sources(config)
  assert info.num_examples == {'train': 10, 'val': 2, 'test': 3}
  label = sources['test'][0]['label']
  assert label.shape == (24, 32, 1) and label.max() <= 11


def test_rebuild_when_folder_changes_and_reuse_otherwise(tmp_path):
  folder = write_scenes(tmp_path / 'scenes', num_train=4, num_val=2, num_test=2)
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(folder))
  first = input_pipeline.build_dataset(config)
  record = next(Path(first.data_dir).glob('*train.array_record*'))
  stamp = record.stat().st_mtime_ns
  again = input_pipeline.build_dataset(config)
  assert again.data_dir == first.data_dir and record.stat().st_mtime_ns == stamp
  # A new pair in the folder -> a new fingerprint and a rebuild that sees it.
  for sub in ('train', 'trainannot'):
    shutil.copy(folder / sub / 'synth_train_00000.png', folder / sub / 'zz_new.png')
  sources, info = input_pipeline.load_sources(config)
  assert info.num_examples['train'] == 5
  assert input_pipeline.build_dataset(config).data_dir != first.data_dir


def test_interrupted_build_is_redone(tmp_path, monkeypatch):
  folder = write_scenes(tmp_path / 'scenes', num_train=4, num_val=2, num_test=2)
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(folder))
  real_check_pair, calls = camvid.check_pair, []

  def failing_check_pair(*pair):
    calls.append(pair)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_check_pair(*pair)

  monkeypatch.setattr(camvid, 'check_pair', failing_check_pair)
  with pytest.raises(KeyboardInterrupt):
    input_pipeline.load_sources(config)
  monkeypatch.setattr(camvid, 'check_pair', real_check_pair)
  _, info = input_pipeline.load_sources(config)
  assert info.num_examples == {'train': 4, 'val': 2, 'test': 2}


def test_synthetic_name_builds_through_the_builder(tmp_path, monkeypatch):
  config = data_config(tmp_path / 'cache')
  config.synthetic.update(num_train=5, num_val=2, num_test=2, height=16, width=24)
  sources, info = input_pipeline.load_sources(config)
  assert info.num_examples == {'train': 5, 'val': 2, 'test': 2}
  assert sources['train'][0]['image'].shape == (16, 24, 3)
  folders = list((tmp_path / 'cache').glob('synthetic-*'))
  assert len(folders) == 1
  input_pipeline.load_sources(config)
  assert list((tmp_path / 'cache').glob('synthetic-*')) == folders
  monkeypatch.setattr(synthetic, 'SCENES_VERSION', synthetic.SCENES_VERSION + 1)
  input_pipeline.load_sources(config)  # Other scenes' code: other scenes, not the cached ones.
  assert len(list((tmp_path / 'cache').glob('synthetic-*'))) == 2


def test_a_build_leaves_no_temporary_folders(tmp_path, monkeypatch):
  # tfds makes an empty /tmp/tmp*tfds folder per unprepared builder and never removes it.
  system_tmp = tmp_path / 'tmp'
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', os.fspath(system_tmp))
  config = data_config(tmp_path / 'cache')
  config.synthetic.update(num_train=3, num_val=2, num_test=2, height=16, width=24)
  input_pipeline.load_sources(config)
  assert tempfile.tempdir == os.fspath(system_tmp)
  assert list(system_tmp.iterdir()) == []


def test_random85_split(tmp_path, scenes):
  train, val = input_pipeline.random85_split(367, seed=42)
  assert len(train) == 312 and len(val) == 55
  assert not set(train) & set(val) and set(train) | set(val) == set(range(367))
  again, _ = input_pipeline.random85_split(367, seed=42)
  other, _ = input_pipeline.random85_split(367, seed=1)
  np.testing.assert_array_equal(train, again)
  assert not np.array_equal(train, other)
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(scenes),
                       split='random85')
  sources, info = input_pipeline.load_sources(config)
  assert info.num_examples == {'train': 10, 'val': 2, 'test': 3}
  names = lambda src: {src[i]['file_name'] for i in range(len(src))}
  assert not names(sources['train']) & names(sources['val'])
  assert len(names(sources['train']) | names(sources['val'])) == 12


# --- training batches ---------------------------------------------------------------------------


def test_train_batches_from_built_dataset(tmp_path, scenes):
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(scenes),
                       image_size=(32, 48))
  sources, _ = input_pipeline.load_sources(config)
  batch = next(input_pipeline.train_iterator(sources['train'], config, global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 32, 48, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 48) and batch['label'].dtype == np.int32
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
  assert 0 <= batch['label'].min() and batch['label'].max() <= 11
  config.lab = True
  batch = next(input_pipeline.train_iterator(sources['train'], config, global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 32, 48, 6)
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1


class CountingSource(IndexSource):
  """IndexSource that counts its reads."""

  def __init__(self, n, **kwargs):
    super().__init__(n, **kwargs)
    self.reads = 0

  def __getitem__(self, i):
    self.reads += 1
    return super().__getitem__(i)


def test_decoded_cache_reads_each_example_once_within_its_budget():
  parent = CountingSource(6)
  example_bytes = 8 * 8 * 3 + 8 * 8 + len(b'0.png')
  cache = input_pipeline.DecodedCache(parent, max_bytes=4 * example_bytes)
  for _ in range(3):  # Three epochs: the first four examples are decoded once, the rest each time.
    for i in range(6):
      example = cache[i]
      assert example['image'][0, 0, 0] == i and example['file_name'] == f'{i}.png'.encode()
  assert parent.reads == 4 + 2 * 3 and cache.bytes == 4 * example_bytes and len(cache) == 6
  kept = cache[0]
  with pytest.raises(ValueError, match='read-only'):
    kept['image'][0, 0, 0] = 99  # A caller cannot change what later reads get.
  kept['image'] = None  # Replacing a key changes the caller's copy of the dict only.
  assert cache[0]['image'][0, 0, 0] == 0 and parent.reads == 10


def test_decoded_cache_gives_the_same_batches(tmp_path, scenes):
  kwargs = dict(name='camvid', manual_dir=os.fspath(scenes), image_size=(32, 48), random_flip=True)
  on = data_config(tmp_path / 'cache', **kwargs)
  on.augment.update(crop=True, scale=(0.8, 1.5), jitter=0.2)
  off = data_config(tmp_path / 'cache', cache_decoded_mb=0, **kwargs)
  off.augment = on.augment
  cached, _ = input_pipeline.load_sources(on)
  plain, _ = input_pipeline.load_sources(off)
  assert isinstance(cached['train'], input_pipeline.DecodedCache)
  assert not isinstance(plain['train'], input_pipeline.DecodedCache)
  assert isinstance(cached['val'], input_pipeline.DecodedCache)
  assert not isinstance(cached['test'], input_pipeline.DecodedCache)  # Read once: not held.
  streams = [input_pipeline.train_iterator(src['train'], cfg, global_batch_size=4, seed=0)
             for src, cfg in ((cached, on), (plain, off))]
  for _ in range(9):  # Three epochs of 12 examples: the later ones read the cache.
    a, b = (next(s) for s in streams)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert cached['train'].bytes == 12 * (24 * 32 * 4 + len(cached['train'][0]['file_name']))
  # grain worker processes (data.num_workers) get a pickled copy that starts empty.
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which main.py has parsed.
  on.num_workers = 1
  worker = input_pipeline.train_iterator(cached['train'], on, global_batch_size=4, seed=0)
  first = next(input_pipeline.train_iterator(plain['train'], off, global_batch_size=4, seed=0))
  np.testing.assert_array_equal(next(worker)['image'], first['image'])
  copy = pickle.loads(pickle.dumps(cached['train']))
  assert copy.bytes == 0 and len(copy) == 12 and copy[3]['image'].shape == (24, 32, 3)
  a, b = (next(input_pipeline.eval_batches(src['val'], cfg, global_batch_size=4, resize=False))
          for src, cfg in ((cached, on), (plain, off)))
  assert a['image'].shape == (4, 32, 32, 3)  # Native 24x32, padded to a multiple of 32.
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])


def test_preprocess_image():
  config = data_config('/unused')
  rgb = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
  x = input_pipeline.preprocess_image(rgb, config)
  np.testing.assert_allclose(x, rgb / 127.5 - 1, atol=1e-6)
  assert input_pipeline.preprocess_image(rgb, config, size=(5, 7)).shape == (5, 7, 3)
  config.lab = True
  x = input_pipeline.preprocess_image(rgb, config)
  lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
  assert x.shape == (10, 14, 6) and x.dtype == np.float32
  np.testing.assert_allclose(x[..., 3:], lab / 127.5 - 1, atol=1e-6)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_epochs_reshuffle_and_are_deterministic():
  config = data_config('/unused', image_size=(8, 8))
  source = IndexSource(10)  # 3 batches of 3 per epoch; one example dropped per epoch.
  assert input_pipeline.steps_per_epoch(10, 3) == 3
  batches = take(input_pipeline.train_iterator(source, config, global_batch_size=3, seed=7), 9)
  ids = [example_ids(b) for b in batches]
  epochs = [sum(ids[3 * e:3 * e + 3], []) for e in range(3)]
  for epoch in epochs:
    assert len(set(epoch)) == 9 and set(epoch) <= set(range(10))
  assert epochs[0] != epochs[1]
  same = take(input_pipeline.train_iterator(source, config, global_batch_size=3, seed=7), 9)
  assert [example_ids(b) for b in same] == ids
  other = take(input_pipeline.train_iterator(source, config, global_batch_size=3, seed=8), 3)
  assert [example_ids(b) for b in other] != ids[:3]
  label = batches[0]['label']
  assert label.dtype == np.int32 and (label[:, 0, 0] == np.array(ids[0]) % 12).all()


@pytest.mark.parametrize('workers', [0, 2])
def test_train_iterator_resumes_at_next_batch(workers):
  """Started at a step, the iterator reads what an uninterrupted one reads from there, whatever
  the number of workers (a resumed run may change data.num_workers)."""
  config = data_config('/unused', image_size=(8, 8), random_flip=True)
  source = IndexSource(10)
  iterator = input_pipeline.train_iterator(source, config, global_batch_size=4, seed=3)
  expected = [example_ids(b) for b in take(iterator, 7)][3:]  # Steps 3-6: into the third epoch.
  config.num_workers = workers
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which main.py has parsed.
  resumed = input_pipeline.train_iterator(source, config, global_batch_size=4, seed=3,
                                          start_step=3)
  got = take(resumed, 4)
  assert [example_ids(b) for b in got] == expected
  again = take(input_pipeline.train_iterator(source, config, global_batch_size=4, seed=3), 7)[3:]
  for a, b in zip(got, again):  # Flips and all.
    np.testing.assert_array_equal(a['image'], b['image'])


def test_train_process_slices_make_up_the_global_batch():
  config = data_config('/unused', image_size=(8, 8), random_flip=True)
  source = IndexSource(13)
  single = take(input_pipeline.train_iterator(source, config, global_batch_size=6, seed=0), 5)
  parts = [take(input_pipeline.train_iterator(source, config, global_batch_size=6, seed=0,
                                              process_index=p, process_count=2), 5)
           for p in range(2)]
  for step in range(5):
    assert parts[0][step]['image'].shape[0] == 3
    for key in ('image', 'label'):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, single[step][key])


def test_random_flip_flips_image_and_label_together():
  config = data_config('/unused', image_size=(4, 6), random_flip=True)

  class Ramp(IndexSource):

    def __getitem__(self, i):
      image = np.broadcast_to(np.arange(6, dtype=np.uint8)[None, :, None] * 40, (4, 6, 3))
      return {'image': image.copy(), 'label': np.arange(6, dtype=np.uint8)[None, :, None]
              .repeat(4, 0), 'file_name': b''}

  batches = take(input_pipeline.train_iterator(Ramp(8), config, global_batch_size=8, seed=0), 2)
  rows = np.concatenate([b['label'][:, 0] for b in batches])
  flipped = rows[:, 0] == 5
  assert 0 < flipped.sum() < len(flipped)
  images = np.concatenate([b['image'][:, 0, :, 0] for b in batches])
  np.testing.assert_allclose(images, (rows * 40) / 127.5 - 1, atol=1e-6)


# --- evaluation batches -------------------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
  config = data_config('/unused', eval_resize=False)
  source = IndexSource(10, height=8, width=40)
  per_process = [list(input_pipeline.eval_batches(source, config, global_batch_size=4,
                                                  process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert all(len(batches) == 3 for batches in per_process)
  seen = []
  for step in range(3):
    batch = {k: np.concatenate([b[step][k] for b in per_process]) for k in per_process[0][step]}
    assert batch['image'].shape == (4, 32, 64, 3) and batch['label'].shape == (4, 32, 64)
    for k in range(4):
      if batch['valid'][k]:
        i = batch['index'][k]
        seen.append(int(i))
        assert example_ids({'image': batch['image'][k:k + 1]}) == [i]
        assert (batch['label'][k, :8, :40] == i % 12).all()
        assert (batch['label'][k, 8:] == -1).all() and (batch['label'][k, :, 40:] == -1).all()
      else:
        assert batch['index'][k] == -1 and (batch['label'][k] == -1).all()
  assert seen == list(range(10))
  assert per_process[-1][2]['valid'].sum() == (2 if process_count == 1 else 0)


class MixedSource(IndexSource):
  """IndexSource whose odd examples are 40x70 (padded to 64x96) and even ones 8x40 (32x64)."""

  def __getitem__(self, i):
    example = super().__getitem__(i)
    if i % 2:
      example['image'] = np.full((40, 70, 3), i, np.uint8)
      example['label'] = np.full((40, 70, 1), i % 12, np.uint8)
    return example


@pytest.mark.parametrize('process_count', [1, 2])
def test_native_eval_pads_each_image_to_its_own_multiple(process_count):
  """Images of different sizes go into different batches, each padded only to its own multiple
  of 32 (as --mode=predict pads it), whichever images share the split, with one shape for all
  processes' slices of a batch."""
  config = data_config('/unused', eval_resize=False)
  source = MixedSource(7, width=40)
  per_process = [list(input_pipeline.eval_batches(source, config, global_batch_size=4,
                                                  process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1
  seen = {}
  for step in range(len(per_process[0])):
    shapes = {b[step]['image'].shape[1:3] for b in per_process}
    assert len(shapes) == 1, shapes
    batch = {k: np.concatenate([b[step][k] for b in per_process]) for k in per_process[0][step]}
    for k in np.flatnonzero(batch['valid']):
      seen[int(batch['index'][k])] = batch['image'].shape[1:3]
      assert example_ids({'image': batch['image'][k:k + 1]}) == [batch['index'][k]]
  assert seen == {i: ((64, 96) if i % 2 else (32, 64)) for i in range(7)}
  # Even examples first (the first example's shape), 4 then the 3 odd ones: two batches.
  assert input_pipeline.eval_plan(input_pipeline.padded_shapes(source), 4, process_count)[0][1] \
      == (32, 64)


def test_resized_eval_of_mixed_sizes_scores_each_at_its_native_size():
  """eval.input=resize (configs/custom.py's) on a split of several sizes: images resized, labels
  kept at each image's native size, batches grouped by it. It was a DataError at the first
  validation, after a whole epoch of training."""
  config = data_config('/unused', eval_resize=False)
  source = MixedSource(7, width=40)
  size = tuple(int(s) for s in config.image_size)
  seen = {}
  for batch in input_pipeline.eval_batches(source, config, global_batch_size=4, resize=True,
                                           native_labels=True):
    assert batch['image'].shape[1:3] == size
    for k in np.flatnonzero(batch['valid']):
      i = int(batch['index'][k])
      seen[i] = batch['label'].shape[1:3]
      assert (batch['label'][k] == i % 12).all()  # Its own label, no padding.
  assert seen == {i: ((40, 70) if i % 2 else (8, 40)) for i in range(7)}


def test_even_batch_size():
  assert input_pipeline.even_batch_size(101, 32) == 26  # CamVid val: 4 batches, 3 padded (not 27).
  assert input_pipeline.even_batch_size(233, 32) == 30  # CamVid test: 8 batches, 7 padded (not 23).
  assert input_pipeline.even_batch_size(101, 32, multiple=8) == 32
  assert input_pipeline.even_batch_size(101, 32, multiple=4) == 28
  assert input_pipeline.even_batch_size(64, 32) == 32
  assert input_pipeline.even_batch_size(5, 32) == 5
  assert input_pipeline.even_batch_size(5, 32, multiple=2) == 6
  for n in range(1, 80):
    for b in (1, 2, 4, 6, 8, 32):
      for m in (1, 2):
        if b % m:
          continue
        e = input_pipeline.even_batch_size(n, b, m)
        assert e <= b and e % m == 0 and math.ceil(n / e) == math.ceil(n / b), (n, b, m)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_are_evened_out(process_count):
  config = data_config('/unused', eval_resize=False)
  source = IndexSource(9, height=8, width=40)
  per_process = [list(input_pipeline.eval_batches(source, config, global_batch_size=8,
                                                  process_index=p, process_count=process_count,
                                                  multiple=2))
                 for p in range(process_count)]
  # 9 examples at most 8 a batch: two batches of 6 (a multiple of 2), not 8 + 8.
  assert [len(b['valid']) * process_count for b in per_process[0]] == [6, 6]
  indices = np.concatenate([np.concatenate([b[s]['index'] for b in per_process])
                            for s in range(2)])
  assert sorted(i for i in indices if i >= 0) == list(range(9)) and (indices == -1).sum() == 3


def test_eval_batches_resized(tmp_path, scenes):
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(scenes),
                       image_size=(16, 16), eval_resize=True)
  sources, _ = input_pipeline.load_sources(config)
  batches = list(input_pipeline.eval_batches(sources['test'], config, global_batch_size=2))
  assert [b['valid'].tolist() for b in batches] == [[True, True], [True, False]]
  assert batches[1]['image'].shape == (2, 16, 16, 3)
  assert (batches[1]['label'][1] == -1).all() and batches[1]['label'][0].min() >= 0


# --- errors -------------------------------------------------------------------------------------


def broken_copy(tmp_path, scenes, name):
  folder = tmp_path / name
  shutil.copytree(scenes, folder)
  return folder


def build(tmp_path, folder):
  config = data_config(tmp_path / 'cache', name='camvid', manual_dir=os.fspath(folder))
  return input_pipeline.load_sources(config)


def test_missing_or_empty_folder(tmp_path):
  with pytest.raises(DataError, match='nowhere'):
    build(tmp_path, tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='empty'):
    build(tmp_path, tmp_path / 'empty')
  (tmp_path / 'other' / 'stuff').mkdir(parents=True)
  with pytest.raises(DataError, match='no CamVid layout'):
    build(tmp_path, tmp_path / 'other')


def test_image_without_label(tmp_path, scenes):
  folder = broken_copy(tmp_path, scenes, 'a')
  (folder / 'valannot' / 'synth_val_00002.png').unlink()
  with pytest.raises(DataError, match=r'synth_val_00002\.png.*no label'):
    build(tmp_path, folder)


def test_label_without_image(tmp_path, scenes):
  folder = broken_copy(tmp_path, scenes, 'a')
  (folder / 'test' / 'synth_test_00001.png').unlink()
  with pytest.raises(DataError, match=r'synth_test_00001\.png.*no image'):
    build(tmp_path, folder)


def test_size_mismatch(tmp_path, scenes):
  folder = broken_copy(tmp_path, scenes, 'a')
  cv2.imwrite(os.fspath(folder / 'trainannot' / 'synth_train_00003.png'),
              np.zeros((20, 32), np.uint8))
  with pytest.raises(DataError, match=r'synth_train_00003\.png.*size'):
    build(tmp_path, folder)


def test_label_value_out_of_range(tmp_path, scenes):
  folder = broken_copy(tmp_path, scenes, 'a')
  label = np.zeros((24, 32), np.uint8)
  label[3, 4] = 200
  cv2.imwrite(os.fspath(folder / 'trainannot' / 'synth_train_00005.png'), label)
  with pytest.raises(DataError, match=r'synth_train_00005\.png.*200'):
    build(tmp_path, folder)


def test_colour_label(tmp_path, scenes):
  folder = broken_copy(tmp_path, scenes, 'a')
  label = camvid.COLORS[np.arange(24 * 32).reshape(24, 32) % 12]
  cv2.imwrite(os.fspath(folder / 'valannot' / 'synth_val_00000.png'), label)
  with pytest.raises(DataError, match=r'synth_val_00000\.png.*RGB'):
    build(tmp_path, folder)


@pytest.mark.parametrize('content', [b'', b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00'])
def test_corrupt_image(tmp_path, scenes, content):
  folder = broken_copy(tmp_path, scenes, 'a')
  (folder / 'train' / 'synth_train_00007.png').write_bytes(content)
  with pytest.raises(DataError, match=r'synth_train_00007\.png.*cannot decode'):
    build(tmp_path, folder)


# --- the real data set --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CAMVID.is_dir(), reason=f'{SHARED_CAMVID} not present')
def test_real_camvid(tmp_path):
  config = test_config.get_config().data
  config.update(name='camvid', manual_dir=os.fspath(SHARED_CAMVID), cache_dir=os.fspath(tmp_path),
                image_size=(288, 384), eval_resize=False)
  sources, info = input_pipeline.load_sources(config)
  assert info.num_examples == {'train': 367, 'val': 101, 'test': 233}
  example = sources['test'][0]
  assert example['image'].shape == (360, 480, 3) and example['label'].shape == (360, 480, 1)
  assert example['label'].max() <= 11
  batch = next(input_pipeline.eval_batches(sources['val'], config, global_batch_size=2))
  assert batch['image'].shape == (2, 384, 480, 3) and (batch['label'][:, 360:] == -1).all()
  batch = next(input_pipeline.train_iterator(sources['train'], config, global_batch_size=2, seed=0))
  assert batch['image'].shape == (2, 288, 384, 3)


def test_a_cache_inside_the_data_folder_does_not_change_its_fingerprint(tmp_path):
  data = tmp_path / 'data'
  (data / 'train').mkdir(parents=True)
  (data / 'train' / 'a.png').write_bytes(b'x')
  before = input_pipeline.folder_fingerprint(data, data / 'cache')
  (data / 'cache' / 'tfds').mkdir(parents=True)
  (data / 'cache' / 'tfds' / 'built.array_record').write_bytes(b'records')
  assert input_pipeline.folder_fingerprint(data, data / 'cache') == before
  assert input_pipeline.folder_fingerprint(data) != before  # Without the exclusion it would move.
  (data / 'train' / 'b.png').write_bytes(b'y')
  assert input_pipeline.folder_fingerprint(data, data / 'cache') != before


def test_the_records_version_is_part_of_the_fingerprint(tmp_path, monkeypatch):
  """Records stored another way (camvid.RECORDS_VERSION raised) are not read from an old cache."""
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'a.png').write_bytes(b'x')
  before = input_pipeline.folder_fingerprint(tmp_path)
  assert input_pipeline.folder_fingerprint(tmp_path) == before
  monkeypatch.setattr(camvid, 'RECORDS_VERSION', camvid.RECORDS_VERSION + 1)
  assert input_pipeline.folder_fingerprint(tmp_path) != before
