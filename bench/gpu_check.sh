#!/usr/bin/env bash
# The GPU check: run on the lent GPU machine (H100/H200) from the repository root.
#
#   bash bench/gpu_check.sh          # core, about 5 minutes: install, GPU tests, sanitizer, targets table
#   bash bench/gpu_check.sh extra    # about 4 minutes more: kernel sweep, e2e, manager cost
#   bash bench/gpu_check.sh all      # both
# Logs, JSON/CSV/PNG results land under $OUT (or bench/out).
#
# core, each step under its own time limit so one hang cannot eat the lease:
#   1. installs the package in place (builds csrc/ for this GPU with its nvcc; no network)
#   2. prints which backends are usable and why
#   3. GPU tests: every transfer vs the reference by raw bytes (triton, cuda, cuda_bulk,
#      copy_engine), side streams, CUDA graph capture, the SGLang surface, the manager on
#      real streams (stateful machine, rule-off hunts)
#   4. compute-sanitizer memcheck on a short subset of every kernel path
#   5. hicache-bench kernels --suite targets: per-layer load and all-layer backup
#      (Llama-3.1-8B geometry, 64-token pages) and the other targets, each next to
#      the same-run contiguous-copy ceiling
# extra: hicache-bench kernels --quick and e2e --quick; the manager's cost on real streams.
# Storage tests are not run here: the GPU machine has no nixl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0
step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}
export PYTHONUNBUFFERED=1 HICACHE_NVTX=0
export CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90a-real}"  # H100/H200 only: a faster build
MODE="${1:-core}"

{ nvidia-smi -L; nvcc --version | tail -1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.log"

if [ "$MODE" = core ] || [ "$MODE" = all ]; then
step install 240 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step backends 60 "$PY" -c "from hicache_kernels import backends
for name, (ok, why) in backends.status().items(): print(f'{name:12s} {\"yes\" if ok else \"no \"} {why}')"
step gpu_tests 300 "$PY" -m pytest -q -m gpu --maxfail=25 -p no:cacheprovider \
    tests/test_transfer.py tests/test_cuda_gpu.py tests/test_manager.py \
    tests/test_manager_parts.py tests/test_manager_stateful.py
step sanitizer 180 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/sanitize_subset.py
step bench_targets 300 "$PY" -m hicache_kernels.bench kernels --suite targets --out "$OUT" --no-progress
fi
if [ "$MODE" = extra ] || [ "$MODE" = all ]; then
[ -e hicache_kernels/libhicache_cuda.so ] || step install 240 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step bench_quick 180 "$PY" -m hicache_kernels.bench kernels --quick --out "$OUT" --no-progress
step e2e_quick 180 "$PY" -m hicache_kernels.bench e2e --quick --out "$OUT" --no-progress
step manager_cost 120 "$PY" -m pytest -q -s -p no:cacheprovider bench/test_manager_cost.py
fi
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED, see $OUT/*.log)"
exit $status
