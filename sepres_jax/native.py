"""Compiled CPU kernels (csrc/kernels.cc), built with the system C++ compiler at first use.

The 3x3 depthwise convolution's backward pass (its input gradient and its kernel gradient) runs
2-6x faster as a plain C++ loop over rows than in the form XLA's CPU backend generates, which
streams the arrays from memory once per tap. `model.impl='native_cpu'` calls these kernels through
the XLA FFI (`jax.ffi.ffi_call`); its forward pass gives fast_cpu's numbers (with `materialize`
calls, below), so inference and evaluation are unchanged, and `--mode=export` exports fast_cpu
for it (an exported function cannot hold these calls). `model.impl='auto'` takes native_cpu on
CPU when the kernels build, and fast_cpu when they do not (no compiler): `available()` says which
and why. With native_cpu the Lovasz-softmax loss (`lovasz_weight`) is also compiled: its loss
and gradient in two passes per image, where XLA's histogram form made many (2.8x faster alone,
the shipped network's train step 1.07-1.08x; benchmarks/lovasz_ab.py). `materialize` is the identity as a call XLA cannot fuse
through: the max-pools' int8 residual is written in the forward pass instead of recomputed, with
the layers before it, in the backward pass.

Under jit over several devices (the train step's 'data' mesh) each call is partitioned by the
batch (`jax.experimental.custom_partitioning`): every device runs the kernel on its own images, and
the kernel gradients, sums over the batch, are summed over the devices. Without that rule XLA
gathered the whole batch onto every device before each call, so each device did all the work.

The shared library is cached under $SEPRES_JAX_CACHE (default ~/.cache/sepres_jax), keyed by the
source, jax's version and this CPU's instruction-set flags (it is built with -march=native).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'kernels.cc')
TARGETS = {  # FFI target name -> exported symbol.
    'sepres_depthwise3x3': 'SepresDepthwise3x3',
    'sepres_depthwise3x3_kernel_grad': 'SepresDepthwise3x3KernelGrad',
    'sepres_dense_kernel_grad': 'SepresDenseKernelGrad',
    'sepres_lovasz_softmax': 'SepresLovaszSoftmax',
    'sepres_materialize': 'SepresMaterialize',
}
_FLAGS = ('-O3', '-march=native', '-fopenmp-simd', '-std=c++17', '-shared', '-fPIC', '-w')


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _compiler():
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def library_path(cache_dir=None) -> str:
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read())
  for part in (jax.__version__, platform.machine(), _cpu_flags(), ' '.join(_FLAGS)):
    key.update(part.encode())
  cache_dir = cache_dir or os.environ.get('SEPRES_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'sepres_jax')
  return os.path.join(cache_dir, f'native-{key.hexdigest()[:16]}.so')


def build(path: str) -> None:
  """Compiles SOURCE into `path` (written under a temporary name, then renamed into place, so
  that processes building at the same time never load a partial file)."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', SOURCE, '-o', tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
      last = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
      raise RuntimeError(f'{os.path.basename(cxx)} failed on {SOURCE}: {last[:300]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def open_library(path: str):
  """The kernels' library at `path`, built first when absent. A cached file that does not load
  (truncated by a full disk or a kill outside build's renaming) is rebuilt once, not left to
  turn the kernels off for good."""
  if not os.path.exists(path):
    build(path)
    return ctypes.cdll.LoadLibrary(path)
  try:
    return ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    logging.warning('Rebuilding %s: it does not load (%s)', path, e)
    build(path)
    return ctypes.cdll.LoadLibrary(path)


@functools.lru_cache(maxsize=None)
def _load():
  """(True, path) once the kernels are built and registered; (False, reason) if they cannot be."""
  if os.environ.get('SEPRES_JAX_NATIVE', '1') == '0':
    return False, 'disabled by SEPRES_JAX_NATIVE=0'
  try:
    path = library_path()
    lib = open_library(path)
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
    return False, f'{type(e).__name__}: {e}'
  return True, path


def available() -> tuple[bool, str]:
  """Whether the compiled kernels can run here, and the library's path or why not."""
  return _load()


def _require():
  ok, why = _load()
  if not ok:
    raise RuntimeError(f'sepres_jax compiled kernels are not available ({why}); '
                       "use model.impl='fast_cpu'")


def _by_batch(call, rule: str, batched, summed=(), static_argnums=()):
  """`call` partitioned over the first (batch) dimension of its operands.

  batched: per array operand, whether its first dimension is the batch (the others, kernels, are
  replicated). summed: the indices of results that are sums over the batch (kernel gradients),
  psum'd over the devices; the other results are split by the batch like the operands. Static
  arguments come last in `call`'s signature. On one device, under pmap or inside shard_map the
  wrapper is `call` itself (custom_partitioning inlines it).
  """
  wrapped = custom_partitioning(call, static_argnums=static_argnums)

  def shardings(mesh, arg_shapes, result_shape):
    spec = getattr(arg_shapes[0].sharding, 'spec', None)
    axes = spec[0] if spec else None  # The mesh axes that split the batch, or None.
    split, whole = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    single = not isinstance(result_shape, (tuple, list))
    results = tuple(whole if i in summed else split
                    for i in range(1 if single else len(result_shape)))
    args = tuple(split if b else whole for b in batched)
    return axes, (results[0] if single else results), args

  def infer(*a):
    *_, mesh, arg_shapes, result_shape = a
    return shardings(mesh, arg_shapes, result_shape)[1]

  def partition(*a):
    *static, mesh, arg_shapes, result_shape = a
    axes, results, args = shardings(mesh, arg_shapes, result_shape)

    def lower(*xs):
      out = call(*xs, *static)
      if not axes or not summed:
        return out
      if not isinstance(out, tuple):
        return lax.psum(out, axes)
      return tuple(lax.psum(o, axes) if i in summed else o for i, o in enumerate(out))

    return mesh, lower, results, args

  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=rule)
  return wrapped


