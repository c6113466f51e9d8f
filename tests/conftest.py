"""Shared fixtures: the tiny config, and where the real CamVid lives when it is present."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from configs import ...` as main.py does.
CAMVID = ROOT.parent / 'shared' / 'data' / 'CamVid'
# The test workers (pytest-xdist) and the subprocesses they start share one machine: on a GPU,
# none of them may take most of its memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# One persistent XLA compilation cache for the workers and every main.py they start: the tests
# compile the same small programs again and again (test_main's train, resume and evaluate runs:
# 242 s without it, 102 s with it from empty, back to back). Kept between runs (about 40 MB;
# `pytest --cache-clear` empties it with pytest's own cache); JAX keys each entry on the program,
# the jax version, flags and device, so nothing stale is read.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.pytest_cache' / 'd' / 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


@pytest.fixture
def tiny_config(tmp_path):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.cache_dir = str(tmp_path / 'cache')
  return config


@pytest.fixture
def camvid_dir():
  if not (CAMVID / 'train').is_dir():
    pytest.skip(f'real CamVid not present at {CAMVID}')
  return str(CAMVID)


def run_env(compile_cache=True, **extra):
  """Environment for running main.py in a subprocess from the repo root.

  With the suite's compilation cache (above) unless `compile_cache` is False.
  """
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  if not compile_cache:
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  env.update(extra)
  return env


def one_error_line(out):
  """The one `error:` line of a failed main.py run (exit status 1), with no traceback."""
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  err = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1, out.stderr[-3000:]
  return err[0]


def run_on_devices(script, n):
  """The JSON after the last `RESULT ` line that `script` prints, run on `n` simulated CPU devices."""
  env = run_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={n}', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def train_tiny(root, **fields):
  """(config, workdir) of a finished 1-epoch run of configs/test.py under `root`.

  `fields` override the config, dotted names as keyword-safe paths: data__eval_resize=False.
  """
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.cache_dir = str(root / 'cache')
  config.num_epochs = 1
  for name, value in fields.items():
    *parents, leaf = name.split('__')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  train.train_and_evaluate(config, str(root / 'run'))
  return config, str(root / 'run')


def weights_folder(config, folder, seed, noise=0.0):
  """A pretrained-style folder (weights/) of the config's network, initialised from `seed`.

  `noise` > 0 adds Gaussian noise of that scale to every parameter: an untrained network predicts
  nearly uniform probabilities, and two of them then differ as trained ones do.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sepres_jax import train  # pylint: disable=g-import-not-at-top
  model = train.models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(seed), train.make_mesh())
  state = state.replace(params=perturbed(state.params, seed, noise))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(folder, 'weights'),
                      jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
    checkpointer.wait_until_finished()
  return str(folder)


def perturbed(params, seed, noise):
  """`params` plus Gaussian noise of scale `noise` (unchanged when 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not noise:
    return params
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + noise * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])
