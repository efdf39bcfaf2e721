"""The copy-engine backend: runs contiguous on both sides, issued as memcpys (0 SMs).

Items are merged into runs wherever consecutive items are byte-adjacent on
both sides (within a plane; a paged layout's run therefore ends at its page
boundary unless the next page truly follows in memory), then every plane's
runs go to ``cudaMemcpyBatchAsync`` (resolved from the driver at run time; one
``cudaMemcpyAsync`` per run where it is missing or inside CUDA graph capture),
at most ``max_descriptors_per_call`` per call, spread over helper streams
joined back to the caller's stream by events, sources read in stream order.

Indices are read on the host (``host_indices``): CPU indices cost nothing,
device indices one synchronising copy (and cannot be used during graph capture).

Example:
    >>> t = Transfer(host, dev, layers=0, backend="copy_engine")
    >>> t(torch.arange(0, 64), torch.arange(128, 192))   # one 64-item run per plane
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ..plan import PlaneSet, TransferPlan, address_table
from . import _native, thresholds

name = "copy_engine"
host_indices = True  # descriptors are built on the host

_CPU = torch.device("cpu")


def available() -> tuple[bool, str]:
    index, info, why = _native.current_device_info()
    if info is None:
        return False, why
    how = {13000: "cudaMemcpyBatchAsync (CUDA 13 API)", 12080: "cudaMemcpyBatchAsync (CUDA 12.8 API)"}.get(
        info.batch_api, "one cudaMemcpyAsync per run (the driver has no cudaMemcpyBatchAsync)")
    return True, f"{how} over merged runs, {info.copy_engines} copy engines on cuda:{index}"


@dataclass
class Runs:
    """Runs of bytes contiguous on both sides, the same in every plane.

    Attributes (int64 CPU tensors ``[n_runs]``): byte offsets from each plane's
    base on the source and destination, and each run's length in bytes.
    """

    src_offsets: torch.Tensor
    dst_offsets: torch.Tensor
    nbytes: torch.Tensor

    def __len__(self) -> int:
        return self.nbytes.numel()

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / len(self) if len(self) else 0.0


def merge_runs(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor) -> Runs:
    """Merge items ``src_indices[i] -> dst_indices[i]`` (int64 CPU; negative =
    skip) into runs contiguous on both sides, in item order.

    Example: layer-first 2 KiB items ``[4, 5, 6, 9] -> [0, 1, 2, 3]`` give runs of
    6144 and 2048 bytes.
    """
    keep = (src_indices >= 0) & (dst_indices >= 0)
    src, dst = src_indices[keep], dst_indices[keep]
    n_chunks, chunk_bytes, src_cs, dst_cs = plan.chunks()
    src_off = plan.src.addressing.item_offsets(src)
    dst_off = plan.dst.addressing.item_offsets(dst)
    if n_chunks > 1:  # one row per (item, head)
        heads = torch.arange(n_chunks, dtype=torch.int64)
        src_off = (src_off[:, None] + heads * src_cs).reshape(-1)
        dst_off = (dst_off[:, None] + heads * dst_cs).reshape(-1)
    n = src_off.numel()
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return Runs(empty, empty, empty)
    # row r continues row r-1's run when it starts where that one ends on both sides
    follows = ((src_off[1:] - src_off[:-1]) == chunk_bytes) & ((dst_off[1:] - dst_off[:-1]) == chunk_bytes)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = ~follows
    first = starts.nonzero().squeeze(1)
    lengths = torch.diff(first, append=torch.tensor([n]))
    return Runs(src_off[first], dst_off[first], lengths * chunk_bytes)


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    del sm_budget, num_warps  # copy engines take no SMs
    for what, idx in (("src_indices", src_indices), ("dst_indices", dst_indices)):
        if idx.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what}: the copy-engine backend builds its copies on the host; "
                               "during CUDA graph capture pass CPU indices")
    issue(plan, merge_runs(plan, src_indices.cpu(), dst_indices.cpu()), stream=stream)


def issue(plan: TransferPlan, runs: Runs, *, stream: "torch.cuda.Stream | None" = None,
          force_per_run: bool = False) -> _native.MemcpyDesc:
    """Copy ``runs`` in every plane of ``plan`` on ``stream``; returns the filled
    descriptor (``used_streams``, ``used_batch`` say how it went)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"backend: 'copy_engine' is not available here: {why}")
    device = plan.device
    if device.type != "cuda":
        raise RuntimeError(f"backend: 'copy_engine' needs a CUDA side; {plan.src.name} and "
                           f"{plan.dst.name} are both on {device}")
    desc = _native.MemcpyDesc(device=device.index)
    if len(runs) == 0 or plan.num_planes == 0:
        return desc
    dsts, srcs, sizes = descriptors(plan, runs)
    th = thresholds.current(device)
    torch_stream = stream if stream is not None else torch.cuda.current_stream(device)
    desc.dsts, desc.srcs, desc.sizes = dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr()
    desc.count = sizes.numel()
    desc.max_per_call = th.max_descriptors_per_call
    desc.bytes_per_stream = th.bytes_per_stream
    desc.max_streams = th.copy_engine_streams
    desc.force_per_run = int(force_per_run)
    desc.prefer_overlap = int(th.prefer_overlap)
    desc.stream = torch_stream.cuda_stream
    lib = _native.library()[0]
    _native.check(lib.hck_memcpy_runs(ctypes.byref(desc)), f"backend 'copy_engine': {plan.label}")
    return desc


def descriptors(plan: TransferPlan, runs: Runs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dsts, srcs, sizes)``: int64 CPU tensors ``[num_planes * n_runs]``, plane by
    plane, the addresses and lengths the copy engines are given."""
    srcs = (_host_bases(plan.src)[:, None] + runs.src_offsets[None, :]).reshape(-1)
    dsts = (_host_bases(plan.dst)[:, None] + runs.dst_offsets[None, :]).reshape(-1)
    return dsts, srcs, runs.nbytes.repeat(plan.num_planes)


def _host_bases(side: PlaneSet) -> torch.Tensor:
    """Plane base addresses as an int64 CPU tensor (a device table costs one sync)."""
    return address_table(side.bases, _CPU)
