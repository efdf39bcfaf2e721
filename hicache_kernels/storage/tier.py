"""The storage tier a cache manager drives: write-back and prefetch in the background.

The seam is small on purpose: the manager hands over page keys and the host
slots that hold (or will hold) those pages, and gets back handles it can poll
or be called back from. It never sees files, NIXL or threads; the tier never
sees radix trees or eviction.

===============================================  ================================================
manager event                                    call
===============================================  ================================================
start-up                                         ``tier = StorageTier.open(host_pool, config)``
pages reached the host pool (backup finished)    ``tier.write_back(keys, host_indices, on_done=)``
lookup missed device and host after page ``k``   ``n = tier.lookup(keys[k:])``
allocated ``n`` host pages for the hit            ``h = tier.prefetch(keys[k:k+n], host_indices)``
every scheduling step, per pending prefetch      ``if h.can_terminate(): m = h.terminate()``
                                                 (pages ``[0, m)`` valid; free the rest)
metrics                                          ``tier.stats()``
shut-down                                        ``tier.close()``
===============================================  ================================================

Host slots given to :meth:`StorageTier.write_back` must stay unchanged, and
slots given to :meth:`StorageTier.prefetch` must stay unused, until the
handle is done (write-back) or terminated (prefetch): the tier reads or
writes them from a worker thread until then.

Storage trouble never raises here: a missing, full or read-only directory, a
corrupt or truncated page, a failed transfer, all become misses or unwritten
pages, counted and logged, and the cache keeps serving from the tiers above.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from .config import PREFETCH_POLICIES, StorageConfig
from .store import Counters, PageStore, StorageUnavailable

__all__ = ["StorageTier", "WriteHandle", "PrefetchHandle"]

log = logging.getLogger(__name__)

_STOP = object()


class WriteHandle:
    """One write-back: ``stored[i]`` says whether page ``i`` is in storage
    (written now, or found there already), once :meth:`done`."""

    def __init__(self, keys: list[str], host_indices: np.ndarray, on_done: Callable | None):
        self.keys = keys
        self.host_indices = host_indices
        self.stored: list[bool] = [False] * len(keys)
        self._on_done = on_done
        self._event = threading.Event()

    @property
    def num_pages(self) -> int:
        return len(self.keys)

    def done(self) -> bool:
        """True once the tier no longer reads the host slots."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def _finish(self) -> None:
        self._event.set()
        _call_back(self._on_done, self)


class PrefetchHandle:
    """One prefetch of a storage hit into host slots.

    ``completed_pages`` grows batch by batch (a prefix, each page checksummed).
    :meth:`can_terminate` applies the policy; :meth:`terminate` stops it and
    returns how many leading pages are valid in the host slots.

    Policies (SGLang's meanings):
        ``best_effort``: may stop at any time; use whatever has arrived.
        ``wait_complete``: stop only once every page has been tried.
        ``timeout``: like ``wait_complete``, but give up after
            ``min(max, base + per_ki_token * tokens / 1024)`` seconds.
    """

    def __init__(self, keys: list[str], host_indices: np.ndarray, *, policy: str,
                 timeout_s: float, on_done: Callable | None):
        self.keys = keys
        self.host_indices = host_indices
        self.policy = policy
        self.timeout_s = timeout_s
        self.start_time = time.monotonic()
        self._on_done = on_done
        self._cond = threading.Condition()
        self._completed = 0
        self._in_flight = False
        self._stopped = False
        self._finished = threading.Event()
        self._result: int | None = None

    @property
    def num_pages(self) -> int:
        return len(self.keys)

    @property
    def completed_pages(self) -> int:
        """Leading pages already valid in the host slots."""
        with self._cond:
            return self._completed

    def finished(self) -> bool:
        """Every page was tried (or a miss/failure ended the prefix early)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def can_terminate(self) -> bool:
        if self.policy == "best_effort":
            return True
        if self.finished():
            return True
        return self.policy == "timeout" and time.monotonic() - self.start_time > self.timeout_s

    def terminate(self) -> int:
        """Stop; wait for a batch in flight (at most ``batch_pages`` pages);
        return the number of leading pages valid in the host slots. The slots
        of the other pages are the caller's again."""
        with self._cond:
            self._stopped = True
            while self._in_flight:
                self._cond.wait()
            if self._result is None:
                self._result = self._completed
            return self._result

    # -- worker side -------------------------------------------------------------
    def _begin_batch(self) -> bool:
        with self._cond:
            if self._stopped:
                return False
            self._in_flight = True
            return True

    def _end_batch(self, valid_pages: int) -> None:
        with self._cond:
            self._completed += valid_pages
            self._in_flight = False
            self._cond.notify_all()

    def _finish(self) -> None:
        self._finished.set()
        _call_back(self._on_done, self)


