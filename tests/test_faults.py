"""Faults: SIGKILL and SIGTERM mid-run resume to the same result; NaN, failed saves, other models.

Every test runs main.py in a subprocess on the tiny config (2 epochs of 4 steps). One uninterrupted
run is the reference; the others copy it or are compared with it. The suite's persistent
compilation cache (conftest.py) keeps the compiles to the first run.
"""

import hashlib
import json
import os
import re
from pathlib import Path
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, one_error_line, run_env

TIME_KEYS = ('epoch_time', 'train_time', 'data_wait_fraction')


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  return tmp_path_factory.mktemp('faults')


def _cmd(workdir, shared, *args):
  return [sys.executable, 'main.py', '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.cache_dir={shared / "cache"}', '--config.visualize.num_tensorboard_images=0',
          '--config.checkpoint_every_steps=1', *args]


def _run(workdir, shared, *args, timeout=600, **kw):
  return subprocess.run(_cmd(workdir, shared, *args), cwd=ROOT, env=run_env(), text=True,
                        capture_output=True, timeout=timeout, **kw)


def _start(workdir, shared, *args):
  log = open(Path(workdir).parent / f'{Path(workdir).name}.log', 'w')
  proc = subprocess.Popen(_cmd(workdir, shared, *args), cwd=ROOT, env=run_env(), text=True,
                          stdout=log, stderr=subprocess.STDOUT)
  return proc, Path(log.name)


def _history(workdir):
  history = json.loads((Path(workdir) / 'history.json').read_text())
  return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]


def _steps(workdir):
  d = Path(workdir) / 'checkpoints'
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.is_dir() else []


def _params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sepres_jax import checkpoints  # pylint: disable=g-import-not-at-top
  manager = checkpoints.create_manager(workdir, read_only=True)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  state = restored['state']
  return {k: np.asarray(v) for k, v in _flat({'params': state['params'],
                                               'batch_stats': state['batch_stats']}).items()}


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _digest(folder):
  h = hashlib.sha256()
  for path in sorted(Path(folder).rglob('*')):
    h.update(os.fspath(path.relative_to(folder)).encode())
    if path.is_file():
      h.update(path.read_bytes())
  return h.hexdigest()


def _assert_same_result(workdir, reference):
  """Same history (bitwise, times aside) and the same final parameters, bit for bit."""
  assert _history(workdir) == _history(reference)
  final = _steps(reference)[-1]
  assert _steps(workdir)[-1] == final
  a, b = _params(workdir, final), _params(reference, final)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def reference(shared):
  workdir = shared / 'reference'
  out = _run(workdir, shared)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps(workdir)[-1] == 8
  return workdir


@pytest.mark.slow
def test_sigkill_anywhere_then_same_command_gives_the_same_result(shared, reference, tmp_path):
  workdir = tmp_path / 'killed'
  proc, log = _start(workdir, shared)
  ckpt = workdir / 'checkpoints'
  deadline = time.time() + 500
  mid_save = False
  try:
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(ckpt) if ckpt.is_dir() else []
      done = [int(n) for n in names if n.isdigit()]
      # Kill while a save is being written once one checkpoint is complete, or at step 3 anyway.
      if done and (any('tmp' in n for n in names) or max(done) >= 3):
        proc.send_signal(signal.SIGKILL)
        mid_save = any('tmp' in n for n in names)
        break
      time.sleep(0.002)
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
  killed_at = _steps(workdir)
  assert killed_at and killed_at[-1] < 8
  again = _run(workdir, shared)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'Resumed from step {killed_at[-1]}' in again.stderr
  assert not [n for n in os.listdir(workdir / 'checkpoints') if 'tmp' in n]
  _assert_same_result(workdir, reference)
  print(f'killed with checkpoints {killed_at}, mid-save: {mid_save}')


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_at_step_boundary_and_resumes_exactly(shared, reference, tmp_path,
                                                                  signum):
  workdir = tmp_path / 'stopped'
  # Epoch-end checkpoints only: the stop itself writes the mid-epoch checkpoint.
  proc, log = _start(workdir, shared, '--config.checkpoint_every_steps=0')
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if 'epoch 1/2 step 2/4' in log.read_text():
      proc.send_signal(signum)
      break
    time.sleep(0.01)
  proc.wait(timeout=300)
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  line = [l for l in text.splitlines() if l.startswith('Stopped at step ')]
  assert len(line) == 1 and line[0].endswith('run the same command again to resume.'), text[-2000:]
  stopped_at = int(line[0].split()[3].rstrip(';'))
  assert _steps(workdir)[-1] == stopped_at and 2 <= stopped_at < 8
  if signum == signal.SIGINT:
    return  # The same handler as SIGTERM; the resume is checked once.
  again = _run(workdir, shared, '--config.checkpoint_every_steps=0')
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'Resumed from step {stopped_at}' in again.stderr
  # The epoch's train-metric sums travelled in the checkpoint: epoch 1's train loss is exact too.
  _assert_same_result(workdir, reference)


