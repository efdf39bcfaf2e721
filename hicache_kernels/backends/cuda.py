"""The CUDA backend: the register-staged transfer kernel from ``csrc/``.

Each thread loads the source and destination slots of its 8 units, then issues
8 loads of up to 16 bytes (the widest access the plan's alignment allows,
narrower where it must) back to back, then stores them; the grid never exceeds
the SM budget. Plane bases come from int64 address tables on the GPU; pinned
host memory is read and written directly (unified addressing). The library is
called through ctypes (:mod:`._native`), so this backend works with any
PyTorch build.

Launch shape: ``sm_budget`` blocks of ``num_warps`` warps. A block has at most
8 warps (256 threads, at most 80 registers each: a third of an SM's register
file), so it can share an SM with the forward pass's blocks; a request for
larger blocks runs as more 8-warp blocks holding the same threads
(``sm_budget=2, num_warps=32`` is 8 blocks of 8 warps).

Source and destination slots must not overlap: a copy within one buffer whose
source and destination items share bytes is undefined.

Example:
    >>> t = Transfer(host, dev, layers=3, backend="cuda", sm_budget=8, num_warps=8)
    >>> t(host_idx, dev_idx)
"""

from __future__ import annotations

import ctypes

import torch

from ..plan import TransferPlan, address_table
from . import _native

name = "cuda"

# Blocks when no SM budget is given: transfers share the GPU with the forward
# pass. 8 blocks of 8 warps hold what 2 blocks of 32 warps did (256 KiB of
# loads in flight, enough to carry the host link), each block small enough to
# share an SM. What 2, 4 or 8 of them cost a GEMM next to them is what
# ``hicache-bench kernels --under-load --backend cuda --sm-budget 2 4 8`` measures.
DEFAULT_SM_BUDGET = 8
# 8 warps x 8 x 16-byte loads per thread = 32 KiB in flight per block.
DEFAULT_NUM_WARPS = 8


def available() -> tuple[bool, str]:
    return _available(_native.KERNEL_REGISTERS)


def _available(kernel: int) -> tuple[bool, str]:
    index, info, why = _native.current_device_info()
    if info is None:
        return False, why
    archs = _native.build_info().get("archs", "?")
    major, minor = info.capability
    if not info.has_register_kernel:
        return False, f"the CUDA library has no code for sm_{major}{minor} (built for {archs})"
    if kernel == _native.KERNEL_BULK and not info.has_bulk_kernel:
        return False, (f"the bulk kernel needs sm_90+ code; cuda:{index} is sm_{major}{minor} "
                       f"and the library was built for {archs}")
    return True, f"libhicache_cuda ({archs}) on {torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    """Copy ``src_indices[i] -> dst_indices[i]`` (int64 on the plan's device) in every plane."""
    launch(plan, src_indices, dst_indices, kernel=_native.KERNEL_REGISTERS,
           sm_budget=sm_budget or DEFAULT_SM_BUDGET, num_warps=num_warps or DEFAULT_NUM_WARPS,
           stream=stream, backend=name)


def launch(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor, *, kernel: int,
           sm_budget: int, num_warps: int, stream: "torch.cuda.Stream | None", backend: str,
           stage_bytes: int = 0, stages: int = 0, smem_cap: int = 0) -> None:
    """Fill the C descriptor for ``plan`` and launch ``kernel`` on ``stream``
    (``stage_bytes``, ``stages``, ``smem_cap``: the bulk kernel's, 0 = default)."""
    device = plan.device
    if device.type != "cuda":
        ok, why = _available(kernel)
        raise RuntimeError(f"backend: {backend!r} is not available here: {why}" if not ok else
                           f"backend: {backend!r} needs a CUDA side; {plan.src.name} and "
                           f"{plan.dst.name} are both on {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    info, why = _native.device_info(device.index)  # cached: nothing to ask the driver per call
    if info is None or not info.has_register_kernel or (kernel == _native.KERNEL_BULK
                                                        and not info.has_bulk_kernel):
        raise RuntimeError(f"backend: {backend!r} is not available here: {_available(kernel)[1]}")
    n_items = src_indices.numel()
    if n_items == 0 or plan.num_planes == 0:
        return
    for what, idx in (("src_indices", src_indices), ("dst_indices", dst_indices)):
        if idx.device != device or idx.dtype != torch.int64 or not idx.is_contiguous():
            raise ValueError(f"{what}: expected a contiguous int64 tensor on {device}, got "
                             f"{idx.dtype} on {idx.device}")
    torch_stream = stream if stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(torch_stream):  # a table copied for this call is copied in stream order
        src_bases = address_table(plan.src.bases, device)
        dst_bases = address_table(plan.dst.bases, device)
    n_chunks, chunk_bytes, src_cs, dst_cs = plan.chunks()
    bases_known = plan.bases_known
    alignment = plan.alignment(table_bases=None)
    if kernel == _native.KERNEL_BULK and not bulk_eligible(plan):
        raise ValueError(f"backend {backend!r}: {plan.label} is not 16-byte aligned throughout "
                         "or takes its bases from address tables; the bulk kernel needs both")
    desc = _native.CopyDesc(
        src=_side(plan.src.addressing, src_bases, src_indices, src_cs),
        dst=_side(plan.dst.addressing, dst_bases, dst_indices, dst_cs),
        n_items=n_items, n_planes=plan.num_planes, n_chunks=n_chunks, chunk_bytes=chunk_bytes,
        alignment=alignment, bases_known=int(bases_known), kernel=kernel, max_blocks=sm_budget,
        warps_per_block=num_warps, device=device.index, stage_bytes=stage_bytes, stages=stages,
        smem_cap=smem_cap, stream=torch_stream.cuda_stream,
    )
    lib = _native.library()[0]
    _native.check(lib.hck_copy_items(ctypes.byref(desc)), f"backend {backend!r}: {plan.label}")


def bulk_eligible(plan: TransferPlan) -> bool:
    """Whether the bulk kernel can take ``plan``: every address and size 16-byte
    aligned, and every base known on the host."""
    return plan.bases_known and plan.alignment(table_bases=None) == 16


def _side(addressing, bases: torch.Tensor, indices: torch.Tensor, chunk_stride: int) -> _native.Side:
    return _native.Side(bases=bases.data_ptr(), indices=indices.data_ptr(),
                        page_size=addressing.page_size, page_stride=addressing.page_stride,
                        slot_stride=addressing.slot_stride, chunk_stride=chunk_stride)
