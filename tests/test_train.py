"""Train and eval steps, the optimiser's injected learning rate, plateau and early stopping."""

import functools
import json
import re
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed
from conftest import train_tiny
from sepres_jax import checkpoints
from sepres_jax import input_pipeline
from sepres_jax import metrics
from sepres_jax import train
from sepres_jax.data.camvid import DataError


def _batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  h, w = config.data.image_size
  # 16x16 blocks of one class: learnable by an FCN whose finest skip is at 1/8 resolution.
  blocks = rng.integers(0, config.data.num_classes + 1, (n, h // 16, w // 16))
  labels = blocks.repeat(16, axis=1).repeat(16, axis=2).astype(np.int32)
  # Images that carry the label, so that the task is learnable.
  images = np.repeat((labels[..., None] / 6.0 - 1.0), 3, axis=-1).astype(np.float32)
  return {'image': images, 'label': labels}


def _setup(config, **kwargs):
  """A fresh state (on a one-axis mesh of all devices) and the compiled steps of `config`."""
  mesh = train.make_mesh()
  model = train.models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(0), mesh, **kwargs)
  return state, train.Stepper(config, mesh, None)


@pytest.mark.parametrize('lovasz_weight', [0.0, 1.0])
def test_train_step_lowers_loss_on_a_repeated_batch(tiny_config, lovasz_weight):
  tiny_config.learning_rate = 1e-2
  tiny_config.lovasz_weight = lovasz_weight
  state, stepper = _setup(tiny_config)
  batch = stepper.batch(_batch(tiny_config, 4))
  losses = []
  for _ in range(20):
    state, out = stepper.train(state, batch)
    out = stepper.fetch(out)
    losses.append(float(out['loss_sum'] / out['weight']))
    assert np.isfinite(out['grad_norm'])
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 20
  # Void (label 11) is not counted when ignored.
  labels = np.asarray(batch['label'])
  assert float(out['pixels']) == np.sum(labels < tiny_config.data.num_classes)


def test_lovasz_weight_adds_to_the_gradient_not_to_the_logged_loss(tiny_config):
  state, _ = _setup(tiny_config)
  raw = _batch(tiny_config, 4)
  results = {}
  for weight in (0.0, 1.0):
    tiny_config.lovasz_weight = weight
    stepper = train.Stepper(tiny_config, train.make_mesh(), None)
    new, out = stepper.train(jax.tree.map(jnp.copy, state), stepper.batch(raw))  # Donated.
    results[weight] = (stepper.fetch(out), new.params)
  (plain, plain_params), (both, both_params) = results[0.0], results[1.0]
  assert float(plain['loss_sum']) == pytest.approx(float(both['loss_sum']), rel=1e-6)
  assert float(both['grad_norm']) != pytest.approx(float(plain['grad_norm']), rel=1e-3)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_params, both_params)
  assert max(jax.tree.leaves(moved)) > 0


def test_eval_step_confusion_covers_counted_pixels(tiny_config):
  state, stepper = _setup(tiny_config)
  raw = _batch(tiny_config, 4)
  raw['label'][0] = -1  # A padded example never counts.
  scores = train.evaluate_split(stepper, state, [raw])
  assert scores['confusion'].sum() == np.sum((raw['label'] >= 0) & (raw['label'] < 11))
  assert 0.0 <= scores['miou'] <= 1.0 and np.isfinite(scores['loss'])


def test_validation_scores_the_classes_evaluate_reports(tiny_config):
  assert train.scored_classes(tiny_config, validation=True) == 11  # Void ignored: 11 outputs.
  tiny_config.data.ignore_void = False  # Void learned as a 12th class ...
  assert train.num_outputs(tiny_config) == 12
  for validation in (False, True):  # ... but scored by neither, as the protocol reports.
    assert train.scored_classes(tiny_config, validation) == 11
  tiny_config.eval.val_counts_void = True  # configs/seed.py: validation as Keras counted it.
  assert (train.scored_classes(tiny_config), train.scored_classes(tiny_config, True)) == (11, 12)
  tiny_config.eval.val_counts_void, tiny_config.eval.ignore_void = False, False
  assert train.scored_classes(tiny_config, True) == train.scored_classes(tiny_config) == 12
  # A confusion matrix right on every real class, with void pixels called class 3.
  cm = np.diag([50] * 11 + [0])
  cm[11, 3] = 30
  cm = cm.astype(np.int64)
  evaluate_like = metrics.scores_from_confusion(cm, num_scored=11)
  assert evaluate_like['miou'] == 1.0 and evaluate_like['pixel_accuracy'] == 1.0
  assert metrics.scores_from_confusion(cm, num_scored=12)['miou'] < 1.0


