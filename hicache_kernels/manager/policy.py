"""Write policies (when a device page is backed up to host) and eviction order.

Write policies, with SGLang's meanings (``HiRadixCache.inc_hit_count`` /
``evict``): a *hit* is the caller inserting or matching a page.

=========================  ==================================================
``write_through``          back up a page on its first hit
``write_through_selective`` back up a page once it is hit again (threshold 2)
``write_back``             never on a hit; back up when the page is evicted
                           from the device, and the device slot is released
                           only when that copy has completed
=========================  ==================================================

Under the write-through policies a device page evicted without a host copy is
dropped (SGLang's ``_evict_regular``).

Eviction takes least-recently-used pages that no transfer holds and nobody pinned.
"""

from __future__ import annotations

import enum
from typing import Callable

import numpy as np

from .pages import BACKING_UP, DEVICE, FETCHING, HOST, LOADING, PINNED, PageTable

__all__ = ["WritePolicy", "device_victims", "host_victims"]


class WritePolicy(str, enum.Enum):
    WRITE_THROUGH = "write_through"
    WRITE_THROUGH_SELECTIVE = "write_through_selective"
    WRITE_BACK = "write_back"

    @classmethod
    def parse(cls, value: "WritePolicy | str") -> "WritePolicy":
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"write_policy: expected one of {names}, got {value!r}") from None

    def default_threshold(self) -> int | None:
        """Hits after which a page is backed up; None: only on eviction."""
        return {WritePolicy.WRITE_THROUGH: 1, WritePolicy.WRITE_THROUGH_SELECTIVE: 2}.get(self)

    @property
    def backs_up_on_evict(self) -> bool:
        return self is WritePolicy.WRITE_BACK


def device_victims(table: PageTable, k: int) -> np.ndarray:
    """Rows of up to ``k`` device pages that may be evicted, least recently used
    first: unpinned and not being loaded."""
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    state = table.state[:table.hw]
    rows = np.flatnonzero((state & (DEVICE | LOADING | PINNED)) == DEVICE)
    return _oldest(rows, table.device_used[rows], k)


def host_victims(table: PageTable, locked: Callable[[np.ndarray], np.ndarray],
                 k: int) -> np.ndarray:
    """Rows of up to ``k`` host pages that no transfer holds, least recently used
    first: first those with no device copy (dropping them removes the page), then
    redundant copies of device pages. ``locked(host_pages)``: bool per page."""
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    state = table.state[:table.hw]
    rows = np.flatnonzero((state & (HOST | BACKING_UP | FETCHING)) == HOST)
    rows = rows[~locked(table.host_page[rows])]
    # stamps are far below 2**62: a device copy puts a row behind every host-only one
    keys = table.host_used[rows] + ((state[rows] & DEVICE).astype(np.int64) << 62)
    return _oldest(rows, keys, k)


def _oldest(rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows with the smallest keys, smallest first (keys are distinct)."""
    if len(rows) > k:
        part = np.argpartition(keys, k - 1)[:k]
        rows, keys = rows[part], keys[part]
    return rows[np.argsort(keys)]
