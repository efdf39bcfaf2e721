"""A drop-in for ``sgl_kernel.kvcacheio``: SGLang's host-pool call surface.

Same function names, argument names, order, defaults and meaning, mapped onto
:mod:`hicache_kernels.ops`::

    from hicache_kernels.sglang import transfer_kv_per_layer, transfer_kv_all_layer, ...

Terms: ``item_size`` is the bytes of one slot of one layer (K or V);
``*_layout_dim`` is the byte stride of one slot in a page-first or page-head
host buffer; ``*_layers`` are uint64 (or int64) tensors of per-layer base
addresses, on the device whose memory they point to. A negative index on
either side skips that item.

Backend: ``HICACHE_BACKEND`` in the environment (default ``auto``: the CUDA
kernels, else Triton, on GPU tensors; the torch reference on CPU tensors, or
Triton's interpreter when ``TRITON_INTERPRET=1``), read when a plan is built
(:func:`clear_plan_cache` makes a change apply to pools already used).
``block_quota`` is the kernel's SM budget and ``num_warps_per_block`` its warps
per block. The ``direct`` functions use the copy-engine backend when it is
built, and take tensors of any strides and any row size, as sgl-kernel does.
Their host indices are checked, expanded to whole pages and bounded in C where
``_prepared`` is built (else with torch ops), with the same errors.

Plan cache. Building a plan (checks, addresses, backend choice) costs far more
than a call, so plans are cached, under this rule:

- A key names every tensor argument by its allocation (the identity of its
  torch storage), where in it the tensor starts, its shape, strides and dtype
  (read in one C call for all of a call's tensors where ``_prepared`` is built);
  an address table also by its contents' version. The entry holds a weak
  reference to each allocation: it frees nothing, yet while it exists no other
  allocation can take that identity, so a freed and rebuilt pool (or table)
  never hits an old entry, even at the same address.
- A cached plan holds addresses and strides, never a tensor: it keeps no pool
  alive. With a CUDA kernel backend the entry also keeps the plan's prepared
  launch (its C description, and the small tables of plane addresses that
  description points to), so a call with device indices is one C call.
  Entries of freed allocations are dropped at the next miss;
  :func:`clear_plan_cache` drops them all. The reference backend, which indexes
  torch views, gets a plan built from the call's own tensors.
- An address table is trusted like sgl-kernel trusts it: its values must point
  to live memory for the duration of the call.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import os
import threading
from types import ModuleType
from typing import NamedTuple, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import backends
from . import ops as _ops
from .buffers import KVBuffer
from .layouts import KVLayout, LayoutKind, PlaneAddressing
from .ops import check_devices, check_launch_options, execute, launch_prepared, run_on_host
from .plan import PlaneSet, TransferPlan, tensor_at

__all__ = [
    "transfer_kv_per_layer",
    "transfer_kv_per_layer_pf_lf",
    "transfer_kv_per_layer_ph_lf",
    "transfer_kv_all_layer",
    "transfer_kv_all_layer_lf_pf",
    "transfer_kv_all_layer_lf_ph",
    "transfer_kv_per_layer_mla",
    "transfer_kv_per_layer_mla_pf_lf",
    "transfer_kv_all_layer_mla",
    "transfer_kv_all_layer_mla_lf_pf",
    "transfer_kv_direct",
    "transfer_kv_per_layer_direct_pf_lf",
    "transfer_kv_all_layer_direct_lf_pf",
    "transfer_embedding_ranges_direct",
    "get_device_accessible_ptr",
    "clear_plan_cache",
]


log = logging.getLogger("hicache_kernels")


def _backend() -> str:
    return os.environ.get("HICACHE_BACKEND", "auto")


# -- building the two sides ------------------------------------------------------------

def _check_item_size(item_size: int, head_num: int = 1) -> None:
    if not isinstance(item_size, int) or isinstance(item_size, bool) or item_size <= 0 \
            or item_size % 8:
        raise ValueError(f"item_size: expected a positive multiple of 8 bytes, got {item_size!r}")
    if not isinstance(head_num, int) or head_num <= 0 or item_size % head_num \
            or (item_size // head_num) % 8:
        raise ValueError(
            f"head_num: expected a divisor of item_size={item_size} leaving whole 8-byte words "
            f"per head, got {head_num!r}"
        )


def _bytes(name: str, t, row_bytes: int) -> torch.Tensor:
    """``t`` as uint8 ``[slots, row_bytes]``, sharing memory (never a copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (strides {t.stride()})")
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name}: expected a tensor [slots, ...], got shape {list(t.shape)}")
    nbytes = t.numel() * t.element_size()
    if nbytes % t.shape[0] or nbytes // t.shape[0] % row_bytes:
        raise ValueError(
            f"{name}: expected rows of a multiple of {row_bytes} bytes, got shape "
            f"{list(t.shape)} of {t.dtype}"
        )
    return t.reshape(-1).view(torch.uint8).view(-1, row_bytes)


