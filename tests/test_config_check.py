"""Config values are checked before any work; a config file that does not load is one line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, one_error_line, run_env
from sepres_jax import config_check
from sepres_jax import train

MODES = ('train', 'evaluate', 'predict', 'export', 'summary', 'benchmark', 'verify', 'visualize')


def _config(name='configs/test.py'):
  spec = importlib.util.spec_from_file_location('cfg', ROOT / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


SHIPPED_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / 'configs').glob('*.py'),
                                                             *(ROOT / 'pretrained').glob('*/config.py')]
                         if p.name != '__init__.py')


def test_the_shipped_configs_are_found():
  assert {'configs/camvid_best.py', 'configs/camvid_crops.py', 'configs/seed.py',
          'pretrained/camvid_sepres_w192_h512/config.py'} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_every_shipped_config_passes(name):
  config = _config(name)
  for mode in MODES:
    assert config_check.check(mode, config) is None  # No ConfigError.
  config.eval_batch_size = 0  # The same config with one bad value is caught, in every mode.
  for mode in MODES:
    with pytest.raises(config_check.ConfigError, match='config.eval_batch_size'):
      config_check.check(mode, config)


@pytest.mark.parametrize('key, value, words', [
    ('batch_size', 0, 'positive integer, got 0'),
    ('batch_size', -4, 'positive integer, got -4'),
    ('eval_batch_size', 0, 'positive integer'),
    ('log_every_steps', 0, 'positive integer'),
    ('checkpoint_every_steps', -1, 'non-negative integer'),
    ('data.image_size', (100, 100), 'two positive multiples of 32, got (100, 100)'),
    ('data.image_size', ('(64,abc)',), 'two positive multiples of 32'),
    ('data.image_size', (64, 64, 64), 'two positive multiples of 32'),
    ('dtype', 'float13', "float32, bfloat16, got 'float13'"),
    ('best_metric', 'val_bogus', "got 'val_bogus'"),
    ('plateau.monitor', 'bogus', 'per-epoch metric'),
    ('early_stopping.monitor', 'val_iou', 'per-epoch metric'),
    ('model.widths', (4, 8), '5 positive integers'),
    ('model.widths', (4, 8, 8, 0, 16), '5 positive integers'),
    ('model.fine_skips', 3, '0, 1 or 2'),
    ('model.refine', -1, 'non-negative'),
    ('eval.scales', (), 'one or more positive numbers'),
    ('eval.scales', (1.0, 0.0), 'one or more positive numbers'),
    ('distill.scales', ('1.0',), 'one or more positive numbers'),
    # Training's validation read a typo as native, the distillation teacher as resize.
    ('eval.input', 'Native', "'resize', 'native', got 'Native'"),
    ('eval.checkpoint', 'last', "'best', 'latest', got 'last'"),
    ('predict.resize', 'crop', "'', 'resize', 'native', got 'crop'"),
    ('predict.alpha', 1.5, 'in [0, 1]'),
    ('data.num_classes', 0, 'positive integer'),  # Was a ZeroDivisionError traceback.
    ('seed', -1, 'integer in 0..4294967295'),  # grain's traceback after the model was built.
    ('seed', 2**32, 'integer in 0..4294967295'),
    # Were a traceback (1 value) or an error once the run had started (low > high).
    ('data.augment.scale', (1.5,), '(low, high) with 0 < low <= high, got (1.5,)'),
    ('data.augment.scale', (2.0, 1.0), '0 < low <= high'),
    ('data.augment.jitter', 1.0, 'in [0, 1), got 1.0'),
    ('data.augment.blur', 2.0, 'probability in [0, 1]'),
    # Trained on (a negative rate is gradient ascent, saved as "best"), or failed after an epoch
    # as a non-finite loss naming no key.
    ('learning_rate', -1.0, 'a number > 0, got -1.0'),
    ('end_factor', -5.0, 'a number >= 0'),
    ('lovasz_weight', -1.0, 'a number >= 0'),
    ('label_smoothing', 2.0, 'in [0, 1)'),
    ('weight_decay', -1.0, 'a number >= 0'),
    ('rmsprop_decay', 2.0, 'in [0, 1)'),
    ('rmsprop_eps', -1.0, 'a number >= 0'),
    ('model.bn_momentum', 2.0, 'in [0, 1]'),
    ('model.bn_epsilon', -1.0, 'a number > 0'),
    ('data.prefetch', -1, 'non-negative integer'),
    ('eval.num_panels', -1, 'non-negative integer'),
    ('data.split_seed', -1, 'integer in 0..4294967295'),  # A numpy traceback on real data.
    # Refused only once the data was loaded (or a distillation teacher had predicted it).
    ('parallelism', 'pmpa', "'jit', 'pmap', got 'pmpa'"),
    ('schedule', 'cos', "'constant', 'cosine', 'polynomial', got 'cos'"),
    ('data.name', 'camvd', "got 'camvd'"),
    ('data.split', 'random', "'official', 'random85'"),
    ('model.impl', 'native', "'native_cpu', got 'native'"),
    ('model.large_conv', 'fft', "got 'fft'"),
    ('visualize.what', 'pictures', "got 'pictures'"),
    ('data.class_weights', 'median', "'median_frequency', 'inverse_log' or comma-separated"),
    ('data.class_weights', '1,-2', 'numbers >= 0'),
])
def test_bad_value_names_its_key(key, value, words):
  config = _config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_check.ConfigError, match=f'config.{key}') as e:
    config_check.check('train', config)
  assert words in str(e.value)


@pytest.mark.parametrize('key, value', [
    ('factor', 1.0), ('factor', 0.0), ('min_delta', -1e-3), ('min_scale', -1.0),
    ('patience', -1), ('patience', 0), ('cooldown', -2)])
def test_plateau_fields_are_checked_for_training(key, value):
  config = _config()
  config.plateau[key] = value
  config_check.check('evaluate', config)  # Not read there.
  with pytest.raises(config_check.ConfigError, match=f'config.plateau.{key} must be'):
    config_check.check('train', config)


def test_plateau_min_delta_zero_counts_any_improvement():
  config = _config()
  config.plateau.min_delta, config.plateau.patience, config.plateau.factor = 0.0, 1, 0.5
  config.plateau.monitor = 'val_loss'
  rules = train.EpochRules(config)  # optax refused a zero tolerance before.
  scales = []
  for loss in (1.0, 0.9999999, 0.9999999, 0.9999999):
    rules.update({'val_loss': loss, 'val_miou': 0.5})
    scales.append(float(rules.scale))
  # The second epoch's 1e-7 counts (with min_delta 1e-4 it would not); the third's 0 does not.
  assert scales == [1.0, 1.0, 0.5, 0.25], scales


def test_epochs_and_benchmark_size_are_checked_where_they_are_used():
  config = _config()
  config.num_epochs = 0
  config.benchmark.infer_size = (100, 100)
  config_check.check('evaluate', config)  # Neither is read there.
  with pytest.raises(config_check.ConfigError, match='config.num_epochs'):
    config_check.check('train', config)
  with pytest.raises(config_check.ConfigError, match='config.benchmark.infer_size'):
    config_check.check('benchmark', config)
  config.benchmark.infer_size, config.num_epochs = (64, 96), 2
  for key, value in (('matmul_size', 0), ('repeats', -1), ('peak_tflops', -5.0)):
    bad = config.copy_and_resolve_references()
    bad.benchmark[key] = value
    config_check.check('train', bad)
    with pytest.raises(config_check.ConfigError, match=f'config.benchmark.{key}'):
      config_check.check('benchmark', bad)


def _main(tmp_path, *args):
  cmd = [sys.executable, 'main.py', f'--workdir={tmp_path / "run"}', *args]
  return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('text, words', [
    (None, 'No such file or directory'),
    ('def get_config(:\n', 'invalid syntax at line 1'),
    ('x = 1\n', 'defines no get_config()'),
    ('def get_config():\n  raise RuntimeError("no GPU here")\n',
     'get_config() raised RuntimeError: no GPU here'),
    # ml_collections wraps a ValueError with its traceback (which was printed whole).
    ('def get_config():\n  raise ValueError("boom")\n', 'get_config() raised ValueError: boom'),
    ('def get_config():\n  return None\n', 'get_config() returned None'),
])
@pytest.mark.parametrize('flag', [[], ['--config.seed=1']])
def test_config_file_that_does_not_load_is_one_line(tmp_path, text, words, flag):
  path = tmp_path / 'my_config.py'
  if text is not None:
    path.write_text(text)
  err = one_error_line(_main(tmp_path, f'--config={path}', *flag))
  assert str(path) in err and words in err, err
  assert not (tmp_path / 'run').exists()


def test_a_section_replaced_by_a_value_is_one_line(tmp_path):
  path = tmp_path / 'my_config.py'
  path.write_text('from configs import test\n\ndef get_config():\n  c = test.get_config()\n'
                  '  c.model = None\n  return c\n')
  err = one_error_line(_main(tmp_path, f'--config={path}'))
  assert err == 'error: config.model must be a section of fields (as in configs/default.py), got None'


def test_bad_value_stops_before_any_work(tmp_path):
  err = one_error_line(_main(tmp_path, '--config=configs/test.py', '--config.batch_size=0',
                         f'--config.data.cache_dir={tmp_path / "cache"}'))
  assert err == 'error: config.batch_size must be a positive integer, got 0'
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()
  err = one_error_line(_main(tmp_path, '--config=configs/test.py', '--config.data.augment.crop=True',
                             '--config.data.augment.scale=(1.5,)',
                             f'--config.data.cache_dir={tmp_path / "cache"}'))
  assert err.startswith('error: config.data.augment.scale must be (low, high)'), err
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()


def _finished_run(tmp_path, config):
  """A workdir as a run of `config` leaves it: config.json and a checkpoint folder."""
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return str(workdir)


def test_resuming_with_another_config_is_refused(tmp_path):
  config = _config()
  workdir = _finished_run(tmp_path, config)
  before = (tmp_path / 'run' / 'config.json').read_text()
  config.best_metric = 'val_loss'
  config.batch_size = 2
  config.learning_rate = 0.5  # Free: not listed.
  with pytest.raises(train.RunError) as e:
    train.check_resumed_config(config, workdir)
  assert str(e.value).startswith(f'{workdir} holds a run trained with another config: '
                                 "batch_size 4 -> 2; best_metric 'val_miou' -> 'val_loss' (")
  config.best_metric, config.batch_size = 'val_miou', 4
  config.model.head_width = 48
  config.data.augment.jitter = 0.3
  with pytest.raises(train.RunError, match='data.augment.jitter 0.0 -> 0.3; model.head_width 32 '
                     '-> 48'):
    train.check_resumed_config(config, workdir)
  assert (tmp_path / 'run' / 'config.json').read_text() == before


def test_resuming_may_change_the_schedule_paths_logging_and_kernels(tmp_path):
  config = _config()
  workdir = _finished_run(tmp_path, config)
  config.num_epochs = 9
  config.learning_rate = 1e-4
  config.log_every_steps = 7
  config.data.cache_dir = '/elsewhere'
  config.model.impl = 'xla'
  config.data.num_threads = 1  # The pipeline's threads and workers do not change the data.
  assert train.check_resumed_config(config, workdir) == [
      "data.cache_dir '~/.cache/sepres_jax' -> '/elsewhere'", 'data.num_threads 2 -> 1',
      'learning_rate 0.001 -> 0.0001',
      'log_every_steps 2 -> 7', "model.impl 'auto' -> 'xla'", 'num_epochs 2 -> 9']


def test_fields_an_older_run_did_not_record_are_not_compared(tmp_path):
  config = _config()
  workdir = _finished_run(tmp_path, config)
  stored = json.loads((tmp_path / 'run' / 'config.json').read_text())
  # model.head_width is fixed on resume: had it been recorded, its change would be refused.
  del stored['host_keep_memory'], stored['model']['large_conv'], stored['model']['head_width']
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(stored))
  config.host_keep_memory = not config.host_keep_memory
  config.model.large_conv = 'rows'
  config.model.head_width = 2 * config.model.head_width
  assert train.check_resumed_config(config, workdir) == []
  os.rename(tmp_path / 'run' / 'checkpoints' / '4', tmp_path / 'run' / 'checkpoints' / 'tmp')
  config.best_metric = 'val_loss'  # No checkpoint: a new run, nothing to compare.
  assert train.check_resumed_config(config, workdir) == []


def test_a_file_where_the_folder_goes_fails_before_the_work(tmp_path):
  (tmp_path / 'taken').write_text('')
  for path in (tmp_path / 'taken', tmp_path / 'taken' / 'run'):
    with pytest.raises(NotADirectoryError, match=str(tmp_path / 'taken')):
      train.check_writable(str(path))
  train.check_writable(str(tmp_path / 'a' / 'b'))
  assert os.listdir(tmp_path) == ['taken']  # Nothing made.


@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a read-only file system needs root')
def test_a_read_only_place_fails_before_the_work(tmp_path):
  ro = tmp_path / 'ro'
  ro.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(ro)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here')
  try:
    with pytest.raises(PermissionError, match=str(ro)):
      train.check_writable(str(ro / 'run'))
  finally:
    subprocess.run(['umount', str(ro)], check=True)


def test_a_misspelled_key_in_a_config_file_is_one_line(tmp_path):
  """Keys a config file adds (not only flags, which ml_collections checks) must exist."""
  path = tmp_path / 'my_data.py'
  path.write_text('from configs import custom\n\n\ndef get_config():\n'
                  '  config = custom.get_config()\n'
                  '  config.data.folder.ignore_valeu = 0\n  return config\n')
  out = subprocess.run([sys.executable, 'main.py', f'--config={path}', '--mode=verify',
                        f'--workdir={tmp_path / "run"}'], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=300)
  err = one_error_line(out)
  assert 'config.data.folder.ignore_valeu is not a field of configs/default.py' in err, err


def test_readme_documents_every_config_field():
  """Each field of configs/default.py is named in README.md: `key`, --config.key or its `group.*`."""
  from configs import default  # pylint: disable=import-outside-toplevel
  readme = (ROOT / 'README.md').read_text()
  def named(key):
    parts = key.split('.')
    groups = ['`' + '.'.join(parts[:i]) + '.*`' for i in range(1, len(parts))]
    return (f'`{key}`' in readme or f'`{key}=' in readme or f'--config.{key}=' in readme
            or any(g in readme for g in groups))
  keys = config_check.flatten(default.get_config().to_dict())
  assert len(keys) > 100
  assert [k for k in keys if not named(k)] == []
