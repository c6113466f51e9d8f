"""The shipped weights' network and crop size, read from their config (for the A/B scripts)."""

import importlib.util
import os

from sepres_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'pretrained', 'camvid_sepres_w192_h512', 'config.py')


def network():
  """(SepResFCN8 keyword arguments but impl, (height, width) of its training crops)."""
  spec = importlib.util.spec_from_file_location('shipped_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  m = config.model
  net = dict(num_classes=train.num_outputs(config), widths=tuple(m.widths),
             head_width=m.head_width)
  # Only the options it uses, so that older revisions' networks (ab_impls --against) take them.
  net.update({k: m[k] for k in ('block_depth', 'fine_skips', 'refine', 'context')
              if m.get(k, 0) and (k != 'block_depth' or m[k] != 3)})
  return net, tuple(int(d) for d in config.data.image_size)
