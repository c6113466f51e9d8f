"""Distillation: soft targets move with the labels, the loss term, and a run with a teacher."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import weights_folder
from configs import default
from sepres_jax import augment
from sepres_jax import checkpoints
from sepres_jax import distill
from sepres_jax import input_pipeline
from sepres_jax import train

K = 11


def _example(h=72, w=96, seed=0):
  """An image, its label (12x12 blocks) and a one-hot uint8 'teacher' of the same label."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, K, ((h + 11) // 12, (w + 11) // 12))
  label = blocks.repeat(12, 0).repeat(12, 1)[:h, :w].astype(np.uint8)
  rgb = np.stack([label * 20, np.full_like(label, 100), np.zeros_like(label)], -1)
  soft = (np.eye(K, dtype=np.uint8)[label] * 255).astype(np.uint8)
  return {'image': rgb.astype(np.uint8), 'label': label[..., None]}, soft


def _agree(soft, label):
  counted = label >= 0
  return (np.argmax(soft, -1) == label)[counted].mean()


@pytest.mark.parametrize('flip', [False, True])
def test_soft_targets_move_with_the_label_and_change_no_random_draw(flip):
  config = default.get_config().data
  config.image_size = (64, 64)
  config.augment.crop = True
  config.augment.scale = (0.7, 1.6)  # Below 1 the crop pads; above it crops.
  config.augment.jitter = 0.2
  example, soft = _example()
  for seed in range(6):
    rgb, label, out = augment.augment(example['image'], example['label'],
                                      np.random.default_rng(seed), config, flip, soft)
    plain = augment.augment(example['image'], example['label'], np.random.default_rng(seed),
                            config, flip)
    np.testing.assert_array_equal(rgb, plain[0])
    np.testing.assert_array_equal(label, plain[1])
    assert out.shape == (64, 64, K) and out.dtype == np.uint8
    assert _agree(out, label) > 0.9
    assert (out[label == augment.IGNORE] == 0).all()  # Padding has no target.


def test_train_batches_carry_soft_targets_with_and_without_augmentation():
  config = default.get_config().data
  config.image_size = (48, 64)
  config.random_flip = True
  examples, softs = zip(*(_example(seed=s) for s in range(4)))
  source = distill.SoftTargets(list(examples), list(softs))
  for crop in (False, True):
    config.augment.crop = crop
    it = input_pipeline.train_iterator(source, config, global_batch_size=2, seed=1)
    for _ in range(4):
      batch = next(it)
      assert batch[distill.SOFT_KEY].shape == (2, 48, 64, K)
      assert _agree(batch[distill.SOFT_KEY], batch['label']) > 0.9
  # Without soft targets the batch is as before.
  plain = next(input_pipeline.train_iterator(list(examples), config, global_batch_size=2, seed=1))
  assert set(plain) == {'image', 'label'}


def test_soft_cross_entropy_counts_labelled_pixels_and_is_least_at_the_teacher():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 5, K)), jnp.float32)
  labels = jnp.asarray(rng.integers(-1, K + 1, (2, 4, 5)), jnp.int32)  # Padding, void, classes.
  q = jax.nn.softmax(logits, -1)
  soft = jnp.round(q * 255).astype(jnp.uint8)
  loss, pixels = distill.soft_cross_entropy(logits, soft, labels, K)
  mask = (np.asarray(labels) >= 0) & (np.asarray(labels) < K)
  assert float(pixels) == mask.sum()
  qn = np.asarray(soft, np.float64)
  qn /= qn.sum(-1, keepdims=True)
  want = -(qn * np.asarray(jax.nn.log_softmax(logits, -1))).sum(-1)[mask].sum()
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # The teacher's own logits are (up to the uint8 rounding) the minimum: a ~zero gradient.
  grad = jax.grad(lambda z: distill.soft_cross_entropy(z, soft, labels, K)[0])(logits)
  other = jax.grad(lambda z: distill.soft_cross_entropy(z, soft, labels, K)[0])(logits * 0.5)
  assert float(jnp.abs(grad).max()) < 0.01 < float(jnp.abs(other).max())


