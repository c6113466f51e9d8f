"""Two processes on 127.0.0.1 (CPU, gloo collectives) train like one process with the same global
batch, write one checkpoint collectively, and that checkpoint resumes in a single process."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_env

KEYS = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_miou')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmd(workdir, cache, *args):
  return [sys.executable, 'main.py', '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.cache_dir={cache}', '--config.visualize.num_tensorboard_images=0',
          '--config.log_every_steps=1', *args]


def _history(workdir):
  return json.loads((workdir / 'history.json').read_text())


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tmp_path):
  # With the suite's compilation cache (conftest.py): main.py turns it off in each of the two CPU
  # processes, whose first collective timed out when they read it warm (README).
  cache, env = tmp_path / 'cache', run_env(JAX_PLATFORMS='cpu')
  # One process, one device, global batch 4, two epochs (also builds the data cache first).
  single = subprocess.run(_cmd(tmp_path / 'single', cache, '--config.num_epochs=2'), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  # Two processes, one device each, the same global batch of 4 (2 per process), one epoch.
  workdir, port = tmp_path / 'two', _free_port()
  procs = [subprocess.Popen(
      _cmd(workdir, cache, '--config.num_epochs=1', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'JAX process 1/2' in outs[1][1]
  assert all('compilation cache off: multi-process CPU' in err for _, err in outs)
  ref, two = _history(tmp_path / 'single'), _history(workdir)
  assert len(two) == 1
  for k in KEYS:  # Metrics are global: the same as one process up to summation order.
    np.testing.assert_allclose(two[0][k], ref[0][k], rtol=2e-4, err_msg=k)
  step_losses = lambda err: [l.split('loss ')[1].split()[0] for l in err.splitlines()
                             if 'epoch 1/' in l and ' loss ' in l]
  losses = step_losses(outs[0][1])
  assert len(losses) == 4 and losses == step_losses(single.stderr)[:4]

  # The two-process checkpoint resumes in one process.
  resumed = subprocess.run(_cmd(workdir, cache, '--config.num_epochs=2'), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step 4 (epoch 1)' in resumed.stderr
  both = _history(workdir)
  assert [r['step'] for r in both] == [4, 8]
  for k in KEYS:
    np.testing.assert_allclose(both[1][k], ref[1][k], rtol=1e-3, err_msg=k)
