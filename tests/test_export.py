"""--mode=export, and its loader with jax and numpy alone: the labels of --mode=predict."""

import glob
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import cv2
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from conftest import ROOT, run_env, train_tiny
from sepres_jax import cli
from sepres_jax import export
from sepres_jax import exported
from sepres_jax import models
from sepres_jax import predict
from sepres_jax import train

# Three images that pad to 96x96 (one batch of 3 in 'native') and one that pads to 64x64.
SIZES = {'wide': (72, 96), 'odd': (75, 85), 'square': (96, 96), 'small': (50, 33)}

# Runs in a fresh interpreter in which flax, orbax, ml_collections, OpenCV and PIL cannot be
# imported: only numpy, jax and sepres_jax/exported.py predict.
LOADER_SCRIPT = r'''
import sys
for name in ('flax', 'orbax', 'orbax.checkpoint', 'ml_collections', 'cv2', 'PIL', 'optax',
             'tensorflow_datasets', 'grain', 'absl'):
  sys.modules[name] = None
import numpy as np
from sepres_jax import exported
images, out = sys.argv[1], sys.argv[2]
with np.load(images) as f:
  stems = list(f['stems'])
  rgbs = [f[s] for s in stems]
results = {}
for folder in sys.argv[3:]:
  model = exported.load(folder)
  tag = model.input_mode
  ids = model.predict(rgbs, batch_size=3)  # Batches of 3 and of 1.
  for stem, rgb, label in zip(stems, rgbs, ids):
    results[f'{tag}/{stem}'] = label
    results[f'{tag}/{stem}_color'] = model.colorize(label)
    results[f'{tag}/{stem}_overlay'] = model.overlay(rgb, label)
  results[f'{tag}/single'] = model.predict(rgbs[-1])  # One image, a batch of 1.
  results[f'{tag}/batch_dim'] = np.array(str(model.exported.in_avals[-1].shape[0]))
others = sorted(m for m in sys.modules if m.startswith('sepres_jax.') and m != 'sepres_jax.exported')
results['others'] = np.array(','.join(others))
np.savez(out, **results)
'''


def _weights_tree(folder):
  """{'params', 'batch_stats'} nested dicts from an export's weights.npz."""
  tree = {}
  with np.load(os.path.join(folder, exported.WEIGHTS_FILE)) as f:
    for name in f.files:
      *parents, leaf = name.split('/')
      node = tree
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = f[name]
  return tree


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """Both input modes exported, and predicted by predict.predict_files with the same weights.

  'native' goes through --mode=export itself; 'resize' (with flip averaging) through
  export.write with the weights that the first export wrote, which saves a second restore.
  """
  root = tmp_path_factory.mktemp('export')
  config, workdir = train_tiny(root)
  rng = np.random.default_rng(0)
  rgbs = {stem: rng.integers(0, 256, (*hw, 3), np.uint8) for stem, hw in SIZES.items()}
  for stem, rgb in rgbs.items():
    (root / 'images').mkdir(exist_ok=True)
    Image.fromarray(rgb).save(root / 'images' / f'{stem}.png')
  paths = [str(root / 'images' / f'{stem}.png') for stem in SIZES]
  np.savez(root / 'images.npz', stems=np.array(list(SIZES)), **rgbs)

  native = config.copy_and_resolve_references()
  native.predict.resize = 'native'
  assert cli.run('export', native, workdir) == 0
  variables = _weights_tree(os.path.join(workdir, 'export'))
  resize = config.copy_and_resolve_references()
  resize.predict.resize = 'resize'
  resize.eval.flip = True
  resize.export.output = str(root / 'export_resize')
  model = models.create_model(config, train.num_outputs(config))
  export.write(resize, model, variables, 'test weights', resize.export.output)

  folders = {}
  for mode, cfg in (('native', native), ('resize', resize)):
    forward = predict.Forward(model.apply, variables, cfg.eval.flip, cfg.eval.scales)
    out = str(root / f'predicted_{mode}')
    assert predict.predict_files(cfg, forward, paths, out) == (len(paths), [])
    folders[mode] = out
  return {'config': config, 'workdir': workdir, 'root': root, 'predicted': folders,
          'exports': {'native': os.path.join(workdir, 'export'),
                      'resize': resize.export.output}}


