"""NVTX ranges in the ``hicache`` domain, free when profiling is off.

Switch on with ``HICACHE_NVTX=1`` in the environment or :func:`enable`. Uses the
``nvtx`` package, which is a no-op without a GPU or a profiler attached.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["DOMAIN", "enable", "enabled", "nvtx_range"]

DOMAIN = "hicache"
_enabled = os.environ.get("HICACHE_NVTX", "0") not in ("", "0")
_NULL = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """A context manager that marks ``name`` in the ``hicache`` domain when on."""
    if not _enabled:
        return _NULL
    try:
        import nvtx
    except ImportError:
        return _NULL
    return nvtx.annotate(name, domain=DOMAIN)
