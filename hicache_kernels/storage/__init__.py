"""The L3 storage tier: pages of the host pool kept in files through NIXL.

Bottom to top: :mod:`.keys` (SGLang's chained page hashes), :mod:`.pages`
(where a page lies in the host pool; the page file format), :mod:`.store`
(the :class:`PageStore` interface), :mod:`.nixl_store` (files through a NIXL
file plugin), :mod:`.peer` (another host's memory through NIXL's UCX plugin),
:mod:`.tier` (:class:`StorageTier`: the manager's storage tier, background
write-through and prefetch).
See docs/storage.md.
"""

from .config import StorageConfig
from .keys import hash_page, page_keys
from .store import PageStore, StorageUnavailable

__all__ = ["StorageConfig", "PageStore", "StorageUnavailable", "hash_page", "page_keys",
           "NixlFileStore", "PeerPageServer", "PeerPageStore", "StorageTier", "PrefetchOp", "WriteOp"]


def __getattr__(name):
    # NIXL and the worker threads load only when used.
    if name == "NixlFileStore":
        from .nixl_store import NixlFileStore
        return NixlFileStore
    if name in ("PeerPageServer", "PeerPageStore"):
        from . import peer
        return getattr(peer, name)
    if name in ("StorageTier", "PrefetchOp", "WriteOp"):
        from . import tier
        return getattr(tier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