def _layer_first(names: Sequence[str], tensors: Sequence, item_size: int, head_num: int) -> PlaneSet:
    """One layer of a layer-first pool: per-plane tensors ``[slots, ...]`` of ``item_size`` rows."""
    rows = []
    for name, t in zip(names, tensors):
        r = _bytes(name, t, item_size)
        if r.shape[0] != t.shape[0]:
            raise ValueError(
                f"{name}: expected rows of item_size={item_size} bytes, got "
                f"{t[0].numel() * t.element_size()} bytes per slot"
            )
        rows.append(r.view(-1, head_num, item_size // head_num))
    layout = KVLayout(LayoutKind.LAYER_FIRST, num_layers=1, num_slots=rows[0].shape[0],
                      head_num=head_num, head_dim=item_size // head_num, dtype=torch.uint8,
                      mla=len(rows) == 1)
    _same_slots(names, rows)
    buf = KVBuffer(layout, [rows[0]], [rows[1]] if len(rows) == 2 else None)
    return buf.plane_set(range(1), names[0])


def _host_pool(kind: LayoutKind, names: Sequence[str], tensors: Sequence, layer_ids: range,
               item_size: int, layout_dim: int, page_size: int = 1, head_num: int = 1) -> PlaneSet:
    """Layers ``layer_ids`` of a page-first or page-head pool (K and V, or MLA's one)."""
    if not isinstance(layout_dim, int) or layout_dim <= 0 or layout_dim % item_size:
        raise ValueError(
            f"{'src' if 'src' in names[0] else 'dst'}_layout_dim: expected a positive multiple "
            f"of item_size={item_size}, got {layout_dim!r}"
        )
    num_layers = layout_dim // item_size
    if layer_ids.start < 0 or layer_ids.stop > num_layers:
        raise ValueError(
            f"layer_id: expected layers within [0, {num_layers}) of a layout_dim of {layout_dim} "
            f"bytes, got {layer_ids.start if len(layer_ids) == 1 else layer_ids}"
        )
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    rows = [_bytes(n, t, layout_dim) for n, t in zip(names, tensors)]
    _same_slots(names, rows)
    layout = KVLayout(kind, num_layers=num_layers, num_slots=rows[0].shape[0], head_num=head_num,
                      head_dim=item_size // head_num, dtype=torch.uint8, page_size=page_size,
                      mla=len(rows) == 1)
    planes = [r.view(layout.shape) for r in rows]
    buf = KVBuffer(layout, planes[0], planes[1] if len(planes) == 2 else None)
    return buf.plane_set(layer_ids, names[0])


def _same_slots(names, rows) -> None:
    if len(rows) == 2 and rows[0].shape[0] != rows[1].shape[0]:
        raise ValueError(f"{names[1]}: expected {rows[0].shape[0]} slots like {names[0]}, "
                         f"got {rows[1].shape[0]}")


def _address_tables(names: Sequence[str], tables: Sequence, num_layers: int, item_size: int,
                    head_num: int = 1) -> PlaneSet:
    """Per-layer layer-first buffers given only by their base addresses."""
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    for name, table in zip(names, tables):
        if not isinstance(table, torch.Tensor) or table.dtype not in (torch.uint64, torch.int64) \
                or table.dim() != 1 or table.numel() != num_layers:
            got = (f"{table.dtype} of shape {list(table.shape)}" if isinstance(table, torch.Tensor)
                   else type(table).__name__)
            raise ValueError(f"{name}: expected a uint64 tensor of {num_layers} layer addresses, "
                             f"got {got}")
    if len(tables) == 2 and tables[0].device != tables[1].device:
        raise ValueError(f"{names[1]}: expected a table on {tables[0].device} like {names[0]}, "
                         f"got {tables[1].device}")
    device = tables[0].device
    # a copy of the addresses: a plan keeps no tensor of the caller's alive
    bases = torch.cat([t.view(torch.int64) for t in tables])
    layout = KVLayout(LayoutKind.LAYER_FIRST, num_layers=1, num_slots=1, head_num=head_num,
                      head_dim=item_size // head_num, dtype=torch.uint8)

    def views(min_slots: int) -> list[torch.Tensor]:
        return [tensor_at(a, min_slots * item_size, device).view(min_slots, 1, head_num, -1)
                for a in bases.tolist()]

    # SGLang's tables live on the GPU and point into the device pool; a CPU
    # table (tests) points to host memory we cannot prove pinned, so it is not.
    return PlaneSet(name=names[0], addressing=layout.plane_addressing(), bases=bases,
                    device=device, views=views, num_slots=None, pinned=False)


# -- the plan cache ------------------------------------------------------------------------
# Building a plan costs ~150 us of Python; SGLang calls these per layer on the hot
# path with the same pools, so plans are cached. The rule (module docstring): a key
# names each tensor's allocation by identity, and the entry holds a weak reference to
# that allocation, which frees nothing but keeps its identity from being reused.

class _Entry(NamedTuple):
    plan: TransferPlan | None        # None: the direct forms' strided copy, no plan
    module: ModuleType | None
    allocations: tuple               # StorageWeakRef of every tensor the key names
    # (block_quota, num_warps, their types) -> the backend's prepared launch (False:
    # none), made on first use; None for the reference (it is given a plan per call)
    # and for calls that are not cached
    launchers: dict | None = None

    def freed(self) -> bool:
        return any(a.expired() for a in self.allocations)


_PLANS: dict[tuple, _Entry] = {}
_UNCACHED_TABLES: set = set()        # devices already warned about (see _contents_version)
_PLAN_CACHE_SIZE = 512
_PLANS_LOCK = threading.Lock()       # misses insert and sweep; hits only read


def clear_plan_cache() -> None:
    """Forget every cached plan (they hold no memory; entries of freed pools are
    also dropped on their own). For a teardown that wants the cache empty."""
    with _PLANS_LOCK:
        _PLANS.clear()


def _key(form: str, tensors: Sequence, tables: Sequence = (), *scalars) -> tuple | None:
    """The cache key of a call: per tensor, its allocation (by identity), where in it
    the tensor starts, its shape, strides and dtype (and device); per address table
    also its contents' version (bumped by in-place writes); the scalars with their
    types (``True == 1``). None when an argument is not a tensor (the builder names
    it). The tensors' part is read in C where ``_prepared`` can (one C call for the
    list; see ``csrc/ops/prepared.c``), else here: the same names, spelled apart."""
    key = [form, *map(type, scalars), *scalars]
    compiled = _ops._compiled
    named = compiled.tensor_key(tensors) if compiled is not None and tensors else None
    try:
        if named is not None:
            key.append(named)
        else:
            for t in tensors:
                key += (t.untyped_storage()._cdata, t.data_ptr(), t.shape, t.stride(), t.dtype)
        for t in tables:
            key += (t.untyped_storage()._cdata, t.data_ptr(), t.shape, t.stride(), t.dtype,
                    _contents_version(t))
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):
        return None
    return tuple(key)


def _contents_version(table: torch.Tensor):
    """What changes when an address table is written: its version counter, or for a
    table made under ``torch.inference_mode()`` (no counter) on the CPU, its values.
    Such a table on a GPU cannot be named without a sync: its calls are not cached."""
    try:
        return table._version
    except RuntimeError:
        if table.device.type == "cpu":
            return tuple(table.tolist())
        if table.device not in _UNCACHED_TABLES:
            _UNCACHED_TABLES.add(table.device)
            log.warning("address tables on %s made under torch.inference_mode() have no version "
                        "counter: calls with them build their plan each time (~150 us); make "
                        "them outside inference mode", table.device)
        raise


def _plan_for(key: tuple | None, tensors: Sequence, build, direct: bool = False) -> _Entry:
    """The entry (plan, backend module, prepared launches) for a call, built (and
    fully checked) on a miss."""
    entry = None
    if key is not None:
        try:
            entry = _PLANS.get(key)
        except TypeError:            # an unhashable argument: let the builder report it
            key = None
    if entry is not None:
        if entry.launchers is None:   # the reference: it indexes views of this call's own tensors
            return entry._replace(plan=build())
        return entry
    plan = build()
    module = None
    if plan is not None:
        module, _ = backends.choose(plan, _direct_backend() if direct else _backend())
        check_devices(plan, module)
    if key is None:   # not cached: no prepared launch either (made for one call, it costs more)
        return _Entry(plan, module, (), None)
    launchers = None if module is not None and module.name == "reference" else {}
    _remember(key, _Entry(_without_views(plan), module, _allocations(tensors), launchers))
    return _Entry(plan, module, (), launchers)


def _remember(key: tuple, entry: _Entry) -> None:
    with _PLANS_LOCK:
        for stale in [k for k, e in _PLANS.items() if e.freed()]:
            del _PLANS[stale]
        _PLANS[key] = entry
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            del _PLANS[next(iter(_PLANS))]


def _allocations(tensors: Sequence[torch.Tensor]) -> tuple:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen[storage._cdata] = StorageWeakRef(storage)
    return tuple(seen.values())


def _no_views(_min_slots: int) -> list[torch.Tensor]:
    raise RuntimeError("a cached plan holds no tensors; the reference backend gets a plan "
                       "built from the call's own tensors")


def _without_views(plan: TransferPlan | None) -> TransferPlan | None:
    """``plan`` minus its views, which reference the tensors it was built from."""
    if plan is None:
        return None
    return dataclasses.replace(plan, src=dataclasses.replace(plan.src, views=_no_views),
                               dst=dataclasses.replace(plan.dst, views=_no_views))


def _plan(label: str, src: PlaneSet, dst: PlaneSet, head_num: int, item_size: int) -> TransferPlan:
    return TransferPlan(src, dst, head_num=head_num, head_bytes=item_size // head_num, label=label)


def _run(entry: _Entry, src_indices, dst_indices, block_quota, num_warps_per_block) -> None:
    launchers = entry.launchers
    if launchers is not None:
        options = (block_quota, num_warps_per_block, type(block_quota), type(num_warps_per_block))
        launcher = launchers.get(options)
        if launcher is None:
            check_launch_options(block_quota, num_warps_per_block)
            prepare = getattr(entry.module, "prepare", None)
            launcher = launchers[options] = prepare(entry.plan, sm_budget=block_quota,
                                                    num_warps=num_warps_per_block) or False \
                if prepare is not None else False
        if launcher and launch_prepared(launcher, src_indices, dst_indices):
            return
    check_launch_options(block_quota, num_warps_per_block)
    execute(entry.plan, src_indices, dst_indices, backend_module=entry.module, sm_budget=block_quota,
            num_warps=num_warps_per_block)


# -- kernel forms ----------------------------------------------------------------------

def transfer_kv_per_layer(src_k, dst_k, src_v, dst_v, src_indices, dst_indices, item_size,
                          block_quota=2, num_warps_per_block=32):
    """One layer, layer-first -> layer-first, K and V."""
    def build():
        _check_item_size(item_size)
        return _plan("lf->lf layer", _layer_first(("src_k", "src_v"), (src_k, src_v), item_size, 1),
                     _layer_first(("dst_k", "dst_v"), (dst_k, dst_v), item_size, 1), 1, item_size)
    tensors = (src_k, dst_k, src_v, dst_v)
    entry = _plan_for(_key("lf_lf", tensors, (), item_size), tensors, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_pf_lf(src_k, dst_k, src_v, dst_v, src_indices, dst_indices, layer_id,
                                item_size, src_layout_dim, block_quota=2, num_warps_per_block=32):
    """Layer ``layer_id`` of a page-first ``[slots, layers, ...]`` source into layer-first."""
    def build():
        _check_item_size(item_size)
        src = _host_pool(LayoutKind.PAGE_FIRST, ("src_k", "src_v"), (src_k, src_v),
                         _one_layer(layer_id), item_size, src_layout_dim)
        dst = _layer_first(("dst_k", "dst_v"), (dst_k, dst_v), item_size, 1)
        return _plan(f"pf->lf L{layer_id}", src, dst, 1, item_size)
    tensors = (src_k, dst_k, src_v, dst_v)
    key = _key("pf_lf", tensors, (), layer_id, item_size, src_layout_dim)
    entry = _plan_for(key, tensors, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_ph_lf(src_k, dst_k, src_v, dst_v, src_indices, dst_indices, layer_id,
                                item_size, src_layout_dim, page_size, head_num, block_quota=2,
                                num_warps_per_block=32):
    """Layer ``layer_id`` of a page-head ``[pages, heads, page_size, layers, head_dim]``
    source into layer-first."""
    def build():
        _check_item_size(item_size, head_num)
        src = _host_pool(LayoutKind.PAGE_HEAD, ("src_k", "src_v"), (src_k, src_v),
                         _one_layer(layer_id), item_size, src_layout_dim, page_size, head_num)
        dst = _layer_first(("dst_k", "dst_v"), (dst_k, dst_v), item_size, head_num)
        return _plan(f"ph->lf L{layer_id}", src, dst, head_num, item_size)
    tensors = (src_k, dst_k, src_v, dst_v)
    key = _key("ph_lf", tensors, (), layer_id, item_size, src_layout_dim, page_size, head_num)
    entry = _plan_for(key, tensors, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer(src_k_layers, dst_k_layers, src_v_layers, dst_v_layers, src_indices,
                          dst_indices, item_size, num_layers, block_quota=2,
                          num_warps_per_block=32):
    """Every layer, layer-first -> layer-first, through address tables."""
    def build():
        _check_item_size(item_size)
        src = _address_tables(("src_k_layers", "src_v_layers"), (src_k_layers, src_v_layers),
                              num_layers, item_size)
        dst = _address_tables(("dst_k_layers", "dst_v_layers"), (dst_k_layers, dst_v_layers),
                              num_layers, item_size)
        return _plan("lf->lf all", src, dst, 1, item_size)
    tables = (src_k_layers, dst_k_layers, src_v_layers, dst_v_layers)
    entry = _plan_for(_key("lf_lf_all", (), tables, item_size, num_layers), tables, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer_lf_pf(src_k_layers, dst_k, src_v_layers, dst_v, src_indices,
                                dst_indices, item_size, dst_layout_dim, num_layers,
                                block_quota=2, num_warps_per_block=32):
    """Every layer, layer-first (address tables) -> page-first."""
    def build():
        _check_item_size(item_size)
        src = _address_tables(("src_k_layers", "src_v_layers"), (src_k_layers, src_v_layers),
                              num_layers, item_size)
        dst = _host_pool(LayoutKind.PAGE_FIRST, ("dst_k", "dst_v"), (dst_k, dst_v),
                         range(num_layers), item_size, dst_layout_dim)
        return _plan("lf->pf all", src, dst, 1, item_size)
    tensors, tables = (dst_k, dst_v), (src_k_layers, src_v_layers)
    key = _key("lf_pf_all", tensors, tables, item_size, dst_layout_dim, num_layers)
    entry = _plan_for(key, tensors + tables, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer_lf_ph(src_k_layers, dst_k, src_v_layers, dst_v, src_indices,
                                dst_indices, item_size, dst_layout_dim, num_layers, page_size,
                                head_num, block_quota=2, num_warps_per_block=32):
    """Every layer, layer-first (address tables) -> page-head."""
    def build():
        _check_item_size(item_size, head_num)
        src = _address_tables(("src_k_layers", "src_v_layers"), (src_k_layers, src_v_layers),
                              num_layers, item_size, head_num)
        dst = _host_pool(LayoutKind.PAGE_HEAD, ("dst_k", "dst_v"), (dst_k, dst_v),
                         range(num_layers), item_size, dst_layout_dim, page_size, head_num)
        return _plan("lf->ph all", src, dst, head_num, item_size)
    tensors, tables = (dst_k, dst_v), (src_k_layers, src_v_layers)
    key = _key("lf_ph_all", tensors, tables, item_size, dst_layout_dim, num_layers, page_size,
               head_num)
    entry = _plan_for(key, tensors + tables, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_mla(src, dst, src_indices, dst_indices, item_size, block_quota=2,
                              num_warps_per_block=32):
    """MLA, one layer, layer-first -> layer-first."""
    def build():
        _check_item_size(item_size)
        return _plan("mla lf->lf layer", _layer_first(("src",), (src,), item_size, 1),
                     _layer_first(("dst",), (dst,), item_size, 1), 1, item_size)
    tensors = (src, dst)
    entry = _plan_for(_key("mla_lf_lf", tensors, (), item_size), tensors, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_mla_pf_lf(src, dst, src_indices, dst_indices, layer_id, item_size,
                                    src_layout_dim, block_quota=2, num_warps_per_block=32):
    """MLA, layer ``layer_id`` of a page-first source into layer-first."""
    def build():
        _check_item_size(item_size)
        src_side = _host_pool(LayoutKind.PAGE_FIRST, ("src",), (src,), _one_layer(layer_id),
                              item_size, src_layout_dim)
        return _plan(f"mla pf->lf L{layer_id}", src_side,
                     _layer_first(("dst",), (dst,), item_size, 1), 1, item_size)
    tensors = (src, dst)
    key = _key("mla_pf_lf", tensors, (), layer_id, item_size, src_layout_dim)
    entry = _plan_for(key, tensors, build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer_mla(src_layers, dst_layers, src_indices, dst_indices, item_size,
                              num_layers, block_quota=2, num_warps_per_block=32):
    """MLA, every layer, layer-first -> layer-first, through address tables."""
    def build():
        _check_item_size(item_size)
        return _plan("mla lf->lf all",
                     _address_tables(("src_layers",), (src_layers,), num_layers, item_size),
                     _address_tables(("dst_layers",), (dst_layers,), num_layers, item_size),
                     1, item_size)
    tables = (src_layers, dst_layers)
    entry = _plan_for(_key("mla_lf_lf_all", (), tables, item_size, num_layers), tables,
                             build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer_mla_lf_pf(src_layers, dst, src_indices, dst_indices, item_size,
                                    dst_layout_dim, num_layers, block_quota=2,
                                    num_warps_per_block=32):
    """MLA, every layer, layer-first (address table) -> page-first."""
    def build():
        _check_item_size(item_size)
        src = _address_tables(("src_layers",), (src_layers,), num_layers, item_size)
        dst_side = _host_pool(LayoutKind.PAGE_FIRST, ("dst",), (dst,), range(num_layers),
                              item_size, dst_layout_dim)
        return _plan("mla lf->pf all", src, dst_side, 1, item_size)
    key = _key("mla_lf_pf_all", (dst,), (src_layers,), item_size, dst_layout_dim, num_layers)
    entry = _plan_for(key, (dst, src_layers), build)
    _run(entry, src_indices, dst_indices, block_quota, num_warps_per_block)


def _one_layer(layer_id) -> range:
    if not isinstance(layer_id, int) or isinstance(layer_id, bool):
        raise TypeError(f"layer_id: expected an int, got {type(layer_id).__name__}")
    return range(layer_id, layer_id + 1)


# -- direct (copy-engine) forms -----------------------------------------------------------
# sgl-kernel copies each run of slots with a slice copy, so it takes tensors of any
# strides and any row size. Here a call is one plan when every row (one slot of one
# tensor) is one contiguous block, and the rows of each side are the same size and
# equally far apart (SGLang's unified-memory views ``e[:, layer, kv]`` are); the copy
# engines then merge rows into runs wherever they are adjacent. Otherwise torch copies
# each run (each page for the page_first_direct forms), as sgl-kernel does.

def _direct_backend() -> str:
    requested = _backend()
    if requested == "auto" and backends.get("copy_engine").available()[0]:
        return "copy_engine"
    return requested


def _tensor_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError(f"{name}: expected a non-empty list of tensors")
    return list(tensors)


@functools.lru_cache(maxsize=64)
def _names(name: str, n: int) -> tuple[str, ...]:
    """``name[0]``, ``name[1]``, ...: what errors call a list's tensors."""
    return tuple(f"{name}[{i}]" for i in range(n))


def _row_bytes(name: str, t) -> int:
    """Bytes of one slot (row) of a tensor ``[slots, ...]``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    row = math.prod(t.shape[1:]) * t.element_size()
    if t.dim() == 0 or row == 0:
        raise ValueError(f"{name}: expected a tensor [slots, ...] with non-empty rows, got shape "
                         f"{list(t.shape)}")
    return row


def _same_rows(names: Sequence[str], tensors: Sequence, row_bytes: int, like: str) -> None:
    for name, t in zip(names, tensors):
        got = _row_bytes(name, t)
        if got != row_bytes:
            raise ValueError(f"{name}: expected rows of {row_bytes} bytes like {like}, got {got}")


def _row_geometry(t: torch.Tensor) -> tuple[int, int] | None:
    """``(row bytes, bytes from one row to the next)`` when every row ``t[i]`` is one
    contiguous block that does not overlap the next, else None."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    row, step = expected * t.element_size(), t.stride(0) * t.element_size()
    return (row, step) if step >= row or t.shape[0] == 1 else None


def _per_layer_rows(name: str, tensors: list[torch.Tensor]) -> PlaneSet | None:
    """Per-layer tensors ``[slots, ...]`` as one side of a plan, each plane one tensor;
    None when their rows are not all contiguous, equally sized and equally far apart
    on one device (then torch copies them)."""
    geometry = {_row_geometry(t) for t in tensors}
    devices = {t.device for t in tensors}
    if len(geometry) != 1 or None in geometry or len(devices) != 1:
        return None
    row, step = geometry.pop()
    # rows as described by the tensors' own strides (no layout has a row gap)
    addressing = PlaneAddressing(page_size=1, page_stride=step, slot_stride=0, head_stride=row)
    device = devices.pop()
    return PlaneSet(
        name=name, addressing=addressing, bases=[t.data_ptr() for t in tensors], device=device,
        views=lambda _m: [t.view(t.shape[0], -1).view(torch.uint8)[:, None, None, :]
                          for t in tensors],
        num_slots=min(t.shape[0] for t in tensors),
        pinned=device.type == "cpu" and all(t.is_pinned() for t in tensors),
    )


# How each side's indices reach the plan: as given (slots), or each page's first index
# expanded to its page: the page holding it (a host pool's page) or the run starting there.
AS_GIVEN, WHOLE_PAGE, RUN_FROM = 0, 1, 2


def _direct_indices(src_indices, dst_indices, page_size):
    """``(given, checked)``: the indices as CPU tensors, checked as whole pages
    (raising, naming the argument), and whether that was done in C (CPU indices that
    pass: :func:`_run_pages` then expands and bounds them in C too)."""
    compiled = _ops._compiled
    if compiled is not None and compiled.checked_pages(src_indices, dst_indices, page_size):
        return (src_indices, dst_indices), True
    return _page_runs(src_indices, dst_indices, page_size), False


_SCRATCH = threading.local()


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two int64 CPU tensors of ``n`` for expanded indices, made once and
    written over call after call. Only for a backend that reads indices on the host
    while it runs (the copy engines build their descriptors from them in ``run()``),
    so nothing reads them once the call returns."""
    if getattr(_SCRATCH, "n", None) != n:
        base = torch.empty(2 * n, dtype=torch.int64)
        _SCRATCH.views, _SCRATCH.n = (base[:n], base[n:]), n
    return _SCRATCH.views


def _run_pages(entry: _Entry, given, checked: bool, page_size: int, src_mode: int,
               dst_mode: int) -> None:
    """Run a direct form's plan. Indices checked in C are expanded and bounded there
    (into this thread's scratch when the copy engines take them) and go straight to
    the copy engines when every one is in range; anything else goes through
    :func:`_run` (the checked path), expanded here."""
    compiled = _ops._compiled
    if checked and compiled is not None:
        outs = None
        if (src_mode or dst_mode) and getattr(entry.module, "host_indices", False) \
                and not _ops._nvtx._enabled:
            outs = _scratch(given[0].shape[0])
        run = compiled.direct_indices(*given, page_size, src_mode, dst_mode, outs)
        if run is not None:
            src, dst, src_top, dst_top = run
            if run_on_host(entry.plan, entry.module, src, dst, (src_top, dst_top)):
                return
            if outs is None:
                _run(entry, src, dst, None, None)
                return
    src, dst = (idx if mode == AS_GIVEN else _expand_pages(idx, page_size, mode == WHOLE_PAGE)
                for idx, mode in zip(given, (src_mode, dst_mode)))
    _run(entry, src, dst, None, None)


def _page_runs(src_indices, dst_indices, page_size: int):
    """CPU copies of the indices, checked as whole pages."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    out = []
    for name, idx in (("src_indices", src_indices), ("dst_indices", dst_indices)):
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
            raise TypeError(f"{name}: expected a 1-D int64 tensor")
        if idx.numel() % page_size:
            raise ValueError(f"{name}: expected a length that is a multiple of page_size="
                             f"{page_size}, got {idx.numel()}")
        out.append(idx.cpu())
    if out[0].numel() != out[1].numel():
        raise ValueError(f"dst_indices: expected {out[0].numel()} indices like src_indices, "
                         f"got {out[1].numel()}")
    return out


def _check_copyable(names: Sequence[str], tensors: Sequence[torch.Tensor], like: str,
                    dtype: torch.dtype, row_shape) -> None:
    """What torch's slice copies need: the same dtype and row shape (bytes stay bytes)."""
    for name, t in zip(names, tensors):
        if t.dtype != dtype or tuple(t.shape[1:]) != tuple(row_shape):
            raise ValueError(f"{name}: expected rows {list(row_shape)} of {dtype} like {like} "
                             f"(strided tensors are copied as they are), got "
                             f"{list(t.shape[1:])} of {t.dtype}")


def _check_in_range(idx_name: str, idx: torch.Tensor, names: Sequence[str],
                    tensors: Sequence[torch.Tensor], extent: int = 1) -> None:
    """Every ``idx .. idx + extent - 1`` (non-negative ``idx``) within each tensor's slots."""
    if not idx.numel():
        return
    largest = int(idx.max()) + extent - 1
    for name, t in zip(names, tensors):
        if largest >= t.shape[0]:
            raise IndexError(f"{idx_name}: largest index {largest} is out of range for {name} "
                             f"with {t.shape[0]} slots")


def _copy_slot_runs(src_names, src_list, dst_names, dst_list, src_idx, dst_idx) -> None:
    """sgl-kernel's transfer_kv_direct for any strides: one slice copy per run of slots
    consecutive on both sides, per tensor pair (pairs with a negative index skipped)."""
    for j, (s, d) in enumerate(zip(src_list, dst_list)):
        _check_copyable([dst_names[j]], [d], src_names[j], s.dtype, s.shape[1:])
    keep = (src_idx >= 0) & (dst_idx >= 0)
    src_idx, dst_idx = src_idx[keep], dst_idx[keep]
    _check_in_range("src_indices", src_idx, src_names, src_list)
    _check_in_range("dst_indices", dst_idx, dst_names, dst_list)
    n = src_idx.numel()
    if n == 0:
        return
    breaks = ((src_idx[1:] - src_idx[:-1]) != 1) | ((dst_idx[1:] - dst_idx[:-1]) != 1)
    starts = [0] + (breaks.nonzero().squeeze(1) + 1).tolist()
    for first, end, s, d in zip(starts, starts[1:] + [n], src_idx[starts].tolist(),
                                dst_idx[starts].tolist()):
        for src, dst in zip(src_list, dst_list):
            dst[d:d + end - first].copy_(src[s:s + end - first], non_blocking=True)


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size):
    """Per-layer tensors ``[slots, ...]`` (K layers then V layers, or any list) ->
    the same, each tensor to its partner, copying runs of slots contiguous on both
    sides with no kernel. Any strides."""
    src_list = _tensor_list("src_layers", src_layers)
    dst_list = _tensor_list("dst_layers", dst_layers)
    given, checked = _direct_indices(src_indices, dst_indices, page_size)

    def build():
        src_names, dst_names = _names("src_layers", len(src_list)), _names("dst_layers", len(dst_list))
        if len(src_list) != len(dst_list):
            raise ValueError(f"dst_layers: expected {len(src_list)} tensors like src_layers, "
                             f"got {len(dst_list)}")
        for j, s in enumerate(src_list):
            _same_rows([dst_names[j]], [dst_list[j]], _row_bytes(src_names[j], s), src_names[j])
        src, dst = _per_layer_rows("src_layers", src_list), _per_layer_rows("dst_layers", dst_list)
        if src is None or dst is None:
            return None
        return _plan("direct lf->lf", src, dst, 1, src.addressing.head_stride)
    tensors = src_list + dst_list
    entry = _plan_for(_key("direct", tensors, (), len(src_list)), tensors, build,
                             direct=True)
    if entry.plan is None:
        _copy_slot_runs(_names("src_layers", len(src_list)), src_list,
                        _names("dst_layers", len(dst_list)), dst_list, *given)
    else:
        _run_pages(entry, given, checked, page_size, AS_GIVEN, AS_GIVEN)


def _direct_pools(name: str, pools: list[torch.Tensor], page_size: int,
                  layers: range) -> tuple[PlaneSet | None, int]:
    """page_first_direct pools ``[pages, layers, page_size, ...]`` (K and V, or MLA's
    one) as one side of a plan, and the bytes of one slot of one layer. The side is
    None when a pool is not contiguous (then torch copies each page)."""
    names = [f"{name}[{i}]" for i in range(len(pools))]
    for n, pool in zip(names, pools):
        if not isinstance(pool, torch.Tensor) or pool.dim() < 3 or pool.shape[2] != page_size:
            got = list(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
            raise ValueError(f"{n}: expected [pages, layers, page_size={page_size}, ...], got {got}")
    first = pools[0]
    for n, pool in zip(names[1:], pools[1:]):
        if pool.shape != first.shape or pool.dtype != first.dtype:
            raise ValueError(f"{n}: expected shape {list(first.shape)} of {first.dtype} like "
                             f"{names[0]}, got {list(pool.shape)} of {pool.dtype}")
    num_layers = first.shape[1]
    if layers.start < 0 or layers.stop > num_layers:
        raise ValueError(f"layer_id: expected layers within [0, {num_layers}), got {layers}")
    item = first[0, 0, 0].numel() * first.element_size()
    if item == 0:
        raise ValueError(f"{names[0]}: expected non-empty rows, got shape {list(first.shape)}")
    if not all(pool.is_contiguous() for pool in pools):
        return None, item
    slot_bytes = item * num_layers
    rows = [_bytes(n, pool, slot_bytes) for n, pool in zip(names, pools)]
    layout = KVLayout(LayoutKind.PAGE_FIRST_DIRECT, num_layers=num_layers,
                      num_slots=rows[0].shape[0], head_num=1, head_dim=item, dtype=torch.uint8,
                      page_size=page_size, mla=len(rows) == 1)
    planes = [r.view(layout.shape) for r in rows]
    buf = KVBuffer(layout, planes[0], planes[1] if len(planes) == 2 else None)
    return buf.plane_set(layers, name), item


def _expand_pages(first_slots: torch.Tensor, page_size: int, whole_pages: bool) -> torch.Tensor:
    """Each page's first index -> its ``page_size`` consecutive slots (SGLang copies
    whole pages: a host page is found from its first index, a device run starts there).
    A padded page's slots are all negative, so it stays skipped."""
    start = first_slots[::page_size]
    if whole_pages:
        start = start // page_size * page_size        # -1 becomes -page_size
    else:
        start = start.masked_fill(start < 0, -page_size)
    return (start[:, None] + _in_page(page_size)).reshape(-1)


@functools.lru_cache(maxsize=16)
def _in_page(page_size: int) -> torch.Tensor:
    return torch.arange(page_size)


def _copy_pages(pools, pool_names, per_layer, layer_names, layers: range, pool_idx, flat_idx,
                page_size: int, to_pool: bool) -> None:
    """sgl-kernel's page_first_direct forms for any strides: per page and layer, one
    slice copy between ``pool[page, layer]`` and ``page_size`` rows of a per-layer
    tensor (K layers, then V layers)."""
    per_pool = len(per_layer) // len(pools)
    owner = [i // per_pool for i in range(len(per_layer))]
    for name, t, p in zip(layer_names, per_layer, owner):
        _check_copyable([name], [t], pool_names[p], pools[p].dtype, pools[p].shape[3:])
    pool_name, flat_name = ("dst_indices", "src_indices") if to_pool else ("src_indices", "dst_indices")
    pages, starts = pool_idx[::page_size], flat_idx[::page_size]
    keep = (pages >= 0) & (starts >= 0)
    pages = torch.div(pages[keep], page_size, rounding_mode="floor")
    starts = starts[keep]
    if pages.numel():
        largest = int(pages.max()) * page_size + page_size - 1
        if largest >= pools[0].shape[0] * page_size:
            raise IndexError(f"{pool_name}: largest index {largest} is out of range for "
                             f"{pool_names[0]} with {pools[0].shape[0] * page_size} slots")
    _check_in_range(flat_name, starts, layer_names, per_layer, page_size)
    for page, start in zip(pages.tolist(), starts.tolist()):
        for i, t in enumerate(per_layer):
            block = pools[owner[i]][page, layers.start + i % per_pool]
            rows = t[start:start + page_size]
            (block if to_pool else rows).copy_(rows if to_pool else block, non_blocking=True)


def transfer_kv_per_layer_direct_pf_lf(src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id,
                                       page_size):
    """Copy-engine load from page_first_direct ``[pages, layers, page_size, ...]``
    (``src_ptrs=[k_pool, v_pool]``, or ``[kv_pool]`` for MLA) into per-layer
    tensors ``[slots, ...]`` (``dst_ptrs``: K layers then V layers), starting at
    layer ``layer_id``. Any row size, any strides."""
    src_list = _tensor_list("src_ptrs", src_ptrs)
    dst_list = _tensor_list("dst_ptrs", dst_ptrs)
    if len(src_list) not in (1, 2) or len(dst_list) % len(src_list):
        raise ValueError(f"dst_ptrs: expected K layers then V layers for {len(src_list)} source "
                         f"pools, got {len(dst_list)} tensors")
    given, checked = _direct_indices(src_indices, dst_indices, page_size)

    def layers() -> range:
        return range(_one_layer(layer_id).start, layer_id + len(dst_list) // len(src_list))

    def build():
        src, item = _direct_pools("src_ptrs", src_list, page_size, layers())
        _same_rows(_names("dst_ptrs", len(dst_list)), dst_list, item, "a slot of src_ptrs[0]")
        dst = _per_layer_rows("dst_ptrs", dst_list)
        if src is None or dst is None:
            return None
        return _plan(f"direct pfd->lf L{layer_id}", src, dst, 1, item)
    tensors = src_list + dst_list
    key = _key("direct_pf_lf", tensors, (), len(src_list), layer_id, page_size)
    entry = _plan_for(key, tensors, build, direct=True)
    if entry.plan is None:
        _copy_pages(src_list, _names("src_ptrs", len(src_list)), dst_list,
                    _names("dst_ptrs", len(dst_list)), layers(), *given, page_size, to_pool=False)
        return
    _run_pages(entry, given, checked, page_size, WHOLE_PAGE, RUN_FROM)


def transfer_kv_all_layer_direct_lf_pf(src_ptrs, dst_ptrs, src_indices, dst_indices, page_size):
    """Copy-engine backup from per-layer tensors ``[slots, ...]`` (``src_ptrs``: K
    layers then V layers) into page_first_direct pools (``dst_ptrs``). Any row size,
    any strides."""
    src_list = _tensor_list("src_ptrs", src_ptrs)
    dst_list = _tensor_list("dst_ptrs", dst_ptrs)
    if len(dst_list) not in (1, 2) or len(src_list) % len(dst_list):
        raise ValueError(f"src_ptrs: expected K layers then V layers for {len(dst_list)} "
                         f"destination pools, got {len(src_list)} tensors")
    given, checked = _direct_indices(src_indices, dst_indices, page_size)
    layers = range(len(src_list) // len(dst_list))

    def build():
        dst, item = _direct_pools("dst_ptrs", dst_list, page_size, layers)
        _same_rows(_names("src_ptrs", len(src_list)), src_list, item, "a slot of dst_ptrs[0]")
        src = _per_layer_rows("src_ptrs", src_list)
        if src is None or dst is None:
            return None
        return _plan("direct lf->pfd all", src, dst, 1, item)
    tensors = src_list + dst_list
    entry = _plan_for(_key("direct_lf_pf", tensors, (), len(src_list), page_size), tensors,
                             build, direct=True)
    if entry.plan is None:
        _copy_pages(dst_list, _names("dst_ptrs", len(dst_list)), src_list,
                    _names("src_ptrs", len(src_list)), layers, given[1], given[0], page_size,
                    to_pool=True)
        return
    _run_pages(entry, given, checked, page_size, RUN_FROM, WHOLE_PAGE)


# -- the other two names SGLang imports -------------------------------------------------------

def _int_list(name: str, values) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name}: expected a list of ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name}[{i}]: expected an int, got {type(v).__name__}") from None
    return out


def transfer_embedding_ranges_direct(src, dst, src_starts, dst_starts, lengths) -> None:
    """Copy row ranges ``src[src_starts[i] : src_starts[i] + lengths[i]]`` to
    ``dst[dst_starts[i] : ...]`` with no kernel (the copy engines on a GPU), on the
    current stream.

    ``src`` and ``dst`` are contiguous 2-D tensors ``[rows, dim]`` of one dtype and
    width, one on a CUDA device and the other in host memory (on a machine without
    CUDA both may be CPU tensors). A zero length skips its range. Every range is
    checked before the first is copied.
    """
    for name, t in (("src", src), ("dst", dst)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_contiguous() or t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a contiguous 2-D tensor on cpu or cuda, got shape "
                             f"{list(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    if dst.dtype != src.dtype or dst.shape[1] != src.shape[1]:
        raise ValueError(f"dst: expected rows of {src.shape[1]} {src.dtype} like src, got "
                         f"{dst.shape[1]} {dst.dtype}")
    if src.is_cuda and dst.is_cuda:
        raise ValueError(f"dst: expected host memory, since src is on {src.device} (one side on "
                         f"CUDA, the other in host memory), got {dst.device}")
    starts = {"src_starts": _int_list("src_starts", src_starts),
              "dst_starts": _int_list("dst_starts", dst_starts)}
    sizes = _int_list("lengths", lengths)
    for name, values in starts.items():
        if len(values) != len(sizes):
            raise ValueError(f"{name}: expected {len(sizes)} starts like lengths, got {len(values)}")
    for i, n in enumerate(sizes):
        if n < 0:
            raise ValueError(f"lengths[{i}]: expected a non-negative length, got {n}")
        for (name, values), t, side in zip(starts.items(), (src, dst), ("src", "dst")):
            if n and not 0 <= values[i] <= t.shape[0] - n:
                raise IndexError(f"{name}[{i}]: rows [{values[i]}, {values[i] + n}) are out of "
                                 f"range for {side} with {t.shape[0]} rows")
    if not any(sizes) or src.shape[1] == 0:
        return
    host = dst if src.is_cuda else src
    if (src.is_cuda or dst.is_cuda) and not host.is_pinned():
        # pageable memory no device reaches: one copy per range, staged by CUDA (sgl-kernel's way)
        for a, b, n in zip(starts["src_starts"], starts["dst_starts"], sizes):
            if n:
                dst[b:b + n].copy_(src[a:a + n], non_blocking=True)
        return
    # every row of every range as one index, each side; the copy engines merge them back
    length = torch.tensor(sizes, dtype=torch.int64)
    first = torch.cumsum(length, 0) - length
    rows = torch.arange(int(length.sum()), dtype=torch.int64)
    src_rows = rows + torch.repeat_interleave(torch.tensor(starts["src_starts"]) - first, length)
    dst_rows = rows + torch.repeat_interleave(torch.tensor(starts["dst_starts"]) - first, length)

    def build():
        return _plan("embedding ranges", _per_layer_rows("src", [src]),
                     _per_layer_rows("dst", [dst]), 1, src.shape[1] * src.element_size())
    entry = _plan_for(_key("ranges", (src, dst)), (src, dst), build, direct=True)
    _run(entry, src_rows, dst_rows, None, None)


def get_device_accessible_ptr(tensor, device_index) -> int:
    """The address at which CUDA device ``device_index`` reaches ``tensor``'s data:
    the tensor's own address when it is on that device, and for pinned (or
    ``cudaHostRegister``-ed) host memory its device alias, which with CUDA's unified
    addressing is the host address itself. Pageable host memory has none: an error."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    try:
        index = operator.index(device_index)
    except TypeError:
        raise TypeError(f"device_index: expected an int, got {type(device_index).__name__}") from None
    if index < 0:
        raise ValueError(f"device_index: expected a non-negative CUDA device index, got {index}")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device_index: expected a CUDA device below {count}, got {index}"
                         + (" (no CUDA device here)" if count == 0 else ""))
    if tensor.device.type == "cuda":
        if tensor.device.index != index:
            raise ValueError(f"tensor: expected a tensor on cuda:{index} or in host memory, got "
                             f"{tensor.device}")
        return tensor.data_ptr()
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor: expected a tensor on cuda:{index} or in host memory, got "
                         f"{tensor.device}")
    if not tensor.is_pinned():
        raise ValueError("tensor: expected pinned (or registered) host memory, which the device "
                         "can reach; got pageable memory")
    return tensor.data_ptr()
