#!/usr/bin/env bash
# The GPU check: what one call on a lent GPU machine (H100/H200) should tell us,
# under one deadline, from the repository root.
#
#   bash bench/gpu_check.sh               # core, everything within 540 s
#   bash bench/gpu_check.sh extra         # kernels --quick, e2e --quick, the manager's cost
#   bash bench/gpu_check.sh all           # both, under the same deadline
#   bash bench/gpu_check.sh --dry-run     # the same script, every step stubbed (CI runs this)
#
# Deadline: GPU_CHECK_DEADLINE seconds (default 540) from the start, the summary
# and the archive included. Each step runs under `timeout` with its own cap, cut
# to what is left after the time it keeps for later steps (its reserve, scaled
# with the deadline) and for packing (GPU_CHECK_PACK_RESERVE, default 15 s); a
# step left with under 5 s is skipped and says so. Exit 124 in the summary means
# the deadline cut the step.
#
# $OUT (default bench/out) receives at most 8 files, at its top level, named in
# [A-Za-z0-9._-]:
#   summary.txt    each step's exit code, seconds and limit; the smoke table; notes
#   summary.json   the same, machine-readable
#   kernels.json (or .jsonl), kernels.csv, kernels.png   the kernel suite: GB/s next to the
#                  same-run ceiling, baselines and SGLang's own kernels
#   blocks.csv     register-kernel block shapes and bulk shared-memory caps next to a GEMM
#   logs.tar.gz    every step's log, pytest JUnit XML, every result file
# Anything else found in $OUT at the end is moved into logs.tar.gz.
#
# Core steps, in order (cap in seconds):
#   machine     (30) GPU, driver, nvcc, torch and triton versions
#   install    (150) pip install --no-deps --no-build-isolation -e . (builds csrc/ for sm_90a)
#   wheels      (60) installs .whl/*.whl into a private folder (PYTHONPATH), when .whl/ holds any
#   smoke       (60) one load and one backup per backend vs the reference: which move the right bytes
#   cuda       (120) pytest -m gpu tests/test_cuda_gpu.py tests/test_launch.py, --maxfail 10
#   triton     (100) pytest -m gpu tests/test_transfer.py tests/test_triton*.py, --maxfail 10
#   manager     (90) pytest -m gpu on the manager's tests (no storage: no nixl there), --maxfail 10
#   peers      (120) builds SGLang's JIT transfer kernels (warm cache for the suite), when importable
#   suite      (150) hicache-bench kernels --suite <the suite the CLI offers>
#   blocks      (90) hicache-bench kernels --under-load: cuda with 2, 4 and 8 blocks of 8 warps,
#                    cuda_bulk with its 64 KiB shared-memory cap and with none (2 and 8 blocks)
#   sanitizer   (90) compute-sanitizer --tool memcheck on bench/sanitize_subset.py, where it is found
# extra: quick (kernels --quick), e2e (e2e --quick), cost (bench/test_manager_cost.py).
#
# SGLang's peers need wheels the GPU machine lacks (it has no network). Fill .whl/
# (ignored by git) on a machine with pip and network, from the repository root:
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     sglang==0.5.23 apache-tvm-ffi==0.1.15.post2 msgspec==0.23.0 orjson==3.13.0 \
#     pybase64==1.5.1 starlette==1.10.0 pydantic-core==2.50.5 pyzmq==27.3.0
# (8 wheels, 44 MiB, sglang's 37 MiB of it: under the 64 MiB a device call carries
# with this 1 MiB tree; the GPU machine has the rest, e.g. anyio, requests, psutil,
# pillow, ninja), and carry it: the device tool's carry [".whl"]. Without .whl/ the
# suite's SGLang rows say "not available: sglang is not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=bench/gpu_check.sh
PY="${PYTHON:-python3}"

# -- sub-modes: a stubbed step (dry run), the block-shape comparison ----------------------
if [ "${1:-}" = "--stub" ]; then  # --stub NAME -- CMD...: what a dry run runs instead of CMD
    name=$2; shift 3
    echo "dry run: $name would run: $*"
    slow=${GPU_CHECK_FAKE_SLOW:-}  # NAME:SECONDS makes that step this slow
    if [ "${slow%%:*}" = "$name" ]; then sleep "${slow#*:}"; fi
    case $name in
        smoke) printf 'smoke on cuda (dry run)\nbackend      available load  backup  seconds  note\n'
               printf 'reference    yes       ok    ok            -  the oracle (dry run)\n' ;;
        suite) mkdir -p "$WORK/suite"
               echo '{"benchmark": "kernels", "rows": [], "dry_run": true}' > "$WORK/suite/kernels-dry.json"
               printf 'op,backend,gbps\n' > "$WORK/suite/kernels-dry.csv"
               printf '\x89PNG\r\n\x1a\n' > "$WORK/suite/kernels-dry.png" ;;
        blocks) mkdir -p "$WORK/blocks"; printf 'shape,backend,gbps\n' > "$WORK/blocks.csv" ;;
        cuda|triton|manager) echo '<testsuite name="dry run" tests="0"/>' > "$WORK/logs/$name.xml" ;;
    esac
    exit 0
