"""A config's values checked before any work: a bad one is a one-line error naming its key.

The flag parser checks types only as far as the config file's defaults give them (a tuple field
given `(64,abc)` becomes a string), and many values fail only deep in a run, some after a whole
epoch (a `best_metric` that no epoch records). `check(mode, config)` runs first, in cli.run.
"""

# The per-epoch keys of history.json a rule may follow (best_metric, plateau, early stopping).
HISTORY_METRICS = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_miou',
                   'val_mean_class_accuracy')
DTYPES = ('float32', 'bfloat16')


class ConfigError(Exception):
  """A config value that cannot work: a user error, reported as one line."""


def flatten(d, prefix='') -> dict:
  """{'a.b': value} of a nested dict (or ConfigDict.to_dict())."""
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def check_keys(config) -> None:
  """A key configs/default.py lacks (a config file's typo, `ignore_valeu` say) is an error: it
  would be silently ignored while the real field kept its default."""
  from configs import default  # pylint: disable=g-import-not-at-top
  known = set(flatten(default.get_config().to_dict()))
  known_sections = {k.rsplit('.', 1)[0] for k in known if '.' in k}
  flat = flatten(config.to_dict())
  unknown = sorted(k for k in flat if k not in known and k not in known_sections)
  not_sections = sorted(k for k in flat if k in known_sections)  # `config.model = None`, say.
  if not_sections:
    raise ConfigError(f'config.{not_sections[0]} must be a section of fields (as in '
                      f'configs/default.py), got {flat[not_sections[0]]!r}')
  if unknown:
    raise ConfigError(f'config.{unknown[0]} is not a field of configs/default.py (a typo?)'
                      + (f'; also {", ".join(unknown[1:4])}' if len(unknown) > 1 else ''))


def check(mode: str, config) -> None:
  """Raises ConfigError naming the first bad value of `config` for `mode`."""
  check_keys(config)
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'predict.batch_size',
              'data.num_classes'):
    _positive_int(config, key)
  if mode == 'train':
    _positive_int(config, 'num_epochs')
  for key in ('checkpoint_every_steps', 'warmup_steps'):
    _positive_int(config, key, zero_ok=True)
  _size(config, 'data.image_size')
  if mode == 'benchmark':
    _size(config, 'benchmark.infer_size')
    for key in ('benchmark.repeats', 'benchmark.matmul_size'):
      _positive_int(config, key)
    _number(config, 'benchmark.peak_tflops', lambda v: v >= 0, 'a number >= 0 (0: not reported)')
  dtype = _get(config, 'dtype')
  if dtype is not None and str(dtype) not in DTYPES:
    raise ConfigError(f'config.dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
  if mode == 'train':
    _plateau(config)
  for key in ('best_metric', 'plateau.monitor', 'early_stopping.monitor'):
    value = _get(config, key)
    if value is not None and value not in HISTORY_METRICS:
      raise ConfigError(f'config.{key} must name a per-epoch metric of history.json '
                        f'({", ".join(HISTORY_METRICS)}), got {value!r}')
  for key in ('eval.scales', 'distill.scales'):
    scales = _get(config, key)
    if scales is not None and (
        not isinstance(scales, (tuple, list)) or not scales
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                   for v in scales)):
      raise ConfigError(f'config.{key} must be one or more positive numbers, e.g. (1.0,) or '
                        f'(0.75,1.0,1.25), got {scales!r}')
  _number(config, 'predict.alpha', lambda v: 0 <= v <= 1, 'a number in [0, 1] (overlay opacity)')
  _seed(config, 'seed')  # grain refuses others after the data and the model are built.
  for key, allowed in (('eval.input', ('resize', 'native')),
                       ('eval.checkpoint', ('best', 'latest')),
                       ('predict.resize', ('', 'resize', 'native'))):
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ConfigError(f'config.{key} must be one of {", ".join(map(repr, allowed))}, got '
                        f'{value!r}')
  _model(config)
  _ranges(config)
  _choices(config)
  augmentation = _get(config, 'data.augment')
  if augmentation is not None:  # Else checked only once the training data is built.
    from sepres_jax import augment  # pylint: disable=g-import-not-at-top
    try:
      augment.check(augmentation)
    except augment.DataError as e:
      raise ConfigError(str(e)) from None


