"""pretrained/<name>/: packing a run, and the shipped weights loading and scoring what they claim."""

import importlib.util
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import CAMVID, ROOT, run_env, train_tiny
from sepres_jax import evaluate
from sepres_jax import pretrained
from sepres_jax import train

SHIPPED = sorted(p for p in (ROOT / 'pretrained').glob('*') if (p / 'weights').is_dir())
MAX_BYTES = 25 * 2**20


def _load_config(path):
  spec = importlib.util.spec_from_file_location(f'shipped_{abs(hash(str(path)))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _size(folder):
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns)


@pytest.fixture(scope='module')
def packed_run(tmp_path_factory):
  """(config, workdir, packed folder, its test scores) of one tiny run, evaluated on test/ and
  packed as pretrained/tiny, for both tests."""
  tmp = tmp_path_factory.mktemp('pack')
  config, workdir = train_tiny(tmp, visualize__num_tensorboard_images=0)
  config.eval.num_panels = 0
  scores = evaluate.evaluate(config, workdir)
  out = tmp / 'pretrained' / 'tiny'
  cwd = os.getcwd()
  os.chdir(ROOT)  # As a user packs from the repository root.
  try:
    results = pretrained.pack(workdir, os.fspath(out))
  finally:
    os.chdir(cwd)
  return config, workdir, out, results, scores


def test_pack_writes_weights_config_and_scores_that_reproduce(packed_run, tmp_path):
  config, workdir, out, results, scores = packed_run
  config = config.copy_and_resolve_references()
  assert sorted(os.listdir(out)) == ['config.py', 'results.json', 'weights']
  assert results['miou'] == pytest.approx(scores['miou'])
  # The test-time settings the figure was measured with travel with it.
  assert (results['flip'], results['scales']) == (False, [1.0]), results
  assert json.loads((out / 'results.json').read_text())['iou']['Sky'] == pytest.approx(
      scores['per_class'][0]['iou'])
  shipped = _load_config(out / 'config.py')
  assert shipped.init_from == os.fspath(out)
  assert tuple(shipped.model.widths) == tuple(config.model.widths)  # Fields the run changed.
  assert shipped.data.name == 'synthetic' and shipped.data.cache_dir != config.data.cache_dir
  shipped.data.cache_dir = config.data.cache_dir
  shipped.eval.num_panels = 0
  again = evaluate.evaluate(shipped, os.fspath(tmp_path / 'elsewhere'))  # Weights from init_from.
  assert again['miou'] == pytest.approx(scores['miou'], abs=1e-9)
  assert again['checkpoint'] == os.fspath(out)


def test_pack_leaves_out_an_ensembles_scores(packed_run, tmp_path, capsys):
  """Scores of an evaluation with eval.ensemble are not the packed weights' own: left out."""
  _, workdir, _, _, scores = packed_run
  with open(os.path.join(workdir, 'eval', 'val.json'), 'w') as f:
    json.dump(dict(scores, split='val', ensemble=['runs/other']), f, default=float)
  results = pretrained.pack(workdir, os.fspath(tmp_path / 'out'), 'val')
  assert 'miou' not in results and 'iou' not in results
  assert 'scores an ensemble' in capsys.readouterr().out


def test_config_source_says_which_fields_it_leaves_out(capsys):
  """A field of an older run that configs/default.py no longer has vanished without a word."""
  text = pretrained.config_source({'learning_rate': 0.5, 'old_field': 3, 'model': {'gone': 1}},
                                  'Title.', 'pretrained/x')
  assert 'config.learning_rate = 0.5' in text and 'old_field' not in text
  assert capsys.readouterr().out.strip() == (
      "left out of pretrained/x/config.py: the run's fields that configs/default.py does not have "
      '(model.gone, old_field)')


def test_pack_leaves_out_scores_of_other_weights(packed_run, tmp_path, capsys):
  """An evaluate with init_from (or of an older best) wrote eval/test.json in the run: its
  figures were packed as these weights' own."""
  _, workdir, _, _, scores = packed_run
  with open(os.path.join(workdir, 'eval', 'val.json'), 'w') as f:
    json.dump(dict(scores, split='val', checkpoint='/elsewhere/weights'), f, default=float)
  results = pretrained.pack(workdir, os.fspath(tmp_path / 'out'), 'val')
  assert 'miou' not in results and 'iou' not in results
  assert 'scores /elsewhere/weights, not the packed best checkpoint (step' in capsys.readouterr().out


