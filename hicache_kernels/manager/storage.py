"""The hook for a lower tier (L3 storage) below the host pool, and an in-memory one.

The manager calls a storage object through three batch calls, keyed by the
caller's page ids, moving whole host pages:

- ``batch_exists(keys) -> int``: how many leading keys are stored (a prefix,
  as a radix tree matches).
- ``batch_get(keys, host_pages)``: fill those host pages from storage.
- ``batch_set(keys, host_pages)``: write those host pages to storage.

The keys are the page ids themselves. The NIXL tier
(:class:`hicache_kernels.storage.StorageTier`) needs them to be SGLang's
chained page hashes (:func:`hicache_kernels.storage.page_keys`), so a caller
with a storage tier names its pages by those hex strings.

``get``/``set`` return either a sequence of bools (done; one per key) or a
:class:`StorageOp`-like object whose ``poll()`` returns None while running and
the bools when done, and optionally ``wait()`` to block until done; the
manager polls it from :meth:`HiCacheManager.poll` and keeps the host pages
locked until then. A ``get`` op may also offer the prefetch policy:
``can_terminate()`` (the request may go ahead now) and ``terminate() -> m``
(stop; pages ``[0, m)`` are valid, never blocking): see
:meth:`HiCacheManager.check_prefetch`. Ops without them finish completely
(``wait_complete``).

``attach(host_pool)`` is called once before any transfer, so a backend can
register the pool's memory (``host_pool.buffer``, a :class:`KVBuffer`; or
``host_pool.base_address``, ``host_pool.nbytes`` and
``host_pool.page_runs(page)``: ``(offset, nbytes)`` runs, K then V).
Optional: ``detach()``, called by :meth:`HiCacheManager.close` once no op is in
flight and before the host pool is freed; ``stats() -> dict``, merged into
:meth:`HiCacheManager.stats` with a ``storage_`` prefix.
"""

from __future__ import annotations

from typing import Any, Hashable, Protocol, Sequence, runtime_checkable

import numpy as np

from .host_pool import HostPool

__all__ = ["Storage", "StorageOp", "InMemoryStorage"]


@runtime_checkable
class StorageOp(Protocol):
    def poll(self) -> Sequence[bool] | None:
        """None while running; one bool per key when finished."""


@runtime_checkable
class Storage(Protocol):
    def attach(self, host: HostPool) -> None: ...

    def batch_exists(self, keys: Sequence[Hashable]) -> int: ...

    def batch_get(self, keys: Sequence[Hashable], host_pages: np.ndarray) -> Any: ...

    def batch_set(self, keys: Sequence[Hashable], host_pages: np.ndarray) -> Any: ...


class _Deferred:
    """A storage op that finishes when :meth:`InMemoryStorage.complete` runs it."""

    def __init__(self, run):
        self._run = run
        self._result: list[bool] | None = None

    def finish(self) -> None:
        if self._result is None:
            self._result = self._run()

    def poll(self) -> list[bool] | None:
        return self._result

    def wait(self) -> None:
        self.finish()


class InMemoryStorage:
    """A dict of page bytes: the reference storage tier for tests and examples.

    Args:
        defer: return ops that finish only on :meth:`complete` (to test the
            manager with storage transfers in flight).

    Example:
        >>> store = InMemoryStorage()
        >>> # mgr = HiCacheManager(device_pool, storage=store)
    """

    def __init__(self, *, defer: bool = False):
        self.defer = defer
        self.pages: dict[Hashable, Any] = {}
        self._host: HostPool | None = None
        self._ops: list[_Deferred] = []

    def attach(self, host: HostPool) -> None:
        self._host = host

    def batch_exists(self, keys: Sequence[Hashable]) -> int:
        n = 0
        for key in keys:
            if key not in self.pages:
                break
            n += 1
        return n

    def batch_get(self, keys, host_pages):
        keys, host_pages = list(keys), np.asarray(host_pages)

        def run() -> list[bool]:
            ok = [key in self.pages for key in keys]
            for i, key in enumerate(keys):
                if ok[i]:
                    self._host.write_pages(host_pages[i:i + 1], self.pages[key].unsqueeze(0))
            return ok

        return self._start(run)

    def batch_set(self, keys, host_pages):
        keys, host_pages = list(keys), np.asarray(host_pages)

        def run() -> list[bool]:
            data = self._host.read_pages(host_pages)
            for i, key in enumerate(keys):
                self.pages[key] = data[i].clone()
            return [True] * len(keys)

        return self._start(run)

    def complete(self) -> None:
        """Finish every deferred op."""
        ops, self._ops = self._ops, []
        for op in ops:
            op.finish()

    def _start(self, run):
        if not self.defer:
            return run()
        op = _Deferred(run)
        self._ops.append(op)
        return op