def _depthwise3x3_call(x, kernel):
  return jax.ffi.ffi_call('sepres_depthwise3x3', jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method='sequential')(x, kernel)


def _depthwise3x3_kernel_grad_call(x, g):
  return jax.ffi.ffi_call('sepres_depthwise3x3_kernel_grad',
                          jax.ShapeDtypeStruct((3, 3, 1, x.shape[-1]), x.dtype),
                          vmap_method='sequential')(x, g)


def _dense_kernel_grad_call(x, g, kernel_shape):
  return jax.ffi.ffi_call('sepres_dense_kernel_grad',
                          jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype),
                          vmap_method='sequential')(x, g)


def _lovasz_softmax_call(logits, labels, bins):
  per_image = jax.ShapeDtypeStruct((logits.shape[0],), logits.dtype)
  return jax.ffi.ffi_call('sepres_lovasz_softmax',
                          (per_image, per_image, jax.ShapeDtypeStruct(logits.shape, logits.dtype)),
                          vmap_method='sequential')(logits, labels, bins=np.int64(bins))


def _materialize_call(x):
  return jax.ffi.ffi_call('sepres_materialize', jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method='broadcast_all', input_output_aliases={0: 0})(x)


# Only the batch factor may be split: every other factor must be whole on each device.
_depthwise3x3 = _by_batch(_depthwise3x3_call, 'b h w c, i j k c -> b h w c',
                          batched=(True, False))
_depthwise3x3_kernel_grad = _by_batch(_depthwise3x3_kernel_grad_call,
                                      'b h w c, b h w c -> i j k c', batched=(True, True),
                                      summed=(0,))
_dense_kernel_grad = _by_batch(_dense_kernel_grad_call, 'b h w c, b h w o -> i j c o',
                               batched=(True, True), summed=(0,), static_argnums=(2,))
_lovasz_softmax = _by_batch(_lovasz_softmax_call, 'n p k, n p -> n, n, n p k',
                            batched=(True, True), static_argnums=(2,))

_materialize = _by_batch(_materialize_call, 'b h w c -> b h w c', batched=(True,))


def depthwise3x3(x, kernel):
  """The 3x3 depthwise convolution (stride 1, SAME) of float32 NHWC x with kernel [3, 3, 1, C]."""
  _require()
  return _depthwise3x3(x, kernel)


def depthwise3x3_kernel_grad(x, g):
  """dL/dkernel [3, 3, 1, C] of depthwise3x3(x, kernel), given g = dL/dout; float32."""
  _require()
  return _depthwise3x3_kernel_grad(x, g)


def dense_kernel_grad(x, g, kernel_shape):
  """dL/dkernel [KH, KW, Cin, Cout] of a stride-1 SAME convolution of float32 NHWC x, given
  g = dL/dout [B, H, W, Cout]. Meant for few taps (the stem's 3x3x3)."""
  _require()
  return _dense_kernel_grad(x, g, tuple(int(d) for d in kernel_shape))


def lovasz_softmax(logits, labels, bins: int):
  """Per-image Lovasz-softmax losses [N], whether each image has a counted pixel [N] (0 or 1),
  and the gradient of each image's loss with respect to its logits [N, P, K], of float32 logits
  [N, P, K] and int32 labels [N, P] (metrics.lovasz_softmax's histogram form, `bins` bins)."""
  _require()
  return _lovasz_softmax(logits, labels, int(bins))


def materialize(x):
  """x [B, H, W, C] itself, written to memory: XLA's fusions then read it rather than recompute
  its producers, which they may duplicate into each consumer, forward and backward. The result
  aliases x's buffer (no copy). Not differentiable: meant for the residuals of custom VJPs."""
  _require()
  return _materialize(x)