def test_loader_equals_predict_without_flax(exports):
  """In a process without flax, orbax, OpenCV or PIL: predict's labels, colours and overlays."""
  root = exports['root']
  out = root / 'loader.npz'
  subprocess.run([sys.executable, '-c', LOADER_SCRIPT, str(root / 'images.npz'), str(out),
                  exports['exports']['native'], exports['exports']['resize']],
                 check=True, env=run_env(), cwd=ROOT, timeout=300)
  with np.load(out) as got:
    assert str(got['others']) == ''  # Nothing else of the package was imported.
    for mode, folder in exports['predicted'].items():
      assert str(got[f'{mode}/batch_dim']) == 'b'
      for stem, (h, w) in SIZES.items():
        ids = np.asarray(Image.open(os.path.join(folder, f'{stem}.png')))
        assert ids.shape == (h, w)
        np.testing.assert_array_equal(got[f'{mode}/{stem}'], ids, err_msg=f'{mode} {stem}')
        for suffix in ('_color', '_overlay'):
          expected = np.asarray(Image.open(os.path.join(folder, f'{stem}{suffix}.png')))
          np.testing.assert_array_equal(got[f'{mode}/{stem}{suffix}'], expected)
      np.testing.assert_array_equal(got[f'{mode}/single'], got[f'{mode}/small'])
    # Not a constant map: the comparison above could fail.
    assert len(np.unique(got['native/wide'])) > 1


def test_export_folder(exports):
  """meta.json says what the loader needs; the weights are the checkpoint's, bit for bit."""
  folder = exports['exports']['native']
  assert sorted(os.listdir(folder)) == ['meta.json', 'model.jax', 'weights.npz']
  with open(os.path.join(folder, 'meta.json')) as f:
    meta = json.load(f)
  config = exports['config']
  assert meta['input']['mode'] == 'native' and meta['input']['size'] is None
  assert meta['num_outputs'] == train.num_outputs(config) == len(meta['class_names']) - 1
  assert meta['class_names'][-1] == 'void' and len(meta['colors']) == len(meta['class_names'])
  assert meta['platforms'] == ['cpu', 'cuda'] or meta['platforms_note']
  with open(os.path.join(exports['exports']['resize'], 'meta.json')) as f:
    resize_meta = json.load(f)
  assert resize_meta['input']['size'] == list(config.data.image_size) and resize_meta['flip']
  [step] = glob.glob(os.path.join(exports['workdir'], 'checkpoints', '*', 'state'))
  saved = ocp.PyTreeCheckpointer().restore(step)
  weights = _weights_tree(folder)
  for part in ('params', 'batch_stats'):
    flat = dict(_flatten(saved[part]))
    assert flat.keys() == dict(_flatten(weights[part])).keys()
    for name, value in _flatten(weights[part]):
      np.testing.assert_array_equal(value, flat[name])


def _flatten(tree, prefix=''):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, f'{prefix}{k}/')
    else:
      yield f'{prefix}{k}', np.asarray(v)


@pytest.mark.parametrize('what, expected', [
    ('no_checkpoint', 'no checkpoint in'),
    ('lab', 'data.lab'),
    ('native_scales', 'eval.scales'),
    ('ensemble', 'eval.ensemble'),
])
def test_one_line_errors(tiny_config, tmp_path, capsys, what, expected):
  if what == 'lab':
    tiny_config.data.lab = True
  elif what == 'native_scales':
    tiny_config.predict.resize = 'native'
    tiny_config.eval.scales = (0.5, 1.0)
  elif what == 'ensemble':
    tiny_config.eval.ensemble = str(tmp_path / 'other_run')
  assert cli.run('export', tiny_config, str(tmp_path / 'run')) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error:') and expected in err[0], err
  assert not (tmp_path / 'run' / 'export').exists()


