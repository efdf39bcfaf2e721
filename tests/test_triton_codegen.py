"""The Triton kernel compiles for Hopper and moves 16-byte vectors when alignment allows.

Compiles to PTX for sm_90 without a GPU (Triton's CUDA backend only needs its
bundled LLVM for this) and inspects the global loads and stores.
"""

from __future__ import annotations

import re

import pytest
import triton

from hicache_kernels.backends import triton_kernels as tk

pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 4),
    reason="ASTSource signature format of Triton >= 3.4",
)


def _ptx(word_bytes: int, vec: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    kernel = tk._copy_items_kernel
    if not isinstance(kernel, JITFunction):  # under TRITON_INTERPRET=1: compile the same source
        kernel = JITFunction(kernel.fn)
    word = {8: "i64", 4: "i32", 2: "i16", 1: "i8"}[word_bytes]
    sig = {}
    for name in kernel.arg_names:
        if name.isupper():
            sig[name] = "constexpr"
        elif name == "anchor":
            sig[name] = f"*{word}"
        elif name.endswith(("_bases", "_idx")):
            sig[name] = "*i64"
        else:
            sig[name] = "i64"
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={"WORD_BYTES": word_bytes, "VEC": vec, "ROWS": 16, "COLS": 256},
                    attrs={(0,): [["tt.divisibility", 16]]})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    return compiled.asm["ptx"]


def _accesses(ptx: str) -> set[str]:
    return set(re.findall(r"\b((?:ld|st)\.global[\w.:]*)", ptx))


def test_aligned_items_use_16_byte_vectors():
    acc = _accesses(_ptx(8, 2))
    assert any(a.startswith("ld.global") and a.endswith("v2.b64") for a in acc), acc
    assert any(a.startswith("st.global") and a.endswith("v2.b64") for a in acc), acc


def test_4_byte_aligned_items_fall_back_to_words():
    acc = _accesses(_ptx(4, 1))
    stores = {a for a in acc if a.startswith("st.global")}
    assert stores and all(a.endswith(".b32") for a in stores), acc
