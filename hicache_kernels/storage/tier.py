"""The storage tier the HiCache manager drives: write-through and prefetch in the background.

:class:`StorageTier` implements the manager's storage protocol
(:mod:`hicache_kernels.manager.storage`) on a :class:`~.store.PageStore`
(files through NIXL by default), so the manager only ever sees page keys, host
page indices and ops it polls; it never sees files, NIXL or threads, and the
tier never sees the page table or eviction.

===============================================  ================================================
manager event                                    tier call
===============================================  ================================================
start-up (the host pool exists)                  ``tier.attach(host_pool)`` (opens the store)
pages reached the host pool (backup finished)    ``op = tier.batch_set(keys, host_pages)``
lookup missed device and host                    ``n = tier.batch_exists(keys)`` (hit prefix)
``n`` host pages allocated for the hit            ``op = tier.batch_get(keys[:n], host_pages)``
every scheduling step                            ``op.poll()``: None while running, else bools
the request is due (prefetch policy)             ``if op.can_terminate(): m = op.terminate()``
metrics                                          ``tier.stats()``
shut-down (before the host pool is freed)        ``tier.detach()``
===============================================  ================================================

``host_pages`` are page indices of the host pool (``[n]``; page ``p`` is token
slots ``[p * page_size, (p + 1) * page_size)``). The tier reads (``batch_set``)
or writes (``batch_get``) those pages from a worker thread until the op's
``poll()`` returns its result: the caller keeps them locked until then.

Storage trouble never raises here: a missing, full or read-only directory, a
corrupt or truncated page, a failed transfer all become misses or unstored
pages, counted and logged, and the cache keeps serving from the tiers above.
Only malformed arguments raise ``ValueError``, in the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from .config import StorageConfig
from .store import Counters, PageStore, StorageUnavailable

__all__ = ["StorageTier", "WriteOp", "PrefetchOp"]

log = logging.getLogger(__name__)

_STOP = object()


class WriteOp:
    """One ``batch_set``: pages being written from host pages to storage.

    ``poll()`` is None while the tier may still read the host pages, then one
    bool per page: stored (written now, or found stored already). Only the
    first ``accepted`` pages are written; the rest did not fit in the write
    queue and stay False.
    """

    def __init__(self, keys: list[str], host_pages: np.ndarray, slots: np.ndarray):
        self.keys = keys
        self.host_pages = host_pages
        self.slots = slots
        self.stored: list[bool] = [False] * len(keys)
        self.accepted = 0
        self._done = threading.Event()

    @property
    def num_pages(self) -> int:
        return len(self.keys)

    def poll(self) -> list[bool] | None:
        return list(self.stored) if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; False on timeout."""
        return self._done.wait(timeout)

    def _finish(self) -> None:
        self._done.set()