fi
if [ "${1:-}" = "--blocks" ]; then  # one kernels --under-load run per block shape, merged
    mkdir -p "$WORK/blocks"
    common=(kernels --under-load --op load --layout layer_first --page-size 64
            --no-baselines --reps 10 --warmup 2 --no-progress)
    status=0
    # the register kernel: 2, 4 or 8 blocks of 8 warps (each at most a third of an SM)
    "$PY" -m hicache_kernels.bench "${common[@]}" --backend cuda --sm-budget 2 4 8 --num-warps 8 \
        --out "$WORK/blocks/cuda-8warps" || status=1
    # the bulk kernel: 64 KiB of shared memory a block (its default), or a whole SM's
    for smem in 65536 0; do
        HICACHE_BULK_SMEM=$smem "$PY" -m hicache_kernels.bench "${common[@]}" --backend cuda_bulk \
            --sm-budget 2 8 --out "$WORK/blocks/bulk-smem$smem" || status=1
    done
    "$PY" - "$WORK/blocks" "$WORK/blocks.csv" <<'EOF' || status=1
import csv, json, sys
from pathlib import Path
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
keys = ["op", "layout", "page_size", "tokens", "backend", "sm_budget", "blocks", "gbps", "pct_of_ceiling",
        "gbps_under_load", "pct_of_alone", "gemm_slowdown_pct", "verified", "note"]
rows = []
for run in sorted(p for p in folder.iterdir() if p.is_dir()):
    for path in sorted(run.glob("*.json*")):
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in filter(str.strip, lines):
            for r in json.loads(line).get("rows", []):
                rows.append(dict({"shape": run.name}, **{k: r.get(k) for k in keys}))
with out.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["shape", *keys])
    w.writeheader()
    w.writerows(rows)
print(f"blocks: {len(rows)} rows from {folder}")
for r in rows:
    print(f"{r['shape']:18s} sm={r['sm_budget']} blocks={r['blocks']} GB/s={r['gbps']} "
          f"with GEMM={r['gbps_under_load']} GEMM slower by {r['gemm_slowdown_pct']}%")
EOF
    exit $status
fi

# -- the run ---------------------------------------------------------------------------------
DRY=0
MODE=core
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        core|extra|all) MODE=$arg ;;
        *) echo "usage: bash $SCRIPT [core|extra|all] [--dry-run]" >&2; exit 2 ;;
    esac
done
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && DRY=1
DEADLINE=${GPU_CHECK_DEADLINE:-540}
PACK_RESERVE=${GPU_CHECK_PACK_RESERVE:-15}
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export WORK PY
mkdir -p "$WORK/logs"
export PYTHONUNBUFFERED=1 HICACHE_NVTX=0
export CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90a-real}"  # H100/H200 only: a faster build
START=$SECONDS
NAMES=() RCS=() SECS=() LIMITS=() NOTES=()

