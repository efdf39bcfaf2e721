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
from typing import Callable, Iterator

from .pages import PageEntry, PageTable

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


def device_victims(table: PageTable) -> Iterator[PageEntry]:
    """Device pages in LRU order that may be evicted: unpinned and not being loaded."""
    for entry in table.device_lru:
        if entry.pins == 0 and entry.load is None:
            yield entry


def host_victims(table: PageTable, locked: Callable[[int], bool]) -> Iterator[PageEntry]:
    """Host pages in LRU order that no transfer holds: first those with no device
    copy (dropping them removes the page), then redundant copies of device pages."""
    second: list[PageEntry] = []
    for entry in table.host_lru:
        if locked(entry.host_page) or entry.fill is not None or entry.backup is not None:
            continue
        if entry.on_device:
            second.append(entry)
        else:
            yield entry
    yield from second