class StorageTier:
    """Background write-back and prefetch over a :class:`PageStore`.

    Args:
        store: the backend, or None for a disabled tier (every lookup misses,
            every write is dropped) - what :meth:`open` returns when storage
            cannot start.
        config: batch size, prefetch policy and timeout, queue bound.
        reason: why the tier is disabled, for :meth:`status`.

    Example:
        >>> tier = StorageTier.open(host, {"directory": "/mnt/nvme/kv"})
        >>> keys = page_keys(tokens, host.layout.page_size)
        >>> tier.write_back(keys, host_indices).wait()
        >>> n = tier.lookup(keys)
        >>> h = tier.prefetch(keys[:n], free_host_indices)
        >>> valid = h.terminate() if h.can_terminate() else None
    """

    def __init__(self, store: PageStore | None, config: "StorageConfig | dict | None" = None, *,
                 reason: str = ""):
        self.store = store
        self.config = StorageConfig.load(config)
        self.reason = reason
        self._lock = threading.Lock()
        self._stats = Counters(
            lookups=0, lookup_pages=0, lookup_hit_pages=0,
            prefetches=0, prefetch_pages=0, prefetch_loaded_pages=0, prefetch_seconds=0.0,
            write_backs=0, write_pages=0, write_existing_pages=0, write_stored_pages=0,
            write_failed_pages=0, write_dropped_pages=0, write_back_seconds=0.0,
        )
        self._pending_write_pages = 0
        self._idle = threading.Condition(self._lock)
        self._write_q: queue.Queue = queue.Queue()
        self._prefetch_q: queue.Queue = queue.Queue()
        self._closed = False
        self._threads = []
        if store is not None:
            for name, loop in (("hicache-storage-write", self._write_loop),
                               ("hicache-storage-prefetch", self._prefetch_loop)):
                thread = threading.Thread(target=loop, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    @classmethod
    def open(cls, host, config: "StorageConfig | dict | None" = None) -> "StorageTier":
        """A tier over a :class:`NixlFileStore` of ``host``; disabled (logged) when
        the store cannot start here. Malformed configuration still raises."""
        cfg = StorageConfig.load(config)
        from .nixl_store import NixlFileStore
        try:
            store = NixlFileStore(host, cfg)
        except StorageUnavailable as e:
            log.error("storage: tier disabled, serving from device and host only: %s", e)
            return cls(None, cfg, reason=str(e))
        return cls(store, cfg)

    # -- state -------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.store is not None and not self._closed

    @property
    def page_size(self) -> int | None:
        return None if self.store is None else self.store.page_size

    def status(self) -> str:
        if self.store is None:
            return f"storage disabled: {self.reason or 'no store'}"
        return self.store.status()

    def stats(self) -> dict:
        """Counters: lookups and hit pages, prefetched and written pages, bytes
        and seconds of storage I/O, corrupt pages and errors."""
        out = self._stats.snapshot()
        with self._lock:
            out["pending_write_pages"] = self._pending_write_pages
        if self.store is not None:
            out.update(self.store.io_stats())
        return out

    # -- the calls a manager makes -------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` whose pages storage holds (0 when disabled)."""
        keys = list(keys)
        hit = 0
        if self.enabled and keys:
            try:
                hit = self.store.batch_exists(keys)
            except ValueError:
                raise  # malformed keys: the caller's bug
            except Exception:
                log.exception("storage: lookup failed; treated as a miss")
        self._stats.add(lookups=1, lookup_pages=len(keys), lookup_hit_pages=hit)
        return hit

    def write_back(self, keys: Sequence[str], host_indices, *,
                   on_done: Callable[[WriteHandle], None] | None = None) -> WriteHandle:
        """Queue pages that reached the host pool for writing to storage.

        ``on_done(handle)`` runs on the writer thread when the host slots are
        no longer read (also when the pages were dropped or failed).
        """
        keys, idx = self._check(keys, host_indices)
        handle = WriteHandle(keys, idx, on_done)
        self._stats.add(write_backs=1, write_pages=len(keys))
        with self._lock:
            accept = (self.enabled and keys
                      and self._pending_write_pages + len(keys) <= self.config.max_pending_writes)
            if accept:
                self._pending_write_pages += len(keys)
        if not accept:
            if keys and self.enabled:
                log.debug("storage: write-back queue full; %d pages stay in the host tier only", len(keys))
            self._stats.add(write_dropped_pages=len(keys))
            handle._finish()
            return handle
        self._write_q.put(handle)
        return handle

    def prefetch(self, keys: Sequence[str], host_indices, *, policy: str | None = None,
                 on_done: Callable[[PrefetchHandle], None] | None = None) -> PrefetchHandle:
        """Start reading stored pages into host slots; returns at once.

        ``policy`` overrides the configured one. ``on_done(handle)`` runs on
        the prefetch thread once every page was tried or the prefetch stopped.
        """
        policy = policy or self.config.prefetch_policy
        if policy not in PREFETCH_POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(PREFETCH_POLICIES)}, got {policy!r}")
        keys, idx = self._check(keys, host_indices)
        timeout_s = self.config.timeout_for(idx.size)
        handle = PrefetchHandle(keys, idx, policy=policy, timeout_s=timeout_s, on_done=on_done)
        self._stats.add(prefetches=1, prefetch_pages=len(keys))
        if not self.enabled or not keys:
            handle._finish()
            return handle
        self._prefetch_q.put(handle)
        return handle

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write-back is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_write_pages:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, *, flush: bool = True) -> None:
        """Finish (or with ``flush=False`` abandon) queued work, stop the threads,
        release the store."""
        if self._closed:
            return
        if flush:
            self.flush()
        self._closed = True
        self._write_q.put(_STOP)
        self._prefetch_q.put(_STOP)
        for thread in self._threads:
            thread.join()
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                log.exception("storage: closing the store failed")

    # -- workers -----------------------------------------------------------------
    def _write_loop(self) -> None:
        batch = self.config.batch_pages
        page = self.store.page_size
        while (handle := self._write_q.get()) is not _STOP:
            start = time.perf_counter()
            stored = 0
            try:
                if not self._closed:
                    existing = self.store.batch_exists(handle.keys)
                    handle.stored[:existing] = [True] * existing
                    self._stats.add(write_existing_pages=existing)
                    for lo in range(existing, handle.num_pages, batch):
                        hi = min(lo + batch, handle.num_pages)
                        ok = self.store.batch_set(handle.keys[lo:hi], handle.host_indices[lo * page:hi * page])
                        handle.stored[lo:hi] = ok
                        stored += sum(ok)
            except Exception:
                log.exception("storage: write-back failed; pages stay in the host tier only")
            failed = handle.num_pages - sum(handle.stored)
            self._stats.add(write_stored_pages=stored, write_failed_pages=failed,
                            write_back_seconds=time.perf_counter() - start)
            handle._finish()
            with self._idle:
                self._pending_write_pages -= handle.num_pages
                self._idle.notify_all()

    def _prefetch_loop(self) -> None:
        batch = self.config.batch_pages
        page = self.store.page_size
        while (handle := self._prefetch_q.get()) is not _STOP:
            start = time.perf_counter()
            loaded = 0
            for lo in range(0, handle.num_pages, batch):
                if self._closed or not handle._begin_batch():
                    break
                hi = min(lo + batch, handle.num_pages)
                valid = 0
                try:
                    ok = self.store.batch_get(handle.keys[lo:hi], handle.host_indices[lo * page:hi * page])
                    valid = ok.index(False) if False in ok else len(ok)
                except Exception:
                    log.exception("storage: prefetch failed; the pages are misses")
                handle._end_batch(valid)
                loaded += valid
                if valid < hi - lo:
                    break  # the hit prefix ends here
            self._stats.add(prefetch_loaded_pages=loaded, prefetch_seconds=time.perf_counter() - start)
            handle._finish()

    # -- helpers -------------------------------------------------------------------
    def _check(self, keys: Sequence[str], host_indices) -> tuple[list[str], np.ndarray]:
        keys = list(keys)
        if self.store is not None:
            self.store.check_pages(keys, host_indices)  # bad input raises here, not in a worker
        if hasattr(host_indices, "detach"):
            host_indices = host_indices.detach().cpu().numpy()
        # A private copy: the caller may reuse its index tensor at once.
        return keys, np.array(host_indices, dtype=np.int64, copy=True).reshape(-1)


def _call_back(fn: Callable | None, handle) -> None:
    if fn is None:
        return
    try:
        fn(handle)
    except Exception:
        log.exception("storage: completion callback %r raised", fn)