record() {  # record NAME RC SECONDS LIMIT NOTE
    NAMES+=("$1"); RCS+=("$2"); SECS+=("$3"); LIMITS+=("$4"); NOTES+=("$(printf '%s' "$5" | tr -d '"\\' | tr '\n' ' ')")
}

declare -A BG_PID BG_LIMIT
run_step() {  # run_step fg|bg NAME CAP RESERVE CMD...: run CMD under what is left of the deadline
    local how=$1 name=$2 cap=$3 reserve=$4; shift 4
    local kept=$(( reserve * DEADLINE / 540 ))
    local left=$(( DEADLINE - PACK_RESERVE - (SECONDS - START) - kept ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: skipped, ${left}s left before the deadline"
        record "$name" skip 0 "$limit" "skipped: no time left before the deadline"
        return
    fi
    local log="$WORK/logs/$name.log" t0=$SECONDS rc
    local cmd=("$@")
    [ "$DRY" = 1 ] && cmd=(bash "$SCRIPT" --stub "$name" -- "$@")
    echo "=== $name (limit ${limit}s$([ "$how" = bg ] && echo ', in the background')): $*" | tee "$log"
    if [ "$how" = bg ]; then
        ( t=$(date +%s); timeout --signal=TERM --kill-after=2 "$limit" "${cmd[@]}" >> "$log" 2>&1
          echo "$? $(( $(date +%s) - t ))" > "$WORK/$name.rc" ) &
        BG_PID[$name]=$! BG_LIMIT[$name]=$limit
        return
    fi
    timeout --signal=TERM --kill-after=2 "$limit" "${cmd[@]}" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    record "$name" "$rc" $((SECONDS - t0)) "$limit" "$( { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && echo "cut at its limit")"
}
step() { run_step fg "$@"; }
start_step() { run_step bg "$@"; }  # finish_step NAME waits for it and records it
finish_step() {
    local name=$1 rc secs
    [ -n "${BG_PID[$name]:-}" ] || return 1
    wait "${BG_PID[$name]}"
    read -r rc secs < "$WORK/$name.rc" || { rc=lost; secs=0; }
    sed 1d "$WORK/logs/$name.log" | tail -40
    echo "=== $name: exit $rc after ${secs}s (in the background)"
    record "$name" "$rc" "$secs" "${BG_LIMIT[$name]}" \
        "in the background$( { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && echo ", cut at its limit")"
}

last_rc() { echo "${RCS[${#RCS[@]}-1]}"; }
note_last() { NOTES[${#NOTES[@]}-1]="$(printf '%s %s' "${NOTES[${#NOTES[@]}-1]}" "$1" | sed 's/^ //' | tr -d '"\\')"; }

pytest_group() {  # pytest_group NAME CAP RESERVE FILES...
    local name=$1 cap=$2 reserve=$3; shift 3
    step "$name" "$cap" "$reserve" "$PY" -m pytest -q -m gpu --maxfail=10 -p no:cacheprovider \
        --junitxml "$WORK/logs/$name.xml" "$@"
}

if [ "$MODE" = core ] || [ "$MODE" = all ]; then
    step machine 30 480 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -2; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
    step install 150 400 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    if compgen -G ".whl/*.whl" > /dev/null; then
        step wheels 60 380 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" .whl/*.whl
        if [ "$(last_rc)" = 0 ]; then
            export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
            note_last "installed $(ls .whl/*.whl | wc -l) wheels into a private folder"
        fi
    else
        record wheels skip 0 0 "no .whl/ folder: SGLang's peers are reported as not available"
    fi
    # SGLang's kernels build (nvcc, CPU) while the tests run (GPU); the suite waits for them
    peers=0
    if [ "$DRY" = 1 ] || "$PY" -c "from hicache_kernels.bench import baselines; import sys; sys.exit(baselines.load_module()[0] is None)" 2>/dev/null; then
        start_step peers 240 150 "$PY" -m hicache_kernels.bench.baselines --build && peers=1
    else
        record peers skip 0 0 "SGLang's JIT kernels do not import: the suite says why in its rows"
    fi
    step smoke 60 360 "$PY" bench/gpu_smoke.py --json "$WORK/logs/smoke.json"
    pytest_group cuda 120 260 tests/test_cuda_gpu.py tests/test_launch.py
    pytest_group triton 100 220 tests/test_transfer.py $(ls tests/test_triton*.py 2>/dev/null)
    pytest_group manager 90 190 tests/test_manager.py tests/test_manager_parts.py \
        tests/test_manager_stateful.py tests/test_manager_fastload.py tests/test_manager_lru.py
    if [ "$peers" = 1 ] && finish_step peers && [ "$(last_rc)" != 0 ]; then
        export HICACHE_SGLANG_PEERS=0   # the suite does not try to build them again
        note_last "SGLang's peers are off for the suite"
    fi
    step suite 150 60 bash -c 'suite=$("$PY" -m hicache_kernels.bench kernels --help | sed -n "s/.*--suite {\([^},]*\).*/\1/p" | head -1); echo "suite: ${suite:?no --suite in hicache-bench kernels --help}"; exec "$PY" -m hicache_kernels.bench kernels --suite "$suite" --out "$WORK/suite" --no-progress'
    step blocks 90 30 bash "$SCRIPT" --blocks
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    if [ -n "$sanitizer" ]; then
        step sanitizer 90 0 "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" bench/sanitize_subset.py
        if grep -q "Device not supported" "$WORK/logs/sanitizer.log" 2>/dev/null; then
            note_last "compute-sanitizer refused the device (as on gVisor machines): no finding either way"
            RCS[${#RCS[@]}-1]=refused
        fi
    else
        record sanitizer skip 0 0 "compute-sanitizer not found on PATH or in /usr/local/cuda/bin"
    fi
fi
if [ "$MODE" = extra ] || [ "$MODE" = all ]; then
    [ -e hicache_kernels/libhicache_cuda.so ] || step install 150 200 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    step quick 150 120 "$PY" -m hicache_kernels.bench kernels --quick --out "$WORK/quick" --no-progress
    step e2e 150 60 "$PY" -m hicache_kernels.bench e2e --quick --out "$WORK/e2e" --no-progress
    step cost 120 0 "$PY" -m pytest -q -s -p no:cacheprovider bench/test_manager_cost.py
fi

# -- $OUT: at most 8 files, top level, plain names ------------------------------------------
for f in summary.txt summary.json kernels.json kernels.jsonl kernels.csv kernels.png blocks.csv logs.tar.gz; do
    rm -f "$OUT/$f"
done
deliver() {  # deliver PATTERN NAME: the first file in $WORK/suite matching PATTERN, as $OUT/NAME
    local found
    found=$(ls "$WORK"/suite/$1 2>/dev/null | head -1)
    [ -n "$found" ] && cp "$found" "$OUT/$2"
}
deliver "*.jsonl" kernels.jsonl || deliver "*.json" kernels.json
deliver "*.csv" kernels.csv
deliver "*.png" kernels.png
[ -f "$WORK/blocks.csv" ] && cp "$WORK/blocks.csv" "$OUT/blocks.csv"
# anything else in $OUT (an earlier run, a stray file) goes into the archive
mkdir -p "$WORK/found-in-out"
for entry in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$entry" ] || continue
    case "$(basename "$entry")" in
        summary.txt|summary.json|kernels.json|kernels.jsonl|kernels.csv|kernels.png|blocks.csv) ;;
        *) mv "$entry" "$WORK/found-in-out/" ;;
    esac
done

failed=0
for i in "${!NAMES[@]}"; do
    case ${RCS[$i]} in 0|skip|refused) ;; *) failed=$((failed + 1)) ;; esac
done
elapsed=$((SECONDS - START))
{
    echo "GPU check ($MODE$([ "$DRY" = 1 ] && echo ', dry run: every step stubbed')): ${#NAMES[@]} steps, $failed failed; ${elapsed}s of the ${DEADLINE}s deadline before packing"
    printf '%-10s %7s %8s %6s  %s\n' step exit seconds limit note
    for i in "${!NAMES[@]}"; do
        printf '%-10s %7s %8s %6s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${LIMITS[$i]}" "${NOTES[$i]}"
    done
    if [ -f "$WORK/logs/smoke.log" ]; then
        echo
        sed -n '/^smoke on/,$p' "$WORK/logs/smoke.log" | grep -v '^===' | head -20
    fi
} > "$OUT/summary.txt"
{
    printf '{"mode": "%s", "dry_run": %s, "deadline_s": %s, "elapsed_s": %s, "failed": %s, "steps": [' \
        "$MODE" "$([ "$DRY" = 1 ] && echo true || echo false)" "$DEADLINE" "$elapsed" "$failed"
    for i in "${!NAMES[@]}"; do
        [ "$i" -gt 0 ] && printf ', '
        printf '{"name": "%s", "exit": "%s", "seconds": %s, "limit": %s, "note": "%s"}' \
            "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${LIMITS[$i]}" "${NOTES[$i]}"
    done
    printf ']}\n'
} > "$OUT/summary.json"
cp "$OUT/summary.txt" "$OUT/summary.json" "$WORK/logs/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=./site . 2>/dev/null || tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
rm -rf "$WORK"

# the contract, checked: at most 8 files, at most 2 folders down, plain names, 16 MiB each
files=$(find "$OUT" -type f | wc -l)
deep=$(find "$OUT" -mindepth 4 | wc -l)
odd=$(find "$OUT" -mindepth 1 | sed "s|^$OUT/||" | tr '/' '\n' | grep -cv '^[A-Za-z0-9._-]*$')
big=$(find "$OUT" -type f -size +16M | wc -l)
contract="ok"
[ "$files" -le 8 ] && [ "$deep" = 0 ] && [ "$odd" = 0 ] && [ "$big" = 0 ] || contract="BROKEN"
echo "files: $(ls "$OUT" | tr '\n' ' ')(logs.tar.gz: logs/<step>.log and .xml, suite/, blocks/, found-in-out/)" >> "$OUT/summary.txt"
echo "contract: $files files, none deeper than 2 folders: $([ "$deep" = 0 ] && echo yes || echo no), plain names: $([ "$odd" = 0 ] && echo yes || echo no), none over 16 MiB: $([ "$big" = 0 ] && echo yes || echo no): $contract" >> "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
echo "gpu_check: $([ "$failed" = 0 ] && [ "$contract" = ok ] && echo all steps passed || echo "SOME STEPS FAILED (see $OUT/summary.txt and $OUT/logs.tar.gz)") in $((SECONDS - START))s"
[ "$failed" = 0 ] && [ "$contract" = ok ]
