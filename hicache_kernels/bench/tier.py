"""The one seam between ``hicache-bench e2e`` and the HiCache manager.

The e2e engine asks a cache four things (:class:`~.e2e.Cache`): how many
leading pages of a history are on the device and on the host (``match``; with
a storage tier, the pages after them that storage holds are fetched into host
first); to make a request's pages usable on the device, loading host pages
layer by layer (``acquire``); to keep the first pages cached when the request
is done and drop the rest (``release``); and to collect finished transfers
(``poll``). :class:`HiCacheTier` answers them with
:class:`hicache_kernels.manager.HiCacheManager` (and, with ``storage=``, the
NIXL :class:`hicache_kernels.storage.StorageTier` below it); this is the only
file that knows the manager's API.

Written against the manager's API (``lookup``, ``pin``, ``unpin``, ``load`` ->
handle with ``wait(layer)``, ``alloc_device``, ``device_indices``, ``free``,
``hit``, ``poll``, ``synchronize``, ``stats``, ``close``; with storage,
``prefetch`` and ``check_prefetch``). If it changes, change this file only.
"""

from __future__ import annotations

import time
from typing import Hashable, NamedTuple, Sequence

import torch

from ..buffers import KVBuffer
from ..nvtx_ranges import nvtx_range

__all__ = ["HiCacheTier", "Match"]

_PREFETCH_POLL_S = 0.0002   # between prefetch checks while a request waits for storage


class Match(NamedTuple):
    """What a cache holds of a history: ``device`` leading pages on the device,
    then ``host`` pages to load from host, ``storage`` of which were fetched
    from storage for this match, taking ``wait_s`` seconds."""

    device: int
    host: int
    storage: int = 0
    wait_s: float = 0.0


class HiCacheTier:
    """The device pool plus a host tier, as the e2e engine's cache.

    Args:
        device_pool: the device pool (its ``layout.page_size`` is the page size).
        host_ratio: host pool size as a multiple of the device pool (SGLang's
            ``--hicache-ratio``).
        host_layout: host pool layout kind.
        write_policy: ``write_through``, ``write_through_selective`` or ``write_back``.
        backend, sm_budget: how the manager's transfers run.
        storage: a :class:`~hicache_kernels.storage.StorageConfig` dict for a NIXL
            storage tier below the host pool, or None. Page ids must then be
            page keys (:func:`~hicache_kernels.storage.page_keys`).
        settle: after each request, wait for every transfer and storage write
            in flight, so what the tiers hold never depends on timing (runs
            whose time is modeled).
    """

    name = "with HiCache"

    @staticmethod
    def unavailable() -> str | None:
        """Why the tier cannot run in this build, or None when it can."""
        try:
            from ..manager import HiCacheManager  # noqa: F401
        except ImportError as exc:
            return f"the manager is not in this build ({exc})"
        return None

    def __init__(self, device_pool: KVBuffer, *, host_ratio: float, host_layout: str,
                 write_policy: str, backend: str, sm_budget: int | None,
                 storage: dict | None = None, settle: bool = False, **manager_options):
        from ..manager import HiCacheManager

        self.page_size = device_pool.layout.page_size
        self.storage = None
        if storage is not None:
            from ..storage import StorageTier

            self.storage = StorageTier(storage)
        self.mgr = HiCacheManager(device_pool, hicache_ratio=host_ratio, host_layout=host_layout,
                                  write_policy=write_policy, backend=backend, sm_budget=sm_budget,
                                  storage=self.storage, **manager_options)
        self.acks = 0
        self.settle = settle

    def describe(self) -> str:
        host = self.mgr.host.layout
        text = (f"host tier: {host.num_slots} token slots, {host.kind.value}, "
                f"{self.mgr.config.write_policy}")
        if self.storage is not None:
            text += (f"; storage tier: {self.storage.status()}, prefetch "
                     f"{self.storage.config.prefetch_policy}")
        return text

    def match(self, page_ids: Sequence[Hashable]) -> Match:
        """The leading pages with a device copy, then the pages after them with
        only a host copy. With a storage tier, the stored pages after those are
        first fetched into host (waiting as the prefetch policy says)."""
        on_device, on_host = self._tiers(page_ids)
        if self.storage is None:
            return Match(on_device, on_host)
        rest = list(page_ids[on_device + on_host:])
        absent = next((i for i, s in enumerate(self.mgr.lookup(rest)) if s), len(rest))
        if not absent:
            return Match(on_device, on_host)
        mgr, start = self.mgr, time.perf_counter()
        with nvtx_range(f"bench.e2e.fetch {absent} pages"):
            fetched = mgr.prefetch(rest[:absent])
            if not fetched:
                return Match(on_device, on_host, 0, time.perf_counter() - start)
            while not mgr.check_prefetch(fetched):
                time.sleep(_PREFETCH_POLL_S)
        wait_s = time.perf_counter() - start
        on_device, on_host = self._tiers(page_ids)   # making room may have evicted host pages
        run = set(page_ids[on_device:on_device + on_host])
        return Match(on_device, on_host, sum(1 for i in fetched if i in run), wait_s)

    def _tiers(self, page_ids: Sequence[Hashable]) -> tuple[int, int]:
        from ..manager import PageState

        states = self.mgr.lookup(page_ids)
        on_device = 0
        while on_device < len(states) and states[on_device] & PageState.DEVICE:
            on_device += 1
        end = on_device
        while end < len(states) and states[end] & PageState.HOST \
                and not states[end] & (PageState.DEVICE | PageState.FETCHING):
            end += 1
        on_host = end - on_device
        return on_device, on_host

    def acquire(self, page_ids: Sequence[Hashable], on_device: int, on_host: int):
        """Pin the device hits, start loading the host hits, allocate the rest.

        Returns ``(slots, handle)``: int64 device slots ``[len(page_ids) * P]`` in
        page order, and the load's handle (``wait(layer)``) or None.
        """
        mgr = self.mgr
        ids = list(page_ids)
        hits, loads, new = ids[:on_device], ids[on_device:on_device + on_host], ids[on_device + on_host:]
        parts = []
        with nvtx_range(f"bench.e2e.acquire hit={len(hits)} load={len(loads)} new={len(new)} pages"):
            if hits:
                mgr.pin(hits)
                parts.append(mgr.device_indices(hits))
            handle = None
            if loads:
                handle = mgr.load(loads)
                mgr.pin(loads)
                parts.append(handle.device_indices)
            if new:
                stale = [i for i, s in zip(new, mgr.lookup(new)) if s]
                if stale:   # pages past a gap: recomputed, so forget the old copies
                    mgr.free(stale)
                parts.append(mgr.alloc_device(new))
                mgr.pin(new)
        return torch.cat(parts), handle

    def release(self, page_ids: Sequence[Hashable], keep: int) -> None:
        """Unpin; keep the first ``keep`` pages cached (the write policy may back
        them up), drop the rest."""
        mgr = self.mgr
        ids = list(page_ids)
        with nvtx_range(f"bench.e2e.release keep={keep} pages"):
            mgr.unpin(ids)
            if ids[keep:]:
                mgr.free(ids[keep:])
            if keep:
                # touched last-first, so the head of a history is the most recent and
                # least-recently-used eviction takes tails before the prefix they need
                mgr.hit(ids[:keep][::-1])
            if self.settle:
                mgr.synchronize(storage=True)
            self.poll()

    def poll(self) -> None:
        self.acks += len(self.mgr.poll())

    def counters(self) -> dict:
        return dict(self.mgr.stats(), acks=self.acks)

    def close(self) -> None:
        self.mgr.close()
