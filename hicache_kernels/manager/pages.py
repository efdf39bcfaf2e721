"""Page allocator (one per pool) and the page table that maps the caller's page ids to slots.

A page is ``page_size`` consecutive token slots of a pool; page ``p`` holds
slots ``p * page_size ... p * page_size + page_size - 1``. The caller names
pages with any hashable id (a radix-tree node, a hash); the table records where
each one lives and what is in flight for it.

Slots are reused only when it is safe: an in-flight transfer *locks* the pages
it reads or writes, and a page freed while locked waits (``DEFERRED``) until
the last lock is gone. That one mechanism implements "a host slot stays locked
until every load reading it has completed" and "a device slot is not released
before its backup completes".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np

__all__ = ["PageAllocator", "PageEntry", "PageTable", "OutOfPages"]

FREE, USED, DEFERRED = 0, 1, 2


class OutOfPages(RuntimeError):
    """A pool has too few pages that can be freed to satisfy an allocation."""


class PageAllocator:
    """Pages ``0 .. num_pages-1`` of one pool.

    Example:
        >>> a = PageAllocator(4, "host")
        >>> pages = a.alloc(2); a.lock(pages); a.free(pages)   # freed while a transfer reads
        >>> a.free_count, a.deferred_count
        (2, 2)
        >>> a.unlock(pages); a.free_count                      # the transfer finished
        4
    """

    def __init__(self, num_pages: int, name: str):
        if num_pages < 1:
            raise ValueError(f"{name}: expected at least one page, got {num_pages}")
        self.name = name
        self.num_pages = num_pages
        # A stack of free pages; LIFO reuse makes reuse hazards show up in tests fast.
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int64)
        self._top = num_pages
        self._state = np.zeros(num_pages, dtype=np.uint8)
        self._locks = np.zeros(num_pages, dtype=np.int32)
        self.deferred_count = 0

    @property
    def free_count(self) -> int:
        return self._top

    @property
    def used_count(self) -> int:
        return self.num_pages - self._top - self.deferred_count

    def alloc(self, n: int) -> np.ndarray | None:
        """``n`` free pages (int64), or None when fewer are free."""
        if n > self._top:
            return None
        pages = self._stack[self._top - n:self._top].copy()
        self._top -= n
        self._state[pages] = USED
        return pages

    def free(self, pages: np.ndarray) -> None:
        """Give pages back; locked ones are reused only once unlocked."""
        if len(pages) == 0:
            return
        if len(pages) > 1 and len(np.unique(pages)) != len(pages):
            raise ValueError(f"{self.name}: a page is freed twice in one call")
        if not (self._state[pages] == USED).all():
            bad = [int(p) for p in pages if self._state[p] != USED]
            raise ValueError(f"{self.name}: pages {bad[:8]} are not allocated (double free?)")
        locked = self._locks[pages] > 0
        if locked.any():
            held = pages[locked]
            self._state[held] = DEFERRED
            self.deferred_count += len(held)
            pages = pages[~locked]
        self._push(pages)

    def lock(self, pages: np.ndarray) -> None:
        """Mark pages as read or written by a transfer in flight (pages unique)."""
        self._locks[pages] += 1

    def unlock(self, pages: np.ndarray) -> None:
        """The transfer finished; free any page that was waiting on it."""
        self._locks[pages] -= 1
        if not self.deferred_count:
            return
        waiting = pages[(self._locks[pages] == 0) & (self._state[pages] == DEFERRED)]
        if len(waiting):
            self.deferred_count -= len(waiting)
            self._push(waiting)

    def is_locked(self, page: int) -> bool:
        return bool(self._locks[page])

    def free_pages(self) -> np.ndarray:
        """The pages an ``alloc`` may hand out next (for invariant checks)."""
        return self._stack[:self._top].copy()

    def state(self, page: int) -> str:
        return ("free", "used", "deferred")[self._state[page]]

    def _push(self, pages: np.ndarray) -> None:
        n = len(pages)
        self._state[pages] = FREE
        self._stack[self._top:self._top + n] = pages
        self._top += n


class PageEntry:
    """Where one page lives and what is in flight for it.

    ``device_page``/``host_page`` are -1 when absent. ``load`` is the load
    filling the device copy, ``backup`` the backup filling the host copy,
    ``fill`` a storage read filling the host copy (None when settled).
    """

    __slots__ = ("page_id", "device_page", "host_page", "load", "backup", "fill", "hits", "pins",
                 "storing")

    def __init__(self, page_id: Hashable):
        self.page_id = page_id
        self.device_page = -1
        self.host_page = -1
        self.load = None
        self.backup = None
        self.fill = None
        self.storing = None   # a storage write reading the host copy
        self.hits = 0
        self.pins = 0

    @property
    def on_device(self) -> bool:
        return self.device_page >= 0

    @property
    def on_host(self) -> bool:
        return self.host_page >= 0

    def __repr__(self) -> str:
        return (f"PageEntry({self.page_id!r}, device={self.device_page}, host={self.host_page}, "
                f"load={self.load is not None}, backup={self.backup is not None}, "
                f"fill={self.fill is not None}, hits={self.hits}, pins={self.pins})")


class PageTable:
    """Page id -> :class:`PageEntry`, with least-recently-used order per tier.

    ``device_lru``/``host_lru`` hold the entries with a copy on that tier, least
    recently used first (keyed by entry: identity hashing keeps the hot path cheap).
    """

    def __init__(self):
        self.entries: dict[Hashable, PageEntry] = {}
        self.device_lru: OrderedDict[PageEntry, None] = OrderedDict()
        self.host_lru: OrderedDict[PageEntry, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, page_id) -> bool:
        return page_id in self.entries

    def get(self, page_id) -> PageEntry | None:
        return self.entries.get(page_id)

    def add(self, page_id) -> PageEntry:
        entry = PageEntry(page_id)
        self.entries[page_id] = entry
        return entry

    def set_device(self, entry: PageEntry, page: int) -> None:
        entry.device_page = page
        if page >= 0:
            self.device_lru[entry] = None
        else:
            self.device_lru.pop(entry, None)

    def set_host(self, entry: PageEntry, page: int) -> None:
        entry.host_page = page
        if page >= 0:
            self.host_lru[entry] = None
        else:
            self.host_lru.pop(entry, None)

    def touch(self, entry: PageEntry) -> None:
        """Mark the page most recently used on the tiers it lives on."""
        if entry.device_page >= 0:
            self.device_lru.move_to_end(entry)
        if entry.host_page >= 0:
            self.host_lru.move_to_end(entry)

    def remove(self, entry: PageEntry) -> None:
        del self.entries[entry.page_id]
        self.device_lru.pop(entry, None)
        self.host_lru.pop(entry, None)
