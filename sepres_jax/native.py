"""Compiled CPU kernels (csrc/kernels.cc), built with the system C++ compiler at first use.

The 3x3 depthwise convolution's backward pass (its input gradient and its kernel gradient) runs
2-6x faster as a plain C++ loop over rows than in the form XLA's CPU backend generates, which
streams the arrays from memory once per tap. `model.impl='native_cpu'` calls these kernels through
the XLA FFI (`jax.ffi.ffi_call`); its forward pass is fast_cpu's, so inference, evaluation and
exported models are unchanged. `model.impl='auto'` takes native_cpu on CPU when the kernels build,
and fast_cpu when they do not (no compiler): `available()` says which and why. With native_cpu the
Lovasz-softmax loss (`lovasz_weight`) is also compiled: its loss and gradient in two passes per
image, where XLA's histogram form made many (2.8x faster alone, the shipped network's train step
1.07-1.08x; benchmarks/lovasz_ab.py).

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

import jax
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'kernels.cc')
TARGETS = {  # FFI target name -> exported symbol.
    'sepres_depthwise3x3': 'SepresDepthwise3x3',
    'sepres_depthwise3x3_kernel_grad': 'SepresDepthwise3x3KernelGrad',
    'sepres_dense_kernel_grad': 'SepresDenseKernelGrad',
    'sepres_lovasz_softmax': 'SepresLovaszSoftmax',
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


@functools.lru_cache(maxsize=None)
def _load():
  """(True, path) once the kernels are built and registered; (False, reason) if they cannot be."""
  if os.environ.get('SEPRES_JAX_NATIVE', '1') == '0':
    return False, 'disabled by SEPRES_JAX_NATIVE=0'
  try:
    path = library_path()
    if not os.path.exists(path):
      build(path)
    lib = ctypes.cdll.LoadLibrary(path)
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


def depthwise3x3(x, kernel):
  """The 3x3 depthwise convolution (stride 1, SAME) of float32 NHWC x with kernel [3, 3, 1, C]."""
  _require()
  return jax.ffi.ffi_call('sepres_depthwise3x3', jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method='sequential')(x, kernel)


def depthwise3x3_kernel_grad(x, g):
  """dL/dkernel [3, 3, 1, C] of depthwise3x3(x, kernel), given g = dL/dout; float32."""
  _require()
  return jax.ffi.ffi_call('sepres_depthwise3x3_kernel_grad',
                          jax.ShapeDtypeStruct((3, 3, 1, x.shape[-1]), x.dtype),
                          vmap_method='sequential')(x, g)


def dense_kernel_grad(x, g, kernel_shape):
  """dL/dkernel [KH, KW, Cin, Cout] of a stride-1 SAME convolution of float32 NHWC x, given
  g = dL/dout [B, H, W, Cout]. Meant for few taps (the stem's 3x3x3)."""
  _require()
  return jax.ffi.ffi_call('sepres_dense_kernel_grad',
                          jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype),
                          vmap_method='sequential')(x, g)


def lovasz_softmax(logits, labels, bins: int):
  """Per-image Lovasz-softmax losses [N], whether each image has a counted pixel [N] (0 or 1),
  and the gradient of each image's loss with respect to its logits [N, P, K], of float32 logits
  [N, P, K] and int32 labels [N, P] (metrics.lovasz_softmax's histogram form, `bins` bins)."""
  _require()
  n, _, _ = logits.shape
  per_image = jax.ShapeDtypeStruct((n,), logits.dtype)
  return jax.ffi.ffi_call('sepres_lovasz_softmax',
                          (per_image, per_image, jax.ShapeDtypeStruct(logits.shape, logits.dtype)),
                          vmap_method='sequential')(logits, labels, bins=np.int64(bins))
