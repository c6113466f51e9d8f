"""Pictures: --mode=visualize (data, curves), TensorBoard predictions, evaluation pictures."""

import json
import os

import cv2
import numpy as np
import pytest

from conftest import train_tiny
from sepres_jax import cli
from sepres_jax import visualize


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of a 1-epoch tiny run with 2 TensorBoard prediction images, validated
  as --mode=evaluate scores (eval.input=native)."""
  return train_tiny(tmp_path_factory.mktemp('visualize'), visualize__num_tensorboard_images=2,
                    data__eval_resize=False)


def _png(path, min_hw=(150, 150), min_bytes=5000):
  assert os.path.isfile(path), path
  assert os.path.getsize(path) > min_bytes
  img = cv2.imread(str(path))
  assert img is not None and img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1]
  assert img.shape[0] < 4000 and img.shape[1] < 4000  # A picture, not a poster.
  assert img.std() > 5
  return img


def test_training_writes_curves_and_tensorboard_images(trained):
  _, workdir = trained
  _png(os.path.join(workdir, 'pictures', 'training_curves.png'), (500, 800))
  events = [f for f in os.listdir(os.path.join(workdir, 'tensorboard')) if 'events' in f]
  data = b''.join(open(os.path.join(workdir, 'tensorboard', f), 'rb').read() for f in events)
  assert b'val_predictions/0' in data and b'val_predictions/1' in data
  assert b'val_predictions/2' not in data


def test_visualize_data_and_curves(trained, tmp_path):
  config, run = trained
  workdir = str(tmp_path / 'vis')
  os.makedirs(workdir)
  config = config.copy_and_resolve_references()
  config.visualize.num_images = 2
  assert cli.run('visualize', config, workdir) == 0
  out = os.path.join(workdir, 'pictures', 'data', 'train')
  names = sorted(os.listdir(out))
  assert len([n for n in names if n.endswith('_masks.png')]) == 2
  assert len([n for n in names if n.endswith('_labels.png')]) == 2
  assert len([n for n in names if n.endswith('_resize.png')]) == 2
  assert {'class_frequencies.png', 'legend.png'} <= set(names)
  for n in names:
    _png(os.path.join(out, n), (100, 100) if n == 'legend.png' else (250, 250), 3000)
  assert not os.path.exists(os.path.join(workdir, 'pictures', 'training_curves.png'))

  # Curves on demand from a run's history.json; without one, a one-line error.
  os.remove(os.path.join(run, 'pictures', 'training_curves.png'))
  config.visualize.what = 'curves'
  assert cli.run('visualize', config, run) == 0
  _png(os.path.join(run, 'pictures', 'training_curves.png'), (500, 800))
  assert cli.run('visualize', config, workdir) == 1


def test_class_pixel_counts():
  source = [{'label': np.array([[0, 0, 11], [3, 255, 0]], np.uint8)[..., None]}]
  np.testing.assert_array_equal(visualize.class_pixel_counts(source, 12),
                                [3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2])


def test_panel_picker_keeps_the_worst():
  picker = visualize.PanelPicker(2, worst_first=True)
  for i, score in enumerate([0.5, 0.1, float('nan'), 0.9, 0.2, 0.05]):
    picker.offer(score, i, np.full((2, 2), i))
  assert [(s, i) for s, i, _ in picker.picked()] == [(0.05, 5), (0.1, 1)]
  first = visualize.PanelPicker(2, worst_first=False)
  # Native evaluation batches images by shape, so index 2 may come before index 1.
  for i, score in zip([0, 2, 3, 1], [0.5, 0.1, 0.9, 0.3]):
    first.offer(score, i, np.zeros((2, 2)))
  assert [i for _, i, _ in first.picked()] == [0, 1]


def test_evaluate_pictures_and_scores_unchanged(trained, capsys):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.num_panels = 3
  config.eval.split = 'val'
  assert cli.run('evaluate', config, workdir) == 0
  assert 'mean IoU' in capsys.readouterr().out
  out = os.path.join(workdir, 'eval', 'val')
  _png(os.path.join(out, 'iou.png'), (300, 500))
  _png(os.path.join(out, 'confusion_matrix.png'), (500, 500))
  _png(os.path.join(out, 'panels.png'), (600, 600))
  with open(os.path.join(workdir, 'eval', 'val.json')) as f:
    scores = json.load(f)
  mious = [p['miou'] for p in scores['panels']]
  assert len(mious) == 3 and mious == sorted(mious) and min(mious) <= scores['miou']
  # The same scores as the training loop's validation of the same (only) checkpoint.
  with open(os.path.join(workdir, 'history.json')) as f:
    [record] = json.load(f)
  assert scores['miou'] == record['val_miou']
  assert scores['pixel_accuracy'] == record['val_accuracy']
  assert scores['loss'] == pytest.approx(record['val_loss'], rel=1e-5)


@pytest.mark.parametrize('text, words', [
    ('[{"epoch": 1, "val_lo', 'not a history of epochs'),
    ('{"epoch": 1}', 'not a history of epochs'),
    ('[{"epoch": 1, "val_loss": [1, 2]}]', 'not a history of epochs'),  # A TypeError traceback.
    ('[]', 'no epoch recorded yet'),
])
def test_curves_of_a_broken_history_are_one_line(tiny_config, tmp_path, capsys, text, words):
  (tmp_path / 'history.json').write_text(text)
  tiny_config.visualize.what = 'curves'
  assert cli.run('visualize', tiny_config, str(tmp_path)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and words in err[0] and 'history.json' in err[0], err


@pytest.mark.parametrize('eval_resize, eval_input, resized', [
    (False, 'resize', True), (True, 'native', True), (False, 'native', False)])
def test_tensorboard_pictures_see_what_validation_feeds(tiny_config, eval_resize, eval_input,
                                                        resized):
  """Validation resizes with data.eval_resize or eval.input='resize' (train.py): so do they."""
  c = tiny_config
  c.data.eval_resize, c.eval.input, c.visualize.num_tensorboard_images = eval_resize, eval_input, 2
  rgb = np.zeros((40, 72, 3), np.uint8)
  source = [{'image': rgb, 'label': np.zeros((40, 72, 1), np.uint8)}] * 3
  info = type('Info', (), {'colors': np.zeros((13, 3), np.uint8)})()
  pictures = visualize.ValidationPictures(c, source, info, apply_fn=None)
  expected = tuple(c.data.image_size) if resized else (64, 96)
  [(members, batch)] = pictures.batches
  assert batch.shape[1:3] == expected and members == [0, 1] and len(pictures) == 2


def test_tensorboard_pictures_pad_each_image_as_validation_does(tiny_config):
  """Native validation pads each image to its own multiple of 32 (input_pipeline.eval_plan), not
  to the largest pictured one: images of two padded sizes go into two batches."""
  c = tiny_config
  c.data.eval_resize, c.eval.input, c.visualize.num_tensorboard_images = False, 'native', 3
  sizes = [(40, 72), (100, 72), (50, 80)]
  source = [{'image': np.zeros((*hw, 3), np.uint8), 'label': np.zeros((*hw, 1), np.uint8)}
            for hw in sizes]
  info = type('Info', (), {'colors': np.zeros((13, 3), np.uint8)})()
  pictures = visualize.ValidationPictures(c, source, info, apply_fn=None)
  got = sorted((members, batch.shape[1:3]) for members, batch in pictures.batches)
  assert got == [([0, 2], (64, 96)), ([1], (128, 96))]  # Before: one batch, all at 128x96.


def test_curves_and_evaluate_read_a_config_json_that_is_not_an_object(tmp_path):
  """config.json of `[]` (valid JSON, no config): the curves fall back to val_miou (it was an
  AttributeError traceback); evaluate's best-metric lookup names the file when it is not JSON."""
  from sepres_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  (tmp_path / 'history.json').write_text(json.dumps(
      [{'epoch': 1, 'train_loss': 1.0, 'val_loss': 1.2, 'val_miou': 0.3, 'lr': 1e-3,
        'best': True}]))
  (tmp_path / 'config.json').write_text('[]')
  path = visualize.training_curves(str(tmp_path))
  assert path and os.path.isfile(path)
  assert evaluate._best_metric(str(tmp_path)) is None  # pylint: disable=protected-access
  (tmp_path / 'config.json').write_text('{"best_metric": ')
  with pytest.raises(train.RunError, match=r'config.json: cannot read the run\'s config'):
    evaluate._best_metric(str(tmp_path))  # pylint: disable=protected-access