def test_stop_during_start_up_saves_nothing(shared, tmp_path):
  """A stop before the first step exits at once and saves no checkpoint: it saved an untrained
  step-0 checkpoint after start-up, which tied the workdir to the config being abandoned."""
  workdir = tmp_path / 'early'
  proc, log = _start(workdir, shared)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if 'Starting the run in' in log.read_text():
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.01)
  proc.wait(timeout=300)
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  assert 'SIGTERM received before the first training step: stopped; no checkpoint was saved' \
      in text, text[-2000:]
  assert 'Traceback' not in text and 'epoch 1/' not in text
  assert _steps(workdir) == []


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoints(shared, reference, tmp_path):
  workdir = tmp_path / 'nan'
  shutil.copytree(reference, workdir)
  before = _digest(workdir / 'checkpoints')
  # Step 9 (lr 1e30) blows the parameters up, step 10's loss is NaN; the mid-epoch save at step 10
  # must see it (no log line in between checks it first).
  out = _run(workdir, shared, '--config.num_epochs=3', '--config.learning_rate=1e30',
             '--config.checkpoint_every_steps=2', '--config.log_every_steps=100')
  assert out.returncode == 1, out.stderr[-3000:]
  err = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and 'non-finite' in err[0], out.stderr[-3000:]
  assert re.search(r'at step (9|10);', err[0]) and str(workdir) in err[0], err[0]
  assert 'Traceback' not in out.stderr
  assert _digest(workdir / 'checkpoints') == before  # Neither latest nor best was touched.


def test_non_finite_loss_before_the_first_checkpoint_says_so(shared, tmp_path):
  workdir = tmp_path / 'nan0'
  out = _run(workdir, shared, '--config.learning_rate=1e30', '--config.checkpoint_every_steps=0')
  err = one_error_line(out)
  assert 'non-finite' in err and 'before the first checkpoint' in err and 'None' not in err, err
  assert _steps(workdir) == []


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, like ENOSPC.
  resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.slow
