"""--mode=benchmark: training and inference speed on random data at the config's shapes.

Prints a few human lines and, last, one JSON line with train_images_per_sec (at config.batch_size),
infer_images_per_sec (config.benchmark.infer_size, batch config.eval_batch_size), compile times,
peak_rss_mb, the model's FLOPs per training image from XLA's cost analysis, and the achieved FLOP/s
as a fraction of a large float32 matrix product's FLOP/s measured in the same process. With
`benchmark.profile`, also the train step's time per layer, forward and backward, and the inference
step's (profiling.py).
"""

import json
import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from sepres_jax import distill
from sepres_jax import host_memory
from sepres_jax import models
from sepres_jax import profiling
from sepres_jax import train


def _timed(fn, *args, repeats) -> tuple[float, float]:
  """(median, mean) seconds of `repeats` calls of fn(*args) (results blocked on), after a warm-up.

  A median hides occasional slow calls (the host-memory stalls of sepres_jax/host_memory.py);
  the mean counts them as training does.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(np.mean(times))


def matmul_flops_per_sec(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
  """The hardware's practical limit for `dtype`: an n x n matrix product under jit."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  return 2 * n ** 3 / _timed(jax.jit(jnp.matmul), a, b, repeats=repeats)[0]


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def _step_flops(compiled, lowered, devices: int = 1) -> tuple[float, str, float]:
  """(FLOPs of the whole step over all devices, which count, the unoptimised module's count).

  The compiled module's count is the work XLA kept (it drops skipped products, and counts the
  Fourier form's own work); a partitioned module is one device's share, so it counts `devices`
  times. The unoptimised (lowered) module is the whole program, before partitioning. Where a
  backend's compiled module hides its products in library calls (cuBLAS, cuDNN: counted as
  nothing or not at all), that count falls far below the unoptimised module's, which is used.
  """
  got, hlo = _flops(compiled) * devices, _flops(lowered)
  if math.isfinite(hlo) and hlo > 0 and not (math.isfinite(got) and got > 0.5 * hlo):
    return hlo, 'hlo', hlo
  return got, 'compiled', hlo


