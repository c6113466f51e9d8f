"""sepres-jax command line: python main.py --config=configs/default.py --workdir=DIR --mode=train."""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sepres_jax import host_memory

FLAGS = flags.FLAGS
_MODES = ('train', 'evaluate', 'visualize', 'predict', 'export', 'summary', 'benchmark',
          'verify')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, history and pictures.')
flags.DEFINE_enum('mode', 'train', _MODES, 'What to do.')
flags.DEFINE_bool('verbose', False, 'Show full tracebacks of errors.')
# Multi-process runs (one process per host): jax.distributed.initialize before any device is used.
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (default: $JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (default: '
                     '$JAX_PROCESS_ID).')
flags.DEFINE_bool('distributed', False, 'Initialise the distributed runtime from the cluster '
                  '(TPU pod, SLURM, Open MPI, GKE) when no address is given.')
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).',
                                lock_config=True)
flags.mark_flags_as_required(['config'])
_NO_WORKDIR_MODES = ('summary', 'benchmark', 'verify')  # Modes that read and write no run.


def main(argv):
  if len(argv) > 1:  # Often a value with a space left unquoted: --config.x=(1, 2).
    sys.exit(f'error: unexpected argument(s) {" ".join(map(repr, argv[1:]))}: flags are '
             '--name=value, and a value with spaces needs quotes, e.g. '
             '"--config.data.image_size=(352, 480)"')
  if FLAGS.workdir is None and FLAGS.mode not in _NO_WORKDIR_MODES:
    sys.exit(f'error: --mode={FLAGS.mode} needs --workdir=DIR')
  if FLAGS.workdir is not None and not FLAGS.workdir.strip():  # An unset $RUN: not the cwd.
    sys.exit(f'error: --workdir is empty (--mode={FLAGS.mode} would write into the current '
             'directory); name a folder, e.g. --workdir=.')
  try:  # A config file that is missing fails at its first use, not when the flags are parsed.
    host = FLAGS.config.host_huge_pages, FLAGS.config.host_keep_memory
  except OSError as e:
    sys.exit(f'error: --config={FLAGS["config"].config_filename}: cannot load it '
             f'({_last_line(e)})')
  # Runs this command again, if it must, before any work (sepres_jax/host_memory.py).
  for line in host_memory.restart(*host):
    logging.info('Host memory: %s', line)
  import jax  # pylint: disable=g-import-not-at-top  # Imported after the restart: 1 s less.
  if FLAGS.mode == 'benchmark':  # Time the compiler, never a read of a persistent cache.
    jax.config.update('jax_enable_compilation_cache', False)
  _initialize_distributed()
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # With a warm persistent cache the processes reached their first collective far apart and
    # gloo's fixed 30 s rendezvous timed out (README, "Compilation cache"): compile in each.
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('Persistent compilation cache off: multi-process CPU run')
  from sepres_jax import cli  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  # `--workdir=~/runs/x`: bash leaves a ~ after = as it is; every mode reads the same folder.
  workdir = os.path.expanduser(FLAGS.workdir) if FLAGS.workdir else FLAGS.workdir
  return cli.run(FLAGS.mode, FLAGS.config, workdir, verbose=FLAGS.verbose)


def _initialize_distributed():
  """jax.distributed.initialize from the flags or JAX_* variables; nothing for one process.

  Values that cannot work (a process id out of range, a count that is not a number, several
  processes without a coordinator, --distributed outside a cluster) exit with one line.
  """
  import jax  # pylint: disable=g-import-not-at-top
  env = lambda name: os.environ.get(name) or None

  def number(flag, variable):
    value = getattr(FLAGS, flag)
    if value is not None:
      return value
    text = env(variable)
    if text is None:
      return None
    try:
      return int(text)
    except ValueError:
      sys.exit(f'error: ${variable}={text!r} is not a whole number')

  address = FLAGS.coordinator_address or env('JAX_COORDINATOR_ADDRESS')
  num = number('num_processes', 'JAX_NUM_PROCESSES')
  pid = number('process_id', 'JAX_PROCESS_ID')
  if num is not None and num < 1:
    sys.exit(f'error: --num_processes={num}: at least 1')
  if num is not None and pid is not None and not 0 <= pid < num:
    sys.exit(f'error: --process_id={pid}: must be 0..{num - 1} with --num_processes={num}')
  if pid is not None and pid != 0 and num is None and not (address or FLAGS.distributed):
    # Alone it ran as process 0 of 1: every host of a forgotten --num_processes trained alone.
    sys.exit(f'error: --process_id={pid} needs --num_processes and --coordinator_address (the '
             'other processes); alone it would run as the only process')
  if not (address or num is not None or FLAGS.distributed):
    return
  if num is not None and num == 1 and not address:
    return
  try:
    jax.distributed.initialize(address, num, pid)
  except (ValueError, RuntimeError) as e:  # jax's checks: no coordinator, no cluster detected.
    sys.exit(f'error: the distributed runtime cannot start ({_last_line(e).rstrip(".")}); pass '
             '--coordinator_address=host:port, --num_processes and --process_id')


def _last_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return ' '.join(lines[-1].split()) if lines else type(e).__name__


def parse_flags(argv):
  """absl's parsing, with config mistakes (unknown key, wrong type, a config file that does not
  run) as one line, not a traceback."""
  config_file = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')),
                     next((b for a, b in zip(argv[1:], argv[2:]) if a == '--config'), '?'))
  none = f'error: --config={config_file}: get_config() returned None (a missing return?)'
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if 'Traceback (most recent call last)' in str(e):  # ml_collections wraps get_config()'s error.
      sys.exit(f'error: --config={config_file}: get_config() raised {_last_line(e)}')
    if str(e).endswith('must have a value other than None.'):
      sys.exit(none)
    sys.exit(f'error: {e}')
  except SyntaxError as e:
    sys.exit(f'error: --config={config_file}: {e.msg} at line {e.lineno}')
  except AttributeError as e:
    if 'get_config' in str(e):
      sys.exit(f'error: --config={config_file}: the file defines no get_config()')
    if "Attribute <class 'NoneType'>" in str(e):  # An override flag on a None config.
      sys.exit(none)
    _unknown_key(argv, e)
  except KeyError as e:
    if "Attribute <class 'NoneType'>" in str(e):
      sys.exit(none)
    _unknown_key(argv, e)
  except (TypeError, ValueError) as e:
    sys.exit(f'error: bad config value: {e}')
  except Exception as e:  # pylint: disable=broad-except  # The config file's own code failed.
    sys.exit(f'error: --config={config_file}: get_config() raised {type(e).__name__}: '
             f'{_last_line(e)}')


def _unknown_key(argv, e: Exception):
  """One line naming the flag; ml_collections' "Did you mean" suggestion kept when it has one."""
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...)).
    e = e.args[0]
  message = str(e.args[0]) if e.args else str(e)
  key, _, rest = message.partition('\n')
  key = key.strip().strip('"\'')
  hint = re.search(r'Did you mean "([^"]+)"', rest)
  flag_names = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
  bad = [f for f in flag_names if f.split('.')[-1] == key] or [f for f in flag_names if key in f]
  sys.exit(f'error: unknown config key {" ".join(bad) or key!r} '
           + (f'(did you mean {hint.group(1)}?)' if hint
              else '(see the config file for the fields it has)'))


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=parse_flags))
