"""--mode=predict on any images and videos, and --mode=summary, from a tiny model trained once."""

import glob
import io
import json
import os
from pathlib import Path
import shutil

import cv2
import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import train_tiny
from conftest import weights_folder
from sepres_jax import cli
from sepres_jax import drawing
from sepres_jax import evaluate
from sepres_jax import input_pipeline
from sepres_jax import predict
from sepres_jax import video
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
  jpeg = (folder / 'photo.jpg').read_bytes()  # FFmpeg decodes half a JPEG as a one-frame video.
  (folder / 'half.jpg').write_bytes(jpeg[:len(jpeg) // 2])
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
  assert len(errors) == 3 and 'corrupt.png' in errors[0] and 'empty.jpg' in errors[1], errors
  assert 'half.jpg: cannot read image' in errors[2]  # Skipped as an image, not a video.
  expected = {f'{stem}{suffix}.png' for stem in sizes for suffix in ('', '_color', '_overlay')}
  expected.add(predict.MARKER)
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


def test_file_names_that_are_not_utf8_are_printed_escaped(trained, tmp_path, monkeypatch):
  """Under a strict UTF-8 stdout (en_US.UTF-8's), a line naming lat\xe9.png was a traceback."""
  config, workdir = trained
  folder = tmp_path / 'in'
  folder.mkdir()
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  for name in ('lat\udce9.png', 'lat\udce9.jpg'):  # The bytes b'lat\xe9', as os.listdir keeps them.
    Image.fromarray(rgb).save(os.path.join(folder, name))
  (folder / 'bad\udce9.png').write_bytes(b'not a png')
  config = config.copy_and_resolve_references()
  config.predict.input, config.predict.output = str(folder), str(tmp_path / 'out')
  out = io.BytesIO()
  monkeypatch.setattr('sys.stdout', io.TextIOWrapper(out, encoding='utf-8', errors='strict',
                                                     write_through=True))
  assert cli.run('predict', config, workdir) == predict.SKIPPED_STATUS
  text = out.getvalue().decode('utf-8')
  assert 'written as lat\\udce9_2.png' in text, text  # The byte \xe9, escaped.
  assert 'skipped 1: ' in text and 'bad\\udce9.png' in text, text
  assert {'lat\udce9.png', 'lat\udce9_2.png'} <= set(os.listdir(tmp_path / 'out'))


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
  assert len(np.unique(ids)) > 1  # Not a constant map, which any two paths would agree on.
  np.testing.assert_array_equal(ids, per_example['pred'][k][:h, :w])


def test_few_images_run_in_a_small_batch_with_the_same_classes(trained):
  """label_maps pads n images to the next power of two (at most predict.batch_size, a multiple
  of the devices), not to a full batch: one large photo took batch_size copies of its memory."""
  assert [predict.padded_batch(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert [predict.padded_batch(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
  assert [predict.padded_batch(n, 8, devices=2) for n in (1, 3)] == [2, 4]
  assert predict.padded_batch(3, 3, devices=2) == 4
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.input = 'native'
  config.predict.batch_size = 8
  _, state, _, _ = evaluate.trained_state(config, workdir)
  forward = predict.Forward(state.apply_fn, {'params': state.params,
                                             'batch_stats': state.batch_stats})
  sizes, logits = [], forward.logits
  forward.logits = lambda x: sizes.append(len(x)) or logits(x)
  source = input_pipeline.load_sources(config.data)[0]['train']
  rgbs = [np.asarray(source[i]['image']) for i in range(3)]
  one = predict.label_maps(config, forward, rgbs[:1])
  three = predict.label_maps(config, forward, rgbs)
  assert sizes == [1, 4]
  config.predict.batch_size = 1
  for rgb, ids in zip(rgbs, three):  # The padding changes no image's classes.
    np.testing.assert_array_equal(ids, predict.label_maps(config, forward, [rgb])[0])
  np.testing.assert_array_equal(one[0], three[0])


def test_ensemble_in_evaluate_and_predict(trained, tmp_path, capsys):
  """eval.ensemble: evaluate and predict average the members' probabilities, the same way."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.input, config.eval.num_panels = 'native', 0
  config.eval.ensemble = weights_folder(config, tmp_path / 'member', seed=3, noise=0.3)
  source = input_pipeline.load_sources(config.data)[0]['train']
  _, state, mesh, _ = evaluate.trained_state(config, workdir)
  own, member = evaluate.members(config, state)
  batches = lambda: input_pipeline.eval_batches(source, config.data, global_batch_size=4,
                                                resize=False)
  batch, _, both = next(evaluate.eval_pass(state, mesh, batches(), others=[member]))
  _, _, alone = next(evaluate.eval_pass(state, mesh, batches()))
  probs = sum(jax.nn.softmax(state.apply_fn(v, batch['image'], train=False)) for v in (own, member))
  np.testing.assert_array_equal(both['pred'], np.argmax(probs, -1))
  assert (both['pred'] != alone['pred']).mean() > 0.05  # The member counts.
  # --mode=predict on a training image's file gives the same classes.
  k = 1
  name = source[int(batch['index'][k])]['file_name'].decode()
  [path] = glob.glob(os.path.join(config.data.cache_dir, 'synthetic-*', 'train', name))
  config.predict.input, config.predict.output = path, str(tmp_path / 'out')
  assert cli.run('predict', config, workdir) == 0
  assert 'and 1 ensemble member(s)' in capsys.readouterr().out
  ids = np.asarray(Image.open(tmp_path / 'out' / (os.path.splitext(name)[0] + '.png')))
  np.testing.assert_array_equal(ids, both['pred'][k][:ids.shape[0], :ids.shape[1]])
  # --mode=evaluate records the members; a wrong member is one line naming it.
  config.eval.split = 'val'
  plain = config.copy_and_resolve_references()
  plain.eval.ensemble = ''
  assert cli.run('evaluate', plain, workdir) == 0
  plain_scores = (Path(workdir) / 'eval' / 'val.json').read_text()
  assert cli.run('evaluate', config, workdir) == 0
  assert '1 ensemble member(s)' in capsys.readouterr().out
  with open(os.path.join(workdir, 'eval', 'val_ens2.json')) as f:
    assert json.load(f)['ensemble'] == [config.eval.ensemble]
  # The single network's scores are kept beside the ensemble's (the same file before).
  assert (Path(workdir) / 'eval' / 'val.json').read_text() == plain_scores
  assert json.loads(plain_scores)['ensemble'] == []
  shipped = str(ROOT / 'pretrained' / 'camvid_sepres_w192_h512')  # Another network.
  for wrong, expected in ((str(tmp_path / 'nowhere'), 'nowhere'),
                          (shipped, 'was trained with model.'),
                          (f'{shipped},{workdir}', f'{workdir} is named twice')):
    config.eval.ensemble = wrong
    assert cli.run('evaluate', config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error:') and expected in err[0], err


def test_evaluate_keeps_earlier_scores_of_other_input_or_weights(trained, tmp_path, capsys):
  """eval/val.json of eval.input=native was replaced by the resize evaluation's (same name)."""
  config, workdir = trained
  workdir = shutil.copytree(workdir, tmp_path / 'run')
  config = config.copy_and_resolve_references()
  config.eval.split, config.eval.num_panels = 'val', 0
  eval_dir = Path(workdir) / 'eval'
  shutil.rmtree(eval_dir, ignore_errors=True)

  def scores(name):
    return json.loads((eval_dir / f'{name}.json').read_text())

  assert cli.run('evaluate', config, workdir) == 0
  assert cli.run('evaluate', config, workdir) == 0  # The same evaluation: replaced.
  assert sorted(os.listdir(eval_dir)) == ['val', 'val.json']
  native = scores('val')
  config.eval.input = 'resize'
  assert cli.run('evaluate', config, workdir) == 0
  assert 'kept the earlier scores (checkpoint best checkpoint' in capsys.readouterr().out
  assert scores('val')['input'] == 'resize' and scores('val.1') == native
  assert (eval_dir / 'val.1' / 'iou.png').is_file()
  config.eval.checkpoint = 'latest'  # Other weights (here the same step, another choice).
  assert cli.run('evaluate', config, workdir) == 0
  assert scores('val.2')['input'] == 'resize' and scores('val.1') == native
  assert scores('val')['checkpoint'].startswith('latest checkpoint')
  config.dtype = 'bfloat16'
  assert cli.run('evaluate', config, workdir) == 0
  assert scores('val.3')['dtype'] == 'float32' and scores('val')['dtype'] == 'bfloat16'
  assert sorted(os.listdir(eval_dir)) == ['val', 'val.1', 'val.1.json', 'val.2', 'val.2.json',
                                          'val.3', 'val.3.json', 'val.json']


def test_evaluate_names_what_it_cannot_read_or_write_and_keeps_the_old_scores(trained, tmp_path,
                                                                              capsys):
  """An empty weights/ folder (was a TypeError traceback), checkpoints without their config.json
  (best silently became latest), and a scores file that cannot be written (was emptied first)."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.split, config.eval.num_panels = 'val', 0
  (tmp_path / 'empty' / 'weights').mkdir(parents=True)
  shutil.copytree(os.path.join(workdir, 'checkpoints'), tmp_path / 'nocfg' / 'checkpoints')
  for key, value, words in (('eval.ensemble', tmp_path / 'empty', 'no weights metadata'),
                            ('init_from', tmp_path / 'nocfg', 'config.json: missing or names no')):
    bad = config.copy_and_resolve_references()
    if key == 'eval.ensemble':
      bad.eval.ensemble = str(value)
    else:
      bad.init_from = str(value)
    assert cli.run('evaluate', bad, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(value) in err[0] and words in err[0], err
  assert cli.run('evaluate', config, workdir) == 0
  scores = Path(workdir) / 'eval' / 'val.json'
  before = scores.read_text()
  (Path(workdir) / 'eval' / 'val.json.tmp').mkdir()  # The write through it fails.
  try:
    assert cli.run('evaluate', config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{scores}: cannot write the scores' in err[0], err
    assert scores.read_text() == before
  finally:
    (Path(workdir) / 'eval' / 'val.json.tmp').rmdir()
  config.eval.flip, config.eval.scales = True, (0.75, 1.0)
  config.eval.ensemble = 'a,b'
  assert evaluate.result_name(config, 'test') == 'test_ens3_flip_x0.75-1'
  config.eval.ensemble = f'a,{tmp_path}/x/../a'  # Relative 'a' is not /tmp/.../a: counted once.
  assert evaluate.ensemble_paths(config) == ['a', f'{tmp_path}/x/../a']
  for twice in (f'{tmp_path}/a,{tmp_path}/x/../a', f'{tmp_path}/nocfg'):
    config.eval.ensemble, config.init_from = twice, str(tmp_path / 'nocfg')
    with pytest.raises(evaluate.checkpoints.CheckpointError, match='named twice'):
      evaluate.ensemble_paths(config)
  config.init_from, config.eval.ensemble = '', f'{tmp_path}/run,b'  # The evaluated workdir.
  assert evaluate.ensemble_paths(config) == [f'{tmp_path}/run', 'b']
  with pytest.raises(evaluate.checkpoints.CheckpointError, match='named twice'):
    evaluate.ensemble_paths(config, f'{tmp_path}/x/../run')


def _write_video(path, frames, fps, fourcc='FFV1'):
  """RGB frames -> a video file (FFV1 in .avi: lossless, so its frames are these)."""
  h, w = frames[0].shape[:2]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
  assert writer.isOpened()
  for frame in frames:
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
  writer.release()


def _decode(path):
  """(RGB frames, fps, (width, height)) as OpenCV reads them."""
  capture = cv2.VideoCapture(str(path))
  assert capture.isOpened(), path
  fps = capture.get(cv2.CAP_PROP_FPS)
  size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
  frames = []
  while (frame := capture.read())[0]:
    frames.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
  capture.release()
  return frames, fps, size


def _ids(path):
  return np.asarray(Image.open(path))


def _luma(rgb):
  return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)


def test_predict_video(trained, tmp_path, capsys):
  """A folder with a video, its frames as images and a corrupt video: frame labels as images'."""
  config, workdir = trained
  scenes = sorted(glob.glob(os.path.join(config.data.cache_dir, 'synthetic-*', 'train', '*.png')))
  frames = [np.asarray(Image.open(f).convert('RGB')) for f in scenes[:7]]  # 72x96, all different.
  inputs = tmp_path / 'in'
  inputs.mkdir()
  _write_video(inputs / 'clip.avi', frames, fps=12)
  decoded, fps, size = _decode(inputs / 'clip.avi')  # Exactly what predict will see.
  assert len(decoded) == 7 and fps == 12 and size == (96, 72)
  for i, frame in enumerate(decoded):  # The same frames as image files.
    Image.fromarray(frame).save(inputs / f'frame{i}.png')
  (inputs / 'broken.mp4').write_bytes(b'not a video at all' * 10)
  config = config.copy_and_resolve_references()
  config.predict.input = str(inputs)
  config.predict.output = str(tmp_path / 'out')
  config.predict.batch_size = 3  # 7 frames: batches of 3, 3 and 1.
  config.predict.save_frames = True
  stale = tmp_path / 'out' / 'clip_frames'  # A longer clip predicted here before, and a user file.
  stale.mkdir(parents=True)
  for name in ('000007.png', '000012.png', 'keep.txt'):
    (stale / name).write_bytes(b'old')
  (tmp_path / 'out' / predict.MARKER).write_text('')  # Predicted there before: its folder.
  status = cli.run('predict', config, workdir)
  out, err = capsys.readouterr()
  assert status == predict.SKIPPED_STATUS != 0
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'broken.mp4' in errors[0] and 'video' in errors[0], err
  out_dir = tmp_path / 'out'
  overlay_path = out_dir / 'clip_overlay.mp4'
  images = {f'frame{i}{suffix}.png' for i in range(7) for suffix in ('', '_color', '_overlay')}
  assert set(os.listdir(out_dir)) == images | {'clip_overlay.mp4', 'clip_frames', predict.MARKER}
  assert sorted(os.listdir(out_dir / 'clip_frames')) == [f'{i:06d}.png' for i in range(7)] + [
      'keep.txt']
  assert any('7 frames' in l and str(overlay_path) in l for l in out.splitlines()), out

  overlays, overlay_fps, overlay_size = _decode(overlay_path)
  assert len(overlays) == 7 and overlay_fps == 12 and overlay_size == (96, 72)
  errors = []
  for i, (frame, picture) in enumerate(zip(decoded, overlays)):
    ids = _ids(out_dir / f'frame{i}.png')
    np.testing.assert_array_equal(_ids(out_dir / 'clip_frames' / f'{i:06d}.png'), ids)
    # Overlay frame i is frame i's overlay up to mp4v's loss, compared in luma (chroma is
    # subsampled): ~3 here; another frame's overlay differs by ~20, R and B swapped by ~6.
    expected = drawing.overlay(frame, ids, camvid.COLORS, 0.5)
    errors.append(np.abs(_luma(picture) - _luma(expected)).mean())
  assert max(errors) < 10 and np.mean(errors) < 4.5, errors


def test_video_detection(tmp_path):
  """Videos by suffix, or files PIL cannot read that OpenCV decodes (what predict_files tries)."""
  frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), np.uint8) for i in range(2)]
  _write_video(tmp_path / 'clip.avi', frames, fps=5)
  shutil.copy(tmp_path / 'clip.avi', tmp_path / 'clip.data')
  (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nnot a png at all')
  (tmp_path / 'empty.mkv').write_bytes(b'')
  assert video.has_video_suffix('a/B.MKV') and not video.has_video_suffix('clip.data')
  assert video.decodes(str(tmp_path / 'clip.data'))
  assert not video.decodes(str(tmp_path / 'corrupt.png'))
  assert not video.decodes(str(tmp_path / 'empty.mkv'))
  with pytest.raises(video.VideoError, match='empty file'):
    video.open_video(str(tmp_path / 'empty.mkv'))
  assert predict.find_inputs(str(tmp_path)) == [str(tmp_path / f)
                                                for f in ('clip.avi', 'corrupt.png', 'empty.mkv')]


def test_a_failed_video_keeps_the_earlier_outputs(tmp_path):
  """The overlay and frames are written under temporary names and renamed at the end: a kill or
  an error mid-video left a 44-byte overlay and frames of two runs mixed."""
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 255, (32, 48, 3), np.uint8) for _ in range(6)]
  _write_video(tmp_path / 'clip.avi', frames, fps=5)
  _write_video(tmp_path / 'short.avi', frames[:3], fps=5)
  out = tmp_path / 'out'
  ids = lambda rgbs: [np.full(r.shape[:2], 1, np.uint8) for r in rgbs]
  run = lambda path, maps: video.predict_video(str(path), str(out), 'clip', maps, camvid.COLORS,
                                               batch_size=2, save_frames=True)
  assert run(tmp_path / 'clip.avi', ids) == 6
  listing = sorted(os.listdir(out))
  overlay = [n for n in listing if n.startswith('clip_overlay')][0]
  before = (out / overlay).read_bytes()
  calls = []

  def failing(rgbs):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError('killed')
    return ids(rgbs)

  with pytest.raises(RuntimeError, match='killed'):
    run(tmp_path / 'clip.avi', failing)
  assert sorted(os.listdir(out)) == listing and (out / overlay).read_bytes() == before
  assert len(os.listdir(out / 'clip_frames')) == 6
  assert run(tmp_path / 'short.avi', ids) == 3  # A shorter video's frames replace them all.
  assert sorted(os.listdir(out / 'clip_frames')) == ['000000.png', '000001.png', '000002.png']
  assert sorted(os.listdir(out)) == listing
  assert len(_decode(str(out / overlay))[0]) == 3


def test_overlay_codec_fallback(tmp_path, monkeypatch):
  monkeypatch.setattr(video, 'CODECS', (('ZZZZ', '.mp4'), ('MJPG', '.avi')))
  writer, path = video.open_writer(str(tmp_path / 'x_overlay'), 10.0, (64, 48))
  writer.write(np.zeros((48, 64, 3), np.uint8))
  writer.release()
  assert path == str(tmp_path / 'x_overlay.avi') and os.listdir(tmp_path) == ['x_overlay.avi']
  assert len(_decode(path)[0]) == 1


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
  assert sorted(os.listdir(tmp_path)) == ['known.png', 'known_color.png', 'known_overlay.png']
  before = (tmp_path / 'known_color.png').read_bytes()
  (tmp_path / 'known_color.png.tmp').mkdir()  # Writing it fails (as on a full disk).
  with pytest.raises(OSError):
    predict.write_outputs(str(tmp_path), 'known', rgb, 11 - ids, camvid.COLORS, alpha=1.0)
  assert (tmp_path / 'known_color.png').read_bytes() == before  # Not truncated: kept whole.


def test_nothing_readable_leaves_no_output_folder(trained, tmp_path, capsys):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nnot a png at all')
  (tmp_path / 'in' / 'clip.mp4').write_bytes(b'not a video either')
  config.predict.input = str(tmp_path / 'in')
  config.predict.output = str(tmp_path / 'out' / 'nested')
  assert cli.run('predict', config, workdir) == 1
  err = capsys.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 3, err
  assert 'clip.mp4' in errors[0] and 'corrupt.png' in errors[1]
  assert 'none of the 2 input file(s) could be read' in errors[2]
  assert not (tmp_path / 'out').exists()


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


def test_output_names_never_write_over_each_other():
  paths = ['d/a.jpg', 'e/a.png', 'd/a_2.png', 'd/x.png', 'd/x_color.png', 'd/X.PNG', 'd/clip.mp4',
           'd/clip_frames.png']
  stems = predict.output_stems(paths)
  # a.png is not a_2 (a_2.png's own name: its ids would sit in the file a_2.png's are expected in).
  assert stems == ['a', 'a_3', 'a_2', 'x', 'x_color_2', 'X_2', 'clip', 'clip_frames_2'], stems
  written = [(s + suffix).casefold() for s in stems for suffix in predict.OUTPUT_SUFFIXES]
  assert len(written) == len(set(written))


def test_output_folder_of_other_files_is_refused_and_its_files_kept(trained, tmp_path, capsys):
  """An output would replace a file predict did not write (here a ground-truth label with the
  image's name): refused, nothing written. A folder predict wrote into may be written again."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  images, labels = tmp_path / 'images', tmp_path / 'labels'
  images.mkdir()
  labels.mkdir()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / 'a.jpg')
  Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(images / 'a_2.jpg')
  Image.fromarray(np.full((40, 40), 3, np.uint8)).save(labels / 'a.png')
  before = {p.name: p.read_bytes() for p in labels.iterdir()}
  config.predict.input, config.predict.output = str(images), str(labels)
  assert cli.run('predict', config, workdir) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'{labels / "a.png"}: predicting' in err[0], err
  assert 'did not write' in err[0]
  assert {p.name: p.read_bytes() for p in labels.iterdir()} == before
  config.predict.output = str(tmp_path / 'out')
  assert cli.run('predict', config, workdir) == 0
  first = (tmp_path / 'out' / 'a.png').read_bytes()
  assert cli.run('predict', config, workdir) == 0  # Its own outputs: replaced.
  assert (tmp_path / 'out' / 'a.png').read_bytes() == first
  assert (tmp_path / 'out' / predict.MARKER).is_file()


def test_output_folder_that_would_overwrite_an_input_is_refused(trained, tmp_path, capsys):
  config, workdir = trained
  photos = tmp_path / 'photos'
  photos.mkdir()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photos / 'a.jpg')
  Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(photos / 'b.png')
  before = {p.name: p.read_bytes() for p in photos.iterdir()}
  config = config.copy_and_resolve_references()
  config.predict.input, config.predict.output = str(photos), str(photos)
  assert cli.run('predict', config, workdir) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'{photos / "b.png"}: predicting into' in err[0], err
  assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
  config.predict.input = str(photos / 'a.jpg')  # Its outputs (a.png, ...) replace no input.
  assert cli.run('predict', config, workdir) == 0
  assert {'a.png', 'a_color.png', 'a_overlay.png'} <= set(os.listdir(photos))


@pytest.mark.parametrize('dtype', [np.uint16, np.float32])
def test_exported_loader_reads_deep_images_as_predict_does(tmp_path, dtype):
  """16-bit and float images are scaled by their maximum, not clipped at 255, by both readers."""
  values = np.array([[0, 1000], [30000, 65535]], np.float64)
  path = str(tmp_path / 'deep.tif')
  Image.fromarray(values.astype(dtype)).save(path)
  from sepres_jax import exported  # pylint: disable=g-import-not-at-top
  rgb = exported.read_image(path)
  assert rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[..., 0], (values * (255 / 65535)).astype(np.uint8))
  np.testing.assert_array_equal(predict.read_rgb(path), rgb)