def test_learning_rate_is_injected_without_retrace(tiny_config):
  state, stepper = _setup(tiny_config)
  batch = stepper.batch(_batch(tiny_config, 4))
  state, _ = stepper.train(state, batch)
  state = train.set_learning_rate(state, 0.0)
  before = jax.tree.map(np.asarray, state.params)
  state, _ = stepper.train(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
  assert stepper.train._cache_size() == 1  # The new rate did not compile a second step.


def test_class_weights(tiny_config):
  assert train.class_weights(tiny_config) is None
  tiny_config.data.name = 'camvid'
  tiny_config.data.class_weights = 'median_frequency'
  w = train.class_weights(tiny_config)  # CamVid: SegNet's published weights.
  assert w.shape == (11,) and w[3] == pytest.approx(0.1417)
  tiny_config.data.ignore_void = False
  assert train.class_weights(tiny_config)[11] == 0.0
  tiny_config.data.class_weights = '1,2'
  with pytest.raises(train.RunError, match='class_weights'):
    train.class_weights(tiny_config)


def test_class_weights_from_training_labels(tiny_config):
  # Two 2x2 label maps, 3 classes and void (3): class 0 in both, 1 in the first, 2 nowhere.
  labels = [np.array([[0, 0], [1, 3]], np.uint8), np.array([[0, 0], [0, 0]], np.uint8)]
  source = [{'label': l[..., None]} for l in labels]
  counts, present = input_pipeline.class_pixel_counts(source, 3)
  np.testing.assert_array_equal(counts, [6, 1, 0])
  np.testing.assert_array_equal(present, [8, 4, 0])
  # f = (6/8, 1/4), median 0.5 -> w = (0.5/0.75, 0.5/0.25); absent class 1.
  np.testing.assert_allclose(metrics.frequency_weights(counts, present, 'median_frequency'),
                             [2 / 3, 2.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.frequency_weights(counts, present, 'inverse_log'),
                             [1 / np.log(1.02 + 6 / 7), 1 / np.log(1.02 + 1 / 7), 1.0], rtol=1e-6)
  tiny_config.data.num_classes = 3
  tiny_config.data.class_weights = 'inverse_log'  # Synthetic data: computed, not CamVid's.
  w = train.class_weights(tiny_config, source)  # The training labels reach the rule chosen.
  np.testing.assert_allclose(w, [1 / np.log(1.02 + 6 / 7), 1 / np.log(1.02 + 1 / 7), 1.0],
                             rtol=1e-6)
  with pytest.raises(train.RunError, match='training labels'):
    train.class_weights(tiny_config)


def test_plateau_and_early_stopping(tiny_config):
  c = tiny_config
  c.plateau.monitor, c.plateau.patience, c.plateau.factor = 'val_accuracy', 2, 0.01
  c.early_stopping.monitor, c.early_stopping.patience = 'val_loss', 3
  rules = train.EpochRules(c)
  cuts, stops = [], []
  for acc, loss in [(0.5, 1.0), (0.6, 0.9), (0.6, 0.95), (0.6, 0.95), (0.6, 0.95), (0.7, 0.95)]:
    cut, stop = rules.update({'val_accuracy': acc, 'val_loss': loss})
    cuts.append(cut)
    stops.append(stop)
  # Accuracy stalls for epochs 3 and 4 (patience 2): cut after epoch 4, by 0.01.
  assert cuts == [False, False, False, True, False, False]
  assert rules.scale == pytest.approx(0.01)
  # Loss last improved at epoch 2: stop after 3 more epochs.
  assert stops == [False, False, False, False, True, True]
  restored = train.EpochRules(c)
  restored.load_state_dict(rules.state_dict())
  assert restored.state_dict() == rules.state_dict()
  # A resume with a shorter patience (its count already past it) cuts at the next stalled
  # epoch, as Keras' `wait >= patience` does; optax's `==` never cut again.
  c.plateau.patience, c.early_stopping.patience = 5, 0
  long = train.EpochRules(c)
  for acc in (0.5, 0.5, 0.5, 0.5, 0.5):
    assert long.update({'val_accuracy': acc, 'val_loss': 1.0}) == (False, False)
  c.plateau.patience = 2
  short = train.EpochRules(c)
  short.load_state_dict(long.state_dict())
  assert short.update({'val_accuracy': 0.5, 'val_loss': 1.0})[0]
  assert short.scale == pytest.approx(0.01)


def test_eval_step_scores_resized_logits_at_label_size(tiny_config):
  state, stepper = _setup(tiny_config)
  raw = _batch(tiny_config, 4)
  native = np.random.default_rng(1).integers(0, 12, (4, 90, 120)).astype(np.int32)
  scores = train.evaluate_split(stepper, state, [{'image': raw['image'], 'label': native}])
  assert scores['confusion'].sum() == np.sum(native < 11)


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'polynomial'])
def test_schedules(tiny_config, kind):
  tiny_config.schedule, tiny_config.warmup_steps, tiny_config.end_factor = kind, 10, 0.1
  f = train.schedule_factor(tiny_config, 110)
  assert float(f(0)) == pytest.approx(0.1)  # Warm-up: 1/10 at the first step.
  assert float(f(9)) == pytest.approx(1.0)
  end = {'constant': 1.0, 'cosine': 0.1, 'polynomial': 0.1}[kind]
  assert float(f(110)) == pytest.approx(end, abs=1e-6)
  if kind == 'cosine':
    assert float(f(60)) == pytest.approx(0.55, abs=1e-6)  # Half way: the mean of 1 and 0.1.
  # A state built to evaluate or predict (no step count) must not fail on a scheduled config.
  assert float(train.schedule_factor(tiny_config, None)(0)) == 1.0


