"""Tiny CPU config for the tests: synthetic scenes, a narrow network, two short epochs."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_epochs = 2
  config.log_every_steps = 2
  config.data.name = 'synthetic'
  config.data.image_size = (64, 64)
  config.data.eval_resize = True
  config.data.synthetic.num_train = 16
  config.data.synthetic.num_val = 6
  config.data.synthetic.num_test = 6
  config.data.synthetic.height = 72
  config.data.synthetic.width = 96
  config.model.widths = (4, 8, 8, 16, 16)
  config.model.head_width = 32
  config.early_stopping.patience = 0
  config.eval.input = 'native'
  config.visualize.num_tensorboard_images = 0  # Saves a compilation; test_visualize sets it.
  return config
