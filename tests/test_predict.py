"""--mode=predict on any images, and --mode=summary, from a tiny model trained once."""

import glob
import os

import numpy as np
from PIL import Image
import pytest

from conftest import train_tiny
from sepres_jax import cli
from sepres_jax import evaluate
from sepres_jax import input_pipeline
from sepres_jax import predict
from sepres_jax.data import camvid


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of a 1-epoch tiny run: a real checkpoint to predict with."""
  return train_tiny(tmp_path_factory.mktemp('predict'), visualize__num_tensorboard_images=0)


def _mixed_folder(folder):
  rng = np.random.default_rng(0)
  folder.mkdir()
  Image.fromarray(rng.integers(0, 256, (70, 90, 3), np.uint8)).save(folder / 'rgb.png')
  Image.fromarray(rng.integers(0, 256, (50, 33), np.uint8)).save(folder / 'grey.png')
  Image.fromarray(rng.integers(0, 256, (64, 64, 4), np.uint8), 'RGBA').save(folder / 'rgba.png')
  # 75x85 pads to 96x96 like 70x90: two model input shapes in all, so two compilations.
  Image.fromarray(rng.integers(0, 256, (75, 85, 3), np.uint8)).save(folder / 'photo.jpg')
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nnot a png at all')
  (folder / 'empty.jpg').write_bytes(b'')
  (folder / 'notes.txt').write_text('not an image: ignored in a folder')
  return {'rgb': (70, 90), 'grey': (50, 33), 'rgba': (64, 64), 'photo': (75, 85)}


def test_predict_mixed_folder(trained, tmp_path, capsys):
  config, workdir = trained
  sizes = _mixed_folder(tmp_path / 'in')
  config = config.copy_and_resolve_references()
  config.predict.input = str(tmp_path / 'in')
  config.predict.output = str(tmp_path / 'out')
  config.predict.batch_size = 2
  status = cli.run('predict', config, workdir)
  err = capsys.readouterr().err
  assert status == predict.SKIPPED_STATUS != 0
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 2 and 'corrupt.png' in errors[0] and 'empty.jpg' in errors[1]
  expected = {f'{stem}{suffix}.png' for stem in sizes for suffix in ('', '_color', '_overlay')}
  assert set(os.listdir(tmp_path / 'out')) == expected
  for stem, (h, w) in sizes.items():
    ids = Image.open(tmp_path / 'out' / f'{stem}.png')
    assert ids.mode == 'L' and ids.size == (w, h)
    ids = np.asarray(ids)
    assert ids.max() < config.data.num_classes
    color = np.asarray(Image.open(tmp_path / 'out' / f'{stem}_color.png'))
    np.testing.assert_array_equal(color, camvid.COLORS[ids])  # Exactly the palette.
    overlay = np.asarray(Image.open(tmp_path / 'out' / f'{stem}_overlay.png'))
    assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8


@pytest.mark.parametrize('mode', ['native', pytest.param('resize', marks=pytest.mark.slow)])
def test_prediction_equals_evaluation_path(trained, tmp_path, mode):
  """A training image predicted from its file == the evaluation pass's argmax for it."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.input = mode
  sources, _ = input_pipeline.load_sources(config.data)
  source = sources['train']
  batches = input_pipeline.eval_batches(source, config.data, global_batch_size=4,
                                        resize=mode == 'resize', native_labels=mode == 'resize')
  _, state, mesh, _ = evaluate.trained_state(config, workdir)
  batch, _, per_example = next(evaluate.eval_pass(state, mesh, batches))
  k = 1
  name = source[int(batch['index'][k])]['file_name'].decode()
  [path] = glob.glob(os.path.join(config.data.cache_dir, 'synthetic-*', 'train', name))
  forward = predict.Forward(state.apply_fn, {'params': state.params,
                                             'batch_stats': state.batch_stats})
  assert predict.predict_files(config, forward, [path], str(tmp_path)) == (1, [])
  ids = np.asarray(Image.open(tmp_path / (os.path.splitext(name)[0] + '.png')))
  h, w = ids.shape
  assert (h, w) == (config.data.synthetic.height, config.data.synthetic.width)
  np.testing.assert_array_equal(ids, per_example['pred'][k][:h, :w])


def test_write_outputs_known_label_map(tmp_path):
  ids = np.arange(12, dtype=np.uint8).repeat(3).reshape(6, 6)
  rgb = np.full((6, 6, 3), 200, np.uint8)
  predict.write_outputs(str(tmp_path), 'known', rgb, ids, camvid.COLORS, alpha=1.0)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'known.png')), ids)
  color = np.asarray(Image.open(tmp_path / 'known_color.png'))
  for c in range(12):
    assert (color[ids == c] == camvid.COLORS[c]).all()
  overlay = np.asarray(Image.open(tmp_path / 'known_overlay.png'))
  np.testing.assert_array_equal(overlay[ids < 11], camvid.COLORS[ids[ids < 11]])  # alpha 1.
  np.testing.assert_array_equal(overlay[ids == 11], rgb[ids == 11])  # Void keeps the image.


def test_no_match_is_one_line(tiny_config, tmp_path, capsys):
  tiny_config.predict.input = str(tmp_path / 'nowhere' / '*.png')
  assert cli.run('predict', tiny_config, str(tmp_path / 'run')) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error:') and 'nowhere' in err[0]


def test_pad_to_multiple():
  x = np.ones((70, 90, 3), np.float32)
  y = predict.pad_to_multiple(x)
  assert y.shape == (96, 96, 3) and y[:70, :90].all() and not y[70:].any() and not y[:, 90:].any()
  assert predict.pad_to_multiple(np.ones((64, 32, 3))).shape == (64, 32, 3)


def test_summary_seed_total(capsys):
  from configs import seed  # pylint: disable=g-import-not-at-top
  assert cli.run('summary', seed.get_config(), '/nonexistent') == 0
  out = capsys.readouterr().out
  assert 'total parameters: 17,530,712' in out
  for layer in ('stem', 'block4', 'conv6', 'up_final'):
    assert layer in out
  assert '(1, 224, 224, 12)' in out