def test_pack_replaces_only_an_earlier_pack_and_never_the_run(packed_run, tmp_path, monkeypatch):
  _, workdir, packed, _, _ = packed_run
  run_before = sorted(str(p) for p in Path(workdir).rglob('*'))
  for bad in (workdir, os.path.dirname(workdir)):  # The run itself, or a folder above it.
    with pytest.raises(train.RunError, match='which packing would replace'):
      pretrained.pack(workdir, bad)
  assert sorted(str(p) for p in Path(workdir).rglob('*')) == run_before
  other = tmp_path / 'notes'  # Any other folder (a typo'd --out) was deleted whole.
  other.mkdir()
  (other / 'old.txt').write_text('mine')
  (tmp_path / 'file').write_text('mine')
  for bad, words in ((other, 'holds old.txt, not weights packed before'),
                     (tmp_path / 'file', 'is not a folder')):
    with pytest.raises(train.RunError, match=words):
      pretrained.pack(workdir, os.fspath(bad))
  assert (other / 'old.txt').read_text() == 'mine' and (tmp_path / 'file').read_text() == 'mine'
  shutil.rmtree(other)
  os.remove(tmp_path / 'file')
  out = tmp_path / 'packed'
  shutil.copytree(packed, out)  # An earlier pack: replaced.
  (out / 'results.json').write_text('{"packed": "before"}')

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  with monkeypatch.context() as m:  # A failure while writing leaves the earlier folder as it was.
    m.setattr(pretrained, 'config_source', full_disk)  # After the weights are written.
    with pytest.raises(OSError, match='No space left'):
      pretrained.pack(workdir, os.fspath(out))
  assert (out / 'results.json').read_text() == '{"packed": "before"}'
  assert sorted(os.listdir(tmp_path)) == ['packed']  # No temporary folder left behind.
  pretrained.pack(workdir, os.fspath(out))
  assert sorted(os.listdir(out)) == ['config.py', 'results.json', 'weights']
  assert sorted(os.listdir(tmp_path)) == ['packed']


def test_fine_tuning_a_grown_model_keeps_what_the_checkpoint_holds(packed_run, tmp_path):
  """init_from into a model with finer skips (training's path): stored arrays are loaded, the new
  layers keep their initial values; a stored array the model lacks or reshapes is a one-line error."""
  import jax  # pylint: disable=g-import-not-at-top
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  config, workdir, packed, _, _ = packed_run
  config = config.copy_and_resolve_references()
  packed = os.fspath(packed)

  states = {}  # Each architecture's initial state is built (compiled) once.

  def state_of(**model_fields):
    key = tuple(sorted(model_fields.items()))
    if key not in states:
      c = config.copy_and_resolve_references()
      c.model.update(model_fields)
      model = train.models.create_model(c, train.num_outputs(c))
      states[key] = train.create_train_state(c, model, jax.random.key(7), train.make_mesh())
    return states[key]

  same = evaluate.load_weights(workdir, state_of())
  for source in (workdir, packed):
    grown = state_of(fine_skips=2)
    loaded = evaluate.load_weights(source, grown, new_layers_ok=True)
    for name in ('score_pool2', 'up_pool2', 'score_pool1', 'up_pool1'):
      np.testing.assert_array_equal(loaded['params'][name]['kernel'], grown.params[name]['kernel'])
    for name in ('stem', 'conv6', 'up_final'):
      np.testing.assert_array_equal(loaded['params'][name]['kernel'],
                                    same['params'][name]['kernel'])
    np.testing.assert_array_equal(loaded['batch_stats']['stem_bn']['mean'],
                                  same['batch_stats']['stem_bn']['mean'])
    with pytest.raises(evaluate.train.RunError, match='not fit this model, which also has params/'):
      evaluate.load_weights(source, grown)  # Evaluation wants every array.
    with pytest.raises(evaluate.train.RunError,
                       match=r'bias: checkpoint shape \(4,\), this model \(8,\)'):
      evaluate.load_weights(source, state_of(widths=(8, 8, 8, 16, 16)), new_layers_ok=True)
  with pytest.raises(evaluate.train.RunError) as e:  # A packed folder: its config.py is named.
    evaluate.load_weights(packed, state_of(widths=(8, 8, 8, 16, 16)))
  assert str(e.value).endswith(
      f'pass the config they were trained with (--config={os.path.join(packed, "config.py")})')
  grown_dir = tmp_path / 'grown'
  grown_config = config.copy_and_resolve_references()
  grown_config.model.fine_skips = 1
  grown_config.init_from = workdir
  train.train_and_evaluate(grown_config, os.fspath(grown_dir))  # Trains from the smaller model.
  with pytest.raises(evaluate.train.RunError, match='params/score_pool2 is not in this model'):
    evaluate.load_weights(os.fspath(grown_dir), state_of(), new_layers_ok=True)
  # Evaluating a workdir's own checkpoints checks the same way, naming the checkpoint.
  weights, _ = evaluate.restore_weights(os.fspath(grown_dir), 'best', state_of(fine_skips=1))
  np.testing.assert_array_equal(weights['params']['score_pool2']['kernel'],
                                evaluate.load_weights(os.fspath(grown_dir), state_of(
                                    fine_skips=1))['params']['score_pool2']['kernel'])
  with pytest.raises(evaluate.train.RunError,
                     match=r'checkpoint \d+ in .*grown: params/score_pool2 is not in this model'):
    evaluate.restore_weights(os.fspath(grown_dir), 'latest', state_of())
  with pytest.raises(evaluate.train.RunError, match=r'checkpoint \d+ in .*: weights do not fit '
                     'this model, which also has params/score_pool1, params/up_pool1; pass the'):
    evaluate.restore_weights(os.fspath(grown_dir), 'best', state_of(fine_skips=2))


