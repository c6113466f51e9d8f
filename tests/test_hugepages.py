"""main.py re-executes itself once with glibc's huge-page tunable (sepres_jax/hugepages.py)."""

import platform
import subprocess
import sys

import pytest

from conftest import ROOT, run_env
from sepres_jax import hugepages

GLIBC = ('glibc', '2.36')


def test_adds_the_tunable():
  env = hugepages.environment({'PATH': '/bin'}, 'linux', GLIBC)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_keeps_other_tunables():
  env = hugepages.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'linux', GLIBC)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('environ, system, libc', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'linux', GLIBC),  # The user's choice stands.
    ({'SEPRES_JAX_HUGEPAGES': '0'}, 'linux', GLIBC),  # Turned off.
    ({}, 'darwin', ('', '')),
    ({}, 'linux', ('glibc', '2.31')),  # Older glibc has no such tunable.
    ({}, 'linux', ('', '')),  # musl and others.
])
def test_nothing_to_change(environ, system, libc):
  assert hugepages.environment(environ, system, libc) is None


def _tunables_seen_by_main(**extra):
  env = run_env(**extra)
  env.pop('GLIBC_TUNABLES', None)
  done = subprocess.run([sys.executable, 'main.py', '--config=configs/test.py', '--mode=summary'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return [line.split('GLIBC_TUNABLES=', 1)[1] for line in done.stderr.splitlines()
          if 'GLIBC_TUNABLES=' in line]


@pytest.mark.skipif(hugepages.environment({}, sys.platform, platform.libc_ver()) is None,
                    reason='not Linux with glibc 2.35 or later')
def test_main_runs_with_the_tunable():
  assert _tunables_seen_by_main() == ['glibc.malloc.hugetlb=1']
  assert _tunables_seen_by_main(SEPRES_JAX_HUGEPAGES='0') == ['']
