"""HiCacheManager: which pages live where, and moving them without ever losing a byte.

The manager owns a host pool, one page allocator per pool, a page table keyed
by the caller's page ids, and two streams of its own (load: host -> device,
backup: device -> host). It calls the ops layer's prepared
:class:`~hicache_kernels.ops.Transfer` objects (one per layer for loads, one
over all layers for backups), never kernels.

Ordering rules, enforced here so callers cannot get them wrong:

1. A backup waits for the stream that produced the KV (the compute stream,
   or ``producer=``) before reading the device pages.
2. A load waits for the compute stream before overwriting device slots that
   may have been used before (work queued there may still read or write them).
3. A host slot stays locked until every load reading it has completed.
4. A device slot is not released before the backup reading it has completed
   (the write_back eviction path, and evicting during a write-through backup).

Also always on: a slot written by a transfer is not reused before it
completes, and a load of a page whose backup is still running waits for it.

Rules 3 and 4 (and the always-on locks) are page locks in
:class:`~hicache_kernels.manager.pages.PageAllocator`: a page freed while
locked is reused only after its last transfer finishes.

Example (CPU emulation; on a GPU pass a CUDA device pool):
    >>> lay = KVLayout("layer_first", num_layers=2, num_slots=64, head_num=2,
    ...                head_dim=8, dtype=torch.bfloat16, page_size=16)
    >>> dev = KVBuffer.allocate(lay)
    >>> mgr = HiCacheManager(dev, hicache_ratio=2.0, backend="reference", host_reserve_gb=0)
    >>> slots = mgr.alloc_device(["a", "b"])     # token slots; the model writes KV there
    >>> op = mgr.hit(["a", "b"])                 # write_through: backed up on first hit
    >>> mgr.synchronize(); [a.kind for a in mgr.poll()]
    ['backup']
    >>> mgr.evict_device(["a"])
    ['a']
    >>> handle = mgr.load(["a"])                 # back to the device, layer by layer
    >>> handle.wait(0)                           # the current stream waits for layer 0
    >>> handle.synchronize(); [a.kind for a in mgr.poll()]
    ['load']
    >>> mgr.lookup(["a"])
    [<PageState.DEVICE|HOST: 3>]
    >>> mgr.close()
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import numbers
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass, fields
from itertools import repeat
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from ..buffers import KVBuffer
from ..layouts import KVLayout, LayoutKind
from ..nvtx_ranges import enabled as _nvtx_enabled, nvtx_range
from ..ops import Transfer, prepare_layers
from ..plan import indices_to
from .device import CudaDevice, Device, EmulatedDevice
from .host_pool import HostPool, check_host_memory, host_pool_slots
from .observer import observer_of
from .pages import (BACKING_UP, DEVICE, FETCHING, HOST, LOADING, PINNED, OutOfPages,
                    PageAllocator, PageEntry, PageTable, clear_mask, unhashable_error)
from .policy import WritePolicy, device_victims, host_victims
from .tp import TensorParallel

try:   # the compiled common case of a load's page-table work (setup.py builds it)
    from . import _fastload
except ImportError:
    _fastload = None

__all__ = ["HiCacheConfig", "HiCacheManager", "LoadHandle", "Ack", "Eviction", "PageState",
           "OutOfPages"]

log = logging.getLogger("hicache_kernels.manager")
_NULL = contextlib.nullcontext()
_NO_ROWS = np.empty(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False


@dataclass
class HiCacheConfig:
    """Options of :class:`HiCacheManager` (all may also be passed as keywords to it)."""

    page_size: int | None = None
    """tokens per page; None: the device pool layout's page_size. A layer_first device
    pool (SGLang's per-layer tensors) may use any page size."""
    hicache_ratio: float = 2.0
    """host pool size as a multiple of the device pool (SGLang's --hicache-ratio)."""
    hicache_size: float | None = None
    """host pool size in GB (10^9 bytes); overrides hicache_ratio (SGLang's --hicache-size)."""
    host_layout: str = "layer_first"
    """host layout kind: layer_first, page_first, page_first_direct or page_head."""
    write_policy: str = "write_through"
    """write_through, write_through_selective or write_back (see policy.py)."""
    write_through_threshold: int | None = None
    """hits before a backup; None: 1 for write_through, 2 for write_through_selective."""
    backend: str = "auto"
    """transfer backend for both directions (ops.Transfer's backend)."""
    sm_budget: int | None = None
    """most SMs a transfer kernel may occupy; transfers share SMs with the forward pass."""
    num_warps: int | None = None
    """warps per block/program of a kernel backend."""
    load_priority: int | None = None
    """load stream priority; None: the highest (loads are on the forward's critical path)."""
    backup_priority: int | None = None
    """backup stream priority; None: the lowest (backups only need to finish eventually)."""
    pin_memory: bool | None = None
    """cudaHostRegister the host pool; None: when CUDA is available."""
    huge_pages: str = "none"
    """none, transparent (madvise) or hugetlb (MAP_HUGETLB) for the host pool."""
    numa_node: int | None = None
    """bind the host pool to this NUMA node (the GPU's); None: first-touch."""
    host_reserve_gb: float = 4.0
    """GiB of host memory the pool must leave free; it fails early otherwise."""
    storage_write_through: bool = True
    """with a storage tier, write each page to it once its backup reaches host."""
    tp_rank: int = 0
    """this rank of a tensor-parallel group (storage prefetch agrees across ranks)."""
    tp_size: int = 1
    """ranks in the tensor-parallel group; > 1 needs torch.distributed (``tp_group``)."""


class PageState(enum.IntFlag):
    """Where a page is (``lookup``). 0 (``ABSENT``): not in the table."""

    ABSENT = 0
    DEVICE = 1          # a device copy (complete unless LOADING)
    HOST = 2            # a host copy (complete unless BACKING_UP or FETCHING)
    LOADING = 4         # the device copy is arriving from host
    BACKING_UP = 8      # the host copy is arriving from device
    FETCHING = 16       # the host copy is arriving from storage
    PINNED = 32         # pinned by the caller: never evicted from the device


# the table's state bits are PageState's values: lookup() maps each code through this list
_STATES = [PageState(code) for code in range(64)]
assert (PageState.DEVICE, PageState.HOST, PageState.LOADING, PageState.BACKING_UP,
        PageState.FETCHING, PageState.PINNED) == (DEVICE, HOST, LOADING, BACKING_UP, FETCHING,
                                                  PINNED)
_NOT_LOADING, _NOT_BACKING_UP = clear_mask(LOADING), clear_mask(BACKING_UP)
# a page can be loaded when its state, masked so, is HOST: a host copy that nothing is
# filling from storage, and no device copy
_LOAD_MASK = DEVICE | HOST | FETCHING
# load()'s check as one byte translation of the rows' states: 0 loadable,
# 1 loadable once the backup still writing its host copy lands, 2 not loadable
_LOADABLE = bytes(2 if (s & _LOAD_MASK) != HOST else 1 if s & BACKING_UP else 0 for s in range(256))
# a state with DEVICE and LOADING set, as a lookup table (a take is cheaper than a ufunc here)
_ON_LOAD = (np.arange(256) | DEVICE | LOADING).astype(np.uint8)


@dataclass(frozen=True)
class Ack:
    """A finished transfer reported by :meth:`HiCacheManager.poll`.

    ``kind``: ``"load"``, ``"backup"``, ``"prefetch"`` (storage -> host) or
    ``"store"`` (host -> storage). ``failed``: ids a storage op could not move.
    """

    kind: str
    op_id: int
    page_ids: tuple
    failed: tuple = ()


@dataclass(frozen=True)
class Eviction:
    """What an eviction did, passed to ``on_evict``: ``page_ids`` left ``tier``;
    ``removed`` (a subset) are no longer held anywhere and left the page table."""

    tier: str
    page_ids: tuple
    removed: tuple


@dataclass
class _Rules:
    """The ordering rules (module docstring). Private: tests switch one off to
    prove the stateful test notices."""

    backup_waits_producer: bool = True
    load_waits_compute: bool = True
    host_locked_during_load: bool = True
    device_locked_during_backup: bool = True
    host_locked_during_storage: bool = True


class _Op:
    """A transfer in flight: the pages it reads and writes, in order (``rows``:
    their page-table rows, ``page_ids``: their ids)."""

    __slots__ = ("op_id", "rows", "page_ids", "host_pages", "device_pages", "extra_events",
                 "removals")

    def __init__(self, op_id, rows, page_ids, host_pages, device_pages, removals):
        self.op_id = op_id
        self.rows = rows
        self.page_ids = page_ids
        self.host_pages = host_pages
        self.device_pages = device_pages
        self.extra_events: list = []     # events this op waited on, recycled when it retires
        self.removals = removals         # the table's removal count when the op started

    def own_rows(self, table: PageTable, op_ids: np.ndarray) -> np.ndarray:
        """The op's rows that are still its own (``op_ids``: the table's load_id or
        backup_id column): a row freed meanwhile may belong to another page now."""
        if table.removals == self.removals:
            return self.rows            # nothing left the table since the op started
        return self.rows[op_ids.take(self.rows) == self.op_id]


class LoadHandle(_Op):
    """A load in flight: one event per layer.

    Attributes:
        op_id: matches the ``Ack`` that :meth:`HiCacheManager.poll` reports.
        page_ids: the pages, in order.
        device_pages, host_pages: the pages written on the device and read on
            the host (int64 numpy), in ``page_ids`` order.
    """

    __slots__ = ("_manager", "_device", "_events", "_host_locked", "_done", "_src", "_dst",
                 "_device_indices")

    def __init__(self, op_id, page_ids, rows, host_pages, device_pages, removals, manager):
        # _Op's fields set here too: this runs on every load()
        self.op_id = op_id
        self.rows = rows
        self.page_ids = page_ids
        self.host_pages = host_pages
        self.device_pages = device_pages
        self.extra_events: list = []
        self.removals = removals
        self._manager = manager
        self._device = manager.device
        self._events: list = []
        self._host_locked = False
        self._done = False
        self._src = self._dst = None       # the indices the layer transfers read
        self._device_indices = None

    @property
    def device_indices(self) -> torch.Tensor:
        """int64 ``[len(page_ids) * page_size]`` token slots on the device where the
        pages land (page ``i`` at ``[i*P, (i+1)*P)``); made on first use."""
        if self._device_indices is None:
            self._device_indices = self._manager._device_tokens(self.device_pages)
        return self._device_indices

    def _make_indices(self, stream) -> tuple[torch.Tensor, torch.Tensor]:
        mgr = self._manager
        self._src, self._dst = mgr._transfer_indices(self.device_pages, self.host_pages, stream,
                                                     to_device=True)
        if not mgr._by_page:   # token slots: the same tensor is device_indices
            self._device_indices = self._dst
            if mgr._cuda:
                # the model reads them on its stream: keep the allocator from reusing them early
                self._dst.record_stream(mgr.compute_stream)
        return self._src, self._dst

    @property
    def host_indices(self) -> torch.Tensor:
        """The token slots (CPU) read from the host pool."""
        return self._manager._host_tokens(self.host_pages)

    @property
    def num_layers(self) -> int:
        return len(self._events)

    @property
    def done(self) -> bool:
        """Whether :meth:`HiCacheManager.poll` has reported this load finished."""
        return self._done

    def wait(self, layer: int, stream=None) -> None:
        """Make ``stream`` (default: the current stream) wait until ``layer`` has
        landed; the CPU does not block. Later layers may still be in flight."""
        if type(layer) is not int or not 0 <= layer < len(self._events):
            layer = self._layer(layer)
        if self._done:
            return
        dev = self._device
        if stream is None:
            stream = dev.current_stream()
        if _nvtx_enabled():
            with nvtx_range(f"hicache.wait L{layer} n={len(self.page_ids) * self._manager.page_size}"):
                dev.wait(stream, self._events[layer])
        else:
            dev.wait(stream, self._events[layer])

    def wait_all(self, stream=None) -> None:
        """:meth:`wait` for the last layer (layers land in order)."""
        if not self._done:
            self.wait(len(self._events) - 1, stream)

    def query(self, layer: int | None = None) -> bool:
        """Whether ``layer`` (default: all) has landed, without blocking."""
        layer = -1 if layer is None else self._layer(layer)
        if self._done:
            return True
        return self._device.query(self._events[layer])

    def _layer(self, layer) -> int:
        """``layer`` as an index of this load's layers; TypeError or IndexError names it."""
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer: expected an int, got {layer!r}")
        n = len(self._events)
        if not 0 <= layer < n:
            raise IndexError(f"layer: expected 0 <= layer < {n}, got {layer}")
        return int(layer)

    def synchronize(self) -> None:
        """Block the CPU until every layer has landed."""
        if not self._done:
            self._device.synchronize(self._events[-1])

    def __repr__(self) -> str:
        return f"LoadHandle(op {self.op_id}, {len(self.page_ids)} pages, done={self._done})"


class _Backup(_Op):
    __slots__ = ("event", "device_locked")

    def __init__(self, op_id, rows, page_ids, host_pages, device_pages, removals):
        super().__init__(op_id, rows, page_ids, host_pages, device_pages, removals)
        self.event = None
        self.device_locked = False


class _StorageOp:
    __slots__ = ("op_id", "kind", "entries", "host_pages", "pending", "host_locked")

    def __init__(self, op_id, kind, entries, host_pages, pending):
        self.op_id = op_id
        self.kind = kind              # "prefetch" or "store"
        self.entries = entries
        self.host_pages = host_pages
        self.pending = pending        # a sequence of bools, or an object with poll()
        self.host_locked = False


_HOST_LAYOUTS = tuple(kind.value for kind in LayoutKind)


def _page_size(asked: int | None, device_layout: KVLayout) -> int:
    if asked is None:
        return device_layout.page_size
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise ValueError(f"page_size: expected a positive int or None, got {asked!r}")
    if device_layout.paged and asked != device_layout.page_size:
        raise ValueError(f"page_size: the device pool is {device_layout.kind.value} with pages of "
                         f"{device_layout.page_size} tokens, got {asked}")
    if asked > device_layout.num_slots:
        raise ValueError(f"page_size: {asked} is larger than the device pool "
                         f"({device_layout.num_slots} slots)")
    return asked


def _storage_result(pending):
    """A storage op's per-page bools once it has ended, else None."""
    return pending.poll() if hasattr(pending, "poll") else pending


def _wait_storage_op(pending, timeout_s: float = 60.0) -> None:
    """Block until a storage op finishes: its ``wait()`` if it has one, else poll."""
    if not hasattr(pending, "poll"):
        return
    if hasattr(pending, "wait"):
        pending.wait()
        return
    deadline = time.monotonic() + timeout_s
    while pending.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"storage op did not finish within {timeout_s:g} s")
        time.sleep(0.001)