def test_distill_weight_changes_the_gradient_not_the_logged_loss(tiny_config):
  mesh = train.make_mesh()
  model = train.models.create_model(tiny_config, train.num_outputs(tiny_config))
  state = train.create_train_state(tiny_config, model, jax.random.key(0), mesh)
  h, w = tiny_config.data.image_size
  rng = np.random.default_rng(0)
  raw = {'image': rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32),
         'label': rng.integers(0, K + 1, (2, h, w)).astype(np.int32),
         distill.SOFT_KEY: rng.integers(0, 256, (2, h, w, K)).astype(np.uint8)}
  results = {}
  for weight in (0.0, 1.0):
    tiny_config.distill.teacher = 'unused-by-the-step'
    tiny_config.distill.weight = weight
    stepper = train.Stepper(tiny_config, mesh, None)
    new, out = stepper.train(jax.tree.map(jnp.copy, state), stepper.batch(raw))  # Donated.
    results[weight] = stepper.fetch(out)
  assert float(results[0.0]['loss_sum']) == pytest.approx(float(results[1.0]['loss_sum']),
                                                          rel=1e-6)
  assert float(results[1.0]['grad_norm']) != pytest.approx(float(results[0.0]['grad_norm']),
                                                           rel=1e-3)


def test_weight_without_teacher_is_a_one_line_error(tiny_config):
  tiny_config.distill.weight = 1.0
  with pytest.raises(train.RunError, match='config.distill.teacher'):
    distill.enabled(tiny_config)
  tiny_config.distill.teacher = 'x'
  tiny_config.distill.weight = -1.0
  with pytest.raises(train.RunError, match='config.distill.weight'):
    distill.enabled(tiny_config)
  # A teacher named twice (its own spelling or another) would count twice in the average.
  tiny_config.distill.weight = 1.0
  tiny_config.distill.teacher = 'runs/a, runs/b/../a'
  with pytest.raises(checkpoints.CheckpointError, match='distill.teacher: runs/b/../a is named'):
    distill.enabled(tiny_config)
  tiny_config.init_from = tiny_config.distill.teacher = 'runs/a'  # Its own init: allowed.
  assert distill.enabled(tiny_config)


def test_a_run_distils_from_a_teacher(tiny_config, tmp_path):
  config = tiny_config
  config.num_epochs = 1
  sources, _ = input_pipeline.load_sources(config.data)
  config.distill.teacher = weights_folder(config, tmp_path / 'teacher', seed=7)
  config.distill.weight = 1.0
  config.distill.scales = (1.0, 1.25)
  probs = distill.teacher_probabilities(config, sources['train'], train.make_mesh())
  assert len(probs) == len(sources['train'])
  first = np.asarray(sources['train'][0]['image'])
  assert probs[0].shape == (*first.shape[:2], train.num_outputs(config))
  assert probs[0].dtype == np.uint8
  total = probs[0].astype(int).sum(-1)
  assert abs(total - 255).max() <= train.num_outputs(config)  # Rounded probabilities.
  # A student run with it trains, and a wrong teacher path is one line naming it.
  workdir = str(tmp_path / 'student')
  record = train.train_and_evaluate(config, workdir)
  assert np.isfinite(record['train_loss']) and 'val_miou' in record
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['distill']['teacher'] == config.distill.teacher
  config.distill.teacher = str(tmp_path / 'nowhere')
  with pytest.raises(train.RunError, match='nowhere'):
    train.train_and_evaluate(config, str(tmp_path / 'student2'))


def test_benchmark_times_a_distilling_step(tiny_config, capsys):
  from sepres_jax import benchmark  # pylint: disable=g-import-not-at-top
  tiny_config.distill.teacher = 'not-read-by-the-benchmark'
  tiny_config.distill.weight = 1.0
  tiny_config.benchmark.repeats = 1
  tiny_config.benchmark.infer_size = (64, 96)
  assert benchmark.benchmark(tiny_config) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['train_images_per_sec'] > 0 and result['train_gflops_per_image'] > 0


