"""The Triton kernel moves 16-byte vectors when alignment allows, under every Triton.

Compiles real launches (tests/triton_launches.py) to PTX for sm_90 without a GPU and
inspects the global loads and stores.
"""

from __future__ import annotations

import re

import triton_launches as tl_


def _ptx(**constexprs) -> str:
    """PTX of the first launch the test matrix makes with these constexprs, default warps."""
    launch = next(l for l in tl_.recorded_launches()
                  if l.kwargs["num_warps"] == 16
                  and all(l.kwargs[k] == v for k, v in constexprs.items()))
    return tl_.compile_launch(tl_.jit_function(), launch, 90).asm["ptx"]


def _accesses(ptx: str) -> set[str]:
    return set(re.findall(r"\b((?:ld|st)\.global[\w.:]*)", ptx))


def _wide(access: str) -> bool:
    return access.endswith((".v2.b64", ".v4.b32", ".v2.u64", ".v4.u32"))


def test_aligned_items_use_16_byte_vectors():
    acc = _accesses(_ptx(WORD_BYTES=8, VEC=2, COLS=64))
    assert any(a.startswith("ld.global") and _wide(a) for a in acc), acc
    assert any(a.startswith("st.global") and _wide(a) for a in acc), acc


def test_4_byte_aligned_items_fall_back_to_words():
    acc = _accesses(_ptx(WORD_BYTES=4, VEC=1))
    stores = {a for a in acc if a.startswith("st.global")}
    assert stores and all(a.endswith(".b32") for a in stores), acc
