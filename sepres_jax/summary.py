"""--mode=summary: the network's layers, output shapes and parameter counts, without running it.

Shapes come from `jax.eval_shape` of the model, its layers' calls intercepted, so nothing is
computed or allocated; counts are per layer (its own and its sublayers' parameters).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sepres_jax import models
from sepres_jax import train

MAX_DEPTH = 2  # Top-level layers, and the layers inside the residual blocks.


def layer_table(config, depth: int = MAX_DEPTH) -> tuple[list[tuple[str, str, int, int]], int, int]:
  """([(layer, output shape, parameters, batch-norm statistics)], total params, total stats)."""
  model = models.create_model(config, train.num_outputs(config))
  x = jax.ShapeDtypeStruct(train.input_shape(config), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  outputs = {}  # Layer path -> output shape, in the order the layers are called.

  def record(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    outputs.setdefault(path, None)  # Entered before its sublayers: a parent is listed first.
    out = next_fun(*args, **kwargs)
    outputs[path] = tuple(out.shape)
    return out

  def forward(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(forward, variables, x)
  params = _counts(variables['params'])
  stats = _counts(variables.get('batch_stats', {}))
  rows = [('input', str(tuple(x.shape)), 0, 0)]
  for path, shape in outputs.items():
    if path and path.count('/') < depth:
      rows.append(('  ' * path.count('/') + path.split('/')[-1], str(shape), params.get(path, 0),
                   stats.get(path, 0)))
  rows.append(('output', str(outputs.get('', ())), 0, 0))
  return rows, params.get('', 0), stats.get('', 0)


def _num(n: int) -> str:
  return f'{n:,}' if n else ''


def _counts(tree) -> dict:
  """Parameter count of every module path (and of the whole tree under '')."""
  counts = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [k.key for k in keys][:-1]  # Drop the parameter's own name.
    n = math.prod(leaf.shape)
    for i in range(len(names) + 1):
      counts['/'.join(names[:i])] = counts.get('/'.join(names[:i]), 0) + n
  return counts


def summary(config) -> int:
  """Prints the layer table and the totals."""
  rows, total, stats = layer_table(config)
  name_w = max(len(r[0]) for r in rows) + 2
  shape_w = max(len(r[1]) for r in rows) + 2
  print(f'SepResFCN8: {train.num_outputs(config)} classes, input {train.input_shape(config)}, '
        f'model.impl={config.model.impl}, model.large_conv={config.model.large_conv}')
  header = f"{'layer':<{name_w}}{'output shape':<{shape_w}}{'params':>12}{'bn stats':>10}"
  print(header)
  print('-' * len(header))
  for name, shape, n, s in rows:
    print(f"{name:<{name_w}}{shape:<{shape_w}}{_num(n):>12}{_num(s):>10}")
  print('-' * len(header))
  print(f'total parameters: {total:,} (trainable); batch-norm statistics: {stats:,}')
  return 0
