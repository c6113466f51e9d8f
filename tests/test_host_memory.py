"""main.py's restart with glibc's malloc on transparent huge pages (sepres_jax/host_memory.py)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import run_env
from sepres_jax import host_memory

# Page faults of a jitted `x * 2` whose 51 MB result malloc maps afresh at every call.
_FAULTS = '''
import json, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2)
x = jnp.ones((16, 224, 224, 16), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
'''


def _faults_per_call(**env):
  proc = subprocess.run([sys.executable, '-c', _FAULTS], cwd=ROOT,
                        env=run_env(JAX_PLATFORMS='cpu', **env), capture_output=True,
                        text=True, timeout=300, check=True)
  return json.loads(proc.stdout.splitlines()[-1])


# Where the kernel gives huge pages only when asked (`madvise`), as on the machines measured here.
needs_madvise_mode = pytest.mark.skipif(
    bool(host_memory.unavailable()) or host_memory.thp_mode() != 'madvise',
    reason=f'{host_memory.unavailable() or "transparent huge pages: " + str(host_memory.thp_mode())}')


@needs_madvise_mode
def test_huge_pages_cut_the_page_faults_of_large_buffers():
  plain = _faults_per_call(GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  huge = _faults_per_call(GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  assert plain > 51e6 / 4096 / 2  # A fault per 4 KB page of the result, at least half of them.
  assert huge < plain / 4, (plain, huge)


def _host_memory_lines(*args, **env):
  environment = run_env(**env)
  if 'GLIBC_TUNABLES' not in env:
    environment.pop('GLIBC_TUNABLES', None)
  proc = subprocess.run([sys.executable, 'main.py', '--config=configs/test.py', '--mode=summary',
                         *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [l.split('Host memory: ', 1)[1] for l in proc.stderr.splitlines() if 'Host memory: ' in l]


KEPT = 'malloc keeps freed memory (' + ':'.join(host_memory.KEEP) + ')'


@needs_madvise_mode
def test_main_restarts_itself_with_huge_pages_and_kept_memory():
  assert _host_memory_lines() == ['malloc on transparent huge pages (glibc.malloc.hugetlb=1)',
                                  KEPT]
  # The user's own choice of each tunable stands, and the config turns each restart off.
  assert _host_memory_lines(GLIBC_TUNABLES='glibc.malloc.hugetlb=0') == [
      'GLIBC_TUNABLES sets glibc.malloc.hugetlb already: left as it is', KEPT]
  assert _host_memory_lines(GLIBC_TUNABLES='glibc.malloc.arena_max=4')[1] == (
      "GLIBC_TUNABLES sets malloc's arenas, mmap or trimming already: left as they are")
  assert _host_memory_lines('--config.host_huge_pages=False') == [KEPT]
  assert _host_memory_lines('--config.host_huge_pages=False',
                            '--config.host_keep_memory=False') == []


def _restarts_recorded(monkeypatch):
  """The os.execve calls of a restart where huge pages can work and the user set a tunable."""
  calls = []
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.tcache_count=0')
  monkeypatch.setattr(host_memory, 'unavailable', lambda: '')
  monkeypatch.setattr(host_memory, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(host_memory.os, 'execve', lambda *a: calls.append(a))
  return calls


def test_restart_adds_every_tunable_asked_for_in_one_restart(monkeypatch):
  calls = _restarts_recorded(monkeypatch)
  host_memory.restart(huge_pages=True, keep_memory=True)
  (_, _, env), = calls
  assert env['GLIBC_TUNABLES'].split(':') == [
      'glibc.malloc.tcache_count=0', 'glibc.malloc.hugetlb=1', *host_memory.KEEP]
  monkeypatch.setenv('GLIBC_TUNABLES', env['GLIBC_TUNABLES'])  # As the restarted process sees.
  assert host_memory.keeping() and host_memory.active()
  assert host_memory.restart(True, True)[1] == KEPT and len(calls) == 1


def test_no_restart_where_huge_pages_cannot_work(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setattr(host_memory, 'unavailable', lambda: 'glibc 2.31 (2.35 or later reads it)')
  monkeypatch.setattr(host_memory.os, 'execve', lambda *a: pytest.fail('restarted'))
  assert host_memory.restart_with_huge_pages() == (
      'malloc on 4 KB pages: glibc 2.31 (2.35 or later reads it)')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1')
  assert host_memory.active()
  assert 'transparent huge pages' in host_memory.restart_with_huge_pages()


def test_no_restart_where_the_kernel_gives_huge_pages_unasked(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setattr(host_memory, 'unavailable', lambda: '')
  monkeypatch.setattr(host_memory, 'thp_mode', lambda: 'always')
  monkeypatch.setattr(host_memory.os, 'execve', lambda *a: pytest.fail('restarted'))
  assert 'already' in host_memory.restart_with_huge_pages()


def test_restart_adds_the_tunable_to_the_users_own(monkeypatch):
  calls = _restarts_recorded(monkeypatch)
  host_memory.restart_with_huge_pages()
  (path, argv, env), = calls
  assert path == sys.executable and argv == sys.orig_argv
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1'
