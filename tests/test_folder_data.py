"""A custom folder of image/label pairs (data.name='folder'): classes, encodings, splits, verify,
and training on it until it learns, in both label encodings."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, run_env
from sepres_jax import input_pipeline
from sepres_jax import train
from sepres_jax.data import folder
from sepres_jax.data import synthetic
from sepres_jax.data.camvid import DataError


def _config(tmp_path, root, encoding='ids', splits='folders', classes_file=None):
  from configs import custom  # pylint: disable=g-import-not-at-top
  config = custom.get_config()
  config.data.manual_dir = os.fspath(root)
  config.data.cache_dir = os.fspath(tmp_path / 'cache')
  config.data.folder.encoding = encoding
  config.data.folder.splits = splits
  if classes_file:
    config.data.folder.classes_file = os.fspath(classes_file)
  config.data.image_size = (64, 64)
  return config


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  """{(encoding, splits): folder} of the coloured-shapes data set."""
  base = tmp_path_factory.mktemp('shapes')
  out = {}
  for encoding, splits in (('ids', 'folders'), ('colors', 'lists'), ('ids', 'random')):
    root = base / f'{encoding}_{splits}'
    synthetic.write_shapes_folder(root, encoding, splits, counts=(24, 8, 8))
    out[encoding, splits] = root
  return out


# --- classes ------------------------------------------------------------------------------------


def test_classes_file_and_config_palette_agree(tmp_path, shapes):
  root = shapes['colors', 'lists']
  from_file = folder.palette(_config(tmp_path, root, classes_file=root / 'classes.txt').data)
  from_config = folder.palette(_config(tmp_path, root).data)
  assert from_file[0] == from_config[0] == ('background', 'disc', 'box', 'void')
  np.testing.assert_array_equal(from_file[1][:3], synthetic.SHAPE_COLORS)
  assert tuple(from_file[1][3]) == synthetic.SHAPE_VOID_COLOR  # The line with the ignore id.
  assert tuple(from_config[1][3]) == (0, 0, 0)  # No ignore colour given: black.


@pytest.mark.parametrize('text, words', [
    ('road 0 1 2 3\ncar 0 4 5 6\n', ':2: class id 0 listed twice'),
    ('road 0 1 2 3\ncar 2 4 5 6\n', 'class ids must be 0..K-1'),
    ('road 0 1 2\n', ':1: expected "name id R G B"'),
    ('road x 1 2 3\n', ':1: class id \'x\' is not an integer'),
    ('road 0 1 2 300\n', ':1: not a colour'),
    ('road 0 #12345g\n', ':1: not a colour'),
    ('road 0 1 2 3\nroad 1 4 5 6\n', ":2: class name 'road' listed twice (first on line 1)"),
    ('road 0 1 2 3\nvoid 255 1 1 1\nvoid 255 2 2 2\n',
     ':3: the ignore value 255 listed twice (first on line 2)'),
    (b'road 0 1 2 3\n\xff\xfe\n', 'classes file is not UTF-8 text'),
])
def test_bad_classes_file_names_the_line(tmp_path, text, words):
  path = tmp_path / 'classes.txt'
  path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
  with pytest.raises(DataError) as e:
    folder.read_classes_file(path, 255)
  assert str(path) in str(e.value) and words in str(e.value)


def test_a_classes_file_with_a_byte_order_mark_reads_as_without(tmp_path):
  """Windows editors start UTF-8 files with a BOM: it neither names the first class nor breaks
  a first comment line."""
  for first in ('', '# name id R G B\n'):
    path = tmp_path / 'classes.txt'
    path.write_bytes(('\ufeff' + first + 'background 0 0 0 0\nroad 1 #804080\n').encode())
    names, colors, _ = folder.read_classes_file(path, 255)
    assert names == ('background', 'road') and colors.tolist() == [[0, 0, 0], [128, 64, 128]]


def test_class_count_must_match_the_palette(tmp_path, shapes):
  config = _config(tmp_path, shapes['ids', 'folders'])
  config.data.num_classes = 4
  with pytest.raises(DataError, match=r'data.num_classes=4 but the palette names 3 classes'):
    folder.palette(config.data)


# --- label encodings ----------------------------------------------------------------------------


def test_both_encodings_decode_to_the_same_ids(tmp_path):
  rng = np.random.default_rng(1)
  _, label = synthetic.draw_shapes(rng, 20, 30)  # Void = 3.
  ids = np.where(label == 3, 255, label).astype(np.uint8)
  palette = np.asarray(synthetic.SHAPE_COLORS + (synthetic.SHAPE_VOID_COLOR,), np.uint8)
  Image.fromarray(ids).save(tmp_path / 'ids.png')
  Image.fromarray(palette[label]).save(tmp_path / 'rgb.png')
  indexed = Image.fromarray(ids).convert('P')  # A palette PNG (VOC style): its indices are ids.
  indexed.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
  indexed.save(tmp_path / 'indexed.png')
  for path, encoding in (('ids.png', 'ids'), ('rgb.png', 'colors'), ('indexed.png', 'ids')):
    config = _config(tmp_path, tmp_path, encoding)
    config.data.folder.ignore_color = synthetic.SHAPE_VOID_COLOR
    decoded, unknown = folder.decode_label(tmp_path / path, folder.spec_of(config.data))
    np.testing.assert_array_equal(decoded, label)
    assert unknown == []


def test_unknown_values_and_colours_are_found(tmp_path):
  config = _config(tmp_path, tmp_path)
  ids = np.zeros((4, 4), np.uint8)
  ids[0, 0], ids[1, 1] = 7, 255
  Image.fromarray(ids).save(tmp_path / 'ids.png')
  decoded, unknown = folder.decode_label(tmp_path / 'ids.png', folder.spec_of(config.data))
  assert unknown == [7] and decoded[0, 0] == 3 and decoded[1, 1] == 3
  config.data.folder.encoding = 'colors'
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[:] = synthetic.SHAPE_COLORS[1]
  rgb[2, 3] = (1, 2, 3)
  Image.fromarray(rgb).save(tmp_path / 'rgb.png')
  spec = folder.spec_of(config.data)
  decoded, unknown = folder.decode_label(tmp_path / 'rgb.png', spec)
  assert unknown == [(1, 2, 3)] and (decoded == 1).sum() == 15
  line = folder.describe_unknown(tmp_path / 'rgb.png', unknown, spec)
  assert line.startswith(f'{tmp_path / "rgb.png"}: label colours not in the palette: (1, 2, 3)')
  with pytest.raises(DataError, match='single-channel'):
    folder.decode_label(tmp_path / 'ids.png', spec)


# --- splits -------------------------------------------------------------------------------------


def test_the_three_ways_of_splitting(tmp_path, shapes):
  by_folders = folder.split_pairs(shapes['ids', 'folders'],
                                  folder.spec_of(_config(tmp_path, shapes['ids', 'folders']).data))
  by_lists = folder.split_pairs(shapes['colors', 'lists'], folder.spec_of(
      _config(tmp_path, shapes['colors', 'lists'], 'colors', 'lists').data))
  for split, count in (('train', 24), ('val', 8), ('test', 8)):
    assert len(by_folders[split]) == len(by_lists[split]) == count
    assert all(p[0].name.startswith(split) for p in by_lists[split])
  random_spec = folder.spec_of(_config(tmp_path, shapes['ids', 'random'], 'ids', 'random').data)
  by_random = folder.split_pairs(shapes['ids', 'random'], random_spec)
  assert {s: len(p) for s, p in by_random.items()} == {'train': 28, 'val': 6, 'test': 6}
  names = [p[0].name for s in by_random.values() for p in s]
  assert len(set(names)) == 40  # Disjoint and complete.
  assert folder.split_pairs(shapes['ids', 'random'], random_spec) == by_random  # Seeded.
  random_spec['seed'] += 1
  assert folder.split_pairs(shapes['ids', 'random'], random_spec) != by_random


def test_split_folders_beside_or_inside(tmp_path, shapes):
  """<root>/<split>/images/ works as well as <root>/images/<split>/."""
  src = shapes['ids', 'folders']
  for split in ('train', 'val'):
    for kind in ('images', 'labels'):
      (tmp_path / 'data' / split).mkdir(parents=True, exist_ok=True)
      os.symlink(src / kind / split, tmp_path / 'data' / split / kind)
  pairs = folder.split_pairs(tmp_path / 'data', folder.spec_of(_config(tmp_path, src).data))
  assert sorted(pairs) == ['train', 'val'] and len(pairs['train']) == 24  # test/ is optional.


@pytest.mark.parametrize('listed, words', [
    ('val_0000.jpg\nnot_there.jpg\n', r"val.txt:2: 'not_there.jpg' is not an image"),
    # Listed twice, it would be trained on (or scored) twice: the line and the first are named.
    ('val_0000.jpg\nval_0001\nval_0000\n',
     r"val.txt:3: 'val_0000' listed twice \(first on line 1\)"),
])
def test_a_list_naming_a_missing_or_repeated_image_is_an_error(tmp_path, listed, words):
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'lists', counts=(4, 2, 2))
  (root / 'val.txt').write_text(listed)
  spec = folder.spec_of(_config(tmp_path, root, 'ids', 'lists').data)
  with pytest.raises(DataError, match=words):
    folder.split_pairs(root, spec)


def test_a_listed_image_without_label_says_so(tmp_path):
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'lists', counts=(4, 2, 2))
  label = next((root / 'labels').glob('val_0001.*'))
  label.unlink()
  spec = folder.spec_of(_config(tmp_path, root, 'ids', 'lists').data)
  with pytest.raises(DataError, match="val.txt:2: 'val_0001.jpg' has no label \\(the image is in"):
    folder.split_pairs(root, spec)
  from sepres_jax import verify  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError) as e:  # --mode=verify says the same.
    verify._folder_splits(root, spec)  # pylint: disable=protected-access
  assert "val.txt:2: 'val_0001.jpg' has no label (the image is in" in str(e.value)


def test_lists_leave_out_unlisted_files_without_a_partner(tmp_path):
  """An unlabelled image (or a label without its image) that no list names blocked the build."""
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'lists', counts=(4, 2, 2))
  image = next((root / 'images').glob('val_0001.*'))
  Image.open(image).save(root / 'images' / f'frame_9999{image.suffix}')  # Unlabelled, unlisted.
  label = next((root / 'labels').glob('val_0001.*'))
  Image.open(label).save(root / 'labels' / 'orphan.png')  # A label with no image, unlisted.
  spec = folder.spec_of(_config(tmp_path, root, 'ids', 'lists').data)
  pairs = folder.split_pairs(root, spec)
  assert {s: len(p) for s, p in pairs.items()} == {'train': 4, 'val': 2, 'test': 2}
  assert all('frame_9999' not in p[0].name for ps in pairs.values() for p in ps)
  from sepres_jax import verify  # pylint: disable=g-import-not-at-top
  assert verify.scan(_config(tmp_path, root, 'ids', 'lists').data).problems == []


def test_void_is_drawn_apart_from_a_black_class(tmp_path):
  config = _config(tmp_path, tmp_path / 'unused')
  config.data.num_classes = 2
  config.data.folder.class_names = ('background', 'thing')
  config.data.folder.colors = ((0, 0, 0), (200, 0, 0))
  config.data.folder.ignore_color = ()
  names, colors = folder.palette(config.data)
  assert names[-1] == 'void' and tuple(colors[-1]) == (255, 255, 255)  # Not the class's black.
  config.data.folder.ignore_color = (200, 0, 0)
  with pytest.raises(DataError, match=r'ignore colour \(200, 0, 0\) is also a class colour'):
    folder.palette(config.data)


def test_awkward_png_modes_are_read_as_rgb_images_and_id_labels(tmp_path):
  """An RGB PNG with a transparency colour decodes to 4 channels in tfds (OpenCV), so it is
  stored converted; grey or palette labels with alpha give their first channel."""
  from sepres_jax.data import camvid  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'keyed.png', transparency=(0, 0, 0))
  Image.fromarray(rgb).save(tmp_path / 'plain.png')
  with Image.open(tmp_path / 'keyed.png') as img:
    stored = camvid.stored_image(img, tmp_path / 'keyed.png')
  assert isinstance(stored, Image.Image) and np.asarray(stored).shape == (6, 7, 3)
  with Image.open(tmp_path / 'plain.png') as img:
    assert camvid.stored_image(img, tmp_path / 'plain.png') == os.fspath(tmp_path / 'plain.png')
  ids = np.random.default_rng(1).integers(0, 12, (6, 7), np.uint8)
  Image.fromarray(np.stack([ids, np.full_like(ids, 255)], -1), 'LA').save(tmp_path / 'la.png')
  _, label = camvid.load_label(tmp_path / 'la.png')
  np.testing.assert_array_equal(label, ids)


def test_images_are_stored_as_predict_reads_them(tmp_path):
  """A phone photo's EXIF orientation and a 16-bit grey image's range: training stores the pixels
  `--mode=predict` reads (before, training ignored the orientation and clipped 16-bit grey at 255),
  and a label is checked against the image as displayed."""
  from sepres_jax import exported  # pylint: disable=g-import-not-at-top
  from sepres_jax.data import camvid  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)  # Stored 56 wide.
  exif = Image.Exif()
  exif[0x0112] = 6  # Displayed rotated: 40 wide, 56 high.
  Image.fromarray(rgb).save(tmp_path / 'phone.jpg', exif=exif, quality=95)
  Image.fromarray(np.zeros((56, 40), np.uint8)).save(tmp_path / 'phone_label.png')
  Image.fromarray(np.zeros((40, 56), np.uint8)).save(tmp_path / 'raw_label.png')
  shown = exported.read_image(tmp_path / 'phone.jpg')
  assert shown.shape == (56, 40, 3)
  image, _ = camvid.check_pair(tmp_path / 'phone.jpg', tmp_path / 'phone_label.png')
  np.testing.assert_array_equal(np.asarray(image), shown)
  with pytest.raises(camvid.DataError,
                     match=r'raw_label\.png: label size 56x40 != image size 40x56'):
    camvid.check_pair(tmp_path / 'phone.jpg', tmp_path / 'raw_label.png')
  grey = (np.arange(40 * 56).reshape(40, 56) * 4000 // (40 * 56)).astype(np.uint16)
  Image.fromarray(grey).save(tmp_path / 'deep.png')  # 16-bit grey, 0..3998.
  image, _ = camvid.check_pair(tmp_path / 'deep.png', tmp_path / 'raw_label.png')
  stored = np.asarray(image)
  np.testing.assert_array_equal(stored, exported.read_image(tmp_path / 'deep.png'))
  assert (stored == 255).mean() < 0.01 and stored.max() == 255  # Scaled, not clipped.


# --- verify ---------------------------------------------------------------------------------------


def test_verify_reports_sizes_frequencies_and_foreign_colours(tmp_path, shapes):
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'colors', 'folders', counts=(6, 2, 2), height=40, width=48)
  bad = root / 'labels' / 'train' / 'train_0002.png'
  rgb = cv2.imread(os.fspath(bad))
  rgb[0, 0] = (7, 8, 9)  # BGR of the colour (9, 8, 7).
  cv2.imwrite(os.fspath(bad), rgb)
  cv2.imwrite(os.fspath(root / 'images' / 'val' / 'val_0001.jpg'),
              np.zeros((30, 48, 3), np.uint8))  # Another size than its label.
  args = [sys.executable, 'main.py', '--config=configs/custom.py', '--mode=verify',
          f'--config.data.manual_dir={root}', '--config.data.folder.encoding=colors',
          f'--config.data.folder.classes_file={root / "classes.txt"}',
          f'--config.data.cache_dir={tmp_path / "cache"}']
  out = subprocess.run(args, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr
  lines = out.stdout.splitlines()
  assert 'pairs: train 6, val 2, test 2' in lines
  assert 'image sizes (width x height, images): 48x40 (9), 48x30 (1)' in lines
  rows = {l.split()[0]: [float(v) for v in l.split()[1:4]] for l in lines
          if l.startswith('  ') and l.split()[0] in ('background', 'disc', 'box', 'void')}
  assert len(rows) == 4 and all(abs(sum(r[k] for r in rows.values()) - 100) < 0.01
                                for k in range(3))
  problems = [l for l in lines if l.startswith(f'{root}/')]
  assert len(problems) == 2, out.stdout
  assert any(l.startswith(f'{bad}: label colours not in the palette: (9, 8, 7)') for l in problems)
  assert any('val_0001.png: label size 48x40 != image size 48x30' in l for l in problems)
  assert out.stderr.strip().splitlines()[-1] == f'error: 2 problem(s) in {root}'


# --- training until it learns, evaluation and prediction ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('encoding, splits', [('ids', 'folders'), ('colors', 'lists')])
def test_trains_until_it_learns_then_evaluates_and_predicts(tmp_path, shapes, encoding, splits):
  root = shapes[encoding, splits]
  config = _config(tmp_path, root, encoding, splits,
                   classes_file=root / 'classes.txt' if encoding == 'colors' else None)
  config.update_from_flattened_dict({
      'model.widths': (8, 16, 16, 32, 32), 'model.head_width': 32, 'batch_size': 4,
      'eval_batch_size': 4, 'num_epochs': 30, 'learning_rate': 3e-3, 'data.augment.crop': False,
      'data.random_flip': True, 'eval.input': 'native', 'visualize.num_tensorboard_images': 0,
      'early_stopping.patience': 0, 'eval.num_panels': 2})
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, os.fspath(workdir))
  history = json.loads((workdir / 'history.json').read_text())
  first, best = history[0]['val_miou'], max(h['val_miou'] for h in history)
  assert best > 0.6 and best > first + 0.3, [round(h['val_miou'], 3) for h in history]

  from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
  scores = evaluate.evaluate(config, os.fspath(workdir))
  assert scores['class_names'] == ['background', 'disc', 'box']
  assert scores['miou'] > 0.55 and np.asarray(scores['confusion_matrix']).shape == (3, 3)

  from sepres_jax import predict  # pylint: disable=g-import-not-at-top
  config.predict.input = os.fspath(root / 'images' / ('test' if splits == 'folders' else ''))
  config.predict.output = os.fspath(tmp_path / 'predictions')
  assert predict.predict(config, os.fspath(workdir)) == 0
  ids = np.asarray(Image.open(tmp_path / 'predictions' / 'test_0000.png'))
  colour = np.asarray(Image.open(tmp_path / 'predictions' / 'test_0000_color.png').convert('RGB'))
  assert ids.shape == (64, 80) and ids.max() <= 2
  _, palette_colors = folder.palette(config.data)
  np.testing.assert_array_equal(colour, palette_colors[ids])  # This data set's colours.
  truth = folder.decode_label(root / 'labels' / ('test' if splits == 'folders' else '') /
                              'test_0000.png', folder.spec_of(config.data))[0]
  counted = truth < 3
  assert (ids[counted] == truth[counted]).mean() > 0.8


def test_built_records_follow_the_palette(tmp_path, shapes):
  """The tfds build maps colours to ids and void to K, and is cached by folder and palette."""
  root = shapes['colors', 'lists']
  config = _config(tmp_path, root, 'colors', 'lists', classes_file=root / 'classes.txt')
  sources, info = input_pipeline.load_sources(config.data)
  assert info.class_names == ('background', 'disc', 'box', 'void') and info.void_label == 3
  assert {s: len(v) for s, v in sources.items()} == {'train': 24, 'val': 8, 'test': 8}
  example = sources['val'][0]
  expected = folder.decode_label(root / 'labels' / 'val_0000.png', folder.spec_of(config.data))[0]
  np.testing.assert_array_equal(np.asarray(example['label'])[..., 0], expected)
  config.data.folder.ignore_color = (1, 1, 1)  # Another palette: another build, here an error.
  with pytest.raises(DataError, match='label colours not in the palette: \\(255, 255, 255\\)'):
    input_pipeline.load_sources(config.data)


# --- awkward folders (each was a stale build, a traceback or silently corrupt labels) -----------


def test_fingerprint_follows_linked_folders_and_survives_cycles_and_dangling_links(tmp_path):
  real = tmp_path / 'real'
  (real / 'train').mkdir(parents=True)
  (real / 'train' / 'a.png').write_bytes(b'x')
  data = tmp_path / 'data'
  data.mkdir()
  os.symlink(real, data / 'images')
  before = input_pipeline.folder_fingerprint(data)
  (real / 'train' / 'a.png').write_bytes(b'xy')  # An edit behind the link: a new build.
  changed = input_pipeline.folder_fingerprint(data)
  assert changed != before
  os.symlink(data, real / 'train' / 'loop')  # A link back up: walked once, no endless loop.
  os.symlink(tmp_path / 'nowhere', data / 'notes.txt')  # Dangling: counted, not an error.
  assert input_pipeline.folder_fingerprint(data) not in (before, changed)
  bad = os.fsdecode(b'b\xff.png')  # A name that is not UTF-8.
  (real / 'train' / bad).write_bytes(b'z')
  assert len(input_pipeline.folder_fingerprint(data)) == 16


def test_a_cache_that_is_the_data_folder_is_refused(tmp_path, shapes):
  """Its own builds changed the folder's fingerprint: a new full copy at every run."""
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'folders', counts=(4, 2, 2))
  config = _config(tmp_path, root)
  config.data.cache_dir = os.fspath(root)
  with pytest.raises(DataError, match='is the data folder itself'):
    input_pipeline.load_sources(config.data)
  assert not (root / 'tfds').exists()