# Numbers a run reads deep inside (optimiser, loss, BatchNorm): out of range, training went on
# with them (a negative rate is gradient ascent) or failed after an epoch without naming them.
RANGES = (
    ('learning_rate', lambda v: v > 0, 'a number > 0'),
    ('rmsprop_decay', lambda v: 0 <= v < 1, 'a number in [0, 1)'),
    ('rmsprop_eps', lambda v: v >= 0, 'a number >= 0'),
    ('weight_decay', lambda v: v >= 0, 'a number >= 0'),
    ('label_smoothing', lambda v: 0 <= v < 1, 'a number in [0, 1)'),
    ('lovasz_weight', lambda v: v >= 0, 'a number >= 0'),
    ('ema_decay', lambda v: 0 <= v < 1, 'a number in [0, 1) (0: off)'),
    ('end_factor', lambda v: v >= 0, 'a number >= 0'),
    ('poly_power', lambda v: v > 0, 'a number > 0'),
    ('distill.weight', lambda v: v >= 0, 'a number >= 0 (0: off)'),
    ('model.bn_momentum', lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
    ('model.bn_epsilon', lambda v: v > 0, 'a number > 0'),
)
NON_NEGATIVE_INTS = ('data.num_workers', 'data.prefetch', 'data.cache_decoded_mb',
                     'eval.num_panels', 'visualize.num_images', 'visualize.num_tensorboard_images')
# Fields with a fixed set of values, read only once the run has loaded its data (or later).
CHOICES = (
    ('parallelism', ('jit', 'pmap')),
    ('schedule', ('constant', 'cosine', 'polynomial')),
    ('data.name', ('camvid', 'folder', 'synthetic')),
    ('data.split', ('official', 'random85')),
    ('data.folder.encoding', ('ids', 'colors')),
    ('data.folder.splits', ('folders', 'lists', 'random')),
    ('visualize.what', ('all', 'data', 'curves')),
)


def _ranges(config) -> None:
  for key, ok, what in RANGES:
    _number(config, key, ok, what)
  for key in NON_NEGATIVE_INTS:
    _positive_int(config, key, zero_ok=True)
  _positive_int(config, 'data.num_threads')
  _seed(config, 'data.split_seed')  # numpy refuses others once the data is loaded.


def _seed(config, key: str) -> None:
  value = _get(config, key)
  if value is not None and (not _is_int(value) or not 0 <= value < 2**32):
    raise ConfigError(f'config.{key} must be an integer in 0..{2**32 - 1}, got {value!r}')


def _choices(config) -> None:
  from sepres_jax import ops  # pylint: disable=g-import-not-at-top  # jax: only when checking.
  for key, allowed in (*CHOICES, ('model.impl', ('auto', *ops.IMPLS)),
                       ('model.large_conv', ops.LARGE_CONV_FORMS)):
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ConfigError(f'config.{key} must be one of {", ".join(map(repr, allowed))}, got '
                        f'{value!r}')
  weights = _get(config, 'data.class_weights')
  if weights and weights not in ('median_frequency', 'inverse_log'):
    try:
      values = [float(v) for v in str(weights).split(',')]
    except ValueError:
      values = None
    if not values or not all(0 <= v < float('inf') for v in values):
      raise ConfigError("config.data.class_weights must be '', 'median_frequency', 'inverse_log' "
                        f'or comma-separated numbers >= 0 (one a class), got {weights!r}')


def _get(config, key: str):
  """config's value at the dotted `key`, or None where the config has no such field."""
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return None
    node = node[part]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(config, key: str, zero_ok: bool = False) -> None:
  value = _get(config, key)
  if value is None:
    return
  if not _is_int(value) or value < (0 if zero_ok else 1):
    what = 'a non-negative' if zero_ok else 'a positive'
    raise ConfigError(f'config.{key} must be {what} integer, got {value!r}')


def _number(config, key: str, ok, what: str) -> None:
  value = _get(config, key)
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not ok(value)):
    raise ConfigError(f'config.{key} must be {what}, got {value!r}')


def _plateau(config) -> None:
  """The plateau rule's fields, which optax checks only when the run builds its rules."""
  _number(config, 'plateau.factor', lambda v: 0 < v < 1,
          'a number in (0, 1) (to turn the rule off, a plateau.patience longer than the run)')
  _number(config, 'plateau.min_delta', lambda v: v >= 0, 'a number >= 0')
  _number(config, 'plateau.min_scale', lambda v: v >= 0, 'a number >= 0')
  patience = _get(config, 'plateau.patience')
  if patience is not None and (not _is_int(patience) or patience < 1):
    # optax counts epochs without improvement and cuts when the count equals patience: at 0 it
    # would cut after every improving epoch and never after a bad one.
    raise ConfigError(f'config.plateau.patience must be a positive integer (1 cuts the rate after '
                      f'each epoch without improvement, as Keras\' patience 0 does; one longer '
                      f'than the run turns the rule off), got {patience!r}')
  for key in ('plateau.cooldown', 'early_stopping.patience'):
    _positive_int(config, key, zero_ok=True)


def _size(config, key: str) -> None:
  """A (height, width) field: two positive multiples of 32 (the network pools five times)."""
  value = _get(config, key)
  if value is None:
    return
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(_is_int(v) and v > 0 and v % 32 == 0 for v in value)):
    raise ConfigError(f'config.{key} must be (height, width), two positive multiples of 32, '
                      f'got {value!r}')


def _model(config) -> None:
  """The network's shape fields (models.SepResFCN8 checks them again, but only once traced)."""
  widths = _get(config, 'model.widths')
  if widths is not None and (not isinstance(widths, (tuple, list)) or len(widths) != 5
                             or not all(_is_int(w) and w > 0 for w in widths)):
    raise ConfigError('config.model.widths must be 5 positive integers (stem + 4 blocks), '
                      f'got {widths!r}')
  _positive_int(config, 'model.head_width')
  _positive_int(config, 'model.block_depth')
  for key in ('model.refine', 'model.context'):
    _positive_int(config, key, zero_ok=True)
  skips = _get(config, 'model.fine_skips')
  if skips is not None and skips not in (0, 1, 2):
    raise ConfigError(f'config.model.fine_skips must be 0, 1 or 2, got {skips!r}')
