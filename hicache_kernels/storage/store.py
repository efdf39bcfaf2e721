"""The storage interface every L3 backend implements, and its failure type."""

from __future__ import annotations

import threading
import time
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["PageStore", "StorageUnavailable", "Counters", "io_counters", "count_io"]


class StorageUnavailable(RuntimeError):
    """The store cannot start here (directory unusable, no NIXL plugin...).

    :meth:`StorageTier.attach` catches it, logs it and serves without storage.
    """


@runtime_checkable
class PageStore(Protocol):
    """Pages keyed by their chained hash (:func:`~.keys.page_keys`).

    ``host_indices`` are token-slot indices of the host pool, ``page_size``
    per page, each page's slots consecutive from a multiple of ``page_size``
    (``[n_pages * page_size]``, int). Methods never raise for storage
    trouble (missing, corrupt, full, read-only): they report misses and
    failures; they raise ``ValueError`` for malformed arguments.
    """

    page_size: int

    def check_pages(self, keys: Sequence[str], host_indices) -> tuple[list[str], object]:
        """Validate arguments of the batch calls; ``ValueError`` naming the bad one."""

    def batch_exists(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` whose pages are stored completely."""

    def batch_get(self, keys: Sequence[str], host_indices) -> list[bool]:
        """Read pages into the host slots; ``True`` for each page that is now
        valid there. Always a prefix: after the first ``False`` all are
        ``False``, and those slots hold undefined bytes."""

    def batch_set(self, keys: Sequence[str], host_indices) -> list[bool]:
        """Write pages from the host slots; ``True`` for each page now stored."""

    def status(self) -> str:
        """One line: where pages go and whether reads/writes work."""

    def io_stats(self) -> dict:
        """Counters of bytes, seconds and errors so far."""

    def close(self) -> None:
        """Release the backend (idempotent)."""


class Counters:
    """Named numbers that several threads add to; :meth:`snapshot` reads them all."""

    def __init__(self, **initial: float):
        self._values = dict(initial)
        self._lock = threading.Lock()

    def add(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                self._values[name] += value

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)


def io_counters() -> Counters:
    """The counters every store keeps (see ``PageStore.io_stats``)."""
    return Counters(pages_read=0, bytes_read=0, read_seconds=0.0, pages_written=0,
                    bytes_written=0, write_seconds=0.0, corrupt_pages=0, read_errors=0,
                    write_errors=0)


def count_io(counters: Counters, kind: str, pages: int, page_bytes: int, started: float) -> None:
    """Add one batch to a store's ``io_counters``: ``kind`` is ``"read"`` or
    ``"written"``; ``started`` is the batch's ``time.perf_counter()`` start."""
    seconds = "read_seconds" if kind == "read" else "write_seconds"
    counters.add(**{f"pages_{kind}": pages, f"bytes_{kind}": pages * page_bytes,
                    seconds: time.perf_counter() - started})
