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

The table keeps one row per page in numpy arrays: a page id maps to a dense row
index with one dict lookup, and the hot paths (a load of 128 pages, a hit, an
eviction) check and change all their rows with a few vector operations instead
of a Python loop per page. Least-recently-used order is a use stamp per tier:
every touch gives the touched rows fresh, increasing stamps in call order, and
eviction picks the candidates with the smallest stamps when it runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Hashable, Iterator

import numpy as np

__all__ = ["PageAllocator", "PageEntry", "PageTable", "OutOfPages", "unhashable_error",
           "DEVICE", "HOST", "LOADING", "BACKING_UP", "FETCHING", "PINNED", "clear_mask"]

FREE, USED, DEFERRED = 0, 1, 2

# A row's state bits: the same values as manager.PageState, so lookup() is one read.
DEVICE, HOST, LOADING, BACKING_UP, FETCHING, PINNED = 1, 2, 4, 8, 16, 32


def clear_mask(bits: int) -> np.uint8:
    """A uint8 mask that clears ``bits`` (numpy refuses a negative Python int here)."""
    return np.uint8(~bits & 0xFF)


_ARANGE = np.arange(1024, dtype=np.intp)
_ARANGE.flags.writeable = False


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` from a shared read-only cache (hot paths call this per operation)."""
    global _ARANGE
    if n > len(_ARANGE):
        _ARANGE = np.arange(max(n, 2 * len(_ARANGE)), dtype=np.intp)
        _ARANGE.flags.writeable = False
    return _ARANGE[:n]


def _all_distinct(values: np.ndarray, scratch: np.ndarray) -> bool:
    """Whether ``values`` (indices into ``scratch``) has no repeats: write each
    position at its value and read it back; a repeat reads another position."""
    n = len(values)
    if n < 2:
        return True
    positions = _arange(n)
    scratch[values] = positions
    return scratch.take(values).tobytes() == positions.tobytes()   # no ufunc: cheaper here


def unhashable_error(page_ids) -> TypeError:
    """The error for ``page_ids`` (a list or tuple) holding an id that cannot be hashed."""
    for position, page_id in enumerate(page_ids):
        try:
            hash(page_id)
        except TypeError:
            return TypeError(f"page_ids: expected hashable ids, got {type(page_id).__name__} "
                             f"at position {position}")
    return TypeError("page_ids: expected a sequence of hashable ids")


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
        self._scratch = np.zeros(num_pages, dtype=np.intp)
        self.deferred_count = 0

    @property
    def free_count(self) -> int:
        return self._top

    @property
    def used_count(self) -> int:
        return self.num_pages - self._top - self.deferred_count

    def alloc(self, n: int, *, lock: bool = False) -> np.ndarray | None:
        """``n`` free pages (int64), or None when fewer are free; ``lock``: also
        :meth:`lock` them (for the transfer that fills them)."""
        if n > self._top:
            return None
        pages = self._stack[self._top - n:self._top].copy()
        self._top -= n
        self._state[pages] = USED
        if lock:
            self._locks[pages] = 1     # a free page holds no locks
        return pages

    def free(self, pages: np.ndarray) -> None:
        """Give pages back; locked ones are reused only once unlocked."""
        if len(pages) == 0:
            return
        if not _all_distinct(pages, self._scratch):
            raise ValueError(f"{self.name}: a page is freed twice in one call")
        if np.count_nonzero(self._state[pages] != USED):
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

    def locked(self, pages: np.ndarray) -> np.ndarray:
        """Bool per page: whether a transfer in flight holds it."""
        return self._locks[pages] > 0

    def deferred_pages(self) -> np.ndarray:
        """The pages freed while locked, waiting for their transfers to end."""
        return np.flatnonzero(self._state == DEFERRED)

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
    """One page's row of a :class:`PageTable`, read and written through the table.

    ``device_page``/``host_page`` are -1 when absent. ``load`` is the load
    filling the device copy, ``backup`` the backup filling the host copy,
    ``fill`` a storage read filling the host copy, ``storing`` a storage write
    reading it (None when settled); ``in_storage``: storage holds the page (a
    write or read of it succeeded), so it is not written again. The table hands out one entry object per
    live page (``table.get(id) is table.get(id)``); once the page leaves the
    table its entry reads as absent everywhere and ignores writes.
    """

    __slots__ = ("_table", "_idx", "page_id")

    def __init__(self, table: "PageTable", idx: int, page_id: Hashable):
        self._table = table
        self._idx = idx
        self.page_id = page_id

    def _get(self, column: str, absent):
        return absent if self._idx < 0 else getattr(self._table, column)[self._idx]

    @property
    def device_page(self) -> int:
        return int(self._get("device_page", -1))

    @property
    def host_page(self) -> int:
        return int(self._get("host_page", -1))

    @property
    def hits(self) -> int:
        return int(self._get("hits", 0))

    @property
    def pins(self) -> int:
        return int(self._get("pins", 0))

    @property
    def load(self):
        return self._table.ops.get(int(self._get("load_id", 0)))

    @property
    def backup(self):
        return self._table.ops.get(int(self._get("backup_id", 0)))

    @property
    def fill(self):
        return self._get("fill_op", None)

    @fill.setter
    def fill(self, op) -> None:
        if self._idx >= 0:
            t, i = self._table, self._idx
            t.fill_op[i] = op
            if op is None:
                t.state[i] &= clear_mask(FETCHING)
            else:
                t.state[i] |= FETCHING

    @property
    def storing(self):
        return self._get("store_op", None)

    @storing.setter
    def storing(self, op) -> None:
        if self._idx >= 0:
            self._table.store_op[self._idx] = op

    @property
    def in_storage(self) -> bool:
        return bool(self._get("in_storage", False))

    @in_storage.setter
    def in_storage(self, value: bool) -> None:
        if self._idx >= 0:
            self._table.in_storage[self._idx] = value

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


class _Entries(Mapping):
    """``table.entries``: page id -> :class:`PageEntry`, a live view of the table."""

    __slots__ = ("_table",)

    def __init__(self, table: "PageTable"):
        self._table = table

    def __getitem__(self, page_id) -> PageEntry:
        return self._table.view(self._table.index[page_id])

    def __contains__(self, page_id) -> bool:
        return page_id in self._table.index

    def __iter__(self) -> Iterator:
        return iter(self._table.index)

    def __len__(self) -> int:
        return len(self._table.index)


# column name -> (dtype, value of an unused row)
_COLUMNS = {
    "page_ids": (object, None),      # the caller's id of each row
    "device_page": (np.int64, -1),
    "host_page": (np.int64, -1),
    "state": (np.uint8, 0),          # DEVICE | HOST | LOADING | BACKING_UP | FETCHING | PINNED
    "hits": (np.int64, 0),
    "pins": (np.int64, 0),
    "device_used": (np.int64, 0),    # LRU stamps, meaningful while on that tier
    "host_used": (np.int64, 0),
    "load_id": (np.int64, 0),        # op id of the load filling the device copy (0: none)
    "backup_id": (np.int64, 0),      # op id of the backup filling the host copy (0: none)
    "fill_op": (object, None),       # storage read filling the host copy
    "store_op": (object, None),      # storage write reading the host copy
    "in_storage": (np.bool_, False),  # a storage write or read of it succeeded: not written again
    "scratch": (np.intp, 0),         # for repeat checks
}
_RESET = [name for name in _COLUMNS if name not in ("scratch", "device_used", "host_used")]


class PageTable:
    """Page id -> row of per-page arrays, with least-recently-used order per tier.

    Rows are dense indices (``index[page_id]``); the arrays ``device_page``,
    ``host_page``, ``state`` (bits :data:`DEVICE` ... :data:`PINNED`),
    ``hits``, ``pins``, ``load_id``/``backup_id`` (op ids; ``ops`` maps them
    to the op objects in flight), ``fill_op``/``store_op`` and the LRU stamps
    ``device_used``/``host_used`` are indexed by row. Arrays are replaced
    when the table grows: read them from the table on each use.

    Example:
        >>> t = PageTable()
        >>> rows = t.add_many(["a", "b", "c"])
        >>> t.place_host(rows, np.array([7, 8, 9]))
        >>> t.touch_rows(t.resolve(["a"]))             # a is now the most recent
        >>> [e.page_id for e in t.host_lru]
        ['b', 'c', 'a']
    """

    def __init__(self, capacity: int = 64, *, ramp: int = 1 << 16):
        """``capacity``: rows to start with (the table grows); ``ramp``: stamps handed
        out between two rebases of the LRU stamps (a slice of it per call is cheap)."""
        self.index: dict[Hashable, int] = {}
        self.ops: dict[int, object] = {}      # loads and backups in flight, by op id
        self.clock = 0                        # the next LRU stamp
        self._ramp = np.arange(ramp, dtype=np.int64)   # stamps are slices of it
        self._ramp.flags.writeable = False
        self.hw = 0                           # rows [0, hw) have been handed out
        self.removals = 0                     # remove_many calls: a row may be reused after one
        self._recycled = np.empty(capacity, dtype=np.intp)
        self._n_recycled = 0
        self._views: dict[int, PageEntry] = {}
        self.capacity = 0
        self._grow(capacity)

    # -- rows ------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, (dtype, absent) in _COLUMNS.items():
            column = np.full(capacity, absent, dtype=dtype)
            if old:
                column[:old] = getattr(self, name)
            setattr(self, name, column)
        recycled = np.empty(capacity, dtype=np.intp)
        recycled[:self._n_recycled] = self._recycled[:self._n_recycled]
        self._recycled = recycled
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, page_id) -> bool:
        return page_id in self.index

    def resolve(self, page_ids) -> np.ndarray:
        """Rows (intp) of ``page_ids``, a list or tuple; KeyError names a missing id."""
        try:
            return np.fromiter(map(self.index.__getitem__, page_ids), np.intp, len(page_ids))
        except KeyError as exc:
            raise KeyError(f"page_ids: {exc.args[0]!r} is not in the page table") from None
        except TypeError:
            raise unhashable_error(page_ids) from None

    def distinct(self, rows: np.ndarray) -> bool:
        return _all_distinct(rows, self.scratch)

    def add_many(self, page_ids: list) -> np.ndarray:
        """Rows for new pages (ids not in the table and distinct: the caller checked)."""
        n = len(page_ids)
        k = min(n, self._n_recycled)
        fresh = n - k
        if self.hw + fresh > self.capacity:
            self._grow(max(2 * self.capacity, self.hw + fresh))
        rows = np.empty(n, dtype=np.intp)
        rows[:k] = self._recycled[self._n_recycled - k:self._n_recycled]
        self._n_recycled -= k
        rows[k:] = _arange(fresh) + self.hw
        self.hw += fresh
        self.index.update(zip(page_ids, rows.tolist()))
        self.page_ids[rows] = np.fromiter(page_ids, object, n)
        return rows

    def remove_many(self, rows: np.ndarray) -> None:
        """Forget these rows' pages (their slots were released by the caller)."""
        if not len(rows):
            return
        self.removals += 1
        deque(map(self.index.__delitem__, self.page_ids[rows].tolist()), maxlen=0)
        for name in _RESET:
            getattr(self, name)[rows] = _COLUMNS[name][1]
        n = self._n_recycled
        self._recycled[n:n + len(rows)] = rows
        self._n_recycled = n + len(rows)
        if self._views:
            for i in rows.tolist():
                view = self._views.pop(i, None)
                if view is not None:
                    view._idx = -1

    def ids_of(self, rows: np.ndarray) -> list:
        """The page ids of ``rows``, in order."""
        return self.page_ids[rows].tolist()

    # -- tiers and LRU stamps ---------------------------------------------------------
    def stamps(self, n: int) -> np.ndarray:
        """``n`` fresh increasing LRU stamps (later in a call = more recent), a
        read-only view. Only their order matters: when the ramp they are cut from
        runs out, every stamp held shifts down and the clock restarts at 0."""
        c = self.clock
        if c + n > len(self._ramp):
            hw = self.hw
            self.device_used[:hw] -= c
            self.host_used[:hw] -= c
            c = 0
            if n > len(self._ramp):
                self._ramp = np.arange(2 * n, dtype=np.int64)
                self._ramp.flags.writeable = False
        self.clock = c + n
        return self._ramp[c:c + n]

    def place_device(self, rows: np.ndarray, pages: np.ndarray) -> None:
        """Rows (unique, not on the device) get device pages: the most recently used."""
        self.device_page[rows] = pages
        self.state[rows] |= DEVICE
        self.device_used[rows] = self.stamps(len(rows))

    def place_host(self, rows: np.ndarray, pages: np.ndarray) -> None:
        """Rows (unique, not on host) get host pages: the most recently used."""
        self.host_page[rows] = pages
        self.state[rows] |= HOST
        self.host_used[rows] = self.stamps(len(rows))

    def clear_device(self, rows: np.ndarray) -> None:
        self.device_page[rows] = -1
        self.state[rows] &= clear_mask(DEVICE)

    def clear_host(self, rows: np.ndarray) -> None:
        self.host_page[rows] = -1
        self.state[rows] &= clear_mask(HOST)

    def touch_rows(self, rows: np.ndarray) -> None:
        """Mark unique rows most recently used, in order, on the tiers they live on.
        (A stamp on a tier a row is not on is harmless: arriving there restamps it.)"""
        stamps = self.stamps(len(rows))
        self.device_used[rows] = stamps
        self.host_used[rows] = stamps

    def lru_rows(self, tier_bit: int) -> np.ndarray:
        """Rows on a tier (DEVICE or HOST), least recently used first."""
        rows = np.flatnonzero(self.state[:self.hw] & tier_bit)
        used = self.device_used if tier_bit == DEVICE else self.host_used
        return rows[np.argsort(used[rows], kind="stable")]

    # -- one entry at a time (storage paths, tests, debugging) --------------------------
    @property
    def entries(self) -> Mapping:
        """Page id -> :class:`PageEntry` (a live mapping; entries are made on demand)."""
        return _Entries(self)

    @property
    def device_lru(self) -> list[PageEntry]:
        return self.views(self.lru_rows(DEVICE))

    @property
    def host_lru(self) -> list[PageEntry]:
        return self.views(self.lru_rows(HOST))

    def view(self, row: int) -> PageEntry:
        entry = self._views.get(row)
        if entry is None:
            entry = self._views[row] = PageEntry(self, row, self.page_ids[row])
        return entry

    def views(self, rows: np.ndarray) -> list[PageEntry]:
        return [self.view(i) for i in rows.tolist()]

    @staticmethod
    def rows_of(entries: list[PageEntry]) -> np.ndarray:
        return np.array([e._idx for e in entries if e._idx >= 0], dtype=np.intp)

    def get(self, page_id) -> PageEntry | None:
        row = self.index.get(page_id)
        return None if row is None else self.view(row)

    def add(self, page_id) -> PageEntry:
        return self.view(int(self.add_many([page_id])[0]))

    def set_device(self, entry: PageEntry, page: int) -> None:
        self._set(entry, page, DEVICE)

    def set_host(self, entry: PageEntry, page: int) -> None:
        self._set(entry, page, HOST)

    def _set(self, entry: PageEntry, page: int, tier_bit: int) -> None:
        row = entry._idx
        if row < 0:
            return
        rows = np.array([row], dtype=np.intp)
        if tier_bit == DEVICE:
            place, clear, pages = self.place_device, self.clear_device, self.device_page
        else:
            place, clear, pages = self.place_host, self.clear_host, self.host_page
        if page < 0:
            clear(rows)
        elif self.state[row] & tier_bit:
            pages[row] = page               # moved within the tier: its LRU place is kept
        else:
            place(rows, np.array([page], dtype=np.int64))

    def touch(self, entry: PageEntry) -> None:
        """Mark the page most recently used on the tiers it lives on."""
        if entry._idx >= 0:
            self.touch_rows(np.array([entry._idx], dtype=np.intp))

    def remove(self, entry: PageEntry) -> None:
        if entry._idx >= 0:
            self.remove_many(np.array([entry._idx], dtype=np.intp))
