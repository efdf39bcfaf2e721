"""The copy-engine backend: runs contiguous on both sides, issued as memcpys (0 SMs).

Not built yet: it arrives with the CUDA issue (``cudaMemcpyBatchAsync`` over
merged runs). ``available()`` says so.
"""

from __future__ import annotations

import torch

from ..plan import TransferPlan

name = "copy_engine"


def available() -> tuple[bool, str]:
    return False, "the copy-engine path (csrc/) is not built in this version"


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    raise RuntimeError(f"backend: 'copy_engine' is not available here: {available()[1]}")
