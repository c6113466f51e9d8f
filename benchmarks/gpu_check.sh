#!/usr/bin/env bash
# Issue #4's GPU figures in one command on a lent accelerator machine (benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh wheels   # here, with network: the packages such a machine lacks,
#                                          # as Python 3.12 wheels in .whl/ (in .gitignore, so it
#                                          # travels to the device only when carried)
#   bash benchmarks/gpu_check.sh run      # there (carry .whl): installs them into /tmp/site, then
#                                          # writes gpu_check.log and benchmarks.jsonl into $OUT
#
# `run` prints the devices, runs the kernel-form and model tests on the accelerator, the benchmark
# of configs/gpu.py (bfloat16 activations) at batch 32 and 8 and in float32 at batch 32, each with
# `benchmark.peak_tflops` (PEAK_TFLOPS, default 989: an H100 SXM's dense bf16) so that the JSON
# has the fraction of the data-sheet peak beside that of a measured bf16 product, and trains the
# demo (synthetic scenes the project builds) with configs/gpu.py's settings, then evaluates it.
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
  # theirs. `promise` has no wheel on the index: it is built here (pure Python).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plat[@]}" -d .whl \
      tensorflow-datasets ml-collections tensorboardX grain array-record portpicker dm-tree \
      immutabledict simple_parsing docstring-parser tensorflow-metadata googleapis-common-protos \
      termcolor toml &&
    python3 -m pip wheel -q --no-deps -w .whl promise &&
    ls .whl && du -sh .whl
}

run() {
  local out="${OUT:-/tmp/gpu_check}" peak="${PEAK_TFLOPS:-989}" py="${PYTHON:-python3}"
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  if [ -z "${NO_INSTALL:-}" ]; then
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
  echo "== tests on $("$py" -c 'import jax; print(jax.default_backend())')"
  timeout 240 "$py" -m pytest -q -p no:cacheprovider -o addopts= \
      ${TESTS:-tests/test_ops.py tests/test_models.py} || echo "TESTS FAILED"
  local bench=("$py" main.py --config=configs/gpu.py --mode=benchmark
               --config.benchmark.peak_tflops="$peak")
  : > "$out/benchmarks.jsonl"
  for args in "--config.batch_size=32" "--config.batch_size=8" \
              "--config.batch_size=32 --config.dtype=float32"; do
    echo "== benchmark $args"
    # shellcheck disable=SC2086
    timeout 240 "${bench[@]}" $args ${BENCH_EXTRA:-} | tail -1 | tee -a "$out/benchmarks.jsonl"
  done
  echo "== demo training with configs/gpu.py's settings"
  rm -rf /tmp/gpu_check_demo  # A fresh run each time, not a resumed one.
  local demo=("$py" main.py --config=configs/demo.py --workdir=/tmp/gpu_check_demo
              --config.dtype=bfloat16 --config.model.impl=xla ${DEMO_EXTRA:-})
  timeout 300 "${demo[@]}" && timeout 120 "${demo[@]}" --mode=evaluate
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh wheels|run" >&2; exit 2 ;;
esac
