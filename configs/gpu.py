"""Accelerators: the default protocol with a larger batch and bfloat16 activations."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 32
  config.eval_batch_size = 32
  config.dtype = 'bfloat16'  # Activations; parameters and optimiser state stay float32.
  config.model.impl = 'xla'  # Library kernels (cuDNN) are the fast path on GPUs.
  config.data.num_workers = 4
  config.data.prefetch = 8
  return config
