"""The copy-engine backend's host side, on the CPU: merging items into runs
contiguous on both sides, and the descriptors built from them.

The descriptors are real addresses into the (CPU) buffers, so executing them
with memmove must reproduce the reference backend's bytes exactly; that checks
the merging and the address arithmetic together, on every layout pair.
"""

from __future__ import annotations

import ctypes

import torch
from hypothesis import given, strategies as st

from conftest import DTYPES, assert_bytes_equal, poison_, random_bytes_

from hicache_kernels import KVBuffer, KVLayout, LayoutKind, Transfer, transfer
from hicache_kernels.backends.copy_engine import descriptors, merge_runs

KIB = 1024


def _plan(src: KVBuffer, dst: KVBuffer, layers=None):
    return Transfer(src, dst, layers=layers, backend="reference").plan


def _runs(src, dst, s, d, layers=None):
    runs = merge_runs(_plan(src, dst, layers), torch.tensor(s), torch.tensor(d))
    return runs.src_offsets.tolist(), runs.dst_offsets.tolist(), runs.nbytes.tolist()


def _pool(kind, slots=64, page_size=1, layers=2, head_num=1, head_dim=1024, mla=True,
          dtype=torch.uint8):
    return KVBuffer.allocate(KVLayout(kind, num_layers=layers, num_slots=slots, head_num=head_num,
                                      head_dim=head_dim, dtype=dtype, page_size=page_size, mla=mla))


def test_consecutive_items_merge_and_gaps_split():
    a, b = _pool("layer_first"), _pool("layer_first")  # 1 KiB items, slot stride 1 KiB
    s, d, n = _runs(a, b, [4, 5, 6, 9, 10, 3], [0, 1, 2, 3, 4, 9])
    assert n == [3 * KIB, 2 * KIB, KIB]
    assert s == [4 * KIB, 9 * KIB, 3 * KIB] and d == [0, 3 * KIB, 9 * KIB]
    # contiguous on the source only: no merging
    assert _runs(a, b, [1, 2, 3], [7, 5, 6])[2] == [KIB, 2 * KIB]


def test_padding_is_dropped_before_merging():
    a, b = _pool("layer_first"), _pool("layer_first")
    # the padded item disappears; its neighbours are adjacent on both sides, so they join
    assert _runs(a, b, [4, -1, 5], [0, 9, 1])[2] == [2 * KIB]
    assert _runs(a, b, [4, 7, 5], [0, -1, 1])[2] == [2 * KIB]
    assert _runs(a, b, [-1, -2], [0, 1])[2] == []


def test_paged_runs_end_at_the_page_boundary():
    # page_first_direct [pages, L, P, ...]: one page of one layer is contiguous, the
    # next page of that layer is L * P items further on
    host = _pool("page_first_direct", slots=64, page_size=4, layers=2)
    dev = _pool("layer_first", slots=64)
    s, d, n = _runs(host, dev, [2, 3, 4, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15, 16], layers=1)
    assert n == [2 * KIB, 4 * KIB, KIB]
    assert s[1] - s[0] == 2 * 4 * KIB - 2 * KIB  # from slot 2 of page 0 to slot 0 of page 1
    # with one layer the pages follow each other in memory: one run across them
    host1 = _pool("page_first_direct", slots=64, page_size=4, layers=1)
    dev1 = _pool("layer_first", slots=64, layers=1)
    assert _runs(host1, dev1, [2, 3, 4, 5], [0, 1, 2, 3])[2] == [4 * KIB]


def test_page_first_never_merges_across_slots():
    host = _pool("page_first", slots=32, layers=3)  # [slots, L, ...]: a slot's layers are adjacent
    dev = _pool("layer_first", slots=32, layers=3)
    assert _runs(host, dev, list(range(8)), list(range(8)), layers=1)[2] == [KIB] * 8


def test_page_head_runs_are_single_heads():
    host = _pool("page_head", slots=32, page_size=8, layers=2, head_num=4, head_dim=64, mla=False)
    dev = _pool("layer_first", slots=32, layers=2, head_num=4, head_dim=64, mla=False)
    s, d, n = _runs(host, dev, [0, 1], [0, 1], layers=0)
    assert n == [64] * 8  # 2 items x 4 heads, each head 64 bytes apart from the next on the host
    assert d == [0, 64, 128, 192, 256, 320, 384, 448]