def test_an_ensemble_teacher_averages_its_members(tiny_config, tmp_path):
  """distill.teacher='a,b': the members' probabilities averaged (to uint8 rounding)."""
  config = tiny_config
  config.distill.weight, config.distill.flip, config.distill.scales = 1.0, False, (1.0,)
  source = input_pipeline.load_sources(config.data)[0]['train']
  a = weights_folder(config, tmp_path / 'a', seed=7, noise=0.3)
  b = weights_folder(config, tmp_path / 'b', seed=8, noise=0.3)
  mesh = train.make_mesh()
  probs = {}
  for name, teacher in (('a', a), ('b', b), ('ab', f'{a}, {b}')):
    config.distill.teacher = teacher
    probs[name] = [p.astype(int) for p in distill.teacher_probabilities(config, source, mesh)[:2]]
  for pa, pb, pab in zip(probs['a'], probs['b'], probs['ab']):
    assert np.abs(pa - pb).max() > 20  # The members disagree ...
    assert np.abs(2 * pab - (pa + pb)).max() <= 3  # ... and the ensemble is their mean.


def test_targets_are_cached_in_the_workdir_and_recomputed_when_stale(tiny_config, tmp_path,
                                                                     monkeypatch):
  """A resumed run reads the targets back; other weights, settings or a broken file recompute."""
  config = tiny_config
  config.distill.weight, config.distill.flip, config.distill.scales = 1.0, False, (1.0,)
  config.distill.teacher = weights_folder(config, tmp_path / 'a', seed=7, noise=0.3)
  source = input_pipeline.load_sources(config.data)[0]['train']
  mesh, workdir = train.make_mesh(), str(tmp_path / 'run')
  path = distill.cache_path(workdir)
  first = distill.teacher_probabilities(config, source, mesh, workdir)
  assert os.path.exists(path) and not os.path.exists(path + '.tmp')
  written = os.path.getmtime(path)

  def no_prediction(*args, **kwargs):
    raise AssertionError('the teacher predicted although its targets were cached')

  config.data.prefetch += 1  # How the data is read does not change the targets,
  config.model.large_conv = 'rows'  # nor the kernels' form (a resume may change it).
  with monkeypatch.context() as m:
    m.setattr(distill.models, 'averaged_logits', no_prediction)
    again = distill.teacher_probabilities(config, source, mesh, workdir)
  assert len(again) == len(first)
  assert all(np.array_equal(x, y) for x, y in zip(first, again))
  assert os.path.getmtime(path) == written

  def recomputed():
    with monkeypatch.context() as m:
      calls = []
      real = distill.models.averaged_logits
      m.setattr(distill.models, 'averaged_logits', lambda *a, **k: calls.append(1) or real(*a, **k))
      probs = distill.teacher_probabilities(config, source, mesh, workdir)
    assert calls, 'the stale cache was used'
    return probs

  # Other teacher weights at the same path: recomputed, and different.
  shutil.rmtree(tmp_path / 'a')
  weights_folder(config, tmp_path / 'a', seed=8, noise=0.3)
  other = recomputed()
  assert any(not np.array_equal(x, y) for x, y in zip(first, other))
  # Other settings: recomputed.
  config.distill.scales = (1.0, 1.25)
  recomputed()
  config.dtype = 'bfloat16'  # The teacher's activations: other numbers.
  recomputed()
  config.dtype = 'float32'
  # A broken file: recomputed and rewritten, no error.
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  recomputed()
  with np.load(path) as z:
    assert int(z['count']) == len(source)
  # distill.cache=False: neither read nor written.
  os.remove(path)
  config.distill.cache = False
  distill.teacher_probabilities(config, source, mesh, workdir)
  assert not os.path.exists(path)
