#!/usr/bin/env bash
# Issue #4's GPU figures in one command on a lent accelerator machine (benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh wheels   # here, with network: the packages such a machine lacks,
#                                          # as Python 3.12 wheels in .whl/ (in .gitignore, so it
#                                          # travels to the device only when carried)
#   bash benchmarks/gpu_check.sh run      # there (carry .whl): installs them into /tmp/site, then
#                                          # writes gpu_check.log and benchmarks.jsonl into $OUT
#
# `run` prints the devices, checks every import, benchmarks configs/gpu.py (bfloat16 activations)
# at batch 32 and 8 with `benchmark.peak_tflops` (PEAK_TFLOPS, default 989: an H100 SXM's dense
# bf16) and in float32 at batch 32 (PEAK_TF32_TFLOPS, 495), so that the JSON has the fraction of
# the data-sheet peak beside that of a measured 8192-square product, trains the demo (synthetic
# scenes the project builds) with configs/gpu.py's settings and evaluates it, then runs the
# kernel-form and model tests on the accelerator, all within DEADLINE (540) seconds.
# NO_INSTALL=1 skips the wheels (a machine that has every package, or a CPU dry run);
# BENCH_EXTRA and DEMO_EXTRA add flags to the benchmarks and the demo, TESTS replaces the test list
# (a dry run: small shapes, one test).
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
              --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  mkdir -p .whl
  # Not in the accelerator image (device KINDS.md lists what is): this project's own needs and
  # theirs, at the versions tested here. protobuf too: tensorflow-metadata's generated code needs
  # a newer one than the image may hold. `promise` has no wheel on the index: built here.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plat[@]}" -d .whl \
      tensorflow-datasets==4.9.10 ml-collections==1.1.0 tensorboardX==2.6.5 grain==0.2.18 \
      array-record==0.8.6 portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 \
      simple_parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
      googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 \
      importlib_resources==7.1.0 protobuf==7.36.2 &&
    python3 -m pip wheel -q --no-deps -w .whl promise==2.3 &&
    ls .whl && du -sh .whl
}

run() {
  # One device command may run 600 s: each step gets what is left of DEADLINE seconds (default
  # 540), at most its own cap, so the log and the JSON lines come back whatever is cut short.
  local out="${OUT:-/tmp/gpu_check}" peak="${PEAK_TFLOPS:-989}" py="${PYTHON:-python3}"
  local peak32="${PEAK_TF32_TFLOPS:-495}" deadline="${DEADLINE:-540}"
  left() { local l=$((deadline - SECONDS)); echo $((l < $1 ? (l > 5 ? l : 5) : $1)); }
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  if [ -z "${NO_INSTALL:-}" ]; then
    ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/*.whl: run 'wheels' here and carry .whl"; exit 1; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR=/tmp/gpu_check_xla
  export SEPRES_JAX_NATIVE=0  # The compiled kernels are CPU custom calls: not on an accelerator.
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
optax.__version__, jax.devices())' || exit 1
  # Every module the steps below import, before any of them: an API change fails here, at once.
  "$py" -c 'import sepres_jax.train, sepres_jax.benchmark, sepres_jax.evaluate, sepres_jax.cli
import tensorflow_datasets, grain, tensorboardX; print("imports ok")' || exit 1
  local bench=("$py" main.py --config=configs/gpu.py --mode=benchmark
               --config.benchmark.matmul_size=8192 --config.benchmark.repeats=20)
  : > "$out/benchmarks.jsonl"
  # float32 products run as TF32 on this hardware by default: its peak (495: an H100 SXM's dense
  # TF32) is the fraction's reference for the float32 row.
  for args in "--config.batch_size=32 --config.benchmark.peak_tflops=$peak" \
              "--config.batch_size=8 --config.benchmark.peak_tflops=$peak" \
              "--config.batch_size=32 --config.dtype=float32 --config.benchmark.peak_tflops=$peak32"; do
    echo "== benchmark $args"
    # shellcheck disable=SC2086
    timeout "$(left 150)" "${bench[@]}" $args ${BENCH_EXTRA:-} | tail -1 | tee -a "$out/benchmarks.jsonl"
  done
  echo "== demo training with configs/gpu.py's settings"
  rm -rf /tmp/gpu_check_demo  # A fresh run each time, not a resumed one.
  local demo=("$py" main.py --config=configs/demo.py --workdir=/tmp/gpu_check_demo
              --config.dtype=bfloat16 --config.model.impl=xla ${DEMO_EXTRA:-})
  timeout "$(left 200)" "${demo[@]}" && timeout "$(left 90)" "${demo[@]}" --mode=evaluate
  cp /tmp/gpu_check_demo/history.json "$out/demo_history.json" 2>/dev/null
  cp /tmp/gpu_check_demo/eval/test.json "$out/demo_test.json" 2>/dev/null
  # Last, with what is left: the kernel forms against the library's, float32 products at full
  # precision (TF32 would miss the tests' float32 tolerances for reasons of precision alone).
  echo "== tests on $("$py" -c 'import jax; print(jax.default_backend())')"
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "$(left 240)" "$py" -m pytest -q -p no:cacheprovider -o addopts= \
      ${TESTS:-tests/test_ops.py tests/test_models.py} || echo "TESTS FAILED (or cut at the deadline)"
  echo "== done in ${SECONDS} s"
  exec >&- 2>&-
  wait
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh wheels|run" >&2; exit 2 ;;
esac
