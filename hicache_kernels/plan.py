"""TransferPlan: one resolved copy job, the currency between the ops layer and backends.

A transfer copies items ``src_indices[i] -> dst_indices[i]`` in each of
``num_planes`` planes (a plane is one layer of K or of V). Each side is a
:class:`PlaneSet`: the planes' base addresses plus how items are addressed
inside a plane (:class:`~hicache_kernels.layouts.PlaneAddressing`, which only
:mod:`hicache_kernels.layouts` computes). A negative index on either side means
padding: the item is skipped.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .layouts import PlaneAddressing, _pow2_alignment

__all__ = ["PlaneSet", "TransferPlan", "address_table", "tensor_at", "indices_to"]


@dataclass
class PlaneSet:
    """One side of a transfer: the planes it touches, in order.

    Attributes:
        name: what the caller called this side, for error messages ("dst_k").
        addressing: byte addressing of items inside one plane.
        bases: base address of each plane, as python ints, or an int64/uint64
            tensor (SGLang's address tables; assumed 8-byte aligned).
        device: where the memory lives.
        views: ``views(min_slots)`` builds the uint8 views ``[pages, P, H, head_bytes]``
            of each plane that the reference backend indexes (torch shapes, not
            our formula); ``min_slots`` sizes views over raw addresses.
        num_slots: slots in each plane, for bounds checks; None when unknown
            (raw address tables).
        pinned: for host memory, whether it is page-locked.
    """

    name: str
    addressing: PlaneAddressing
    bases: Sequence[int] | torch.Tensor
    device: torch.device
    views: Callable[[int], list[torch.Tensor]]
    num_slots: int | None
    pinned: bool = False

    def __len__(self) -> int:
        return len(self.bases)


@dataclass
class TransferPlan:
    """Everything a backend needs, resolved and validated.

    An item is ``head_num`` chunks of ``head_bytes`` (merged into one chunk when
    both sides keep an item's heads adjacent).
    """

    src: PlaneSet
    dst: PlaneSet
    head_num: int
    head_bytes: int
    label: str = "transfer"
    _alignment: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.src) != len(self.dst):
            raise ValueError(
                f"{self.dst.name}: expected {len(self.src)} planes to match {self.src.name}, "
                f"got {len(self.dst)}"
            )

    @property
    def num_planes(self) -> int:
        return len(self.src)

    @property
    def item_bytes(self) -> int:
        return self.head_num * self.head_bytes

    @property
    def device(self) -> torch.device:
        """Where a kernel for this plan runs: the CUDA side's device, else cpu."""
        for side in (self.dst, self.src):
            if side.device.type == "cuda":
                return side.device
        return self.src.device

    def views(self, src_slots: int, dst_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per plane, ``(src_view, dst_view)`` covering at least the given slots."""
        return list(zip(self.src.views(src_slots), self.dst.views(dst_slots)))

    def chunks(self) -> tuple[int, int, int, int]:
        """``(n_chunks, chunk_bytes, src_chunk_stride, dst_chunk_stride)``:
        whole items when both sides keep heads adjacent, else one chunk per head."""
        hb = self.head_bytes
        s, d = self.src.addressing, self.dst.addressing
        if self.head_num == 1 or (s.head_stride == hb and d.head_stride == hb):
            return 1, self.item_bytes, 0, 0
        return self.head_num, hb, s.head_stride, d.head_stride

    def alignment(self, *, table_bases: int | None = 8) -> int:
        """Largest power of two (<= 16) dividing every address the copy touches.

        Bases given as tensors (address tables) are not read here; they are
        assumed ``table_bases``-aligned, or left out with ``table_bases=None``
        (for kernels that check those bases' alignment themselves).
        """
        if self._alignment is None:
            self._alignment = {}
        if table_bases not in self._alignment:
            _, chunk_bytes, scs, dcs = self.chunks()
            values = [chunk_bytes, scs, dcs]
            for side in (self.src, self.dst):
                a = side.addressing
                values += [a.page_stride, a.slot_stride]
                if not isinstance(side.bases, torch.Tensor):
                    values += list(side.bases)
                elif table_bases is not None:
                    values.append(table_bases)
            self._alignment[table_bases] = _pow2_alignment(*values)
        return self._alignment[table_bases]

    @property
    def bases_known(self) -> bool:
        """Whether every plane base is a python int (not an address table on a device)."""
        return not any(isinstance(side.bases, torch.Tensor) for side in (self.src, self.dst))

    @property
    def bytes_per_item(self) -> int:
        """Bytes moved per index, over all planes (for GB/s figures)."""
        return self.item_bytes * self.num_planes


# Address tables are keyed by their contents, so a cached table is never stale:
# the same addresses always make the same table.
_TABLE_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TABLE_CACHE_SIZE = 4096
# Per device, a stream of its own for copying new tables (nothing else is queued there).
_TABLE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def address_table(bases: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Plane base addresses as a contiguous int64 tensor on ``device``, cached.

    A new table is copied from pinned memory on a stream of its own and waited
    for there, so it is ready for every stream without waiting for work queued
    on the caller's. It cannot be made during CUDA graph capture: run the
    transfer once before capturing.
    """
    if isinstance(bases, torch.Tensor):
        table = bases.view(torch.int64) if bases.dtype == torch.uint64 else bases
        return table.to(device=device, dtype=torch.int64).contiguous()
    key = (device, tuple(bases))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _new_table(bases, device)
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def _new_table(bases: Sequence[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(list(bases), dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"address tables: a new table of {len(host)} plane bases cannot be copied to {device} "
            "while a CUDA graph is being captured; run the transfer once before capturing")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _TABLE_STREAMS.get(index)
    if stream is None:
        stream = _TABLE_STREAMS[index] = torch.cuda.Stream(index)
    with torch.cuda.stream(stream):
        table = host.pin_memory().to(device, non_blocking=True)
    stream.synchronize()  # this copy only: the caller's stream is not waited for
    return table


def indices_to(indices: torch.Tensor, device: torch.device, name: str = "indices") -> torch.Tensor:
    """``indices`` on ``device``, queued on the current stream without blocking the CPU.

    From pageable host memory CUDA synchronizes the stream before copying (the CPU
    would wait for everything queued there); from pinned memory the copy is queued,
    and torch keeps the pinned block until it has run.

    CPU indices cannot go to a GPU while a CUDA graph is being captured: the
    captured copy would read a pinned staging buffer that returns to torch's cache
    when this call ends, so each replay could copy whatever it holds by then. That
    raises a RuntimeError naming ``name``, and nothing is copied.
    """
    if indices.device == device:
        return indices
    if indices.device.type == "cpu" and device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{name}: CPU indices cannot be used while a CUDA graph is being captured (the "
                "graph would copy them from a temporary buffer on every replay); pass indices "
                f"on {device}, a tensor that lives as long as the graph, updated in place before "
                "each replay")
        if not indices.is_pinned():
            indices = indices.pin_memory()
    return indices.to(device, non_blocking=True)


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` to wrap raw device memory."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3,
        }


def tensor_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of existing memory at ``address``.

    Used only where SGLang hands us raw addresses (``*_layers`` tables) and the
    reference backend needs something torch can index.
    """
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        return torch.as_tensor(_CudaArray(address, nbytes), device=device)
    buf = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(buf, dtype=torch.uint8)
