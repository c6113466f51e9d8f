"""Large buffers on transparent huge pages: one re-execution of main.py with glibc's tunable set.

XLA's CPU runtime allocates each step's large buffers (activations, their gradients, the step's
scratch) with malloc, which takes every block over 32 MB from a fresh mmap and returns it to the
kernel when freed. Every step then faults in (and the kernel zeroes) each 4 KB page of several GB
again: on this project's seed step, 356,000 page faults and about a second of system time per
step. With `glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc asks for transparent huge pages
on those blocks (madvise), which the kernel then maps 2 MB at a time: 1,000-1,600 faults a step.
glibc reads its tunables only when a process starts, so main.py re-executes itself once with the
variable added. SEPRES_JAX_HUGEPAGES=0 turns this off; an existing GLIBC_TUNABLES setting of
`glibc.malloc.hugetlb` is left as it is.
"""

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'


def _glibc_at_least(version: str, want=(2, 35)) -> bool:
  try:
    return tuple(int(p) for p in version.split('.')[:2]) >= want
  except ValueError:
    return False


def environment(environ, system: str = sys.platform, libc=None):
  """The environment to re-execute with, or None when nothing is to change."""
  if system != 'linux' or environ.get('SEPRES_JAX_HUGEPAGES', '1') == '0':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None
  name, version = libc if libc is not None else platform.libc_ver()
  if name != 'glibc' or not _glibc_at_least(version):
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))


def reexec_if_needed(argv) -> None:
  """Replaces this process by `python argv...` with the tunable set (returns if none is needed)."""
  env = environment(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
