"""Transparent huge pages for malloc's large buffers: each step's buffers fault in 2 MB at a time.

XLA's CPU runtime takes every step's buffers (activations, gradients, temporaries) from malloc.
glibc serves a request above its mmap threshold (at most 32 MB) with fresh pages from the kernel
and returns them when the buffer is freed, so each step touches its large buffers for the first
time again: one page fault, and a page zeroed by the kernel, per 4 KB. At the seed network's batch
32 `x * 2` on one 32x224x224x16 activation (103 MB) took ~29,500 faults and 30 ms, against 141
faults and 8.6 ms with huge pages; the whole train step ran 1.25x faster (README.md, "Speed on
this CPU").

glibc (2.35 and later) advises the kernel to back its large blocks with transparent huge pages
when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1; a tunable is read only when a process
starts, so `restart_with_huge_pages` runs the same command again (os.execve, same process id) with
it added. main.py does that first, when `config.host_huge_pages` is True (the default). Peak
memory is unchanged (freed blocks still go back to the kernel). Nothing is done where it cannot
work or is not needed: not Linux, a C library other than glibc 2.35+, transparent huge pages set to
`never` (or `always`: the kernel then gives them without being asked), or GLIBC_TUNABLES already
choosing glibc.malloc.hugetlb (the user's choice stands).

Also tried (2026-12-04): malloc told to keep freed memory instead (mallopt: no mmap, a 2 GB trim
threshold, one arena): as fast, but peak memory 1.5-2.2x higher and compiles 1.3x slower.
"""

import ctypes
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_version():
  try:
    get = ctypes.CDLL(None).gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  get.restype = ctypes.c_char_p
  try:
    return tuple(int(p) for p in get().decode().split('.')[:2])
  except ValueError:
    return None


def _tunables() -> list[str]:
  return [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':') if t]


def active() -> bool:
  """Whether this process started with malloc's huge pages on."""
  return f'{TUNABLE}=1' in _tunables()


def thp_mode():
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  chosen = [w[1:-1] for w in text.split() if w.startswith('[') and w.endswith(']')]
  return chosen[0] if chosen else None


def unavailable() -> str:
  """Why huge pages for malloc cannot work here, or '' if they can."""
  if platform.system() != 'Linux':
    return f'{platform.system()}, not Linux'
  version = _glibc_version()
  if version is None:
    return 'the C library is not glibc'
  if version < (2, 35):
    return f'glibc {version[0]}.{version[1]} (2.35 or later reads {TUNABLE})'
  mode = thp_mode()
  if mode is None:
    return f'no {THP_MODE}'
  if mode == 'never':
    return f'transparent huge pages are off ({THP_MODE}: never)'
  return ''


def restart_with_huge_pages() -> str:
  """Runs this process's command again with GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1 when that
  can work and is not set yet (does not return then); otherwise says what holds."""
  if active():
    return f'malloc on transparent huge pages ({TUNABLE}=1)'
  if any(t.startswith(TUNABLE + '=') for t in _tunables()):
    return f'GLIBC_TUNABLES sets {TUNABLE} already: left as it is'
  why = unavailable()
  if why:
    return f'malloc on 4 KB pages: {why}'
  if thp_mode() == 'always':
    return f'transparent huge pages for every large block already ({THP_MODE}: always)'
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(_tunables() + [f'{TUNABLE}=1']))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
  return ''  # Not reached.
