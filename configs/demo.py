"""A few minutes on a laptop CPU: synthetic CamVid-like scenes that the project generates itself."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = 20
  config.data.name = 'synthetic'
  config.data.image_size = (96, 128)
  config.data.synthetic.num_train = 160
  config.data.synthetic.num_val = 32
  config.data.synthetic.num_test = 32
  config.model.head_width = 256
  config.learning_rate = 1e-3
  config.plateau.patience = 3
  config.early_stopping.patience = 6
  return config