def test_failed_save_says_why_and_keeps_previous_checkpoints(shared, reference, tmp_path):
  workdir = tmp_path / 'full'
  shutil.copytree(reference, workdir)
  steps = _steps(workdir)
  out = subprocess.run(_cmd(workdir, shared, '--config.num_epochs=3'), cwd=ROOT,
                       env=run_env(compile_cache=False),  # Cache writes would hit the limit.
                       text=True, capture_output=True,
                       timeout=600, preexec_fn=_limit_file_size)
  assert out.returncode == 1, out.stderr[-3000:]
  err = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and 'could not save checkpoint' in err[0], out.stderr[-3000:]
  assert 'File too large' in err[0] and 'previous checkpoints are intact' in err[0]
  # No traceback of the libraries' threads (which once broke the error line in two).
  assert 'Traceback' not in out.stderr and 'Event loop is closed' not in out.stderr
  failed = re.search(r'could not save checkpoint (\d+) in', err[0])
  assert failed, err[0]
  assert int(failed.group(1)) not in _steps(workdir)  # Never finalised, so never restored.
  assert _steps(workdir) == steps  # The limit fails the first save of the run.
  for step in _steps(workdir):  # What is there restores.
    assert all(np.isfinite(v).all() for v in _params(workdir, step).values())


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_line_and_touches_nothing(shared, reference, tmp_path):
  workdir = tmp_path / 'other'
  shutil.copytree(reference, workdir)
  before = _digest(workdir)
  out = _run(workdir, shared, '--config.num_epochs=3', '--config.model.head_width=48')
  err = one_error_line(out)
  # config.json says what differs, before any work.
  assert err.startswith(f'error: {workdir} holds a run trained with another config: '
                        'model.head_width 32 -> 48'), err
  assert _digest(workdir) == before
  # Without config.json (a copy of the checkpoints alone) nothing says what they were trained
  # with: refused, whatever changed (before, a changed seed or best_metric resumed silently).
  (workdir / 'config.json').unlink()
  before = _digest(workdir)
  for flags in (('--config.model.head_width=48',), ('--config.seed=5',)):
    err = one_error_line(_run(workdir, shared, '--config.num_epochs=3', *flags))
    assert err.startswith(f'error: {workdir / "config.json"}: missing, but '), err
    assert _digest(workdir) == before
  (workdir / 'config.json').write_text('[]')  # Valid JSON, not a config: was a traceback.
  err = one_error_line(_run(workdir, shared, '--config.num_epochs=3'))
  assert err == f'error: {workdir / "config.json"}: not a JSON object (the run\'s config)', err


@pytest.mark.slow
def test_resume_with_another_best_metric_is_refused_and_keeps_the_run(shared, reference, tmp_path):
  """Before, config.json was rewritten: the workdir's evaluate then looked for the new metric."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _digest(workdir)
  err = one_error_line(_run(workdir, shared, '--config.best_metric=val_loss'))
  assert "best_metric 'val_miou' -> 'val_loss'" in err, err
  assert _digest(workdir) == before


@pytest.mark.slow
def test_corrupt_or_incomplete_checkpoint_is_one_line_and_touches_nothing(shared, reference,
                                                                         tmp_path):
  corrupt = tmp_path / 'corrupt'
  shutil.copytree(reference, corrupt)
  step = _steps(corrupt)[-1]
  for path in (corrupt / 'checkpoints' / str(step) / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # The arrays' data files, cut short.
      path.write_bytes(path.read_bytes()[:20])
  incomplete = tmp_path / 'incomplete'
  shutil.copytree(reference, incomplete)
  for path in (incomplete / 'checkpoints').rglob('*'):
    if path.name in ('_CHECKPOINT_METADATA', '_METADATA'):
      path.unlink()
  no_metrics = tmp_path / 'no_metrics'  # Best by a metric no checkpoint holds any more.
  shutil.copytree(reference, no_metrics)
  for path in (no_metrics / 'checkpoints').glob('*/metrics'):
    shutil.rmtree(path)
  before = {w: _digest(w) for w in (corrupt, incomplete, no_metrics)}
  cases = [
      (corrupt, ('--config.num_epochs=3',), f'checkpoint {step} in {corrupt}/checkpoints cannot '
       'be read'),
      (corrupt, ('--mode=evaluate',), f'{corrupt}: cannot read its weights'),
      (incomplete, ('--mode=evaluate',), f'checkpoint {step} has no metadata'),
      # Training said "cannot be read (pytree structure error: ...)".
      (incomplete, ('--config.num_epochs=3',), f'checkpoint {step} in {incomplete}/checkpoints '
       'has no metadata'),
      # Evaluate said "no checkpoint in", of a folder that holds them.
      (no_metrics, ('--mode=evaluate',), 'no checkpoint records its val_miou'),
  ]
  for workdir, args, words in cases:
    out = _run(workdir, shared, *args)
    err = one_error_line(out)
    assert words in err, err
    assert 'Exception ignored' not in out.stderr, out.stderr[-3000:]
  assert {w: _digest(w) for w in (corrupt, incomplete, no_metrics)} == before
