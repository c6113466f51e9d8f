"""The shipped weights' config (pretrained/camvid_sepres_w192_h512/config.py), for the A/B scripts."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'pretrained', 'camvid_sepres_w192_h512', 'config.py')


def config():
  spec = importlib.util.spec_from_file_location('shipped_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
