"""End to end: main.py trains, checkpoints, resumes and evaluates on the tiny config."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, one_error_line, run_env


def _main(workdir, cache, *args, timeout=600):
  cmd = [sys.executable, 'main.py', '--config=configs/test.py', f'--workdir={workdir}',
         f'--config.data.cache_dir={cache}', *args]
  return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_train_resume_evaluate(tmp_path):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  first = _main(workdir, cache, '--config.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  history = json.loads((workdir / 'history.json').read_text())
  assert [r['epoch'] for r in history] == [1]
  assert os.listdir(workdir / 'checkpoints') == ['4']  # 16 images / batch 4.
  assert any(f.startswith('events') for f in os.listdir(workdir / 'tensorboard'))
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == 4

  second = _main(workdir, cache, '--config.num_epochs=3')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed from step 4 (epoch 1)' in second.stderr
  history = json.loads((workdir / 'history.json').read_text())
  assert [r['epoch'] for r in history] == [1, 2, 3]
  assert [r['step'] for r in history] == [4, 8, 12]
  # config.json is the resumed run's; the first run's (num_epochs 1) is kept beside it.
  assert json.loads((workdir / 'config.json').read_text())['num_epochs'] == 3
  assert json.loads((workdir / 'config.until_step4.json').read_text())['num_epochs'] == 1
  assert all(r['train_loss'] > 0 and 0 <= r['val_miou'] <= 1 for r in history)

  done = _main(workdir, cache, '--config.num_epochs=3')  # Nothing left to do.
  assert done.returncode == 0 and 'epoch 4' not in done.stderr
  assert sorted(f for f in os.listdir(workdir) if f.startswith('config')) == [
      'config.json', 'config.until_step4.json']  # Nothing changed: nothing more kept.

  ev = _main(workdir, cache, '--mode=evaluate', '--config.eval.checkpoint=latest')
  assert ev.returncode == 0, ev.stderr[-3000:]
  scores = json.loads((workdir / 'eval' / 'test.json').read_text())
  assert {'miou', 'pixel_accuracy', 'per_class', 'mean_class_accuracy'} <= set(scores)
  assert [r['name'] for r in scores['per_class']][:2] == ['Sky', 'Building']
  assert len(scores['per_class']) == 11
  assert all({'name', 'tp', 'fp', 'fn', 'iou'} <= set(r) for r in scores['per_class'])
  assert 'mean IoU' in ev.stdout and 'Sky' in ev.stdout
  total = sum(r['tp'] + r['fn'] for r in scores['per_class'])
  assert total == sum(map(sum, scores['confusion_matrix']))


def test_stray_argument_is_one_line(tmp_path):
  # `--config.data.image_size=(352, 480)` unquoted: the shell splits it, absl sees '480)'.
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.batch_size=2', '480)', timeout=120)
  line = one_error_line(out)
  assert "unexpected argument(s) '480)'" in line and 'quotes' in line
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('args, env, words', [
    # An unset $RUN trained into the current directory.
    (['--workdir='], {}, '--workdir is empty'),
    (['--num_processes=2', '--process_id=3'], {}, '--process_id=3: must be 0..1'),
    (['--num_processes=2', '--process_id=0'], {}, 'the distributed runtime cannot start'),
    ([], {'JAX_NUM_PROCESSES': 'x'}, "$JAX_NUM_PROCESSES='x' is not a whole number"),
    # Alone, each ran as process 0 of 1 (every host of a forgotten --num_processes alone).
    (['--process_id=7'], {}, '--process_id=7 needs --num_processes and --coordinator_address'),
    ([], {'JAX_PROCESS_ID': '-3'}, '--process_id=-3 needs --num_processes'),
])
def test_bad_workdir_and_process_flags_are_one_line(tmp_path, args, env, words):
  """Each was a jax ValueError traceback (or, the empty workdir, no error at all)."""
  cmd = [sys.executable, str(ROOT / 'main.py'), f'--config={ROOT / "configs" / "test.py"}',
         '--mode=train', f'--config.data.cache_dir={tmp_path / "cache"}', *args]
  if not any(a.startswith('--workdir') for a in args):
    cmd.append(f'--workdir={tmp_path / "run"}')
  out = subprocess.run(cmd, cwd=tmp_path, env=run_env(**env), capture_output=True, text=True,
                       timeout=120)
  assert words in one_error_line(out)
  assert os.listdir(tmp_path) == []  # Nothing written, in the workdir or the current directory.


def test_unknown_config_key_is_one_line(tmp_path):
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.data.no_such_key=3', timeout=120)
  assert one_error_line(out).startswith("error: unknown config key '--config.data.no_such_key'")


def test_a_mistyped_key_is_one_line_with_the_suggestion(tmp_path):
  """ml_collections' KeyError carries a "Did you mean" line: the flag and the field are named (it
  printed the exception's escaped repr, backslashes and all)."""
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.num_epoch=3', timeout=120)
  assert one_error_line(out) == ("error: unknown config key '--config.num_epoch' "
                                 '(did you mean num_epochs?)')
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.data.folder.ignore_valeu=3',
              timeout=120)
  assert one_error_line(out) == ("error: unknown config key '--config.data.folder.ignore_valeu' "
                                 '(did you mean ignore_value?)')


def test_wrong_type_is_one_line(tmp_path):
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.batch_size=eight', timeout=120)
  assert one_error_line(out).startswith("error: flag --config.batch_size=eight: invalid literal")


@pytest.mark.parametrize('field', ['impl', 'large_conv'])
def test_unknown_kernel_form_is_one_line(tmp_path, field):
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--mode=summary',
              f'--config.model.{field}=bogus', timeout=120)
  assert out.returncode == 1
  err = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and f'model.{field}' in err[0] and 'bogus' in err[0]
  assert 'Traceback' not in out.stderr


def test_missing_data_folder_is_one_line(tmp_path):
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--config.data.name=camvid',
              f'--config.data.manual_dir={tmp_path}/nowhere', timeout=120)
  assert out.returncode == 1
  err = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and 'nowhere' in err[0] and 'Traceback' not in out.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'run' / 'checkpoints')


def test_a_workdir_under_home_is_the_same_folder_in_every_mode(tmp_path):
  """`--workdir=~/x` (bash leaves a ~ after = alone): train expanded it, evaluate and predict
  looked for ./~/x."""
  home = tmp_path / 'home'
  home.mkdir()
  cmd = [sys.executable, str(ROOT / 'main.py'), f'--config={ROOT / "configs" / "test.py"}',
         '--mode=evaluate', '--workdir=~/runs/x', f'--config.data.cache_dir={tmp_path / "cache"}']
  out = subprocess.run(cmd, cwd=tmp_path, env=run_env(HOME=str(home)), capture_output=True,
                       text=True, timeout=300)
  assert f'no checkpoint in {home}/runs/x/checkpoints' in one_error_line(out)
  assert not (tmp_path / '~').exists()


def test_evaluate_without_checkpoint_is_one_line(tmp_path):
  out = _main(tmp_path / 'run', tmp_path / 'cache', '--mode=evaluate', timeout=300)
  assert 'no checkpoint' in one_error_line(out)