def test_descriptors_cover_every_plane():
    host = _pool("layer_first", slots=16, layers=3, mla=False, head_dim=256)
    dev = _pool("layer_first", slots=16, layers=3, mla=False, head_dim=256)
    plan = _plan(host, dev)
    runs = merge_runs(plan, torch.tensor([1, 2, 5]), torch.tensor([3, 4, 0]))
    dsts, srcs, sizes = descriptors(plan, runs)
    assert len(runs) == 2 and dsts.numel() == srcs.numel() == sizes.numel() == 6 * 2
    assert srcs[2].item() - srcs[0].item() == host.layout.layer_stride()
    assert sizes.tolist() == [512, 256] * 6


def _execute(src: KVBuffer, dst: KVBuffer, s_idx, d_idx, layers):
    """Merge, build descriptors, and run them with memmove on the CPU buffers."""
    plan = _plan(src, dst, layers)
    runs = merge_runs(plan, s_idx, d_idx)
    dsts, srcs, sizes = descriptors(plan, runs)
    for to, frm, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
        ctypes.memmove(to, frm, n)
    return runs


def _like(buf: KVBuffer) -> KVBuffer:
    out = KVBuffer.allocate(buf.layout)
    for t in out.tensors():
        poison_(t)
    return out


@st.composite
def cases(draw):
    kinds = list(LayoutKind)
    src_kind, dst_kind = draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds))
    mla = draw(st.booleans()) and LayoutKind.PAGE_HEAD not in (src_kind, dst_kind)
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    geometry = dict(num_layers=draw(st.integers(1, 3)), head_num=1 if mla else draw(st.integers(1, 3)),
                    head_dim=draw(st.integers(1, 24)), dtype=draw(st.sampled_from(DTYPES)), mla=mla)
    src_slots = page_size * draw(st.integers(1, 5))
    dst_slots = page_size * draw(st.integers(1, 5))
    n = draw(st.integers(0, min(src_slots, dst_slots)))
    # runs of consecutive slots, in random order, as a pool hands out pages
    s = draw(st.permutations(range(src_slots)))[:n] if draw(st.booleans()) else list(range(n))
    d = list(range(dst_slots))[:n] if draw(st.booleans()) else draw(st.permutations(range(dst_slots)))[:n]
    for i in draw(st.lists(st.integers(0, max(0, n - 1)), max_size=2)) if n else []:
        s[i] = -1
    first = draw(st.integers(0, geometry["num_layers"] - 1))
    return (KVLayout(src_kind, num_slots=src_slots, page_size=page_size, **geometry),
            KVLayout(dst_kind, num_slots=dst_slots, page_size=page_size, **geometry),
            torch.tensor(s, dtype=torch.int64), torch.tensor(d, dtype=torch.int64),
            range(first, geometry["num_layers"]) if draw(st.booleans()) else first)


@given(case=cases())
def test_runs_reproduce_the_reference(case):
    src_lay, dst_lay, s_idx, d_idx, layers = case
    gen = torch.Generator().manual_seed(s_idx.numel())
    src = KVBuffer.allocate(src_lay)
    for t in src.tensors():
        random_bytes_(t, gen)
    want, got = _like(KVBuffer.allocate(dst_lay)), _like(KVBuffer.allocate(dst_lay))
    transfer(src, want, s_idx, d_idx, layers=layers, backend="reference")
    runs = _execute(src, got, s_idx, d_idx, layers)
    for i, (a, b) in enumerate(zip(got.tensors(), want.tensors())):
        assert_bytes_equal(a, b, f"tensor {i}")
    live = int(((s_idx >= 0) & (d_idx >= 0)).sum())
    assert runs.total_bytes == live * src_lay.item_bytes
    assert len(runs) <= live * (src_lay.head_num if runs.total_bytes else 1)


def test_llama_load_geometry_gives_one_run_per_page():
    """Llama-3.1-8B's load (8192 tokens in random 64-token pages): 128 KiB runs, one per page."""
    n = 8192
    host = _pool("page_first_direct", slots=2 * n, page_size=64, layers=2, mla=False, head_num=8,
                 head_dim=128, dtype=torch.bfloat16)
    dev = _pool("layer_first", slots=n, layers=2, mla=False, head_num=8, head_dim=128, dtype=torch.bfloat16)
    pages = torch.randperm(2 * n // 64)[: n // 64]
    s = (pages[:, None] * 64 + torch.arange(64)).reshape(-1)
    d = torch.arange(n)
    runs = merge_runs(_plan(host, dev, 0), s, d)
    assert len(runs) == n // 64 and runs.nbytes.unique().tolist() == [64 * 2 * KIB]
