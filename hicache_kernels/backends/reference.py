"""The reference backend: pure torch indexing on shaped views.

The oracle that every other backend is tested against, and the fallback on any
device. It never uses the plan's address arithmetic: it indexes the views that
:func:`hicache_kernels.layouts.layer_view` builds from torch shapes.
"""

from __future__ import annotations

import contextlib

import torch

from ..plan import TransferPlan

name = "reference"


def available() -> tuple[bool, str]:
    return True, "pure torch, runs on any device"


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    del sm_budget, num_warps  # a torch gather/scatter has no SM budget to honour
    keep = (src_indices >= 0) & (dst_indices >= 0)
    src_idx = src_indices[keep]
    dst_idx = dst_indices[keep]
    if src_idx.numel() == 0:
        return
    cuda_stream = stream if stream is not None and plan.device.type == "cuda" else None
    with torch.cuda.stream(cuda_stream) if cuda_stream is not None else contextlib.nullcontext():
        src_slots, dst_slots = int(src_idx.max()) + 1, int(dst_idx.max()) + 1
        for src_view, dst_view in plan.views(src_slots, dst_slots):
            s = src_idx.to(src_view.device)
            d = dst_idx.to(dst_view.device)
            p_src = src_view.shape[1]
            p_dst = dst_view.shape[1]
            items = src_view[s // p_src, s % p_src]                  # [n, H, head_bytes]
            dst_view[d // p_dst, d % p_dst] = items.to(dst_view.device)
