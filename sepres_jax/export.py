"""--mode=export: the trained network as a `jax.export` artifact, to run with jax and numpy alone.

The weights come from where `--mode=predict` takes them (the workdir's best checkpoint, or
`config.init_from`). The folder (`config.export.output`, default <workdir>/export) gets:

  model.jax     the serialized function (weights, images) -> logits, batch-polymorphic
  weights.npz   its weights, one array per leaf, in the order meta.json's `weights` lists
  meta.json     input size and mode, normalisation, test-time averaging, classes and colours

`sepres_jax/exported.py` loads the folder and gives the same labels as `--mode=predict`.
"""

import glob
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from sepres_jax import checkpoints
from sepres_jax import evaluate
from sepres_jax import exported
from sepres_jax import models
from sepres_jax import predict
from sepres_jax import train
from sepres_jax.data import folder

PLATFORMS = ('cpu', 'cuda')  # Tried together; CPU alone (said in meta.json) if that fails.


def export(config, workdir: str) -> int:
  """--mode=export: writes model.jax, weights.npz and meta.json; returns the exit status."""
  check(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not config.init_from and not os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
    raise train.RunError(f'no checkpoint in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)} '
                         '(train first, or pass --config.init_from=DIR)')
  model, state, _, origin = evaluate.trained_state(config, workdir)
  out_dir = config.export.output or os.path.join(workdir, 'export')
  if jax.process_index() == 0:
    train.check_writable(os.path.abspath(os.path.expanduser(out_dir)))  # Before the work.
  variables = jax.tree.map(_host, {'params': state.params, 'batch_stats': state.batch_stats})
  meta = write(config, model, variables, origin, out_dir)
  print(f'exported the {origin} (input {meta["input"]["mode"]}, '
        f'{", ".join(meta["platforms"])}) into {os.path.abspath(os.path.expanduser(out_dir))}'
        + (f'; {meta["platforms_note"]}' if meta['platforms_note'] else ''))
  return 0


def check(config) -> None:
  """One-line errors for what an export cannot carry."""
  mode = predict.input_mode(config)
  if config.data.lab:
    raise train.RunError('--mode=export does not support data.lab=True (the loader has no '
                         'OpenCV to compute the LAB channels)')
  if config.eval.get('ensemble', ''):
    raise train.RunError('--mode=export exports one network: unset config.eval.ensemble '
                         f'({config.eval.ensemble})')
  scales = tuple(float(s) for s in config.eval.scales)
  if mode == 'native' and scales != (1.0,):
    raise train.RunError(f'eval.scales={scales} needs a fixed input size: export with '
                         '--config.predict.resize=resize or eval.scales=(1.0,)')


def write(config, model, variables, origin: str, out_dir: str) -> dict:
  """Exports `model` with `variables` ({'params', 'batch_stats'}, numpy) into out_dir; the meta.

  The function takes predict's model input (float32, in [-1, 1]: resized to data.image_size,
  or padded to multiples of 32 for 'native', any batch) and returns predict's logits: the same
  test-time averaging (eval.flip, eval.scales) and the same kernels.
  """
  check(config)
  mode = predict.input_mode(config)
  flip, scales = bool(config.eval.flip), tuple(float(s) for s in config.eval.scales)
  class_names, colors = folder.class_palette(config.data)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = [jax.tree_util.keystr(p, simple=True, separator='/') for p, _ in paths_leaves]
  leaves = [np.asarray(leaf) for _, leaf in paths_leaves]

  # The kernels that --mode=predict runs on each platform (model.impl 'auto': fast_cpu on CPU,
  # the library's convolutions elsewhere), so that labels equal predict's exactly, not nearly:
  # the two forms are equal in exact arithmetic only, and a near tie can flip an argmax.
  def logits_fn(impl):
    net = model.clone(impl=impl)
    return lambda v, x: models.averaged_logits(net.apply, v, x, flip, scales)

  # native_cpu's forward pass is fast_cpu's numbers with compiled calls (the stem's output and the
  # pools written out) that an exported function cannot hold: fast_cpu is exported for it.
  impl = 'fast_cpu' if config.model.impl == 'native_cpu' else config.model.impl

  def fn(weights, images):
    v = jax.tree_util.tree_unflatten(treedef, weights)
    if impl == 'auto':
      return jax.lax.platform_dependent(v, images, cpu=logits_fn('fast_cpu'),
                                        default=logits_fn('xla'))
    return logits_fn(impl)(v, images)

  h, w = (int(s) for s in config.data.image_size)
  shape = f'b, {h}, {w}, 3' if mode == 'resize' else 'b, 32*h, 32*w, 3'  # Symbolic b (h, w).
  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), np.float32))
  note = ''
  try:
    artifact = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*specs)
  except Exception as e:  # pylint: disable=broad-except
    # This jax cannot lower for every platform here: CPU alone, and meta.json says why.
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    note = f'exported for cpu only: lowering for {", ".join(PLATFORMS)} failed ({reason})'
    artifact = jax.export.export(jax.jit(fn), platforms=('cpu',))(*specs)
  meta = {
      'format': exported.FORMAT, 'version': exported.VERSION,
      'model_file': exported.MODEL_FILE, 'weights_file': exported.WEIGHTS_FILE,
      'weights': names,  # weights.npz's arrays, in the order the function takes them.
      'platforms': list(artifact.platforms), 'platforms_note': note,
      'function': ('(weights: list in the order of `weights`, images: float32 [b, H, W, 3]) -> '
                   'logits float32 [b, H, W, num_outputs]'),
      'input': {
          'mode': mode,  # 'resize': to `size`, logits resized back; 'native': padded, cropped.
          'size': [h, w] if mode == 'resize' else None,
          'resize': 'bilinear, OpenCV INTER_LINEAR on uint8 RGB (exported.resize_linear)',
          'multiple': 32, 'pad_value': 0.0, 'channels': 3, 'dtype': 'float32',
          'scale': 1 / 127.5, 'offset': -1.0,  # float32(rgb) * scale + offset: [-1, 1].
      },
      'output': ('logits [b, H, W, num_outputs]; resize: bilinear (jax.image.resize) back to the '
                 'image size, then argmax = class id'),
      'flip': flip, 'scales': list(scales),
      'num_classes': int(config.data.num_classes), 'num_outputs': train.num_outputs(config),
      'class_names': list(class_names), 'colors': np.asarray(colors).tolist(),
      'model_impl': config.model.impl, 'dtype': config.dtype, 'source': origin,
      'jax_version': jax.__version__,
  }
  if jax.process_index() == 0:
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    # Written into a temporary folder first, then renamed into place: a failure while writing
    # (a full disk, a kill) leaves an earlier export in `out_dir` whole, not half replaced.
    # The three files are renamed one by one, meta.json last; it records the others' digests, so
    # a folder left with files of two exports (a kill between the renames) fails to load, naming
    # the file, instead of running one export's function with the other's weights.
    for stale in glob.glob(os.path.join(out_dir, '.export-*')):  # Left by a killed export.
      shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix='.export-', dir=out_dir)
    try:
      with open(os.path.join(tmp, exported.MODEL_FILE), 'wb') as f:
        f.write(artifact.serialize())
      np.savez(os.path.join(tmp, exported.WEIGHTS_FILE), **dict(zip(names, leaves)))
      meta['sha256'] = {name: exported.file_digest(os.path.join(tmp, name))
                        for name in (exported.MODEL_FILE, exported.WEIGHTS_FILE)}
      with open(os.path.join(tmp, exported.META_FILE), 'w') as f:
        json.dump(meta, f, indent=1)
      for name in (exported.MODEL_FILE, exported.WEIGHTS_FILE, exported.META_FILE):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _host(x) -> np.ndarray:
  """This process's copy of a replicated array, on the host."""
  return np.asarray(x.addressable_data(0) if hasattr(x, 'addressable_data') else x)
