"""SGLang HiCache storage backend on the NIXL storage tier (:mod:`hicache_kernels.storage`).

SGLang loads it by module path::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "hicache_kernels",
        "module_path": "hicache_kernels.integrations.sglang_storage",
        "class_name": "HiCacheKernelsStorage", "interface_v1": 1,
        "directory": "/mnt/nvme/hicache"}'

``interface_v1`` makes SGLang call :meth:`~HiCacheKernelsStorage.batch_get_v1`
and :meth:`~HiCacheKernelsStorage.batch_set_v1` with host-pool indices: one
NIXL transfer per batch moves the pages straight between SGLang's host pool
(registered with NIXL once) and the page files, with no copy. Without it
SGLang goes through ``get``/``set`` and a flat copy of each page, which work
too (through a one-page buffer), only slower.

The other keys of the extra config are the storage tier's (``directory``,
``namespace``, ``plugin``, ``plugin_params``, ``batch_pages``, ``fsync``;
:mod:`hicache_kernels.storage.config`; ``HICACHE_STORAGE_*`` variables
too). Everything the tier guarantees holds: a page is visible only once
complete (temporary name, then rename), every read is checked against the
CRC-32 its writer recorded (a damaged page is a miss, and removed), pages
survive restarts and are shared by every process on the same directory.

Pages of different models and tensor-parallel ranks never mix: the namespace
(a folder) carries the model name and, unless the model is MLA, the TP rank
and size (``Qwen-Qwen3-8B_0_2``), plus pipeline and context-parallel shards
as SGLang's own file backend does. MLA pages are the same on every rank: TP
rank 0 writes them, all ranks read them (``Qwen-DeepSeek-V3`` for all).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ..buffers import KVBuffer
from ..layouts import KVLayout
from ..storage import NixlFileStore, StorageConfig, StorageUnavailable

__all__ = ["HiCacheKernelsStorage", "host_buffer", "storage_namespace"]

log = logging.getLogger(__name__)

# Keys of the extra config that are SGLang's, not the storage tier's.
SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")
LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


def storage_namespace(storage_config: HiCacheStorageConfig, prefix: str = "") -> str:
    """The folder a rank's pages go to: model, TP rank and size unless MLA,
    pipeline and context-parallel shards; ``prefix`` (the tier's
    ``namespace``) first when given."""
    model = "-".join(storage_config.model_name.split("/")) if storage_config.model_name else "model"
    shard = f"_{storage_config.pp_size}_{storage_config.pp_rank}" if storage_config.pp_size > 1 else ""
    if storage_config.attn_cp_size > 1:
        shard += f"_cp{storage_config.attn_cp_rank}_{storage_config.attn_cp_size}"
    if storage_config.is_mla_model:
        name = f"{model}{shard}"
    else:
        name = f"{model}_{storage_config.tp_rank}_{storage_config.tp_size}{shard}"
    return f"{prefix}_{name}" if prefix else name


def host_buffer(mem_pool_host) -> KVBuffer:
    """SGLang's host pool as a :class:`KVBuffer` sharing its memory; ValueError
    for a pool this backend does not store."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    mla = isinstance(mem_pool_host, MLATokenToKVPoolHost)
    if not mla and not isinstance(mem_pool_host, MHATokenToKVPoolHost):
        raise ValueError(f"mem_pool_host: expected SGLang's MHATokenToKVPoolHost or "
                         f"MLATokenToKVPoolHost, got {type(mem_pool_host).__name__}")
    if mem_pool_host.layout not in LAYOUTS:
        raise ValueError(f"mem_pool_host: layout {mem_pool_host.layout!r} is not stored here; "
                         f"use one of {', '.join(LAYOUTS)}")
    if not mla and mem_pool_host.v_head_dim != mem_pool_host.head_dim:
        raise ValueError(f"mem_pool_host: K and V head dims differ ({mem_pool_host.head_dim} and "
                         f"{mem_pool_host.v_head_dim}); not stored here")
    layout = KVLayout(mem_pool_host.layout, num_layers=mem_pool_host.layer_num,
                      num_slots=mem_pool_host.size, head_num=1 if mla else mem_pool_host.head_num,
                      head_dim=mem_pool_host.kv_cache_dim if mla else mem_pool_host.head_dim,
                      dtype=mem_pool_host.dtype, page_size=mem_pool_host.page_size, mla=mla)
    kv = mem_pool_host.kv_buffer
    return KVBuffer(layout, kv) if mla else KVBuffer(layout, kv[0], kv[1])


class HiCacheKernelsStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` on a :class:`~hicache_kernels.storage.NixlFileStore`.

    Args:
        storage_config: what SGLang passes (ranks, MLA, model name, and the
            extra config: the storage tier's keys besides SGLang's own).
        kwargs: SGLang's extra keyword arguments (unused).

    Raises:
        ValueError: an unknown or malformed key in the extra config (named),
            or a parallel setup this backend does not store (split heads,
            decode context parallel).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        if getattr(storage_config, "dcp_size", 1) > 1:
            raise ValueError("storage_config: decode context parallel (dcp_size > 1) is not "
                             "supported by this backend")
        if storage_config.should_split_heads:
            raise ValueError("storage_config: tp_lcm_size (heads split across ranks) is not "
                             "supported by this backend")
        extra = {k: v for k, v in (storage_config.extra_config or {}).items() if k not in SGLANG_KEYS}
        config = StorageConfig.load(extra)
        self.config = dataclasses.replace(
            config, namespace=storage_namespace(storage_config, config.namespace))
        self.storage_config = storage_config
        self.is_mla_model = storage_config.is_mla_model
        # MLA pages are the same on every rank: rank 0 writes, every rank reads.
        self.is_writer = not self.is_mla_model or storage_config.tp_rank == 0
        self.metrics_enabled = bool(storage_config.enable_storage_metrics)
        self._store: NixlFileStore | None = None
        self._page: tuple[torch.Tensor, NixlFileStore] | None = None  # the get/set page
        self._page_lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._metrics = _empty_metrics()

    # -- SGLang's attach ---------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Open the store on SGLang's host pool (registered with NIXL once).
        A directory that cannot be used is logged and every page is a miss."""
        host = host_buffer(mem_pool_host)
        try:
            store = NixlFileStore(host, self.config)
        except StorageUnavailable as e:
            store = None
            log.error("hicache-kernels storage: %s; every page is a miss", e)
        self.close()
        super().register_mem_pool_host(mem_pool_host)
        self._host, self._store = host, store
        if self.is_mla_model:
            role = "MLA: one copy for every rank, " + ("written by this rank" if self.is_writer
                                                       else "written by rank 0")
        else:
            role = f"TP rank {self.storage_config.tp_rank} of {self.storage_config.tp_size}"
        log.info("hicache-kernels storage: namespace %s (%s), %s", self.config.namespace, role,
                 store.status() if store is not None else "unavailable")

    def close(self) -> None:
        """Let NIXL go of the host pool (SGLang calls this on detach)."""
        for store in (self._store, self._page and self._page[1]):
            if store is not None:
                store.close()
        self._store, self._page = None, None

    # -- zero-copy interface (interface_v1) ----------------------------------------
    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """How many leading ``keys`` are stored completely."""
        store = self._ready()
        return store.batch_exists(keys) if store is not None else 0

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Read pages into SGLang's host pool at ``host_indices`` (token slots,
        ``page_size`` per key); ``True`` for each page now valid there, a
        prefix (a miss or a damaged page ends it)."""
        store = self._ready()
        if store is None:
            return [False] * len(keys)
        keys, _ = store.check_pages(keys, host_indices)  # the whole call, before any read
        start, ok, P = time.perf_counter(), [], store.page_size
        for lo in range(0, len(keys), self.config.batch_pages):
            hi = min(lo + self.config.batch_pages, len(keys))
            ok += store.batch_get(keys[lo:hi], host_indices[lo * P:hi * P])
            if not all(ok):
                break
        ok += [False] * (len(keys) - len(ok))
        self._record("prefetch", sum(ok), start)
        return ok

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Write pages from SGLang's host pool at ``host_indices``; ``True`` for
        each page now stored. A stored prefix is not written again; on an MLA
        rank other than 0 nothing is written, and ``True`` means rank 0 has
        stored the page."""
        store = self._ready()
        if store is None:
            return [False] * len(keys)
        keys, _ = store.check_pages(keys, host_indices)
        start, P = time.perf_counter(), store.page_size
        stored = store.batch_exists(keys)
        ok = [True] * stored + [False] * (len(keys) - stored)
        written = 0
        if self.is_writer:
            for lo in range(stored, len(keys), self.config.batch_pages):
                hi = min(lo + self.config.batch_pages, len(keys))
                ok[lo:hi] = store.batch_set(keys[lo:hi], host_indices[lo * P:hi * P])
                written += sum(ok[lo:hi])
        self._record("backup", written, start)
        return ok

    # -- SGLang's generic interface (a flat copy of each page) ---------------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Optional[torch.Tensor] = None,
            target_sizes: Any = None) -> Optional[torch.Tensor]:
        """The page ``key`` in SGLang's flat page order (the bytes of
        ``get_data_page(i, flat=True)``), written into ``target_location``
        when given; None on a miss."""
        store = self._ready()
        target = self._flat_page("target_location", target_location)
        if store is None:
            return None
        with self._page_lock:
            data, page_store = self._page_store()
            if not page_store.batch_get([key], torch.arange(store.page_size))[0]:
                return None
            target.view(-1).view(torch.uint8).copy_(data.view(-1).view(torch.uint8))
        return target

    def set(self, key: str, value: Optional[torch.Tensor] = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        """Store ``value``, a page in SGLang's flat page order, under ``key``;
        True once stored (by this call, before it, or by MLA rank 0)."""
        store = self._ready()
        if value is None:
            raise ValueError("value: expected a flat page tensor, got None")
        value = self._flat_page("value", value)
        if store is None:
            return False
        if self.exists(key):
            return True
        if not self.is_writer:
            return False
        with self._page_lock:
            data, page_store = self._page_store()
            data.view(-1).view(torch.uint8).copy_(value.view(-1).view(torch.uint8))
            return page_store.batch_set([key], torch.arange(store.page_size))[0]

    def batch_get(self, keys: List[str], target_locations: Optional[List[torch.Tensor]] = None,
                  target_sizes: Any = None) -> List[Optional[torch.Tensor]]:
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            raise ValueError(f"target_locations: expected {len(keys)} tensors, got {len(targets)}")
        return [self.get(key, target) for key, target in zip(keys, targets)]

    def batch_set(self, keys: List[str], values: Optional[List[torch.Tensor]] = None,
                  target_locations: Any = None, target_sizes: Any = None) -> bool:
        values = list(values) if values is not None else []
        if len(values) != len(keys):
            raise ValueError(f"values: expected {len(keys)} tensors, got {len(values)}")
        return all(self.set(key, value) for key, value in zip(keys, values))

    # -- metrics ------------------------------------------------------------------
    def clear(self) -> bool:
        """SGLang's storage clear (``POST /hicache/storage-backend/clear``, e.g. after new
        weights): remove every page of this backend's namespace and layout, so none
        is served again. Other models' and ranks' pages stay. False when the store
        is not open."""
        store = self._ready()
        if store is None:
            return False
        store.clear()
        return True

    def get_stats(self):
        """SGLang's ``StorageMetrics`` since the last call: pages and GB/s per
        prefetch and per backup batch (recorded when SGLang's storage metrics
        are on)."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._metrics_lock:
            metrics, self._metrics = self._metrics, _empty_metrics()
        return StorageMetrics(**metrics)

    def stats(self) -> dict:
        """The store's counters (bytes, seconds, corrupt pages, errors), the
        flat-page path's added in."""
        out = self._store.io_stats() if self._store is not None else {}
        if self._page is not None:
            for name, value in self._page[1].io_stats().items():
                out[name] = out.get(name, 0) + value
        return out

    # -- helpers ------------------------------------------------------------------
    def _ready(self) -> NixlFileStore | None:
        if not hasattr(self, "_host"):
            raise RuntimeError("register_mem_pool_host: SGLang registers its host pool before "
                               "any storage call; none was registered")
        return self._store

    def _page_store(self) -> tuple[torch.Tensor, NixlFileStore]:
        """One page of the host pool's layout, and a store on it (made once)."""
        if self._page is None:
            layout = self._host.layout.with_(num_slots=self._host.layout.page_size)
            data = torch.empty(layout.shape if layout.mla else (2, *layout.shape), dtype=layout.dtype)
            page = KVBuffer(layout, data) if layout.mla else KVBuffer(layout, data[0], data[1])
            self._page = data, NixlFileStore(page, self.config)
        return self._page

    def _flat_page(self, name: str, tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """``tensor`` checked to hold one page (a new one when None)."""
        layout = self._host.layout
        nbytes = layout.total_bytes // layout.num_slots * layout.page_size
        if tensor is None:
            return torch.empty(nbytes // layout.element_size, dtype=layout.dtype)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" \
                or not tensor.is_contiguous() or tensor.numel() * tensor.element_size() != nbytes:
            got = (f"{list(tensor.shape)} of {tensor.dtype} on {tensor.device}"
                   if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
            raise ValueError(f"{name}: expected a contiguous CPU tensor of one page ({nbytes} "
                             f"bytes, SGLang's get_dummy_flat_data_page()), got {got}")
        return tensor

    def _record(self, kind: str, pages: int, start: float) -> None:
        if not self.metrics_enabled or pages == 0:
            return
        seconds = max(time.perf_counter() - start, 1e-9)
        gb = pages * self._store.page_bytes / 1e9
        with self._metrics_lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(gb / seconds)


def _empty_metrics() -> dict:
    return {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}