def test_schedule_scales_the_update(tiny_config):
  """A cosine schedule at its end (factor 0) leaves the parameters where they are."""
  tiny_config.schedule, tiny_config.end_factor = 'cosine', 0.0
  state, stepper = _setup(tiny_config, total_steps=1)
  batch = stepper.batch(_batch(tiny_config, 4))
  initial = jax.tree.map(np.asarray, state.params)
  state, _ = stepper.train(state, batch)  # Step 0: factor 1, moves.
  before = jax.tree.map(np.asarray, state.params)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(initial), jax.tree.leaves(before)))
  state, _ = stepper.train(state, batch)  # Step 1 = total: factor 0.
  jax.tree.map(np.testing.assert_allclose, jax.tree.map(np.asarray, state.params), before)


def test_test_time_averaging(tiny_config):
  """Flip/multi-scale averaging: plain when off, flip-invariant when on, same shape always."""
  state, _ = _setup(tiny_config)
  v = {'params': state.params, 'batch_stats': state.batch_stats}
  x = jnp.asarray(_batch(tiny_config, 2)['image'])
  plain = state.apply_fn(v, x, train=False)
  np.testing.assert_array_equal(train.models.averaged_logits(state.apply_fn, v, x), plain)
  flipped = train.models.averaged_logits(state.apply_fn, v, x, flip=True)
  mirrored = train.models.averaged_logits(state.apply_fn, v, x[:, :, ::-1], flip=True)
  np.testing.assert_allclose(flipped, mirrored[:, :, ::-1], rtol=1e-5, atol=1e-5)
  multi = train.models.averaged_logits(state.apply_fn, v, x, flip=True, scales=(0.5, 1.0, 1.5))
  assert multi.shape == plain.shape and np.isfinite(np.asarray(multi)).all()
  np.testing.assert_allclose(np.exp(multi).sum(-1), 1.0, rtol=1e-4)


