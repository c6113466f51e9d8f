"""On the real CamVid (../shared/data/CamVid, skipped when absent): a short run clearly learns."""

import json

import jax
import pytest

from configs import default
from sepres_jax import input_pipeline
from sepres_jax import models
from sepres_jax import train


@pytest.mark.slow
def test_a_few_hundred_steps_beat_an_untrained_model(camvid_dir, tmp_path):
  config = default.get_config()
  config.data.manual_dir = camvid_dir
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.image_size = (96, 128)
  config.data.eval_resize = True
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = 7  # 45 steps each: 315 steps.
  config.model.head_width = 256
  config.log_every_steps = 45

  sources, _ = input_pipeline.load_sources(config.data)
  mesh = train.make_mesh()
  model = models.create_model(config, train.num_outputs(config))
  untrained = train.create_train_state(config, model, jax.random.key(config.seed), mesh)
  stepper = train.Stepper(config, mesh, None)
  before = train.evaluate_split(stepper, untrained, input_pipeline.eval_batches(
      sources['val'], config.data, global_batch_size=8))

  last = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert last['epoch'] == 7 and last['step'] == 315
  assert last['train_loss'] < 1.2
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())
  best = max(r['val_miou'] for r in history)
  assert best > before['miou'] + 0.15, (before['miou'], best)
  assert best > 0.25