def test_jpeg_labels_and_names_that_are_not_utf8_are_named(tmp_path):
  from sepres_jax import verify  # pylint: disable=g-import-not-at-top
  from sepres_jax.data import camvid  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'folders', counts=(4, 2, 2))
  spec = folder.spec_of(_config(tmp_path, root).data)
  label = next((root / 'labels' / 'val').glob('*.png'))
  Image.open(label).save(label.with_suffix('.jpg'), quality=90)  # Passed every check before.
  label.unlink()
  jpeg = label.with_suffix('.jpg')
  with pytest.raises(DataError, match=f'{jpeg}: a JPEG label map'):
    folder.decode_label(jpeg, spec)
  with pytest.raises(DataError, match='a JPEG label map'):
    camvid.load_label(jpeg)
  image = next((root / 'images' / 'train').iterdir())
  bad = image.with_name(os.fsdecode(b'b\xff') + image.suffix)
  image.rename(bad)
  next((root / 'labels' / 'train').glob(image.stem + '.*')).rename(
      root / 'labels' / 'train' / (bad.stem + '.png'))
  with pytest.raises(DataError, match='the file name is not valid UTF-8'):
    folder.split_pairs(root, spec)
  problems = verify.scan(_config(tmp_path, root).data).problems
  assert any('the file name is not valid UTF-8' in p for p in problems), problems
  assert any(f'{jpeg}: a JPEG label map' in p for p in problems), problems