def _run_transfer(transfer: Transfer, src: torch.Tensor, dst: torch.Tensor, cuda: bool,
                  stream) -> None:
    # The manager's indices are valid by construction: skip the bounds check (a sync on GPU).
    transfer(src, dst, stream=stream if cuda else None, check=False)


class _LoadLayers:
    """A load's per-layer work. ``self(stream, handle, layer)`` runs one layer's
    transfer; ``all_layers(stream, handle, events)`` runs every layer in one
    compiled call, recording ``events[i]`` after layer ``i`` (the CUDA device uses
    it), and returns False, having launched nothing, where that cannot be done
    (no CUDA kernel backend, NVTX ranges on): the device then runs the layers one by one.

    The first layer's launch makes the index tensors (on GPU: copied on the load
    stream, ahead of every layer). Valid by construction: no bounds check (a sync).
    """

    def __init__(self, transfers: list[Transfer], cuda: bool):
        self.transfers = transfers
        self.cuda = cuda
        self._layers = None   # ops.prepare_layers(transfers), made on first use; False: none

    def __call__(self, stream, handle: "LoadHandle", layer: int) -> None:
        src, dst = handle._src, handle._dst
        if src is None:
            src, dst = handle._make_indices(stream)
        if _nvtx_enabled():
            with nvtx_range(f"hicache.load L{layer} n={len(handle.page_ids) * handle._manager.page_size}"):
                self.transfers[layer](src, dst, stream=stream if self.cuda else None, check=False)
        else:
            self.transfers[layer](src, dst, stream=stream if self.cuda else None, check=False)

    def all_layers(self, stream, handle: "LoadHandle", events) -> bool:
        if _nvtx_enabled():     # one range per layer: the layers one by one
            return False
        layers = self._layers
        if layers is None:
            layers = self._layers = prepare_layers(self.transfers) or False
        if not layers:
            return False
        src, dst = handle._src, handle._dst
        if src is None:
            src, dst = handle._make_indices(stream)
        return layers(src, dst, stream=stream if self.cuda else None, events=events, check=False)


