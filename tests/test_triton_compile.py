"""Every specialization the Triton backend launches compiles for sm_80, sm_90 and sm_100.

No GPU needed: the launches come from the launcher itself over the CPU test matrix's
geometries (tests/triton_launches.py), and each distinct one goes through Triton's own
JIT (binder, specialization, cache, compile to a cubin) as a launch on that GPU would.
CI runs this file under every supported Triton (.ci/triton_matrix.sh), since each
Triton release compiles the same source differently.
"""

from __future__ import annotations

import pytest

import triton_launches as tl_

from hicache_kernels.backends import triton_kernels as tk

_launches = tl_.recorded_launches
_jit = tl_.jit_function


def test_the_launches_cover_every_tile_shape_and_num_warps():
    launches = _launches()
    shapes = {(l.kwargs["WORD_BYTES"], l.kwargs["VEC"]) for l in launches}
    assert shapes == {(1, 1), (2, 1), (4, 1), (8, 1), (8, 2)}, shapes
    warps = {l.kwargs["num_warps"] for l in launches}
    assert warps == {1, 2, 4, 8, 16, 32}, warps
    assert max(l.kwargs["ROWS"] for l in launches) == tk.MAX_ROWS
    assert any(l.what.startswith("sglang transfer_kv_all_layer") for l in launches)


@pytest.mark.parametrize("arch", tl_.ARCHS, ids=lambda a: f"sm_{a}")
def test_every_launch_compiles(arch, capfd):
    jit, failures = _jit(), {}
    for launch in _launches():
        capfd.readouterr()
        try:
            tl_.compile_launch(jit, launch, arch)
        except Exception as exc:  # the compiler's own error, reported per specialization
            key = tuple(sorted(launch.kwargs.items()))
            if key not in failures:  # MLIR prints its diagnostics, the exception only fails
                failures[key] = f"{launch.describe()}\n    {_first_error(exc, capfd.readouterr().err)}"
    compiled = tl_.compiled_count(jit, arch)
    assert not failures, (f"triton {tl_.triton.__version__}, sm_{arch}: {len(failures)} "
                          f"specializations fail to compile ({compiled} compiled):\n"
                          + "\n".join(failures.values()))
    # one kernel per tile shape and num_warps: nothing else is specialized
    assert compiled == len({tuple(sorted(l.kwargs.items())) for l in _launches()})


def _first_error(exc: Exception, stderr: str) -> str:
    text = f"{stderr}\n{type(exc).__name__}: {exc}"
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return errors[0] if errors else f"{type(exc).__name__}: {exc}"
