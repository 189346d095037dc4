#!/usr/bin/env bash
# The GPU checks, as one script of about ten minutes on an NVIDIA GPU (issue 14's GPU section):
#   1. the CUDA kernels built for this GPU (the same CMake build as `make plugins`);
#   2. `make test-gpu`: the kernels against the fp32 reference for every method, at LLaVA-OV-7B shapes too;
#   3. `make bench-cuda`: kernel times with CUDA events;
#   4. `iwp bench --backend torch --device cuda` at llava-ov-0.5b (random weights): every method's pruned
#      prefill against unpruned, the selection on the CUDA kernels.
# Usage: benchmarks/gpu_check.sh [OUT]   (PY=python to use another interpreter than .venv's; ARCH=90 for Hopper)
# Each step runs under its own time limit (BUILD_S, TEST_S, BENCH_CUDA_S, BENCH_S seconds) and the script goes on past a failure; the exit status is the
# number of failed steps. Logs and the bench report go to OUT (default build/gpu-check).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu-check}
PY=${PY:-.venv/bin/python}
ARCH=${ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)}
mkdir -p "$OUT"
failed=0
step() {   # name seconds command...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s) $(date -u +%T)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
step build "${BUILD_S:-300}" bash -c "cmake -S plugins -B build/plugins -DCMAKE_CUDA_COMPILER=$(command -v nvcc) \
    ${ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$ARCH} && cmake --build build/plugins -j$(nproc)"
step test-gpu "${TEST_S:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_kernels.py
step bench-cuda "${BENCH_CUDA_S:-120}" "$PY" -m iwp bench-cuda
step bench-torch-cuda "${BENCH_S:-300}" "$PY" -m iwp bench --backend torch --device cuda --model llava-ov-0.5b --random-weights \
    --out "$OUT/bench"
echo "== $failed step(s) failed"
exit "$failed"
