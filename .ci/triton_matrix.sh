#!/usr/bin/env bash
# The Triton compatibility matrix: compile every specialization the Triton backend
# launches, for sm_80, sm_90 and sm_100, under each supported Triton other than the one
# in .venv (the main test run covers that one). No GPU needed.
#
# Each version gets its own small venv, .venv/triton-<version>: that Triton, from a wheel
# downloaded once per machine (~/.cache/hicache-kernels/wheels), and everything else
# linked from .venv (the CPU torch pinned by constraints.txt, pytest, this package).
# Versions run side by side, one per CPU core.
#
#   bash .ci/triton_matrix.sh              # every version in .ci/triton-versions
#   bash .ci/triton_matrix.sh 3.6.0        # some of them
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
test -x "$PY" || { echo "triton matrix: run 'make install' first" >&2; exit 2; }
versions=("$@")
[ ${#versions[@]} -gt 0 ] || mapfile -t versions < <(grep -v '^#' .ci/triton-versions | grep .)
main=$("$PY" -c 'import triton; print(triton.__version__)')
main_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
logs=.venv/triton-matrix-logs
# Wheels are kept per machine, outside the checkout, so a fresh clone (CI) downloads nothing.
wheels=${HICACHE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hicache-kernels/wheels}
mkdir -p "$logs" "$wheels"

setup() {  # setup VERSION: .venv/triton-VERSION with that Triton and the rest linked from .venv
    local v=$1 env=.venv/triton-$1 site
    [ -x "$env/bin/python" ] || "$PY" -m venv --without-pip "$env"
    site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    find "$site" -maxdepth 1 -type l -delete        # relink: .venv may have changed
    for f in "$main_site"/*; do
        case $(basename "$f") in triton | triton-*.dist-info) ;; *) ln -s "$(realpath "$f")" "$site/" ;; esac
    done
    if [ ! -d "$site/triton-$v.dist-info" ]; then
        rm -rf "$site"/triton "$site"/triton-*.dist-info
        "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$site" \
            "$(wheel "$v")" 2>&1 | grep -v '^WARNING: Location' || true
        [ -d "$site/triton-$v.dist-info" ] || { echo "triton $v: install failed" >&2; return 1; }
    fi
}

wheel() {  # wheel VERSION: the path of its wheel in $wheels, downloaded once per machine
    local v=$1 tag whl tmp
    tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    whl=$(ls "$wheels"/triton-"$v"-"$tag"-*.whl 2>/dev/null | head -n 1)
    if [ -z "$whl" ]; then
        tmp=$(mktemp -d "$wheels/.download.XXXXXX")
        grep '^torch==' constraints.txt > "$tmp/torch-pin.txt"   # never let pip pick a torch
        "$PY" -m pip download -q --disable-pip-version-check --no-deps -c "$tmp/torch-pin.txt" \
            -d "$tmp" "triton==$v" 2>&1 | grep -v '^WARNING: Location' >&2 || true
        mv "$tmp"/triton-"$v"-*.whl "$wheels"/ && rm -rf "$tmp"   # whole files only
        whl=$(ls "$wheels"/triton-"$v"-"$tag"-*.whl | head -n 1)
    fi
    echo "$whl"
}

check() {  # check VERSION: the compile tests under that Triton; log in $logs/VERSION
    local v=$1 start=$SECONDS rc=0
    {
        setup "$v" &&
        ".venv/triton-$v/bin/python" -m pytest -q -p no:cacheprovider \
            tests/test_triton_compile.py tests/test_triton_codegen.py
    } > "$logs/$v" 2>&1 || rc=$?
    echo "$rc" > "$logs/$v.rc"
    echo "triton $v: $([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc)") in $((SECONDS - start)) s: $(tail -n 1 "$logs/$v")"
    return $rc
}
export -f setup wheel check
export PY main_site logs wheels

todo=()
for v in "${versions[@]}"; do [ "$v" = "$main" ] || todo+=("$v"); done
echo "triton matrix: ${todo[*]:-nothing} (triton $main: the main test run)"
[ ${#todo[@]} -gt 0 ] || exit 0
start=$SECONDS
rm -f "$logs"/*.rc
printf '%s\n' "${todo[@]}" | xargs -P "$(nproc)" -I{} bash -c 'check {}' || true
passed=0 failed=0
for v in "${todo[@]}"; do
    if [ "$(cat "$logs/$v.rc" 2>/dev/null)" = 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "==== triton $v: $logs/$v"; tail -n 60 "$logs/$v"
    fi
done
echo "triton matrix: ${#todo[@]} versions in $((SECONDS - start)) s"
echo "triton-matrix: $passed passed, $failed failed"
[ "$failed" = 0 ]