# not sequences of page ids, though iterable: a string's characters, a tensor's
# elements (hashed by identity) or a set's arbitrary order would name the wrong pages
_NOT_PAGE_IDS = (str, bytes, bytearray, memoryview, torch.Tensor, Set, Mapping)


def _as_list(page_ids: Sequence[Hashable]) -> list | tuple:
    """``page_ids`` as a list or tuple; TypeError naming the argument unless it is a
    sequence of ids (the ids' hashability is checked where they are looked up)."""
    kind = type(page_ids)
    if kind is list or kind is tuple:
        return page_ids
    if isinstance(page_ids, _NOT_PAGE_IDS):
        one = " (for one page, pass [page_id])" if isinstance(page_ids, (str, bytes)) else ""
        raise TypeError(f"page_ids: expected a sequence of page ids, got a {kind.__name__}{one}")
    if isinstance(page_ids, (list, tuple)):
        return page_ids
    try:
        return list(page_ids)
    except TypeError:
        raise TypeError(f"page_ids: expected a sequence of page ids, got {kind.__name__} "
                        f"{page_ids!r}") from None


def _check_distinct(ids: list | tuple) -> None:
    """Refuse unhashable or repeated ids (for ids that need not be in the table)."""
    try:
        if len(set(ids)) == len(ids):
            return
    except TypeError:
        raise unhashable_error(ids) from None
    raise _repeat_error(ids)


def _repeat_error(ids: list | tuple) -> ValueError:
    seen = set()
    for page_id in ids:
        if page_id in seen:
            return ValueError(f"page_ids: {page_id!r} appears more than once "
                              f"(a call takes each page once)")
        seen.add(page_id)
    raise AssertionError("_repeat_error: no id repeats")


def _num_pages(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_pages: expected an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"num_pages: expected an int >= 0, got {value!r}")
    return int(value)