def test_ensemble_averages_the_members_probabilities(tiny_config):
  """A list of members: the mean of each member's (flip/scale-averaged) probabilities."""
  model = train.models.create_model(tiny_config, train.num_outputs(tiny_config))
  members = []
  for seed in (0, 1):
    state = train.create_train_state(tiny_config, model, jax.random.key(seed), train.make_mesh())
    # Noise: an untrained network's probabilities are nearly uniform, two of them nearly equal.
    members.append({'params': perturbed(state.params, seed, 0.3), 'batch_stats': state.batch_stats})
  x = jnp.asarray(_batch(tiny_config, 2)['image'])
  avg = functools.partial(train.models.averaged_logits, state.apply_fn, images=x)
  np.testing.assert_array_equal(avg(members[:1]), avg(members[0]))  # One member: plain logits.
  for flip, scales in ((False, (1.0,)), (True, (1.0, 1.25))):
    # Softmax: one member unflipped at scale 1 gives raw logits, anything else log-probabilities.
    each = [np.asarray(jax.nn.softmax(avg(m, flip=flip, scales=scales))) for m in members]
    assert np.abs(each[0] - each[1]).max() > 0.05  # Two different networks ...
    both = np.asarray(jax.nn.softmax(avg(members, flip=flip, scales=scales)))
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, atol=1e-5)  # ... averaged.


def test_weight_decay_is_decoupled_and_spares_1d_arrays(tiny_config):
  """With zero gradients only the decay moves parameters: kernels by exactly rate * wd * p."""
  tiny_config.weight_decay, tiny_config.learning_rate = 0.1, 0.01
  tx = train.create_optimizer(tiny_config)
  params = {'kernel': jnp.full((3, 3, 2, 2), 2.0), 'bias': jnp.full((2,), 2.0)}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  # Coupled L2 (decay added to the gradient before RMSprop's normalisation) would give about
  # -rate / sqrt(1 - decay) here, whatever the decay's size.
  np.testing.assert_allclose(updates['kernel'], -0.01 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates['bias'], 0.0)


def test_epoch_time_counts_the_previous_epochs_save(tmp_path, monkeypatch):
  """The epochs' times add up to the run: epoch 2's includes epoch 1's checkpoint start."""
  save = checkpoints.save

  def slow_save(*args, **kwargs):
    time.sleep(1.0)
    return save(*args, **kwargs)

  monkeypatch.setattr(checkpoints, 'save', slow_save)
  t0 = time.time()
  _, workdir = train_tiny(tmp_path, num_epochs=2)
  wall = time.time() - t0
  first, second = json.loads((Path(workdir) / 'history.json').read_text())
  assert second['epoch_time'] >= second['train_time'] + 1.0  # Epoch 1's save (1 s) is in it.
  assert first['epoch_time'] + second['epoch_time'] < wall


@pytest.mark.parametrize('in_sqrt', [True, False])
def test_rmsprop_epsilon_inside_or_outside_the_root(tiny_config, in_sqrt):
  """optax's g / sqrt(v + eps) by default; Keras' g / (sqrt(v) + eps) with eps_in_sqrt off."""
  c = tiny_config
  c.rmsprop_eps_in_sqrt, c.rmsprop_eps, c.rmsprop_decay, c.learning_rate = in_sqrt, 1e-4, 0.9, 1.0
  tx = train.create_optimizer(c)
  g = jnp.array([1e-3, 1.0])
  updates, _ = tx.update({'w': g}, tx.init({'w': jnp.zeros(2)}))
  v = 0.1 * g ** 2
  expected = -g / (jnp.sqrt(v + 1e-4) if in_sqrt else jnp.sqrt(v) + 1e-4)
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-5)


def _resume_workdir(tmp_path, config):
  """A workdir that looks resumable: config.json and a checkpoint folder."""
  workdir = tmp_path / 'run'
  (workdir / checkpoints.CHECKPOINT_DIR / '5').mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  return str(workdir)


def test_resume_refuses_other_monitors_and_switching_weight_decay(tiny_config, tmp_path):
  c = tiny_config
  c.weight_decay = 0.0
  workdir = _resume_workdir(tmp_path, c)
  for key, value, words in [
      ('plateau.monitor', 'val_loss', "plateau.monitor 'val_miou' -> 'val_loss'"),
      ('early_stopping.monitor', 'val_loss', "early_stopping.monitor 'val_miou' -> 'val_loss'"),
      ('weight_decay', 1e-4, 'weight_decay 0.0 -> 0.0001 (to or from 0')]:
    changed = c.copy_and_resolve_references()
    *parents, leaf = key.split('.')
    node = changed
    for p in parents:
      node = node[p]
    node[leaf] = value
    with pytest.raises(train.RunError, match=re.escape(words)):
      train.check_resumed_config(changed, workdir)
  decayed = c.copy_and_resolve_references()
  decayed.weight_decay = 1e-4
  workdir = _resume_workdir(tmp_path / 'decayed', decayed)
  decayed.weight_decay, decayed.learning_rate = 2e-4, 5e-4  # A decay's size and the rate are free.
  assert train.check_resumed_config(decayed, workdir) == [
      'learning_rate 0.001 -> 0.0005', 'weight_decay 0.0001 -> 0.0002']