def test_init_from_a_workdir_follows_eval_checkpoint(packed_run, tmp_path):
  """evaluate/predict/export with init_from=<workdir> read the checkpoint eval.checkpoint names
  (it always read the best: --config.eval.checkpoint=latest was silently ignored)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sepres_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config, workdir, _, _, _ = packed_run
  config = config.copy_and_resolve_references()
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  # A later, worse checkpoint: the latest is no longer the best.
  _, state, _, _ = evaluate.trained_state(config, os.fspath(copy))
  manager = checkpoints.create_manager(os.fspath(copy), config.best_metric)
  best = manager.latest_step()
  _, meta = checkpoints.restore(manager, best, checkpoints.abstract_like(state))
  worse = -1e9 if checkpoints.metric_mode(config.best_metric) == 'max' else 1e9
  later = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
  checkpoints.save(manager, best + 1, later, meta, {config.best_metric: worse})
  checkpoints.wait(manager)
  manager.close()
  kernel = lambda s: np.asarray(s.params['stem']['kernel'])
  config.init_from = os.fspath(copy)
  for which, expected in (('best', kernel(state)), ('latest', kernel(later))):
    config.eval.checkpoint = which
    _, loaded, _, origin = evaluate.trained_state(config, os.fspath(tmp_path / 'elsewhere'))
    np.testing.assert_array_equal(kernel(loaded), expected)
    assert origin == os.fspath(copy) + (' (latest checkpoint)' if which == 'latest' else '')


def test_weights_refuse_a_config_that_changes_their_numbers(packed_run, tmp_path):
  """A model field that changes no shape (bn_epsilon) but every prediction loaded silently (2,246
  of the shipped model's labels on one test image changed): now a one-line error naming the
  config the weights were trained with. Fields that change only how layers compute pass."""
  config, workdir, packed, _, _ = packed_run
  for path, hint in ((workdir, f'pass the values its {os.path.join(workdir, "config.json")} holds'),
                     (os.fspath(packed), 'pass the config it was trained with '
                      f'(--config={os.path.join(packed, "config.py")})')):
    c = config.copy_and_resolve_references()
    c.model.impl, c.model.large_conv, c.model.bn_momentum = 'xla', 'rows', 0.5
    evaluate.check_trained_with(c, path)
    c.model.bn_epsilon = 1e-5
    with pytest.raises(evaluate.train.RunError) as e:
      evaluate.check_trained_with(c, path)
    assert str(e.value) == (f'{path} was trained with model.bn_epsilon={config.model.bn_epsilon!r}'
                            f', this config has 1e-05; {hint}')
    c.init_from = path  # evaluate, predict and export check before building anything.
    with pytest.raises(evaluate.train.RunError, match='model.bn_epsilon'):
      evaluate.trained_state(c, os.fspath(tmp_path / 'elsewhere'))
  assert evaluate.stored_model_fields(os.fspath(tmp_path)) is None  # Nothing to compare.


def test_every_shipped_model_is_small_and_complete():
  assert SHIPPED, 'no pretrained/<name>/ folder with weights/ in the repository'
  for folder in SHIPPED:
    assert _size(folder) <= MAX_BYTES, f'{folder}: {_size(folder) / 2**20:.1f} MB'
    assert (folder / 'config.py').is_file() and (folder / 'results.json').is_file()
    assert _load_config(folder / 'config.py').init_from == os.fspath(folder)


@pytest.mark.slow
@pytest.mark.parametrize('folder', SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_predict_from_the_command_line(folder, tmp_path):
  """A fresh user's command: the shipped config alone, on an image of their own."""
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (240, 320, 3), np.uint8)).save(tmp_path / 'mine.jpg')
  out = subprocess.run(
      [sys.executable, 'main.py', f'--config={folder}/config.py', f'--workdir={tmp_path / "run"}',
       '--mode=predict', f'--config.predict.input={tmp_path / "mine.jpg"}',
       f'--config.predict.output={tmp_path / "out"}'],
      cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  ids = np.asarray(Image.open(tmp_path / 'out' / 'mine.png'))
  assert ids.shape == (240, 320) and ids.max() < 11


@pytest.mark.slow
@pytest.mark.parametrize('folder', SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_score_the_stated_miou_on_camvid_test(folder, tmp_path):
  if not (CAMVID / 'test').is_dir():
    pytest.skip(f'real CamVid not present at {CAMVID}')
  claimed = json.loads((folder / 'results.json').read_text())
  assert (claimed['flip'], claimed['scales']) == (False, [1.0]), claimed  # As config.py evaluates.
  config = _load_config(folder / 'config.py')
  config.data.manual_dir = os.fspath(CAMVID)
  config.data.cache_dir = os.fspath(tmp_path / 'cache')
  config.eval.num_panels = 0
  scores = evaluate.evaluate(config, os.fspath(tmp_path / 'run'))
  assert scores['num_images'] == 233
  assert scores['miou'] == pytest.approx(claimed['miou'], abs=5e-4)
  readme = (ROOT / 'README.md').read_text()
  # The README's command for these weights states this figure (ENet's 51.3 is in it too).
  assert f'# {100 * claimed["miou"]:.1f} on test/' in readme