def _peak_rss_mb() -> float:
  """Peak resident memory in MiB (2^20 bytes; 'mb' and the README's MB/GB figures are binary, as
  in benchmarks/keras_reference.py and pytorch_reference.py, so the three compare directly)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def benchmark(config) -> int:
  b = config.batch_size
  repeats = config.benchmark.repeats
  mesh = train.make_mesh()
  train.check_batch_sizes(config, mesh)
  model = models.create_model(config, train.num_outputs(config))
  state = train.create_train_state(config, model, jax.random.key(0), mesh)
  stepper = train.Stepper(config.copy_and_resolve_references(), mesh, None)
  if config.parallelism != 'jit':
    raise train.RunError('the benchmark measures parallelism=jit')

  rng = np.random.default_rng(0)
  shape = train.input_shape(config, b)
  raw = {'image': rng.uniform(-1, 1, shape).astype(np.float32),
         'label': rng.integers(0, train.num_outputs(config), shape[:3]).astype(np.int32)}
  if distill.SOFT_KEY in stepper.keys:  # A distilling run's step also reads soft targets.
    raw[distill.SOFT_KEY] = rng.integers(
        0, 256, (*shape[:3], train.num_outputs(config))).astype(np.uint8)
  batch = stepper.batch(raw)

  # --- Training: compile, then time the donated step on a fixed batch ---------------------
  t = time.perf_counter()
  lowered = stepper.train.lower(state, batch)
  compiled = lowered.compile()
  train_compile = time.perf_counter() - t
  devices = mesh.devices.size
  flops_per_image, flops_source, flops_hlo = _step_flops(compiled, lowered, devices)
  flops_per_image /= b
  flops_hlo /= b
  holder = {'state': state}

  def step(batch):
    holder['state'], out = compiled(holder['state'], batch)
    return out

  train_time, train_mean = _timed(step, batch, repeats=repeats)
  train_ips = b / train_time
  profiled_steps = 3
  by_part = (profiling.profile(compiled, lambda: step(batch), profiled_steps)
             if config.benchmark.profile else {})

  # --- Inference at the evaluation size --------------------------------------------------
  ih, iw = config.benchmark.infer_size
  eb = config.eval_batch_size
  images = jax.device_put(rng.uniform(-1, 1, (eb, ih, iw, shape[-1])).astype(np.float32),
                          stepper.data_sharding)
  st = holder['state']
  infer = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  variables = {'params': st.params, 'batch_stats': st.batch_stats}
  t = time.perf_counter()
  infer_compiled = infer.lower(variables, images).compile()
  infer_compile = time.perf_counter() - t
  infer_ips = eb / _timed(infer_compiled, variables, images, repeats=repeats)[0]
  infer_by_part = (profiling.profile(infer_compiled, lambda: infer_compiled(variables, images),
                                     profiled_steps) if config.benchmark.profile else {})

  # --- The hardware's limit, in the same process ------------------------------------------
  n = int(config.benchmark.matmul_size)
  peak = matmul_flops_per_sec(n)
  # Accelerators' limit for bfloat16 activations: a bf16 product.
  peak_bf16 = matmul_flops_per_sec(n, dtype=jnp.bfloat16) if config.dtype == 'bfloat16' else None
  achieved = flops_per_image * train_ips  # Over all devices.
  per_device = achieved / devices  # The limits below are one device's (device 0's product).
  result = {
      'backend': jax.default_backend(), 'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'impl': model.impl, 'large_conv': model.large_conv, 'dtype': config.dtype, 'batch_size': b,
      'image_size': list(config.data.image_size), 'infer_size': [ih, iw], 'infer_batch': eb,
      'train_images_per_sec': round(train_ips, 2),
      'train_step_sec': round(train_time, 4),
      'train_step_sec_mean': round(train_mean, 4),
      'infer_images_per_sec': round(infer_ips, 2),
      'train_compile_sec': round(train_compile, 2),
      'infer_compile_sec': round(infer_compile, 2),
      'train_gflops_per_image': float(f'{flops_per_image / 1e9:.4g}'),  # 4 digits, tiny too.
      'train_gflops_source': flops_source,  # 'compiled' or 'hlo' (see _step_flops).
      'train_gflops_per_image_hlo': float(f'{flops_hlo / 1e9:.4g}'),
      'achieved_gflops_per_sec': round(achieved / 1e9, 1),
      'matmul_gflops_per_sec': round(peak / 1e9, 1),
      'flops_fraction_of_matmul': round(per_device / peak, 4),
      'peak_rss_mb': round(_peak_rss_mb(), 1),
      'matmul_size': n,
      'host_huge_pages': host_memory.active(), 'host_keep_memory': host_memory.keeping(),
  }
  if peak_bf16:
    result['bf16_matmul_gflops_per_sec'] = round(peak_bf16 / 1e9, 1)
    result['flops_fraction_of_bf16_matmul'] = round(per_device / peak_bf16, 4)
  if config.benchmark.peak_tflops:  # The data sheet's figure, where the user gives it.
    result['flops_fraction_of_peak'] = float(
        f'{per_device / (config.benchmark.peak_tflops * 1e12):.4g}')  # 4 digits, tiny too.
  for what, table in (('train', by_part), ('infer', infer_by_part)):
    if table:
      result[f'{what}_seconds_by_part'] = {
          part: {k: round(v, 4) for k, v in d.items()} for part, d in table.items()}
      print(f'{what} step by part (seconds per step, from a profile of {profiled_steps} steps):')
      print(profiling.format_table(table))
  print(f"train: {train_ips:.1f} images/s at batch {b} {tuple(config.data.image_size)} "
        f"({flops_per_image / 1e9:.2f} GFLOP/image, {achieved / 1e9:.0f} GFLOP/s = "
        f"{100 * per_device / peak:.0f}% of a {peak / 1e9:.0f} GFLOP/s matmul per device)")
  print(f"infer: {infer_ips:.1f} images/s at batch {eb} {ih}x{iw}; compile train "
        f"{train_compile:.1f}s, infer {infer_compile:.1f}s; peak RSS {_peak_rss_mb():.0f} MB")
  print(json.dumps(result))
  return 0