def test_an_early_stopped_run_stays_stopped_on_resume(tmp_path, monkeypatch):
  """Started again (or resumed after a stop request during its last epoch), a run that early
  stopping ended trains no further; a longer patience trains on."""
  update = train.EpochRules.update

  def stop_now(self, record):
    cut, _ = update(self, record)
    self.stop_wait = self.config.early_stopping.patience  # As if it had not improved.
    return cut, True

  monkeypatch.setattr(train.EpochRules, 'update', stop_now)
  config, workdir = train_tiny(tmp_path, num_epochs=3, early_stopping__patience=1,
                               visualize__num_tensorboard_images=0)
  history = lambda: json.loads((Path(workdir) / 'history.json').read_text())
  assert [r['epoch'] for r in history()] == [1]
  monkeypatch.setattr(train.EpochRules, 'update', update)
  assert train.train_and_evaluate(config, workdir)['epoch'] == 1
  assert [r['epoch'] for r in history()] == [1]
  config.early_stopping.patience = 5
  train.train_and_evaluate(config, workdir)
  assert [r['epoch'] for r in history()] == [1, 2, 3]


def test_resume_on_other_training_data_is_refused(tmp_path, monkeypatch):
  config, workdir = train_tiny(tmp_path, visualize__num_tensorboard_images=0)
  load = input_pipeline.load_sources

  def fewer(data_config):
    sources, info = load(data_config)
    n = len(sources['train'])
    return dict(sources, train=input_pipeline.SubsetSource(sources['train'], range(n - 1))), info

  monkeypatch.setattr(input_pipeline, 'load_sources', fewer)
  config.num_epochs = 2
  with pytest.raises(train.RunError, match='was trained on .* training images, and'):
    train.train_and_evaluate(config, workdir)
  assert len(json.loads((Path(workdir) / 'history.json').read_text())) == 1


def test_best_mark_takes_ties_and_never_nan():
  """history.json's 'best': a tie counts (orbax keeps the latest of equal checkpoints); NaN (a
  metric with nothing to score) is never best and does not hide later values."""
  nan = float('nan')
  history = [{'val_miou': nan}]
  assert not train._is_best([], 'val_miou', nan)
  assert train._is_best(history, 'val_miou', 0.3)  # Before: NaN stayed the 'best so far'.
  history.append({'val_miou': 0.3})
  assert train._is_best(history, 'val_miou', 0.3)  # A tie.
  assert not train._is_best(history, 'val_miou', 0.2)
  assert not train._is_best(history, 'val_miou', nan)  # Before: NaN compared False, so best.
  assert train._is_best([{'val_loss': 0.5}], 'val_loss', 0.4)
  assert not train._is_best([{'val_loss': 0.5}], 'val_loss', 0.6)


def test_fewer_training_images_than_a_batch_fail_before_the_run_folder(tiny_config, tmp_path):
  tiny_config.data.synthetic.num_train = 3
  tiny_config.batch_size = 4
  workdir = tmp_path / 'run'
  with pytest.raises(DataError, match=r'3 training examples, fewer than one batch'):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert not workdir.exists()  # Before: workdir/checkpoints was made, and the model compiled.


def test_non_finite_validation_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
  """It said 'the last good checkpoint is intact' where none had been saved."""
  scored = train.evaluate_split

  def nan_loss(*args, **kwargs):
    return dict(scored(*args, **kwargs), loss=float('nan'))

  monkeypatch.setattr(train, 'evaluate_split', nan_loss)
  with pytest.raises(train.RunError, match='non-finite validation loss after epoch 1') as e:
    train_tiny(tmp_path, visualize__num_tensorboard_images=0)
  assert 'no checkpoint was saved in' in str(e.value) and 'intact' not in str(e.value)
  assert not list((tmp_path / 'run' / 'checkpoints').glob('[0-9]*'))
