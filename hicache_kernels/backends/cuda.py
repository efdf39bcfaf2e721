"""The CUDA backend: kernels from ``csrc/`` loaded through a C surface.

Not built yet: the CUDA kernels arrive with their own issue. ``available()``
says so, and ``backend="auto"`` moves on to Triton.
"""

from __future__ import annotations

import torch

from ..plan import TransferPlan

name = "cuda"


def available() -> tuple[bool, str]:
    return False, "the CUDA kernels (csrc/) are not built in this version"


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    raise RuntimeError(f"backend: 'cuda' is not available here: {available()[1]}")