@pytest.mark.parametrize('encoding, words', [
    ('utf-8-sig', None),  # Notepad's UTF-8 with a byte-order mark: read as without.
    ('utf-16', 'val.txt: not UTF-8 text'),  # Notepad's "Unicode": was a traceback.
])
def test_split_lists_in_a_windows_editors_encodings(tmp_path, encoding, words):
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'lists', counts=(4, 2, 2))
  names = (root / 'val.txt').read_text()
  (root / 'val.txt').write_text(names, encoding=encoding)
  spec = folder.spec_of(_config(tmp_path, root, 'ids', 'lists').data)
  if words is None:
    assert len(folder.split_pairs(root, spec)['val']) == 2
  else:
    with pytest.raises(DataError, match=words):
      folder.split_pairs(root, spec)


def test_verify_notes_image_sub_folders_it_does_not_read(tmp_path, capsys):
  """images/train/cityB/*.png beside images/train/*.png were left out without a word."""
  from sepres_jax import verify  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  synthetic.write_shapes_folder(root, 'ids', 'folders', counts=(4, 2, 2))
  config = _config(tmp_path, root)
  assert verify.scan(config.data).notes == []
  nested = root / 'images' / 'train' / 'cityB'
  nested.mkdir()
  image = next((root / 'images' / 'train').glob('*.*'))
  Image.open(image).save(nested / f'extra{image.suffix}')
  report = verify.scan(config.data)
  assert report.problems == [] and len(report.notes) == 1, report.notes
  assert report.notes[0].startswith(f'{nested}: 1 image file(s) in a sub-folder')
  assert verify.verify(config) == 0
  assert f'note: {nested}: 1 image file(s)' in capsys.readouterr().out
