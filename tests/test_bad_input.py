"""Bad input: every problem of a data folder listed at once; one-line errors that name the culprit.

The folder checks run in process (fast); the command line (--mode=verify, training on a broken
folder, bad batch sizes, predict inputs) in subprocesses, none of which gets as far as compiling.
"""

import os
from pathlib import Path
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, one_error_line, run_env
from sepres_jax import verify
from sepres_jax.data import camvid
from sepres_jax.data import synthetic
from sepres_jax.data.camvid import DataError


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  return synthetic.write_synthetic_camvid(tmp_path_factory.mktemp('scenes'), num_train=6,
                                          num_val=3, num_test=3, height=24, width=32, seed=0)


def _copy(scenes, tmp_path):
  folder = tmp_path / 'camvid'
  shutil.copytree(scenes, folder)
  return folder


def _break_everything(folder):
  """One of each problem; returns {file name: words its line must have}."""
  (folder / 'valannot' / 'synth_val_00002.png').unlink()  # Image without label.
  (folder / 'test' / 'synth_test_00001.png').unlink()  # Label without image.
  (folder / 'train' / 'synth_train_00001.png').write_bytes(b'')  # Zero-byte image.
  data = (folder / 'train' / 'synth_train_00002.png').read_bytes()
  (folder / 'train' / 'synth_train_00002.png').write_bytes(data[:len(data) // 2])  # Truncated.
  (folder / 'trainannot' / 'synth_train_00003.png').write_bytes(b'not a png at all')  # Corrupt.
  cv2.imwrite(os.fspath(folder / 'trainannot' / 'synth_train_00004.png'),
              np.zeros((20, 32), np.uint8))  # Another size.
  label = np.full((24, 32), 11, np.uint8)  # Void (11) is fine; 12 and 200 are not.
  label[0, 0], label[1, 1] = 12, 200
  cv2.imwrite(os.fspath(folder / 'trainannot' / 'synth_train_00005.png'), label)
  cv2.imwrite(os.fspath(folder / 'valannot' / 'synth_val_00000.png'),
              camvid.COLORS[np.arange(24 * 32).reshape(24, 32) % 12])  # RGB label.
  return {'synth_val_00002.png': 'has no label', 'synth_test_00001.png': 'has no image',
          'synth_train_00001.png': 'zero-byte', 'synth_train_00002.png': 'cannot decode',
          'synth_train_00003.png': 'cannot decode', 'synth_train_00004.png': 'size',
          'synth_train_00005.png': '[12, 200] out of range', 'synth_val_00000.png': 'RGB'}


def _assert_all_listed(lines, expected):
  assert len(lines) == len(expected), '\n'.join(lines)
  for name, words in expected.items():
    hits = [l for l in lines if name in l.split(':')[0]]
    assert len(hits) == 1 and words in hits[0], (name, hits)


def test_sound_folder_has_no_problems(scenes):
  assert verify.folder_problems(scenes) == []


def test_every_problem_is_listed_once(scenes, tmp_path):
  folder = _copy(scenes, tmp_path)
  expected = _break_everything(folder)
  _assert_all_listed(verify.folder_problems(folder), expected)


@pytest.mark.parametrize('make, words', [
    (lambda root: root / 'nowhere', 'does not exist'),
    (lambda root: (root / 'f').write_text('x') and root / 'f', 'is a file, not a folder'),
    (lambda root: (root / 'empty').mkdir() or root / 'empty', 'is empty'),
    (lambda root: (root / 'x' / 'y').mkdir(parents=True) or root / 'x', 'no CamVid layout'),
])
def test_missing_empty_or_foreign_folder(tmp_path, make, words):
  folder = make(tmp_path)
  problems = verify.folder_problems(folder)
  assert len(problems) == 1 and str(folder) in problems[0] and words in problems[0]


def test_missing_label_folder(scenes, tmp_path):
  folder = _copy(scenes, tmp_path)
  shutil.rmtree(folder / 'testannot')
  problems = verify.folder_problems(folder)
  assert problems == [f'{folder / "testannot"}: folder missing']


def test_training_check_runs_once_per_folder_state(scenes, tmp_path, tiny_config):
  folder = _copy(scenes, tmp_path)
  tiny_config.data.update(name='camvid', manual_dir=os.fspath(folder))
  verify.check_data(tiny_config.data)
  markers = list((Path(tiny_config.data.cache_dir) / verify.VERIFIED_DIR).iterdir())
  assert len(markers) == 1
  with pytest.MonkeyPatch.context() as patch:  # Remembered: no second decoding pass.
    patch.setattr(verify, 'scan', lambda *a, **k: pytest.fail('the folder was scanned again'))
    verify.check_data(tiny_config.data)
  assert list((Path(tiny_config.data.cache_dir) / verify.VERIFIED_DIR).iterdir()) == markers
  (folder / 'train' / 'synth_train_00000.png').write_bytes(b'')  # A change is checked again.
  with pytest.raises(DataError, match=r'synth_train_00000\.png: zero-byte'):
    verify.check_data(tiny_config.data)


# --- the command line ---------------------------------------------------------------------------


def _main(tmp_path, *args, env=None, timeout=300):
  cmd = [sys.executable, 'main.py', '--config=configs/test.py', f'--workdir={tmp_path / "run"}',
         f'--config.data.cache_dir={tmp_path / "cache"}', *args]
  return subprocess.run(cmd, cwd=ROOT, env=env or run_env(), capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(out):
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  return [l for l in out.stderr.splitlines() if l.startswith('error:')]


@pytest.mark.slow
def test_verify_mode_lists_every_problem(scenes, tmp_path):
  folder = _copy(scenes, tmp_path)
  expected = _break_everything(folder)
  out = _main(tmp_path, '--mode=verify', '--config.data.name=camvid',
              f'--config.data.manual_dir={folder}')
  assert out.returncode == 1
  lines = out.stdout.strip().splitlines()
  assert 'pairs: train 6, val 2, test 2' in lines  # What it found, then every problem.
  _assert_all_listed([l for l in lines if l.startswith(f'{folder}/')], expected)
  assert _error_lines(out) == [f'error: {len(expected)} problem(s) in {folder}']
  assert not (tmp_path / 'run').exists()
  ok = _main(tmp_path, '--mode=verify', '--config.data.name=camvid',
             f'--config.data.manual_dir={scenes}')
  assert ok.returncode == 0 and 'no problems found' in ok.stdout


@pytest.mark.slow
def test_training_on_a_broken_folder_lists_all_and_writes_nothing(scenes, tmp_path):
  folder = _copy(scenes, tmp_path)
  expected = _break_everything(folder)
  out = _main(tmp_path, '--config.data.name=camvid', f'--config.data.manual_dir={folder}')
  assert out.returncode == 1
  err = _error_lines(out)
  assert len(err) == 1 and f'{len(expected)} problems in {folder}' in err[0]
  _assert_all_listed([l.strip() for l in out.stderr.splitlines() if l.startswith('  /')], expected)
  assert not (tmp_path / 'run').exists()
  assert not (tmp_path / 'cache' / 'tfds').exists()  # Checked before any building.


@pytest.mark.slow
def test_batch_not_divisible_by_devices(tmp_path):
  env = run_env(XLA_FLAGS='--xla_force_host_platform_device_count=3', JAX_PLATFORMS='cpu')
  out = _main(tmp_path, env=env)
  assert out.returncode == 1
  err = _error_lines(out)
  assert err == ['error: config.batch_size=4 is not divisible by the 3 devices']
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_predict_input_that_matches_nothing(tmp_path):
  out = _main(tmp_path, '--mode=predict', f'--config.predict.input={tmp_path}/none/*.png')
  assert out.returncode == 1
  err = _error_lines(out)
  assert len(err) == 1 and f'{tmp_path}/none/*.png' in err[0] and 'no such image' in err[0]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.parametrize('arg, words', [
    ('--config.data.no_such_key=3', 'no_such_key'),
    ('--config.batch_size=eight', 'batch_size'),
    ('--config.learning_rate=fast', 'learning_rate'),
])
def test_config_mistakes_are_one_line(tmp_path, arg, words):
  out = _main(tmp_path, arg, timeout=120)
  line = one_error_line(out)
  assert line.startswith('error: ') and words in line
  assert not (tmp_path / 'run').exists()