@pytest.mark.parametrize('src, dst', [
    ((360, 480), (224, 288)), ((720, 960), (224, 288)), ((448, 576), (224, 288)),  # 2x exactly.
    ((72, 96), (64, 64)), ((50, 33), (64, 64)), ((17, 250), (96, 32)), ((64, 128), (64, 64)),
    ((1, 1), (32, 32)), ((1080, 1920), (256, 320)),
])
def test_resize_linear_equals_opencv(src, dst):
  """The loader's numpy resize is OpenCV's INTER_LINEAR (which predict uses) to the bit."""
  rgb = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), np.uint8)
  ours = exported.resize_linear(rgb, dst)
  np.testing.assert_array_equal(ours, cv2.resize(rgb, dst[::-1], interpolation=cv2.INTER_LINEAR))


def test_failed_export_leaves_the_earlier_one_whole(exports, monkeypatch):
  """A failure while writing (here the weights) replaces none of the earlier export's files."""
  folder = exports['exports']['resize']
  before = {n: (Path(folder) / n).read_bytes() for n in os.listdir(folder)}
  config = exports['config'].copy_and_resolve_references()
  config.predict.resize = 'resize'
  model = models.create_model(config, train.num_outputs(config))

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(np, 'savez', full_disk)
  with pytest.raises(OSError, match='No space left'):
    export.write(config, model, _weights_tree(folder), 'other weights', folder)
  assert {n: (Path(folder) / n).read_bytes() for n in os.listdir(folder)} == before


def test_native_cpu_impl_exports_fast_cpu_forward(exports, tmp_path):
  """model.impl=native_cpu: its compiled calls cannot be exported; its forward pass is fast_cpu's
  numbers, so the export holds that form and gives the same labels as the default export."""
  config = exports['config'].copy_and_resolve_references()
  config.predict.resize = 'native'
  config.model.impl = 'native_cpu'
  variables = _weights_tree(exports['exports']['native'])
  model = models.create_model(config, train.num_outputs(config))
  export.write(config, model, variables, 'test weights', str(tmp_path / 'native_cpu'))
  rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), np.uint8)
  want = exported.load(exports['exports']['native']).predict([rgb])
  got = exported.load(str(tmp_path / 'native_cpu')).predict([rgb])
  assert len(np.unique(want[0])) > 1
  np.testing.assert_array_equal(got[0], want[0])


def test_files_of_two_exports_do_not_load(exports, tmp_path):
  """A kill between the renames leaves one export's model.jax beside another's meta.json: the
  digests in meta.json make that a one-line error instead of the wrong weights' function."""
  mixed = tmp_path / 'mixed'
  shutil.copytree(exports['exports']['native'], mixed)
  assert exported.load(str(mixed)).meta['sha256'].keys() == {'model.jax', 'weights.npz'}
  shutil.copyfile(Path(exports['exports']['resize']) / 'model.jax', mixed / 'model.jax')
  with pytest.raises(ValueError, match=r'mixed/model\.jax is not the file meta\.json was written'):
    exported.load(str(mixed))


def test_a_killed_exports_temporary_folder_is_removed_by_the_next(exports, tmp_path):
  out = tmp_path / 'out'
  (out / '.export-killed').mkdir(parents=True)
  (out / '.export-killed' / 'model.jax').write_bytes(b'half')
  config = exports['config'].copy_and_resolve_references()
  config.predict.resize = 'native'
  model = models.create_model(config, train.num_outputs(config))
  export.write(config, model, _weights_tree(exports['exports']['native']), 'w', str(out))
  assert sorted(os.listdir(out)) == ['meta.json', 'model.jax', 'weights.npz']


def test_the_platform_check_uses_export_names(exports, monkeypatch):
  """On an NVIDIA GPU jax.default_backend() is 'gpu' while exports list 'cuda': every export was
  refused there. The check now asks jax.export for this machine's platform name."""
  import jax  # pylint: disable=g-import-not-at-top
  folder = exports['exports']['native']
  assert 'cuda' in exported.load(folder).platforms
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax.export, 'default_export_platform', lambda: 'cuda')
  exported.load(folder)  # Loads: 'cuda' is among the exported platforms.
  monkeypatch.setattr(jax.export, 'default_export_platform', lambda: 'tpu')
  with pytest.raises(ValueError, match="exported for cpu, cuda, not for this machine's tpu"):
    exported.load(folder)
