"""Bad input is refused before anything is written, naming the argument."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import poison_, random_bytes_

from hicache_kernels import KVBuffer, KVLayout, Transfer, backends, transfer
from hicache_kernels.ops import execute
from hicache_kernels.plan import PlaneSet, TransferPlan


@pytest.fixture
def pair(gen):
    lay = KVLayout("page_first", num_layers=2, num_slots=32, head_num=2, head_dim=8,
                   dtype=torch.bfloat16, page_size=4)
    src = KVBuffer.allocate(lay)
    dst = KVBuffer.allocate(lay.with_(kind="layer_first", num_slots=16))
    for t in src.tensors():
        random_bytes_(t, gen)
    for t in dst.tensors():
        poison_(t)
    return src, dst


def untouched(buf):
    return all((t.view(torch.uint8) == 0xA5).all() for t in buf.tensors())


IDX = torch.arange(8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("src_idx, dst_idx, kw, error, match", [
    (IDX.int(), IDX, {}, TypeError, "src_indices: expected dtype torch.int64, got torch.int32"),
    (IDX, IDX[:7], {}, ValueError, "dst_indices: expected 8 indices like src_indices, got 7"),
    (IDX, IDX + 9, {}, IndexError, "dst_indices: largest index 16 is out of range for dst with 16 slots"),
    (IDX + 25, IDX, {}, IndexError, "src_indices: largest index 32 is out of range for src"),
    (IDX.view(2, 4), IDX.view(2, 4), {}, ValueError, "src_indices: expected a 1-D tensor"),
    ([0, 1], IDX, {}, TypeError, "src_indices: expected an int64 tensor, got list"),
    (IDX, IDX, dict(layers=2), ValueError, r"layers: expected a non-empty step-1 range within \[0, 2\)"),
    (IDX, IDX, dict(layers=range(0, 2, 2)), ValueError, "layers"),
    (IDX, IDX, dict(layers="all"), TypeError, "layers: expected an int, a range or None"),
    (IDX, IDX, dict(sm_budget=0), ValueError, "sm_budget: expected a positive int"),
    (IDX, IDX, dict(num_warps=3), ValueError, "num_warps: expected one of"),
])
def test_refused_before_writing(pair, backend, src_idx, dst_idx, kw, error, match):
    src, dst = pair
    with pytest.raises(error, match=match):
        transfer(src, dst, src_idx, dst_idx, backend=backend, **kw)
    assert untouched(dst)


def test_mismatched_geometry(pair):
    src, _ = pair
    other = KVBuffer.allocate(src.layout.with_(head_dim=16))
    with pytest.raises(ValueError, match="dst: expected head_dim=8 like src, got 16"):
        transfer(src, other, IDX, IDX)
    mla = KVBuffer.allocate(src.layout.with_(head_num=1, mla=True))
    with pytest.raises(ValueError, match="dst: expected head_num=2 like src, got 1"):
        transfer(src, mla, IDX, IDX)
    with pytest.raises(TypeError, match="dst: expected a KVBuffer"):
        transfer(src, src.k, IDX, IDX)


def test_unknown_or_unavailable_backend(pair):
    src, dst = pair
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        transfer(src, dst, IDX, IDX, backend="fast")
    ok, why = backends.get("cuda").available()
    if not ok:
        with pytest.raises(RuntimeError, match=f"backend: 'cuda' is not available here"):
            transfer(src, dst, IDX, IDX, backend="cuda")
    assert untouched(dst)


def test_bounds_check_on_request(pair):
    src, dst = pair
    # check=True checks wherever the indices live (device indices cost one sync)
    with pytest.raises(IndexError):
        transfer(src, dst, IDX, IDX + 9, backend="reference", check=True)
    assert untouched(dst)


def _fake_side(name, device, pinned=False, num_slots=16):
    lay = KVLayout("layer_first", num_layers=1, num_slots=num_slots, head_num=1, head_dim=8,
                   dtype=torch.int64)
    return PlaneSet(name=name, addressing=lay.plane_addressing(), bases=[4096], device=torch.device(device),
                    views=lambda _m: [], num_slots=num_slots, pinned=pinned)


def test_unpinned_host_memory_is_refused_for_gpu_kernels():
    """A GPU kernel reads host memory directly: it must be pinned. (Planes only: no GPU needed
    to reach the check, which runs before any launch.)"""
    plan = TransferPlan(_fake_side("host_k", "cpu"), _fake_side("dev_k", "cuda:0"), 1, 64)
    with pytest.raises(ValueError, match="host_k: expected pinned host memory"):
        execute(plan, IDX, IDX, backend="triton")


def test_tensors_on_different_gpus_are_refused():
    plan = TransferPlan(_fake_side("src_k", "cuda:0"), _fake_side("dst_k", "cuda:1"), 1, 64)
    with pytest.raises(ValueError, match="dst_k: expected memory on cuda:0 like src_k, got cuda:1"):
        execute(plan, IDX, IDX, backend="reference")


def test_plane_count_mismatch():
    two = _fake_side("dst", "cpu")
    two.bases = [4096, 8192]
    with pytest.raises(ValueError, match="dst: expected 1 planes to match src, got 2"):
        TransferPlan(_fake_side("src", "cpu"), two, 1, 64)


def test_auto_logs_its_reason(pair, caplog):
    src, dst = pair
    backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="hicache_kernels"):
        t = Transfer(src, dst, layers=0)
    assert t.reason and any("backend auto ->" in r.message and t.reason in r.message
                            for r in caplog.records)