class PrefetchOp:
    """One ``batch_get``: stored pages being read into host pages, batch by batch.

    The valid pages are always a prefix (each checked against its checksum).
    :meth:`can_terminate` applies the prefetch policy (SGLang's meanings):

    ``best_effort``
        always: the request may proceed with whatever has arrived.
    ``wait_complete``
        once every page was tried (a miss or failure ends the prefix early).
    ``timeout``
        as ``wait_complete``, or once ``min(max, base + per_ki_token * tokens / 1024)``
        seconds have passed.

    :meth:`terminate` stops it without blocking and fixes the result: pages
    ``[0, m)`` are valid, the rest are not. ``poll()`` is None while the tier
    may still write into the host pages (at most the batch in flight after a
    terminate), then the final bools.
    """

    def __init__(self, keys: list[str], host_pages: np.ndarray, slots: np.ndarray, *,
                 policy: str, timeout_s: float):
        self.keys = keys
        self.host_pages = host_pages
        self.slots = slots
        self.policy = policy
        self.timeout_s = timeout_s
        self.start_time = time.monotonic()
        self._lock = threading.Lock()
        self._completed = 0
        self._stopped = False
        self._result: int | None = None
        self._done = threading.Event()

    @property
    def num_pages(self) -> int:
        return len(self.keys)

    @property
    def completed_pages(self) -> int:
        """Leading pages already valid in the host pages."""
        with self._lock:
            return self._completed

    def poll(self) -> list[bool] | None:
        if not self._done.is_set():
            return None
        valid = self.valid_pages()
        return [i < valid for i in range(self.num_pages)]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the tier no longer touches the host pages; False on timeout."""
        return self._done.wait(timeout)

    def can_terminate(self) -> bool:
        if self.policy == "best_effort" or self._done.is_set():
            return True
        return self.policy == "timeout" and time.monotonic() - self.start_time > self.timeout_s

    def terminate(self) -> int:
        """Stop reading; return the number of leading pages valid now. Never blocks."""
        with self._lock:
            self._stopped = True
            if self._result is None:
                self._result = self._completed
            return self._result

    def valid_pages(self) -> int:
        with self._lock:
            return self._completed if self._result is None else self._result

    # -- worker side -------------------------------------------------------------
    def _begin_batch(self) -> bool:
        with self._lock:
            return not self._stopped

    def _end_batch(self, valid_pages: int) -> None:
        with self._lock:
            self._completed += valid_pages

    def _finish(self) -> None:
        self._done.set()


class StorageTier:
    """Background write-through and prefetch over a :class:`PageStore`.

    Args:
        config: a :class:`StorageConfig` or dict (directory, batch size,
            prefetch policy and timeout, queue bound); see docs/storage.md.
        open_store: ``open_store(host, config) -> PageStore``, called by
            :meth:`attach` with the host pool's :class:`KVBuffer`; default
            :class:`~.nixl_store.NixlFileStore` (files through NIXL). Raising
            :class:`StorageUnavailable` gives a disabled tier (logged): every
            lookup misses, every write is dropped.

    Example:
        >>> tier = StorageTier({"directory": "/mnt/nvme/kv", "prefetch_policy": "timeout"})
        >>> mgr = HiCacheManager(device_pool, storage=tier)   # calls tier.attach(host pool)
        >>> mgr.stats()["storage_bytes_read"]
        0
    """

    def __init__(self, config: "StorageConfig | dict | None" = None, *,
                 open_store: Callable[..., PageStore] | None = None):
        self.config = StorageConfig.load(config)
        self._open_store = open_store
        self.store: PageStore | None = None
        self.reason = "not attached"
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stats = Counters(
            lookups=0, lookup_pages=0, lookup_hit_pages=0,
            prefetches=0, prefetch_pages=0, prefetch_loaded_pages=0, prefetch_seconds=0.0,
            stores=0, store_pages=0, store_existing_pages=0, store_written_pages=0,
            store_failed_pages=0, store_dropped_pages=0, store_seconds=0.0,
        )
        self._io_before: dict = {}      # counters of stores already detached
        self._pending_write_pages = 0
        self._threads: list[threading.Thread] = []

    # -- lifetime ------------------------------------------------------------------
    def attach(self, host) -> None:
        """Open the store on ``host`` (the manager's :class:`HostPool`, or a host
        :class:`KVBuffer`) and start the worker threads. Storage that cannot
        start here leaves the tier disabled (logged); a missing NIXL package
        raises ``ImportError``."""
        if self.store is not None:
            raise RuntimeError("attach: the tier is attached to a host pool already; detach() first")
        buffer = getattr(host, "buffer", host)   # HostPool -> its KVBuffer
        open_store = self._open_store
        if open_store is None:
            from .nixl_store import NixlFileStore as open_store
        try:
            store = open_store(buffer, self.config)
        except StorageUnavailable as e:
            self.reason = str(e)
            log.error("storage: tier disabled, serving from device and host only: %s", e)
            return
        self.store, self.reason = store, ""
        self._write_q: queue.Queue = queue.Queue()
        self._prefetch_q: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=loop, args=(store, q), name=name, daemon=True)
                         for name, loop, q in (("hicache-storage-write", self._write_loop, self._write_q),
                                               ("hicache-storage-prefetch", self._prefetch_loop,
                                                self._prefetch_q))]
        for thread in self._threads:
            thread.start()

    def detach(self, *, flush: bool = True) -> None:
        """Finish (or with ``flush=False`` abandon) queued writes, stop the
        threads and release the store and the host pool (idempotent)."""
        store = self.store
        if store is None:
            return
        if flush:
            self.flush()
        with self._lock:        # after this, new calls see a detached tier and queue nothing
            self.store = None
            self.reason = "detached"
            self._write_q.put(_STOP)
            self._prefetch_q.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []
        io = store.io_stats()
        self._io_before = {k: self._io_before.get(k, 0) + v for k, v in io.items()}
        try:
            store.close()
        except Exception:
            log.exception("storage: closing the store failed")

    # -- state ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.store is not None

    @property
    def page_size(self) -> int | None:
        return None if self.store is None else self.store.page_size

    def status(self) -> str:
        if self.store is None:
            return f"storage disabled: {self.reason}"
        return self.store.status()

    def stats(self) -> dict:
        """Counters: lookups and hit pages, prefetched and written pages, bytes
        and seconds of storage I/O, corrupt pages and errors."""
        out = self._stats.snapshot()
        with self._lock:
            out["store_pending_pages"] = self._pending_write_pages
        io = dict(self._io_before)
        store = self.store
        if store is not None:
            for k, v in store.io_stats().items():
                io[k] = io.get(k, 0) + v
        out.update(io)
        return out

    # -- the manager's storage protocol ----------------------------------------------
    def batch_exists(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` whose pages storage holds (0 when disabled)."""
        keys = list(keys)
        store, hit = self.store, 0
        if store is not None and keys:
            try:
                hit = store.batch_exists(keys)
            except ValueError:
                raise  # malformed keys: the caller's bug
            except Exception:
                log.exception("storage: lookup failed; treated as a miss")
        self._stats.add(lookups=1, lookup_pages=len(keys), lookup_hit_pages=hit)
        return hit

    def batch_set(self, keys: Sequence[str], host_pages) -> WriteOp:
        """Queue host pages for writing to storage; returns at once. Pages
        already stored are not written again. At most ``max_pending_writes``
        pages wait: the leading pages that fit are queued, the rest are
        dropped (counted; the host tier still has them) rather than blocking
        the caller."""
        op = WriteOp(*self._check(keys, host_pages))
        n = op.num_pages
        self._stats.add(stores=1, store_pages=n)
        with self._lock:
            if self.store is not None:
                room = self.config.max_pending_writes - self._pending_write_pages
                op.accepted = max(0, min(n, room))
            if op.accepted:
                self._pending_write_pages += op.accepted
                self._write_q.put(op)      # under the lock: detach cannot slip in between
        dropped = n - op.accepted
        if dropped:
            if self.store is not None:
                log.debug("storage: write queue full; %d pages stay in the host tier only", dropped)
            self._stats.add(store_dropped_pages=dropped)
        if not op.accepted:
            op._finish()
        return op

    def batch_get(self, keys: Sequence[str], host_pages) -> PrefetchOp:
        """Start reading stored pages into host pages; returns at once. The
        policy is the configured ``prefetch_policy``."""
        keys, pages, slots = self._check(keys, host_pages)
        op = PrefetchOp(keys, pages, slots, policy=self.config.prefetch_policy,
                        timeout_s=self.config.timeout_for(slots.size))
        self._stats.add(prefetches=1, prefetch_pages=len(keys))
        with self._lock:
            accept = self.store is not None and keys
            if accept:
                self._prefetch_q.put(op)
        if not accept:
            op._finish()
        return op

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_write_pages:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- workers ---------------------------------------------------------------------
    def _write_loop(self, store: PageStore, ops: queue.Queue) -> None:
        batch, page = self.config.batch_pages, store.page_size
        while (op := ops.get()) is not _STOP:
            start = time.perf_counter()
            stored = 0
            accepted = op.accepted
            try:
                existing = store.batch_exists(op.keys[:accepted])
                op.stored[:existing] = [True] * existing
                self._stats.add(store_existing_pages=existing)
                for lo in range(existing, accepted, batch):
                    hi = min(lo + batch, accepted)
                    ok = store.batch_set(op.keys[lo:hi], op.slots[lo * page:hi * page])
                    op.stored[lo:hi] = ok
                    stored += sum(ok)
            except Exception:
                log.exception("storage: write failed; the pages stay in the host tier only")
            failed = accepted - sum(op.stored)
            self._stats.add(store_written_pages=stored, store_failed_pages=failed,
                            store_seconds=time.perf_counter() - start)
            op._finish()
            with self._idle:
                self._pending_write_pages -= accepted
                self._idle.notify_all()

    def _prefetch_loop(self, store: PageStore, ops: queue.Queue) -> None:
        batch, page = self.config.batch_pages, store.page_size
        while (op := ops.get()) is not _STOP:
            start = time.perf_counter()
            for lo in range(0, op.num_pages, batch):
                if not op._begin_batch():
                    break
                hi = min(lo + batch, op.num_pages)
                valid = 0
                try:
                    ok = store.batch_get(op.keys[lo:hi], op.slots[lo * page:hi * page])
                    valid = ok.index(False) if False in ok else len(ok)
                except Exception:
                    log.exception("storage: prefetch failed; the pages are misses")
                op._end_batch(valid)
                if valid < hi - lo:
                    break  # the hit prefix ends here
            op._finish()
            self._stats.add(prefetch_loaded_pages=op.valid_pages(),
                            prefetch_seconds=time.perf_counter() - start)

    # -- helpers ---------------------------------------------------------------------
    def _check(self, keys: Sequence[str], host_pages) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Keys, a private copy of the host pages ``[n]`` and their token slots
        ``[n * page_size]``; bad input raises here, not in a worker."""
        keys = list(keys)
        if hasattr(host_pages, "detach"):
            host_pages = host_pages.detach().cpu().numpy()
        pages = np.array(host_pages, dtype=np.int64, copy=True)
        if pages.ndim != 1:
            raise ValueError(f"host_pages: expected a 1-D sequence of page indices, got shape {pages.shape}")
        store = self.store
        if store is None:
            return keys, pages, pages
        p = store.page_size
        slots = (pages[:, None] * p + np.arange(p, dtype=np.int64)).reshape(-1)
        store.check_pages(keys, slots)
        return keys, pages, slots
