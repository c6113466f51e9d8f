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
starts, so `restart` runs the same command again (os.execve, same process id) with it added.
main.py does that first, when `config.host_huge_pages` is True (the default). Nothing is done where
it cannot work or is not needed: not Linux, a C library other than glibc 2.35+, transparent huge
pages set to `never` (or `always`: the kernel then gives them without being asked), or
GLIBC_TUNABLES already choosing glibc.malloc.hugetlb (the user's choice stands).

With `config.host_keep_memory` (the default) the same restart also makes malloc keep the memory
it frees (KEEP: one arena, no mmap, no trimming), as TensorFlow's own allocator does. Freed blocks
otherwise go back to the kernel, and on a VM whose kernel reports free pages to the host (this
machine: Firecracker, `page_reporting_order=11`) blocks that stay free about two seconds are taken
back by the host and refilled slowly when touched again: with conv6 in its Fourier form
(ops.conv, model.large_conv), whose step frees blocks of 100+ MB in the middle, one step in three
or four took 1-2.5 s of system time instead of 0.15 (seed config, batch 32: 0.9 s steps became
2-2.5 s). Kept, the seed config's epochs on CamVid took 11.5 and 12.6 s against 15.3-18.2 s, at
5.9 GB peak memory against 3.5 GB (2026-12-05). Set it False where memory is short. (Tried on
2026-12-04 before the Fourier form, with mallopt: as fast, peak memory 1.5-2.2x higher, compiles
1.3x slower; not adopted then.) A user's own GLIBC_TUNABLES choice of arenas, mmap or trimming
stands.
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


# malloc keeps what it frees (config.host_keep_memory): one arena (XLA's threads would otherwise get
# arenas that must mmap any block over 64 MB), no mmap, and no trimming of the heap's top.
KEEP = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
        'glibc.malloc.trim_threshold=68719476736')


def keeping() -> bool:
  """Whether this process started with malloc keeping freed memory (KEEP)."""
  return all(k in _tunables() for k in KEEP)


def _huge_pages_plan() -> tuple[str, list[str]]:
  """(what holds, the tunables to add) for transparent huge pages."""
  if active():
    return f'malloc on transparent huge pages ({TUNABLE}=1)', []
  if any(t.startswith(TUNABLE + '=') for t in _tunables()):
    return f'GLIBC_TUNABLES sets {TUNABLE} already: left as it is', []
  why = unavailable()
  if why:
    return f'malloc on 4 KB pages: {why}', []
  if thp_mode() == 'always':
    return f'transparent huge pages for every large block already ({THP_MODE}: always)', []
  return '', [f'{TUNABLE}=1']


def _keep_plan() -> tuple[str, list[str]]:
  """(what holds, the tunables to add) for malloc keeping the memory it frees."""
  if keeping():
    return 'malloc keeps freed memory (' + ':'.join(KEEP) + ')', []
  names = {k.split('=')[0] for k in KEEP}
  if any(t.split('=')[0] in names for t in _tunables()):
    return 'GLIBC_TUNABLES sets malloc\'s arenas, mmap or trimming already: left as they are', []
  if platform.system() != 'Linux' or _glibc_version() is None:
    return 'malloc returns freed memory: the C library is not glibc', []
  return '', list(KEEP)


def restart(huge_pages: bool = True, keep_memory: bool = False) -> list[str]:
  """Runs this process's command again with the GLIBC_TUNABLES asked for that can work and are not
  set yet (does not return then); otherwise returns a line on what holds for each one asked."""
  plans = ([_huge_pages_plan()] if huge_pages else []) + ([_keep_plan()] if keep_memory else [])
  add = [t for _, tunables in plans for t in tunables]
  if add:
    env = dict(os.environ, GLIBC_TUNABLES=':'.join(_tunables() + add))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
  return [line for line, _ in plans]


def restart_with_huge_pages() -> str:
  """restart() for huge pages alone (the benchmarks' harnesses): its line."""
  return restart(huge_pages=True)[0]
