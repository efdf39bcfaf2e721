"""The CUDA bulk backend (sm_90+): the transfer kernel that moves bytes with
``cp.async.bulk`` through shared memory instead of registers.

An experiment the issue asks for: SGLang reported the host link's ceiling
from 4 of 152 SMs this way on a GB300. Each warp runs its own pipeline of
shared-memory stages (``csrc/include/hicache/copy_bulk.h``); ``num_warps`` is
pipelines per block. Plans that are not 16-byte aligned throughout, or that
take bases from address tables, run the register kernel instead (logged).

A block takes at most ``SMEM_PER_BLOCK`` bytes of shared memory (64 KiB unless
``HICACHE_BULK_SMEM`` says otherwise; 0 = all a block may have, 227 KiB on a
Hopper GPU), so it can share an SM with the forward pass's blocks: with the
default 2 pipelines that is 7 stages of 4 KiB each (56 KiB); uncapped, 7
stages of 16 KiB (224 KiB, a whole SM). ``hicache-bench kernels --under-load``
with ``HICACHE_BULK_SMEM`` set to each measures the difference.

Source and destination slots must not overlap (see :mod:`.cuda`).
"""

from __future__ import annotations

import logging
import os

import torch

from ..plan import TransferPlan
from . import _native, cuda

name = "cuda_bulk"
log = logging.getLogger("hicache_kernels")
_told: set[str] = set()


def _smem_setting() -> int:
    text = os.environ.get("HICACHE_BULK_SMEM", "65536")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value > 2**31 - 1:
        raise ValueError(f"HICACHE_BULK_SMEM: expected bytes of shared memory (0: no cap), got {text!r}")
    return value


# Blocks when no SM budget is given, as for the register kernel: 8 blocks of
# 2 pipelines, each with 5 of its 7 4-KiB stages loading, keep 320 KiB in flight.
DEFAULT_SM_BUDGET = cuda.DEFAULT_SM_BUDGET
# Two pipelines (warps) per block.
DEFAULT_NUM_WARPS = 2
# Most shared memory a block may take (0: all the device allows a block).
SMEM_PER_BLOCK = _smem_setting()


def available() -> tuple[bool, str]:
    return cuda._available(_native.KERNEL_BULK)


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    if not _bulk(plan):
        cuda.run(plan, src_indices, dst_indices, sm_budget=sm_budget, num_warps=num_warps,
                 stream=stream)
        return
    cuda.launch(plan, src_indices, dst_indices, kernel=_native.KERNEL_BULK,
                sm_budget=sm_budget or DEFAULT_SM_BUDGET, num_warps=num_warps or DEFAULT_NUM_WARPS,
                stream=stream, backend=name, smem_cap=SMEM_PER_BLOCK)


def prepare(plan: TransferPlan, *, sm_budget: int | None = None,
            num_warps: int | None = None) -> cuda.Launcher | None:
    """:func:`run`'s launch for ``plan``, prepared once (see :class:`cuda.Launcher`)."""
    if not _bulk(plan):
        return cuda.prepare(plan, sm_budget=sm_budget, num_warps=num_warps)
    return cuda.Launcher.of(plan, kernel=_native.KERNEL_BULK, sm_budget=sm_budget or DEFAULT_SM_BUDGET,
                            num_warps=num_warps or DEFAULT_NUM_WARPS, backend=name,
                            smem_cap=SMEM_PER_BLOCK)


def _bulk(plan: TransferPlan) -> bool:
    """Whether ``plan`` runs the bulk kernel (else the register kernel, logged once)."""
    if cuda.bulk_eligible(plan):
        return True
    key = plan.label
    if key not in _told:
        _told.add(key)
        log.info("backend cuda_bulk: %s is not 16-byte aligned throughout (or has address "
                 "tables); using the register kernel", key)
    return False