def _host_reserve_gb(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"host_reserve_gb: expected a number of GiB >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"host_reserve_gb: expected a number of GiB >= 0, got {value!r}")
    return float(value)


def _closed_error() -> RuntimeError:
    return RuntimeError("HiCacheManager: closed (close() freed its host pool); make a new "
                        "manager to use the cache again")


class HiCacheManager:
    """A device pool, a host pool twice its size (by default), and the moves between them.

    Args:
        device_pool: the device tier, a :class:`KVBuffer` (SGLang's per-layer
            ``[num_slots, head_num, head_dim]`` tensors via ``KVBuffer.from_layers``);
            its ``layout.page_size`` is the page size. On a CPU buffer the
            manager runs on an :class:`EmulatedDevice`.
        config: a :class:`HiCacheConfig`; keywords override its fields.
        device: the :class:`Device` (default: CUDA for a CUDA pool, else a
            synchronous :class:`EmulatedDevice`).
        compute_stream: the stream the model runs on (default: the current
            stream at each call).
        storage: an optional lower tier (:mod:`.storage`'s protocol), e.g.
            :class:`hicache_kernels.storage.StorageTier` (files through NIXL);
            page ids are then its keys (``hicache_kernels.storage.page_keys``).
        on_evict: called with an :class:`Eviction` after every eviction, so the
            caller's tree stays in step.
        observers: objects told of every change (:class:`.observer.ManagerObserver`):
            :mod:`hicache_kernels.observers` publishes KV events and metrics. None: off.
        tp_group: the ``torch.distributed`` group of the tensor-parallel ranks
            (``tp_size > 1``; None: the default group).

    Page ids are any hashables the caller chooses. The manager is not thread-safe:
    call it from one thread (the scheduler's).
    """

    def __init__(self, device_pool: KVBuffer, config: HiCacheConfig | None = None, *,
                 device: Device | None = None, compute_stream=None, storage=None,
                 on_evict: Callable[[Eviction], None] | None = None, observers=None,
                 tp_group=None, **options):
        if not isinstance(device_pool, KVBuffer):
            raise TypeError(f"device_pool: expected a KVBuffer, got {type(device_pool).__name__}")
        cfg = config if config is not None else HiCacheConfig()
        unknown = set(options) - {f.name for f in fields(HiCacheConfig)}
        if unknown:
            raise TypeError(f"HiCacheManager: unknown option(s) {sorted(unknown)}; see HiCacheConfig")
        if options:
            cfg = HiCacheConfig(**{**cfg.__dict__, **options})
        self.config = cfg
        self.policy = WritePolicy.parse(cfg.write_policy)
        threshold = cfg.write_through_threshold
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ValueError(f"write_through_threshold: expected a positive int, got {threshold!r}")
        self._threshold = None if self.policy.backs_up_on_evict else \
            (threshold or self.policy.default_threshold())
        if cfg.host_layout not in _HOST_LAYOUTS:
            raise ValueError(f"host_layout: expected one of {', '.join(_HOST_LAYOUTS)}, "
                             f"got {cfg.host_layout!r}")
        reserve_gb = _host_reserve_gb(cfg.host_reserve_gb)
        self._rules = _Rules()
        self.on_evict = on_evict
        self.storage = storage
        self._observer = observer_of(observers)

        dlay = device_pool.layout
        self._tp = None if cfg.tp_size == 1 and cfg.tp_rank == 0 and tp_group is None else \
            TensorParallel(cfg.tp_rank, cfg.tp_size, tp_group, mla=dlay.mla)

        self.device_pool = device_pool
        self.page_size = _page_size(cfg.page_size, dlay)
        self.num_layers = dlay.num_layers
        if self._observer is not None:   # before anything is allocated: it may refuse
            self._observer.attach(self)
        if device is None:
            device = CudaDevice(device_pool.device) if device_pool.device.type == "cuda" \
                else EmulatedDevice()
        self.device = device
        self._cuda = device.is_cuda
        self._compute_stream = compute_stream

        # -- pools -------------------------------------------------------------------
        P = self.page_size
        device_pages = dlay.num_slots // P
        bytes_per_slot = dlay.item_bytes * dlay.num_planes_per_layer * dlay.num_layers
        host_slots = host_pool_slots(device_pages * P, bytes_per_slot, P,
                                     hicache_ratio=cfg.hicache_ratio, hicache_size=cfg.hicache_size)
        hlay = dlay.with_(kind=cfg.host_layout, num_slots=host_slots, page_size=P)
        check_host_memory(hlay, reserve_gb, lower="hicache_ratio / hicache_size, or host_reserve_gb")
        # (the reserve was checked just above, by the names of this manager's options)
        self.host_pool = HostPool(hlay, pin=cfg.pin_memory, huge_pages=cfg.huge_pages,
                                  numa_node=cfg.numa_node, reserve_gb=0)
        try:
            self._setup(cfg, device, device_pages, host_slots)
        except BaseException:
            self.host_pool.close(quiet=True)
            raise
        if storage is not None:
            try:
                storage.attach(self.host_pool)
            except BaseException:
                self.host_pool.close(quiet=True)
                raise
        self._log_startup(device_pages * P, host_slots)

    def _setup(self, cfg: HiCacheConfig, device: Device, device_pages: int, host_slots: int) -> None:
        P, host, device_pool = self.page_size, self.host_pool.buffer, self.device_pool
        self.device_pages = PageAllocator(device_pages, "device pool")
        self.host_pages = PageAllocator(host_slots // P, "host pool")
        self.table = PageTable()
        # page -> its token slots, so token indices are one fancy index
        self._device_slots = np.arange(device_pages * P, dtype=np.int64).reshape(device_pages, P)
        self._host_slots = np.arange(host_slots, dtype=np.int64).reshape(-1, P)
        # Transfers move whole pages (one index per page, P times fewer than
        # tokens) where both layouts keep a page's slots contiguous in each plane.
        host_paged, device_paged = host.page_items(P), device_pool.page_items(P)
        self._by_page = host_paged is not None and device_paged is not None
        if self._by_page:
            host, device_pool = host_paged, device_paged

        # -- streams and prepared transfers ----------------------------------------------
        low, high = device.priority_range()
        self.load_stream = device.stream(high if cfg.load_priority is None else cfg.load_priority)
        self.backup_stream = device.stream(low if cfg.backup_priority is None else cfg.backup_priority)
        opts = dict(backend=cfg.backend, sm_budget=cfg.sm_budget, num_warps=cfg.num_warps)
        self._load_transfers = [Transfer(host, device_pool, layers=l, **opts)
                                for l in range(self.num_layers)]
        self._backup_transfer = Transfer(device_pool, host, **opts)
        self._load_layer = _LoadLayers(self._load_transfers, self._cuda)

        self._events: list = []
        self._loads: list[LoadHandle] = []       # in flight, in stream order
        self._backups: list[_Backup] = []        # in flight, in stream order
        self._storage_ops: list[_StorageOp] = []
        self._acks: list[Ack] = []
        self._next_op = 0
        self._closed = False
        # the compiled common case of _claim_load (None: numpy only; tests compare both)
        self._claimer = None if _fastload is None else \
            _fastload.LoadClaimer(self.table, self.device_pages, self.host_pages)

    # -- properties ------------------------------------------------------------------
    @property
    def compute_stream(self):
        """The stream the model runs on (as given, else the current stream)."""
        return self._compute_stream if self._compute_stream is not None else self.device.current_stream()

    @property
    def host(self) -> KVBuffer:
        """The host pool's buffer."""
        return self.host_pool.buffer

    @property
    def in_flight(self) -> int:
        """Loads, backups and storage ops not yet reported by :meth:`poll`."""
        return len(self._loads) + len(self._backups) + len(self._storage_ops)

    # -- allocation ---------------------------------------------------------------------
    def alloc_device(self, page_ids: Sequence[Hashable]) -> torch.Tensor:
        """Give new pages device slots (evicting least-recently-used pages if needed).

        Returns the int64 token slots ``[len(page_ids) * page_size]`` on the
        device pool's device; the model writes the pages' KV there. Raises
        :class:`OutOfPages` when not enough pages can be freed.
        """
        ids = self._new_ids(page_ids)
        with self._mark("alloc_device", len(ids) * self.page_size):
            pages = self._alloc_device_pages(len(ids))
            self.table.place_device(self.table.add_many(ids), pages)
            slots = self._device_tokens(pages)
        if self._observer is not None:
            self._observer.stored("device", ids)
        return slots

    def alloc_host(self, page_ids: Sequence[Hashable]) -> torch.Tensor:
        """Give new pages host slots to fill directly (e.g. from another store).

        Returns the int64 token slots (CPU) in the host pool; the pages count as
        on host at once, so fill them before loading them.
        """
        ids = self._new_ids(page_ids)
        with self._mark("alloc_host", len(ids) * self.page_size):
            pages = self._alloc_host_pages(len(ids))
            if pages is None:
                raise OutOfPages(f"host pool: no {len(ids)} pages can be freed "
                                 f"({self.host_pages.free_count} free)")
            self.table.place_host(self.table.add_many(ids), pages)
        if self._observer is not None:
            self._observer.stored("host", ids)
        return self._host_tokens(pages)

    def free(self, page_ids: Sequence[Hashable]) -> None:
        """Forget pages on every tier. Slots a transfer still uses are reused only after it."""
        ids, rows = self._rows(page_ids)
        pins = self.table.pins[rows]
        if np.count_nonzero(pins):
            i = int(np.flatnonzero(pins)[0])
            raise ValueError(f"page_ids: {ids[i]!r} is pinned ({pins[i]}); unpin it first")
        with self._mark("free", len(rows) * self.page_size):
            self._release_rows(rows, remove=True)

    def pin(self, page_ids: Sequence[Hashable]) -> None:
        """Keep pages on the device (a request is using them); counted: each pin
        needs its unpin."""
        _, rows = self._rows(page_ids)
        table = self.table
        table.pins[rows] += 1
        table.state[rows] |= PINNED

    def unpin(self, page_ids: Sequence[Hashable]) -> None:
        ids, rows = self._rows(page_ids)
        table = self.table
        pins = table.pins[rows]
        if np.count_nonzero(pins < 1):
            raise ValueError(f"page_ids: {ids[int(np.flatnonzero(pins < 1)[0])]!r} is not pinned")
        table.pins[rows] = pins - 1
        table.state[rows[pins == 1]] &= clear_mask(PINNED)

    # -- queries ---------------------------------------------------------------------
    def lookup(self, page_ids: Sequence[Hashable]) -> list[PageState]:
        """Each page's :class:`PageState` (``ABSENT`` when unknown). A transfer
        shows as in flight until the manager retires it: in :meth:`poll`,
        :meth:`synchronize`, :meth:`check_prefetch`, or a call that had to wait
        for it (an allocation waiting for a write-back copy); its ack waits for
        :meth:`poll`."""
        if self._closed:
            raise _closed_error()
        ids = _as_list(page_ids)
        table = self.table
        try:
            rows = np.fromiter(map(table.index.get, ids, repeat(-1)), np.intp, len(ids))
        except TypeError:
            raise unhashable_error(ids) from None
        if not table.distinct(rows):   # (unknown ids, all row -1, may look repeated)
            _check_distinct(ids)
        codes = table.state[rows]
        codes[rows < 0] = 0
        return list(map(_STATES.__getitem__, codes.tolist()))

    def device_indices(self, page_ids: Sequence[Hashable]) -> torch.Tensor:
        """Token slots on the device of pages that have a device copy."""
        return self._device_tokens(self._pages(page_ids, "device"))

    def host_indices(self, page_ids: Sequence[Hashable]) -> torch.Tensor:
        """Token slots (CPU) in the host pool of pages that have a host copy."""
        return self._host_tokens(self._pages(page_ids, "host"))

    # -- policies ------------------------------------------------------------------------
    def hit(self, page_ids: Sequence[Hashable], *, producer=None) -> int | None:
        """Count a hit (the caller inserted or matched these pages) and apply the
        write policy: write-through policies back up pages that reach their
        threshold. Returns the backup's op id, or None when none started.

        ``producer``: the stream that wrote the pages' KV (default: the compute
        stream). Every backup of these pages waits for the work queued on it up
        to this call: this hit's, and a later one (a later hit's, a write_back
        eviction's), so name it on the hit that follows the write.
        """
        _, rows = self._rows(page_ids)
        table = self.table
        table.hits[rows] += 1
        table.touch_rows(rows)
        if self._observer is not None:
            self._observer.hit("device", int(np.count_nonzero(table.state[rows] & DEVICE)))
        threshold = self._threshold
        op = None
        if threshold is not None:
            due = rows[(table.hits[rows] >= threshold)
                       & ((table.state[rows] & (DEVICE | HOST)) == DEVICE)]
            if len(due):
                with self._mark("hit", len(due) * self.page_size):
                    op = self._backup(due, producer, why=f"{self.policy.value} hit")
        if producer is not None and np.count_nonzero((table.state[rows] & (DEVICE | HOST)) == DEVICE):
            # pages still without a host copy are backed up later, maybe with no producer named
            self._backups_wait_for(producer)
        return None if op is None else op.op_id

    def backup(self, page_ids: Sequence[Hashable], *, producer=None) -> int | None:
        """Back up device pages that have no host copy yet, whatever the policy.
        Returns the op id (acked by :meth:`poll`), None if all were on host already."""
        _, rows = self._rows(page_ids)
        table = self.table
        rows = rows[table.host_page[rows] < 0]
        off_device = rows[table.device_page[rows] < 0]
        if len(off_device):
            raise ValueError(f"page_ids: {table.page_ids[off_device[0]]!r} has no device copy "
                             f"to back up")
        if not len(rows):
            return None
        with self._mark("backup", len(rows) * self.page_size):
            op = self._backup(rows, producer, why="asked")
        if op is None:
            raise OutOfPages(f"host pool: no {len(rows)} pages can be freed for the backup")
        return op.op_id

    # -- eviction ------------------------------------------------------------------------
    def evict_device(self, page_ids: Sequence[Hashable] | None = None, *,
                     num_pages: int | None = None) -> list:
        """Drop device copies: ``page_ids``, or the ``num_pages`` least recently used
        unpinned ones. Pages without a host copy are backed up first under
        write_back (their slots are released when the copy completes; a page
        the host pool has no room for stays on the device) and dropped under
        the write-through policies. Returns the evicted ids."""
        if self._closed:
            raise _closed_error()
        if (page_ids is None) == (num_pages is None):
            raise TypeError("evict_device: pass page_ids or num_pages, not both" if page_ids is not None
                            else "evict_device: pass page_ids or num_pages")
        if page_ids is not None:
            ids, rows = self._rows(page_ids)
            state = self.table.state[rows]
            stuck = (state & (DEVICE | LOADING | PINNED)) != DEVICE
            if np.count_nonzero(stuck):
                i = int(np.flatnonzero(stuck)[0])
                why = "not on it" if not state[i] & DEVICE else \
                    "loading" if state[i] & LOADING else "pinned"
                raise ValueError(f"page_ids: {ids[i]!r} cannot leave the device ({why})")
        else:
            rows = device_victims(self.table, _num_pages(num_pages))
        with self._mark("evict_device", len(rows) * self.page_size):
            return self._evict_device(rows)

    def evict_host(self, num_pages: int) -> list:
        """Drop the ``num_pages`` least recently used host copies that no transfer
        holds (pages with no device copy first). Returns the evicted ids."""
        if self._closed:
            raise _closed_error()
        rows = host_victims(self.table, self.host_pages.locked, _num_pages(num_pages))
        with self._mark("evict_host", len(rows) * self.page_size):
            return self._evict_host(rows)

    # -- loading ---------------------------------------------------------------------------
    def load(self, page_ids: Sequence[Hashable]) -> LoadHandle:
        """Load host pages to the device, layer by layer, on the load stream.

        Returns a :class:`LoadHandle`: ``handle.wait(layer)`` before attention on
        ``layer``; ``handle.device_indices`` are where the pages land. The CPU
        never blocks (unless the device pool must wait for a write-back copy).
        """
        if self._closed:
            raise _closed_error()
        ids = _as_list(page_ids)
        if not ids:
            raise ValueError("page_ids: expected at least one page to load")
        if _nvtx_enabled():
            with nvtx_range(f"hicache.load n={len(ids) * self.page_size}"):
                return self._load(ids)
        return self._load(ids)

    def _load(self, ids: list | tuple) -> LoadHandle:
        # The serving loop's hot path. The page-table half is one compiled call
        # in the common case (csrc/manager/fastload.c), else _claim_load.
        ids = tuple(ids)     # the handle's own copy, and fixed under the compiled call
        claimed = np.empty((3, len(ids)), dtype=np.int64)
        # the compiled call never evicts, so nothing takes an op id before this load's
        if self._claimer is not None and self._claimer.claim(
                ids, claimed, self._next_op + 1, self._rules.host_locked_during_load):
            op_id = self._op_id()
            rows, host_pages, dev_pages = claimed
            backups = ()
        else:
            op_id, rows, host_pages, dev_pages, backups = self._claim_load(ids)
        table = self.table
        handle = LoadHandle(op_id, ids, rows, host_pages, dev_pages, table.removals, self)
        handle._host_locked = self._rules.host_locked_during_load
        dev, stream = self.device, self.load_stream
        for backup in backups:   # a host copy still arriving: read it only once it has
            dev.wait(stream, backup.event)
        if self._rules.load_waits_compute:
            ev = self._event()
            dev.record(ev, self.compute_stream)
            dev.wait(stream, ev)
            handle.extra_events.append(ev)
        handle._events = dev.launch_layers(stream, self._load_layer, handle, self.num_layers)
        table.ops[op_id] = handle
        self._loads.append(handle)
        if self._observer is not None:
            self._observer.stored("device", ids)
            self._observer.started("load", op_id, ids)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("load op %d: %d pages (%d tokens) host->device, %d layers%s",
                      op_id, len(ids), len(ids) * self.page_size, self.num_layers,
                      " by page" if self._by_page else "")
        return handle

    def _claim_load(self, ids: list | tuple) -> tuple:
        """The page-table half of a load: check the pages, take device pages (evicting
        if needed), take an op id (after any write_back eviction took its own), lock,
        and mark the rows loading. Returns ``(op_id, rows, host_pages, device_pages,
        backups)``, the backups being those still filling host copies. Raises, having
        changed nothing, when a page cannot be loaded or the device pool has no room."""
        table = self.table
        rows = self._resolve(ids)
        n = len(rows)
        state = table.state.take(rows)
        # validate everything before changing anything
        check = state.tobytes().translate(_LOADABLE)
        if b"\x02" in check or not table.distinct(rows):
            self._refuse_load(ids, rows)
        host_pages = table.host_page.take(rows)
        # locked: the load writes them (a free during the load defers their reuse)
        dev_pages = self.device_pages.alloc(n, lock=True)
        if dev_pages is None:
            # Making room may evict host pages: keep these out of reach meanwhile.
            self.host_pages.lock(host_pages)
            try:
                dev_pages = self._alloc_device_pages(n)
            finally:
                self.host_pages.unlock(host_pages)
            self.device_pages.lock(dev_pages)
            state = table.state.take(rows)   # waiting for transfers may have retired backups
            check = state.tobytes().translate(_LOADABLE)
        backups = []
        if b"\x01" in check:
            busy = rows[(state & BACKING_UP) != 0]
            backups = [table.ops[i] for i in np.unique(table.backup_id[busy]).tolist()]
        op_id = self._op_id()
        if self._rules.host_locked_during_load:
            self.host_pages.lock(host_pages)
        table.device_page[rows] = dev_pages
        table.state[rows] = _ON_LOAD.take(state)
        table.load_id[rows] = op_id
        stamps = table.stamps(n)
        table.device_used[rows] = stamps      # newly on the device: most recent
        table.host_used[rows] = stamps        # and touched on host
        return op_id, rows, host_pages, dev_pages, backups

    def prefetch(self, page_ids: Sequence[Hashable]) -> tuple:
        """Fetch the stored prefix of ``page_ids`` (those not in the table) from
        storage into host pages: all of it, or its leading pages that the host
        pool can make room for. Returns the ids being fetched (empty when
        storage holds none or the host pool has no room); they show as
        ``HOST | FETCHING`` until :meth:`check_prefetch` or :meth:`poll` settles
        them, and a ``"prefetch"`` :class:`Ack` reports them (and any that failed)."""
        if self._closed:
            raise _closed_error()
        ids = _as_list(page_ids)
        _check_distinct(ids)
        if self.storage is None:
            raise RuntimeError("prefetch: the manager has no storage tier")
        index = self.table.index
        ids = [i for i in ids if i not in index]
        tp = self._tp
        n = self.storage.batch_exists(ids if tp is None else tp.storage_keys(ids)) if ids else 0
        n = min(n, self._host_room_for(n))
        if tp is not None:   # a collective: every rank asks for the same ids; the shortest prefix wins
            n = tp.min([n])[0]
        if n == 0:
            return ()
        ids = ids[:n]
        with self._mark("prefetch", n * self.page_size):
            pages = self._alloc_host_pages(n)
            entries = []
            for page_id, page in zip(ids, pages.tolist()):
                e = self.table.add(page_id)
                self.table.set_host(e, page)
                entries.append(e)
            op = _StorageOp(self._op_id(), "prefetch", entries, pages, None)
            self._lock_for_storage(op)
            for e in entries:
                e.fill = op
            try:
                op.pending = self.storage.batch_get(ids if tp is None else tp.storage_keys(ids),
                                                    pages)
            except BaseException:
                self._unlock_for_storage(op)
                self._release(entries, remove=True, notify=False)
                raise
            self._storage_ops.append(op)
        if self._observer is not None:
            self._observer.stored("host", ids)
            self._observer.started("prefetch", op.op_id, ids)
        log.debug("prefetch op %d: %d pages from storage", op.op_id, n)
        return tuple(ids)

    def check_prefetch(self, page_ids: Sequence[Hashable]) -> bool:
        """Whether a request may use ``page_ids`` now, under the storage tier's
        prefetch policy (SGLang's ``check_prefetch_progress``); never blocks.

        Every storage read still filling one of these pages is asked
        ``can_terminate()``. If all may stop, they are stopped: the pages that
        arrived are host pages from now on (:meth:`load` them), the others
        leave the page table, and True is returned. Otherwise nothing changes
        and False is returned: call again at the next scheduling step. A read
        that cannot stop early (no ``can_terminate``) must finish.
        """
        if self._closed:
            raise _closed_error()
        page_ids = _as_list(page_ids)
        _check_distinct(page_ids)
        self._collect()
        get = self.table.entries.get
        ops = {}
        for page_id in page_ids:
            e = get(page_id)
            if e is not None and e.fill is not None:
                ops[id(e.fill)] = e.fill
        ready = all(getattr(op.pending, "can_terminate", lambda: False)() for op in ops.values())
        tp = self._tp
        if tp is not None:   # a collective: the ranks wait for, and keep, the same pages
            ready = tp.agree_ready(ready, len(ops))
        if not ready:
            return False
        # a read that already ended by itself stopped at a page it could not read
        ended = [tp is None and _storage_result(op.pending) is not None for op in ops.values()]
        valid = [op.pending.terminate() for op in ops.values()]
        if tp is not None and valid:
            valid = tp.min(valid)
            for op, n in zip(ops.values(), valid):
                op.pending = tp.cut(op.pending, n)   # its ack names the pages cut off too
        for op, n, read_to_end in zip(ops.values(), valid, ended):
            self._end_prefetch(op, n, read_to_end)
        return True

    # -- completion ---------------------------------------------------------------------
    def poll(self) -> list[Ack]:
        """Finished loads, backups and storage ops since the last poll (never blocks)."""
        if self._closed:
            raise _closed_error()
        with self._mark("poll", 0):
            self._collect()
            acks, self._acks = self._acks, []
            return acks

    def synchronize(self, *, storage: bool = False) -> None:
        """Block until every load and backup in flight has finished, and with
        ``storage=True`` every storage op too. They are retired (:meth:`lookup`
        shows them settled); their acks wait for :meth:`poll`."""
        if self._closed:
            raise _closed_error()
        self._finish_all(storage=storage)

    def _finish_all(self, *, storage: bool) -> None:
        dev = self.device
        with self._mark("synchronize", 0):
            for h in list(self._loads):
                dev.synchronize(h._events[-1])
            for op in list(self._backups):
                dev.synchronize(op.event)
        self._collect()
        if storage:
            for op in list(self._storage_ops):
                _wait_storage_op(op.pending)
            self._collect()

    def close(self) -> None:
        """Finish transfers in flight, then unregister and free the host pool. Any
        later call raises (close() itself may be called again)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_all(storage=True)
        finally:
            try:
                detach = getattr(self.storage, "detach", None)
                if detach is not None:   # storage lets go of the host pool before it goes
                    detach()
            finally:
                self._load_transfers = []
                self._load_layer = None
                self._backup_transfer = None
                try:
                    self.host_pool.close()
                finally:
                    if self._observer is not None:
                        self._observer.closed()

    def __enter__(self) -> "HiCacheManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Counts for logs and benchmarks; a storage tier's own counters (hits,
        bytes, seconds) follow with a ``storage_`` prefix."""
        if self._closed:
            raise _closed_error()
        out = dict(pages=len(self.table), device_free=self.device_pages.free_count,
                   device_deferred=self.device_pages.deferred_count,
                   host_free=self.host_pages.free_count,
                   host_deferred=self.host_pages.deferred_count,
                   loads_in_flight=len(self._loads), backups_in_flight=len(self._backups),
                   storage_in_flight=len(self._storage_ops))
        storage_stats = getattr(self.storage, "stats", None)
        if storage_stats is not None:
            out.update((f"storage_{k}", v) for k, v in storage_stats().items())
        return out

    # -- internals: transfers -----------------------------------------------------------------
    def _backup(self, rows: np.ndarray, producer, *, why: str) -> _Backup | None:
        """Back up device pages (unique rows) with no host copy; None if the host pool is full."""
        n = len(rows)
        host_pages = self._alloc_host_pages(n)
        if host_pages is None:
            log.debug("backup of %d pages skipped: host pool full of pages in use", n)
            return None
        table = self.table
        dev_pages = table.device_page[rows]
        tokens = n * self.page_size
        op = _Backup(self._op_id(), rows, tuple(table.ids_of(rows)), host_pages, dev_pages,
                     table.removals)
        dev, stream = self.device, self.backup_stream
        if self._rules.backup_waits_producer:
            ev = self._event()
            dev.record(ev, producer if producer is not None else self.compute_stream)
            dev.wait(stream, ev)
            op.extra_events.append(ev)
        if self._rules.device_locked_during_backup:
            self.device_pages.lock(dev_pages)
            op.device_locked = True
        self.host_pages.lock(host_pages)
        src, dst = self._transfer_indices(dev_pages, host_pages, stream, to_device=False)
        t, cuda = self._backup_transfer, self._cuda
        with self._mark("backup", tokens):
            dev.launch(stream, lambda s: _run_transfer(t, src, dst, cuda, s), op)
            op.event = self._event()
            dev.record(op.event, stream)
        table.place_host(rows, host_pages)
        table.state[rows] |= BACKING_UP
        table.backup_id[rows] = op.op_id
        table.ops[op.op_id] = op
        self._backups.append(op)
        if self._observer is not None:
            self._observer.stored("host", op.page_ids)
            self._observer.started("backup", op.op_id, op.page_ids)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("backup op %d (%s): %d pages (%d tokens) device->host", op.op_id, why, n, tokens)
        return op

    def _backups_wait_for(self, producer) -> None:
        """Make every backup launched from now on wait for the work queued on
        ``producer`` so far (ordering rule 1 for pages backed up later)."""
        if not self._rules.backup_waits_producer:
            return
        dev, ev = self.device, self._event()
        dev.record(ev, producer)
        dev.wait(self.backup_stream, ev)
        self._events.append(ev)   # the wait keeps the record it saw: the event is free again

    def _collect(self) -> None:
        """Retire finished transfers, oldest first per stream; queue their acks."""
        query = self.device.query
        loads = self._loads
        while loads and query(loads[0]._events[-1]):
            self._finish_load(loads.pop(0))
        backups = self._backups
        while backups and query(backups[0].event):
            self._finish_backup(backups.pop(0))
        if self._storage_ops:
            self._collect_storage()

    def _finish_load(self, h: LoadHandle) -> None:
        if h._host_locked:
            self.host_pages.unlock(h.host_pages)
        self.device_pages.unlock(h.device_pages)
        h._done = True
        self.device.release_layer_events(h._events)
        self._retire(h, "load", self.table.load_id, _NOT_LOADING)

    def _finish_backup(self, op: _Backup) -> None:
        if op.device_locked:
            self.device_pages.unlock(op.device_pages)
        self.host_pages.unlock(op.host_pages)
        self._events.append(op.event)
        done = self._retire(op, "backup", self.table.backup_id, _NOT_BACKING_UP)
        if self.storage is not None and self.config.storage_write_through and \
                (self._tp is None or self._tp.writes_storage):
            done = self.table.views(done)
            # pages still on host in the slots this backup filled, not yet in storage
            live = [e for e in done if self.table.get(e.page_id) is e and e.storing is None
                    and not e.in_storage]
            if live:
                self._store(live)

    def _retire(self, op: _Op, kind: str, op_ids: np.ndarray, clear: np.uint8) -> np.ndarray:
        """What finishing a load and a backup share: the op's rows (those still its
        own; ``op_ids`` is the table's column naming it) stop being in flight, its
        events go back to the pool, and an ack is queued. Returns those rows."""
        table = self.table
        rows = op.own_rows(table, op_ids)
        op_ids[rows] = 0
        table.state[rows] &= clear
        del table.ops[op.op_id]
        self._events.extend(op.extra_events)
        op.extra_events = []
        ack = Ack(kind, op.op_id, op.page_ids)
        self._acks.append(ack)
        if self._observer is not None:
            self._observer.finished(ack)
        log.debug("%s op %d done", kind, op.op_id)
        return rows

    def _store(self, entries: list[PageEntry]) -> None:
        pages = np.array([e.host_page for e in entries], dtype=np.int64)
        op = _StorageOp(self._op_id(), "store", entries, pages, None)
        self._lock_for_storage(op)
        for e in entries:
            e.storing = op
        ids = [e.page_id for e in entries]
        with self._mark("store", len(entries) * self.page_size):
            try:
                op.pending = self.storage.batch_set(ids if self._tp is None else
                                                    self._tp.storage_keys(ids), pages)
            except BaseException:
                self._unlock_for_storage(op)
                for e in entries:
                    e.storing = None
                raise
        self._storage_ops.append(op)
        if self._observer is not None:
            self._observer.started("store", op.op_id, ids)
        log.debug("store op %d: %d pages host->storage", op.op_id, len(entries))

    def _collect_storage(self) -> None:
        keep = []
        for op in self._storage_ops:
            result = _storage_result(op.pending)
            if result is None or (self._tp is not None and op.kind == "prefetch"
                                  and any(e.fill is op for e in op.entries)):
                keep.append(op)   # with TP, only check_prefetch settles reads (ranks agree)
                continue
            self._unlock_for_storage(op)
            failed = []
            lost = []   # the first page whose own read failed (reads end at a failure)
            written = []   # pages now in storage, not already announced there
            for e, ok in zip(op.entries, result):
                if ok and op.kind == "store":
                    # the page may have left the table and come back during the write
                    # (``e`` then reads as absent): storage holds the id once, named by
                    # whichever write landed first
                    current = self.table.get(e.page_id)
                    if current is None or not current.in_storage:
                        written.append(e.page_id)
                    if current is not None:
                        current.in_storage = True
                if ok:
                    e.in_storage = True
                if op.kind == "prefetch":
                    if e.fill is op:   # not cut off by check_prefetch: a read's own answer
                        e.fill = None
                        if not ok:
                            if not lost:
                                lost.append(e.page_id)
                            if self.table.get(e.page_id) is e:
                                self._release([e], remove=True)
                elif e.storing is op:
                    e.storing = None
                if not ok:
                    failed.append(e.page_id)
            ack = Ack(op.kind, op.op_id, tuple(e.page_id for e in op.entries), tuple(failed))
            self._acks.append(ack)
            if self._observer is not None:
                if written:
                    self._observer.stored("storage", written)
                elif lost:
                    self._observer.removed("storage", lost)
                self._observer.finished(ack)
        self._storage_ops = keep

    def _lock_for_storage(self, op: _StorageOp) -> None:
        # storage reads or writes these host pages from another thread until the op ends
        if self._rules.host_locked_during_storage:
            self.host_pages.lock(op.host_pages)
            op.host_locked = True

    def _unlock_for_storage(self, op: _StorageOp) -> None:
        if op.host_locked:
            op.host_locked = False
            self.host_pages.unlock(op.host_pages)

    def _end_prefetch(self, op: _StorageOp, valid: int, read_to_end: bool) -> None:
        """A prefetch stopped by its policy: pages ``[0, valid)`` are on host from now
        on, the rest leave the table. The op keeps its pages locked until it ends.
        ``read_to_end``: the reads had ended by themselves, so page ``valid`` (if any)
        is one storage could not serve."""
        table = self.table
        lost = []
        for i, e in enumerate(op.entries):
            if e.fill is not op:
                continue
            e.fill = None
            if i < valid:
                e.in_storage = True
            else:
                if i == valid and read_to_end:
                    lost.append(e.page_id)
                if table.get(e.page_id) is e:
                    self._release([e], remove=True)
        if lost and self._observer is not None:
            self._observer.removed("storage", lost)

    # -- internals: slots ---------------------------------------------------------------------
    # Making room is decided before it is done: a call that cannot get its pages
    # raises (or gets None) having evicted nothing. Pages count as obtainable when
    # free, freed but held by a load or backup in flight (waited for), or evictable.

    def _alloc_device_pages(self, n: int) -> np.ndarray:
        """``n`` device pages: free ones, else LRU evictions, else waiting for the
        transfers that hold freed pages. OutOfPages, nothing changed, if that cannot
        make room."""
        alloc = self.device_pages
        pages = alloc.alloc(n)
        if pages is not None:
            return pages
        victims = self._device_victims_for(n)
        if victims is None:
            raise OutOfPages(
                f"device pool: need {n} pages, {alloc.free_count} free, "
                f"{alloc.deferred_count} waiting for transfers, the rest pinned, loading, "
                f"or without host room for their write-back")
        self._evict_device(victims)
        return self._take(alloc, n)

    def _alloc_host_pages(self, n: int) -> np.ndarray | None:
        """``n`` host pages as :meth:`_alloc_device_pages` finds them; None, nothing
        changed, if there is no room."""
        alloc = self.host_pages
        pages = alloc.alloc(n)
        if pages is not None:
            return pages
        short = n - alloc.free_count - self._host_pages_freed_by_transfers()
        victims = host_victims(self.table, alloc.locked, short)
        if len(victims) < short:
            return None
        self._evict_host(victims)
        return self._take(alloc, n)

    def _host_room_for(self, n: int) -> int:
        """How many of ``n`` host pages :meth:`_alloc_host_pages` can make room for."""
        alloc = self.host_pages
        room = alloc.free_count + self._host_pages_freed_by_transfers()
        if room >= n:
            return n
        return room + len(host_victims(self.table, alloc.locked, n - room))

    def _host_pages_freed_by_transfers(self) -> int:
        """Freed host pages that a load or backup in flight holds (waiting for those
        frees them); pages a storage op holds are freed only when it ends by itself."""
        alloc = self.host_pages
        if not alloc.deferred_count or not self._storage_ops:
            return alloc.deferred_count
        held = [op.host_pages for op in self._storage_ops if op.host_locked]
        if not held:
            return alloc.deferred_count
        return int(np.count_nonzero(~np.isin(alloc.deferred_pages(), np.concatenate(held))))

    def _device_victims_for(self, n: int) -> np.ndarray | None:
        """Rows of the device pages to evict so that ``n`` can be had, least recently
        used first; None if no choice makes room. Under write_back a page with no
        host copy is evicted only if a host page can be had for its backup, and the
        host copies of the pages evicted with it are not eviction candidates then."""
        alloc, table = self.device_pages, self.table
        need = n - alloc.free_count - alloc.deferred_count
        if need <= 0:
            return _NO_ROWS
        candidates = device_victims(table, table.hw)
        if len(candidates) < need:
            return None
        if not self.policy.backs_up_on_evict:
            return candidates[:need]
        host = self.host_pages
        spare = host.free_count + self._host_pages_freed_by_transfers()
        host_candidates = host_victims(table, host.locked, table.hw)
        is_host_candidate = np.zeros(table.hw, dtype=bool)
        is_host_candidate[host_candidates] = True
        # host pages available to the backups: spare + host candidates not kept
        budget = spare + len(host_candidates)
        first = candidates[:need]
        backed = table.host_page[first] >= 0
        if np.count_nonzero(~backed) <= budget - np.count_nonzero(is_host_candidate[first[backed]]):
            return first                                  # the common case: room for all
        chosen, backups = [], 0
        for row in candidates.tolist():
            if table.host_page[row] >= 0:                 # evicting it keeps its host copy
                keep = int(is_host_candidate[row])
                if backups <= budget - keep:
                    budget -= keep
                    chosen.append(row)
            elif backups < budget:                        # needs a host page for its backup
                backups += 1
                chosen.append(row)
            if len(chosen) == need:
                return np.array(chosen, dtype=np.intp)
        return None

    def _take(self, alloc: PageAllocator, n: int) -> np.ndarray:
        """``n`` pages of a pool that has room for them once the loads and backups
        in flight that hold freed pages finish (blocking on them, oldest first)."""
        while (pages := alloc.alloc(n)) is None:
            if not self._wait_for_transfer(alloc):
                raise AssertionError(f"{alloc.name}: room for {n} pages was promised, "
                                     f"{alloc.free_count} free")
        return pages

    def _wait_for_transfer(self, pool: PageAllocator) -> bool:
        """Block on the oldest transfer that may hold pages of ``pool``; False if none.
        This is where a write-back eviction waits for its copy."""
        if pool.deferred_count == 0:
            return False
        dev = self.device
        if self._backups:
            dev.synchronize(self._backups[0].event)
        elif self._loads:
            dev.synchronize(self._loads[0]._events[-1])
        else:
            return False   # only storage ops hold pages: they finish on their own
        self._collect()
        return True

    def _evict_device(self, rows: np.ndarray) -> list:
        if not len(rows):
            return []
        table = self.table
        if self.policy.backs_up_on_evict:
            unbacked = rows[table.host_page[rows] < 0]
            if len(unbacked):
                # the host copies of the pages leaving now are all they will have:
                # making room for the backup must not evict them
                kept = table.host_page[rows[table.host_page[rows] >= 0]]
                self.host_pages.lock(kept)
                try:
                    op = self._backup(unbacked, None, why="write_back eviction")
                finally:
                    self.host_pages.unlock(kept)
                if op is None:   # no host room: keep these on the device rather than lose them
                    rows = rows[table.host_page[rows] >= 0]
        removed = rows[table.host_page[rows] < 0]
        ids, removed_ids = table.ids_of(rows), table.ids_of(removed)
        self.device_pages.free(table.device_page[rows])
        table.clear_device(rows)
        table.remove_many(removed)
        if self._observer is not None:
            self._observer.removed("device", ids)
        return self._report("device", ids, removed_ids)

    def _evict_host(self, rows: np.ndarray) -> list:
        if not len(rows):
            return []
        table = self.table
        removed = rows[table.device_page[rows] < 0]
        ids, removed_ids = table.ids_of(rows), table.ids_of(removed)
        self._release_rows(rows, remove=False, host_only=True)
        table.remove_many(removed)
        return self._report("host", ids, removed_ids)

    def _release(self, entries: list[PageEntry], *, remove: bool, host_only: bool = False,
                 notify: bool = True) -> None:
        """:meth:`_release_rows` for a list of :class:`PageEntry` (the storage paths)."""
        self._release_rows(self.table.rows_of(entries), remove=remove, host_only=host_only,
                           notify=notify)

    def _release_rows(self, rows: np.ndarray, *, remove: bool, host_only: bool = False,
                      notify: bool = True) -> None:
        """Give back the slots of unique rows (locked ones once their transfers end).
        ``notify=False``: pages no observer was told of (a call undoing its own work)."""
        table = self.table
        observer = self._observer if notify else None
        if observer is not None:   # which pages leave which tier, before the table forgets
            gone = [("host", table.ids_of(rows[table.host_page[rows] >= 0]))]
            if not host_only:
                gone.insert(0, ("device", table.ids_of(rows[table.device_page[rows] >= 0])))
        if not host_only:
            dev = table.device_page[rows]
            self.device_pages.free(dev[dev >= 0])
            table.clear_device(rows)
        host = table.host_page[rows]
        self.host_pages.free(host[host >= 0])
        table.clear_host(rows)
        if remove:
            table.remove_many(rows)
        if observer is not None:
            for tier, ids in gone:
                if ids:
                    observer.removed(tier, ids)

    def _report(self, tier: str, ids: list, removed: list) -> list:
        log.debug("evicted %d pages from %s (%d gone)", len(ids), tier, len(removed))
        if self.on_evict is not None or self._observer is not None:
            eviction = Eviction(tier, tuple(ids), tuple(removed))
            if self._observer is not None:
                self._observer.evicted(eviction)
            if self.on_evict is not None:
                self.on_evict(eviction)
        return ids

    # -- internals: small helpers ---------------------------------------------------------------
    def _device_tokens(self, pages: np.ndarray) -> torch.Tensor:
        """Token slots of device pages, on the device (allocated on the compute stream)."""
        return self._to_device(self._device_slots.take(pages, axis=0).ravel(), self.compute_stream)

    def _host_tokens(self, pages: np.ndarray) -> torch.Tensor:
        """Token slots (CPU) of host pages."""
        return torch.from_numpy(self._host_slots.take(pages, axis=0).ravel())

    def _transfer_indices(self, device_pages: np.ndarray, host_pages: np.ndarray, stream, *,
                          to_device: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (src, dst) index tensors of a load (``to_device``) or backup, on
        ``stream``'s device: pages, or token slots where transfers move tokens."""
        if self._by_page:
            dev, host = device_pages, host_pages
        else:
            dev = self._device_slots.take(device_pages, axis=0).ravel()
            host = self._host_slots.take(host_pages, axis=0).ravel()
        dev, host = self._to_device(dev, stream), self._to_device(host, stream)
        return (host, dev) if to_device else (dev, host)

    def _to_device(self, slots: np.ndarray, stream) -> torch.Tensor:
        """Slot indices where kernels read them: on the GPU, copied and allocated on
        ``stream`` (the one that uses them first), so they are ready in its order."""
        t = torch.from_numpy(slots)
        if not self._cuda:
            return t
        with torch.cuda.stream(stream):   # queued there, never blocking (pinned staging)
            return indices_to(t, self.device_pool.device)

    def _event(self):
        return self._events.pop() if self._events else self.device.event()

    def _op_id(self) -> int:
        self._next_op += 1
        return self._next_op

    def _rows(self, page_ids: Sequence[Hashable]) -> tuple[list | tuple, np.ndarray]:
        """The ids of a call on pages in the table, as a list or tuple, and their
        rows; raises if the manager is closed or an id is unknown or repeated."""
        if self._closed:
            raise _closed_error()
        ids = _as_list(page_ids)
        rows = self._resolve(ids)
        if not self.table.distinct(rows):
            raise _repeat_error(ids)
        return ids, rows

    def _resolve(self, ids: list | tuple) -> np.ndarray:
        """The rows of ``ids``; an unknown id is a KeyError, but a repeated one is
        reported first (the argument's form before its contents)."""
        try:
            return self.table.resolve(ids)
        except KeyError:
            _check_distinct(ids)
            raise

    def _new_ids(self, page_ids: Sequence[Hashable]) -> list | tuple:
        """The ids of an allocation: distinct, and none in the table yet."""
        if self._closed:
            raise _closed_error()
        ids = _as_list(page_ids)
        _check_distinct(ids)
        index = self.table.index
        if not index.keys().isdisjoint(ids):
            for i in ids:
                if i in index:
                    raise ValueError(f"page_ids: {i!r} is already in the page table")
        return ids

    def _pages(self, page_ids, tier: str) -> np.ndarray:
        ids, rows = self._rows(page_ids)
        pages = getattr(self.table, f"{tier}_page")[rows]
        if np.count_nonzero(pages < 0):
            bad = [ids[i] for i in np.flatnonzero(pages < 0).tolist()]
            raise ValueError(f"page_ids: {bad[:4]!r} have no {tier} copy")
        return pages

    def _refuse_load(self, ids, rows: np.ndarray) -> None:
        """Raise for a load that cannot be done: a repeated id, else the first page
        that cannot be loaded (the slow path)."""
        table = self.table
        if not table.distinct(rows):
            raise _repeat_error(ids)
        for page_id, row in zip(ids, rows.tolist()):
            if (table.state[row] & _LOAD_MASK) != HOST:
                raise ValueError(f"page_ids: {page_id!r} cannot be loaded ({self._why_not(row)})")
        raise AssertionError("_refuse_load: every page is loadable")

    def _why_not(self, row: int) -> str:
        state = self.table.state[row]
        if state & DEVICE:
            return "already on the device" + (" (loading)" if state & LOADING else "")
        if state & FETCHING:
            return "still arriving from storage; wait for its prefetch ack"
        return "no host copy"

    @staticmethod
    def _mark(op: str, tokens: int, layer: int | None = None):
        if not _nvtx_enabled():
            return _NULL
        where = "" if layer is None else f" L{layer}"
        return nvtx_range(f"hicache.{op}{where} n={tokens}")

    def _log_startup(self, device_slots: int, host_slots: int) -> None:
        dlay, cfg = self.device_pool.layout, self.config
        sized = f"hicache_size={cfg.hicache_size} GB" if cfg.hicache_size is not None \
            else f"hicache_ratio={cfg.hicache_ratio:g}"
        log.info("HiCache device pool: %d tokens, %.3f GiB, %s %s, page size %d, on %s",
                 device_slots, dlay.total_bytes / 2**30, dlay.kind.value,
                 str(dlay.dtype).removeprefix("torch."), self.page_size, self.device_pool.device)
        log.info("HiCache host pool: %s (%s)", self.host_pool.describe(), sized)
        load, backup = self._load_transfers[0], self._backup_transfer
        log.info("HiCache transfers: load %s (%s), backup %s (%s), %s; write policy %s; "
                 "streams on %s: load priority %s, backup priority %s; page table: %s",
                 load.backend.name, load.reason, backup.backend.name, backup.reason,
                 "whole pages" if self._by_page else "token slots (host layout splits pages)",
                 self.policy.value, self.device.name,
                 getattr(self.load_stream, "priority", "?"), getattr(self.backup_stream, "priority", "?"),
                 "compiled load path" if self._claimer is not None else "numpy (fastload not built)")
