"""The CUDA bulk backend (sm_90+): the transfer kernel that moves bytes with
``cp.async.bulk`` through shared memory instead of registers.

An experiment the issue asks for: SGLang reported the host link's ceiling
from 4 of 152 SMs this way on a GB300. Each warp runs its own pipeline of
shared-memory stages (``csrc/include/hicache/copy_bulk.h``); ``num_warps`` is
pipelines per block. Plans that are not 16-byte aligned throughout, or that
take bases from address tables, run the register kernel instead (logged).
"""

from __future__ import annotations

import logging

import torch

from ..plan import TransferPlan
from . import _native, cuda

name = "cuda_bulk"
log = logging.getLogger("hicache_kernels")
_told: set[str] = set()

DEFAULT_SM_BUDGET = cuda.DEFAULT_SM_BUDGET
# Two pipelines per block, each with as many 16 KiB stages as fit (up to 8):
# ~96 KiB of loads in flight per pipeline, never a register spent holding data.
DEFAULT_NUM_WARPS = 2


def available() -> tuple[bool, str]:
    return cuda._available(_native.KERNEL_BULK)


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    if not cuda.bulk_eligible(plan):
        key = plan.label
        if key not in _told:
            _told.add(key)
            log.info("backend cuda_bulk: %s is not 16-byte aligned throughout (or has address "
                     "tables); using the register kernel", key)
        cuda.run(plan, src_indices, dst_indices, sm_budget=sm_budget, num_warps=num_warps,
                 stream=stream)
        return
    cuda.launch(plan, src_indices, dst_indices, kernel=_native.KERNEL_BULK,
                sm_budget=sm_budget or DEFAULT_SM_BUDGET, num_warps=num_warps or DEFAULT_NUM_WARPS,
                stream=stream, backend=name)
