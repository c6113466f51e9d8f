"""config.ema_decay: the moving average of the weights, what validation scores and what is read."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, train_tiny
from sepres_jax import checkpoints
from sepres_jax import evaluate
from sepres_jax import pretrained
from sepres_jax import train
from test_train import _batch, _setup


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_average_follows_the_decay_rule_with_its_warm_up(tiny_config):
  tiny_config.learning_rate = 1e-2
  tiny_config.ema_decay = 0.5
  state, stepper = _setup(tiny_config)
  expected = _leaves({'params': state.params, 'batch_stats': state.batch_stats})
  batch = stepper.batch(_batch(tiny_config, 4))
  for t in range(4):
    state, _ = stepper.train(state, batch)
    d = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, 0.31: the warm-up, below 0.5.
    now = _leaves({'params': state.params, 'batch_stats': state.batch_stats})
    expected = [d * e + (1 - d) * w for e, w in zip(expected, now)]
  got = _leaves(state.ema)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # The average lags the weights: it is not a copy of them.
  assert any(not np.allclose(g, w) for g, w in zip(got, _leaves(
      {'params': state.params, 'batch_stats': state.batch_stats})))
  assert train.eval_weights(state).params is state.ema['params']


def test_off_keeps_no_average(tiny_config):
  state, stepper = _setup(tiny_config)
  state, _ = stepper.train(state, stepper.batch(_batch(tiny_config, 4)))
  assert state.ema is None and train.eval_weights(state) is state


def test_a_decay_out_of_range_is_a_one_line_error(tiny_config):
  tiny_config.ema_decay = 1.5
  with pytest.raises(train.RunError, match='config.ema_decay must be in'):
    _setup(tiny_config)


def test_validation_evaluate_init_from_and_pack_read_the_average(tmp_path):
  config, workdir = train_tiny(tmp_path, ema_decay=0.9, data__eval_resize=False)
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  step = history[-1]['step']
  stored = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))
  average, raw = _leaves(stored['ema']['params']), _leaves(stored['params'])
  assert any(not np.allclose(a, r) for a, r in zip(average, raw))

  # evaluate reads the average; on val it scores what validation recorded for this checkpoint.
  config.eval.split, config.eval.num_panels = 'val', 0
  scores = evaluate.evaluate(config, workdir)
  assert scores['miou'] == pytest.approx(history[-1]['val_miou'], abs=1e-6)
  _, state, _, _ = evaluate.trained_state(config, workdir)
  for got, want in zip(_leaves(state.params), average):
    np.testing.assert_array_equal(got, want)

  # init_from a run with an average loads the average, and a run fine-tuned from it trains.
  tuned = config.copy_and_resolve_references()
  tuned.init_from, tuned.num_epochs = workdir, 1
  fresh, _ = _setup(tuned)
  loaded = evaluate.load_weights(workdir, fresh)
  for got, want in zip(_leaves(loaded['params']), average):
    np.testing.assert_array_equal(got, want)
  record = train.train_and_evaluate(tuned, os.fspath(tmp_path / 'tuned'))
  assert np.isfinite(record['val_miou'])

  # A packed folder holds the average as plain weights.
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    pretrained.pack(workdir, os.fspath(tmp_path / 'packed'))
  finally:
    os.chdir(cwd)
  packed = ocp.StandardCheckpointer().restore(os.fspath(tmp_path / 'packed' / 'weights'))
  assert 'ema' not in packed
  for got, want in zip(_leaves(packed['params']), average):
    np.testing.assert_array_equal(got, want)


def test_resuming_with_another_ema_setting_is_a_one_line_error(tmp_path):
  config, workdir = train_tiny(tmp_path)  # Without an average.
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  config.ema_decay, config.num_epochs = 0.9, 2
  with pytest.raises(checkpoints.CheckpointError, match='written without a moving average of the weights; resume '
                                      'with the config.ema_decay it was started with'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before  # Nothing written.
