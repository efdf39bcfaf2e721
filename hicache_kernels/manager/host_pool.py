"""The host tier: one mmap'd region holding K and V in any host layout, pinned in place.

PyTorch's pinned allocator rounds sizes up to a power of two (20 GiB becomes
32) and some drivers refuse single pinned allocations above a few GiB, so the
pool is plain anonymous memory from ``mmap`` (optionally on huge pages and
bound to one NUMA node) registered with ``cudaHostRegister``: exactly the size
asked for, any size. Without a GPU it stays plain memory and a warning says so.

Example:
    >>> lay = KVLayout("page_first", num_layers=2, num_slots=64, head_num=2,
    ...                head_dim=8, dtype=torch.bfloat16, page_size=16)
    >>> with HostPool(lay, pin=False, reserve_gb=0) as pool:
    ...     pool.buffer.k.shape
    torch.Size([64, 2, 2, 8])
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import platform
from functools import cached_property

import numpy as np
import torch

from ..buffers import KVBuffer
from ..layouts import KVLayout

__all__ = ["HostPool", "host_pool_slots", "available_memory_bytes", "check_host_memory"]

log = logging.getLogger("hicache_kernels.manager")

HUGE_PAGES = ("none", "transparent", "hugetlb")
_HUGETLB_PAGE = 2 << 20          # the usual explicit huge page size (x86-64, arm64 4K kernels)
_MAP_HUGETLB = 0x40000
_MPOL_BIND = 2
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259}


def host_pool_slots(device_slots: int, bytes_per_slot: int, page_size: int, *,
                    hicache_ratio: float = 2.0, hicache_size: float | None = None) -> int:
    """Host pool size in token slots, SGLang's way: ``hicache_size`` GB (10^9 bytes)
    when given, else ``hicache_ratio`` times the device pool; whole pages.

    >>> host_pool_slots(1000, 4096, 64, hicache_ratio=2.0)
    1984
    >>> host_pool_slots(1000, 4096, 64, hicache_size=1)    # 1e9 / 4096 = 244140.6
    244096
    """
    if hicache_size is not None:
        if not hicache_size > 0:
            raise ValueError(f"hicache_size: expected a positive size in GB, got {hicache_size!r}")
        slots = round(hicache_size * 1e9) // bytes_per_slot   # whole bytes: no float floor
        asked = f"hicache_size={hicache_size} GB"
    else:
        if not hicache_ratio > 0:
            raise ValueError(f"hicache_ratio: expected a positive ratio, got {hicache_ratio!r}")
        slots = int(device_slots * hicache_ratio)
        asked = f"hicache_ratio={hicache_ratio}"
    slots -= slots % page_size
    if slots < page_size:
        raise ValueError(f"{asked}: gives {slots} host slots, less than one page of {page_size}")
    return slots


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_host_memory(layout: KVLayout, reserve_gb: float, *, lower: str) -> None:
    """MemoryError, before any memory is touched, if a host pool of ``layout`` would
    leave less than ``reserve_gb`` GiB available; ``lower`` names the options to lower."""
    nbytes = layout.total_bytes
    available = available_memory_bytes()
    if nbytes + int(reserve_gb * 2**30) > available:
        raise MemoryError(
            f"host pool: needs {nbytes / 2**30:.2f} GiB ({layout.num_slots} tokens) but only "
            f"{available / 2**30:.2f} GiB is available and {reserve_gb:g} GiB is kept in "
            f"reserve; lower {lower}")


class HostPool:
    """K and V of ``layout`` in one anonymous mapping, pinned when a GPU is present.

    Args:
        layout: the host layout (any kind); K and V are stored like SGLang's
            host pool, one ``[2, *layout.shape]`` region (``layout.shape`` for MLA).
        pin: register with ``cudaHostRegister``. None pins when CUDA is
            available; without CUDA the pool is plain memory and a warning is logged.
        huge_pages: ``"none"``; ``"transparent"`` (``madvise(MADV_HUGEPAGE)``:
            fewer TLB misses and faster pinning, no setup); ``"hugetlb"``
            (``MAP_HUGETLB``: needs pages reserved in /proc/sys/vm/nr_hugepages).
        numa_node: bind the memory to this NUMA node (the GPU's, for the
            shortest path); None leaves the kernel's first-touch policy.
        reserve_gb: GiB that must stay available to the rest of the machine;
            the pool fails early, before touching memory, if it would eat into it.
    """

    def __init__(self, layout: KVLayout, *, pin: bool | None = None, huge_pages: str = "none",
                 numa_node: int | None = None, reserve_gb: float = 4.0):
        if huge_pages not in HUGE_PAGES:
            raise ValueError(f"huge_pages: expected one of {', '.join(HUGE_PAGES)}, got {huge_pages!r}")
        self.layout = layout
        self.nbytes = layout.total_bytes
        self.huge_pages = huge_pages
        self.numa_node = numa_node
        self._registered = False
        if isinstance(reserve_gb, bool) or not isinstance(reserve_gb, (int, float)) \
                or not 0 <= reserve_gb < math.inf:
            raise ValueError(f"reserve_gb: expected a number of GiB >= 0, got {reserve_gb!r}")
        check_host_memory(layout, reserve_gb, lower="the layout's size or reserve_gb")
        self._map = self._mmap()
        try:
            # Through a memoryview: every tensor over the pool then holds a buffer export,
            # so the mapping cannot be unmapped under a live tensor (close() says so instead).
            self._data = torch.frombuffer(memoryview(self._map), dtype=torch.uint8)[: self.nbytes]
            if numa_node is not None:
                _bind_to_node(self._data.data_ptr(), len(self._map), numa_node)
            self.pin_status = self._register(pin)
            shape = layout.shape if layout.mla else (2, *layout.shape)
            planes = self._data.view(layout.dtype).view(shape)
            self.buffer = _HostBuffer(layout, planes) if layout.mla \
                else _HostBuffer(layout, planes[0], planes[1])
            self.buffer.registered = self._registered
        except BaseException:
            self.close()
            raise

    # -- what the manager and a storage tier read -------------------------------------
    @property
    def pinned(self) -> bool:
        return self._registered

    @property
    def base_address(self) -> int:
        """Address of byte 0 (K plane first, then V), for registering with a storage tier."""
        return self._data.data_ptr()

    @property
    def plane_bytes(self) -> int:
        return self.layout.plane_bytes

    @cached_property
    def _page_runs(self) -> list[tuple[int, int]]:
        runs = self.layout.page_byte_runs()
        planes = self.layout.num_planes_per_layer
        return [(plane * self.plane_bytes + off, n) for plane in range(planes) for off, n in runs]

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, K and V."""
        return sum(n for _, n in self._page_runs)

    def page_runs(self, page: int) -> list[tuple[int, int]]:
        """``(offset from base_address, nbytes)`` runs holding host page ``page``, K then V."""
        shift = self.layout.plane_addressing().item_offset(page * self.layout.page_size)
        return [(off + shift, n) for off, n in self._page_runs]

    def read_pages(self, pages: np.ndarray) -> torch.Tensor:
        """Copy of pages ``[n, page_bytes]`` uint8 (a storage tier's ``set`` source)."""
        out = torch.empty((len(pages), self.page_bytes), dtype=torch.uint8)
        for i, page in enumerate(pages):
            out[i] = torch.cat([self._data[o:o + n] for o, n in self.page_runs(int(page))])
        return out

    def write_pages(self, pages: np.ndarray, data: torch.Tensor) -> None:
        """Fill pages from ``data`` ``[n, page_bytes]`` uint8 (a storage tier's ``get``)."""
        if tuple(data.shape) != (len(pages), self.page_bytes) or data.dtype != torch.uint8:
            raise ValueError(f"data: expected uint8 [{len(pages)}, {self.page_bytes}], "
                             f"got {data.dtype} {list(data.shape)}")
        for i, page in enumerate(pages):
            at = 0
            for o, n in self.page_runs(int(page)):
                self._data[o:o + n] = data[i, at:at + n]
                at += n

    def describe(self) -> str:
        lay = self.layout
        pin = "pinned (cudaHostRegister)" if self.pinned else f"not pinned ({self.pin_status})"
        numa = f"NUMA node {self.numa_node}" if self.numa_node is not None else "NUMA: first touch"
        return (f"{lay.num_slots} tokens, {self.nbytes / 2**30:.3f} GiB, {lay.kind.value}, {pin}, "
                f"{numa}, huge pages: {self.huge_pages}")

    # -- lifetime ---------------------------------------------------------------------
    def close(self, *, quiet: bool = False) -> None:
        """Unregister and unmap. Views still held elsewhere keep the memory (unpinned) alive."""
        if getattr(self, "buffer", None) is not None:
            self.buffer.registered = False
        if self._registered:
            err = torch.cuda.cudart().cudaHostUnregister(self._data.data_ptr())
            if int(err) != 0:
                log.warning("cudaHostUnregister failed (error %s)", int(err))
            self._registered = False
        self.buffer = None
        self._data = None
        self.__dict__.pop("_page_runs", None)
        mapping, self._map = getattr(self, "_map", None), None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                if not quiet:
                    log.warning("host pool: tensors still refer to the pool; "
                                "it is unmapped when they go")

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_map", None) is not None:
                self.close(quiet=True)
        except Exception:
            pass

    # -- setup steps --------------------------------------------------------------------
    def _mmap(self) -> mmap.mmap:
        flags = mmap.MAP_PRIVATE
        size = max(self.nbytes, 1)
        if self.huge_pages == "hugetlb":
            size = -(-size // _HUGETLB_PAGE) * _HUGETLB_PAGE
            flags |= _MAP_HUGETLB
        try:
            mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            hint = " (are huge pages reserved in /proc/sys/vm/nr_hugepages?)" \
                if self.huge_pages == "hugetlb" else ""
            raise MemoryError(f"host pool: mmap of {size / 2**30:.2f} GiB failed: {exc}{hint}") from exc
        if self.huge_pages == "transparent":
            mapping.madvise(mmap.MADV_HUGEPAGE)
        if hasattr(mmap, "MADV_DONTFORK"):
            # a fork()ed child (a worker, a subprocess before exec) would otherwise get a
            # copy-on-write mapping of the pool, and copy every pinned page it touches
            mapping.madvise(mmap.MADV_DONTFORK)
        return mapping

    def _register(self, pin: bool | None) -> str:
        if not torch.cuda.is_available():
            if pin:
                raise RuntimeError("pin: cudaHostRegister needs a CUDA device, and none is available")
            if pin is None:
                log.warning("host pool: no CUDA device, using plain (unpinned) memory")
            return "no CUDA device"
        if pin is False:
            return "pin=False"
        err = torch.cuda.cudart().cudaHostRegister(self._data.data_ptr(), self.nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(
                f"host pool: cudaHostRegister of {self.nbytes / 2**30:.2f} GiB failed (cudaError "
                f"{int(err)}); check the locked-memory limit (ulimit -l) or pass pin=False"
            )
        self._registered = True
        return "cudaHostRegister"


class _HostBuffer(KVBuffer):
    """The pool's KVBuffer: pinned exactly when the pool registered it (``is_pinned``
    must not depend on how torch classifies ``cudaHostRegister``-ed memory)."""

    registered = False

    def is_pinned(self) -> bool:
        return self.registered


def _bind_to_node(address: int, nbytes: int, node: int) -> None:
    """``mbind(MPOL_BIND)`` before first touch, so every page lands on ``node``."""
    if not isinstance(node, int) or isinstance(node, bool) or node < 0:
        raise ValueError(f"numa_node: expected a non-negative int, got {node!r}")
    if not os.path.isdir(f"/sys/devices/system/node/node{node}"):
        nodes = sorted(n for n in os.listdir("/sys/devices/system/node") if n.startswith("node")) \
            if os.path.isdir("/sys/devices/system/node") else []
        raise ValueError(f"numa_node: node {node} does not exist here (nodes: {', '.join(nodes) or 'none'})")
    number = _SYS_MBIND.get(platform.machine())
    if number is None:
        raise RuntimeError(f"numa_node: binding is not supported on {platform.machine()}")
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(number), ctypes.c_void_p(address), ctypes.c_ulong(nbytes),
                      ctypes.c_int(_MPOL_BIND), mask, ctypes.c_ulong(words * 64 + 1), ctypes.c_uint(0))
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"numa_node: mbind to node {node} failed: {os.strerror(errno)}")
