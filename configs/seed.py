"""The original blog post's recipe, as faithfully as this codebase allows.

224x224 squashed resize, 12 classes (void learned as a class), a random 85:15 split of the 367
training images, RMSprop lr 1e-3, batch 32, up to 180 epochs, plateau decay on val accuracy
(factor 0.01, patience 2), early stopping on val loss (patience 10), best checkpoint by val
accuracy. Reported on test/ at native resolution with void ignored (the standard benchmark);
`--config.data.ignore_void=False` is not needed for that: the 12th output is simply never counted.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_epochs = 180
  config.data.split = 'random85'
  config.data.image_size = (224, 224)
  config.data.eval_resize = True  # Validation as Keras saw it: the resized 224x224 copies.
  config.data.ignore_void = False  # 12 classes: void is the 12th.
  config.eval.val_counts_void = True  # Val accuracy and mIoU over the 12, as Keras counted them.
  config.learning_rate = 1e-3
  config.plateau.monitor = 'val_accuracy'
  config.plateau.factor = 0.01
  config.plateau.patience = 2
  config.plateau.min_scale = 0.0
  config.early_stopping.monitor = 'val_loss'
  config.early_stopping.patience = 10
  config.best_metric = 'val_accuracy'
  config.model.bn_momentum = 0.99  # Keras' BatchNormalization default.
  return config
