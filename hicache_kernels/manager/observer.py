"""What the manager tells its observers: copies of pages appearing on and leaving
each tier, hits, transfers started and finished, evictions, close.

An observer is any object with the methods of :class:`ManagerObserver` (subclass
it and override what you need). Pass observers to the manager
(``HiCacheManager(..., observers=[...])``); without any, the manager checks one
attribute for None at each point below and does nothing else.

The manager calls them on its own thread, after a change is committed, never
for a call that raised. An observer must be quick and must not raise: it runs
inside the manager's calls (``load()`` included), and an exception there would
surface from a call whose work is already done.

Tiers are ``"device"``, ``"host"`` and ``"storage"``. ``stored``/``removed``
follow the page table's device and host bits exactly (a page counts as on a
tier from the moment the table places it there, as ``lookup`` reports it:
while a load, backup or storage read is still filling it too), and pages that
a storage write stored. The manager never deletes from storage, so storage
has no ``removed``.

Implementations: :mod:`hicache_kernels.observers` (KV events over ZMQ,
Prometheus metrics).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["ManagerObserver", "TIERS", "observer_of"]

TIERS = ("device", "host", "storage")


class ManagerObserver:
    """The calls a :class:`~hicache_kernels.manager.HiCacheManager` makes; each a no-op here."""

    def attach(self, manager) -> None:
        """Once, early in the manager's construction: ``page_size``, ``num_layers``,
        ``device_pool`` and ``config`` are set, nothing is allocated yet (raising
        here fails the construction, leaving nothing behind). Keep ``manager`` to
        read its public API later (``stats()``, ``device_pages``, ``host_pages``)."""

    def stored(self, tier: str, page_ids: Sequence) -> None:
        """``page_ids`` (in the caller's order) now have a copy on ``tier``."""

    def removed(self, tier: str, page_ids: Sequence) -> None:
        """``page_ids`` no longer have a copy on ``tier``: ``"device"`` or ``"host"``, or
        ``"storage"`` for the page at which a prefetch's reads stopped, missing or
        damaged (whoever wrote it; the storage tier deletes a damaged page)."""

    def evicted(self, eviction) -> None:
        """An eviction (the :class:`~hicache_kernels.manager.Eviction` ``on_evict`` gets),
        after the ``removed`` it caused."""

    def hit(self, tier: str, num_pages: int) -> None:
        """``hit()`` named ``num_pages`` pages that had a device copy (``tier="device"``)."""

    def started(self, kind: str, op_id: int, page_ids: Sequence) -> None:
        """A transfer started: ``kind`` is ``"load"`` (host -> device), ``"backup"``
        (device -> host), ``"prefetch"`` (storage -> host) or ``"store"`` (host -> storage)."""

    def finished(self, ack) -> None:
        """A transfer finished: the :class:`~hicache_kernels.manager.Ack` that
        ``poll()`` will report (``ack.failed``: pages a storage op could not move)."""

    def closed(self) -> None:
        """The manager closed: nothing is on its device or host tiers any more."""


class _Observers(ManagerObserver):
    """Several observers, called in order."""

    def __init__(self, observers: Sequence[ManagerObserver]):
        self.observers = tuple(observers)

    def attach(self, manager) -> None:
        for o in self.observers:
            o.attach(manager)

    def stored(self, tier, page_ids) -> None:
        for o in self.observers:
            o.stored(tier, page_ids)

    def removed(self, tier, page_ids) -> None:
        for o in self.observers:
            o.removed(tier, page_ids)

    def evicted(self, eviction) -> None:
        for o in self.observers:
            o.evicted(eviction)

    def hit(self, tier, num_pages) -> None:
        for o in self.observers:
            o.hit(tier, num_pages)

    def started(self, kind, op_id, page_ids) -> None:
        for o in self.observers:
            o.started(kind, op_id, page_ids)

    def finished(self, ack) -> None:
        for o in self.observers:
            o.finished(ack)

    def closed(self) -> None:
        for o in self.observers:
            o.closed()


_METHODS = ("attach", "stored", "removed", "evicted", "hit", "started", "finished", "closed")


def observer_of(observers) -> ManagerObserver | None:
    """The one object the manager calls: None for no observers (the manager's
    checks then cost one comparison), the observer itself for one, else a fan-out.
    TypeError names an object that lacks an observer method."""
    if observers is None:
        return None
    if not isinstance(observers, (list, tuple)):
        observers = [observers]
    for o in observers:
        missing = [m for m in _METHODS if not callable(getattr(o, m, None))]
        if missing:
            raise TypeError(f"observers: {type(o).__name__} lacks {missing} "
                            f"(subclass hicache_kernels.manager.ManagerObserver)")
    if not observers:
        return None
    return observers[0] if len(observers) == 1 else _Observers(observers)
