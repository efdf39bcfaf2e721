"""A drop-in for ``sgl_kernel.kvcacheio``: SGLang's host-pool call surface.

Same function names, argument names, order, defaults and meaning (see
``shared/SGLANG_API.md``), mapped onto :mod:`hicache_kernels.ops`::

    from hicache_kernels.sglang import transfer_kv_per_layer, transfer_kv_all_layer, ...

Terms: ``item_size`` is the bytes of one slot of one layer (K or V);
``*_layout_dim`` is the byte stride of one slot in a page-first or page-head
host buffer; ``*_layers`` are uint64 (or int64) tensors of per-layer base
addresses, on the device whose memory they point to. A negative index on
either side skips that item.

Backend: ``HICACHE_BACKEND`` in the environment (default ``auto``: the CUDA
kernels, else Triton, on GPU tensors; the torch reference on CPU tensors, or
Triton's interpreter when ``TRITON_INTERPRET=1``). ``block_quota`` is the
kernel's SM budget and ``num_warps_per_block`` its warps per block. The
``direct`` functions use the copy-engine backend when it is built.

Plans are cached per pool (see ``_PLANS``): a cached plan holds references to
the tensors it was built from, so the memory stays valid; the cache is bounded.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch

from . import backends
from .buffers import KVBuffer
from .layouts import KVLayout, LayoutKind
from .ops import check_devices, check_launch_options, execute
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
]


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
    bases = torch.cat([t.view(torch.int64) for t in tables]) if len(tables) == 2 \
        else tables[0].view(torch.int64)
    layout = KVLayout(LayoutKind.LAYER_FIRST, num_layers=1, num_slots=1, head_num=head_num,
                      head_dim=item_size // head_num, dtype=torch.uint8)

    def views(min_slots: int) -> list[torch.Tensor]:
        return [tensor_at(a, min_slots * item_size, device).view(min_slots, 1, head_num, -1)
                for a in bases.tolist()]

    # SGLang's tables live on the GPU and point into the device pool; a CPU
    # table (tests) points to host memory we cannot prove pinned, so it is not.
    return PlaneSet(name=names[0], addressing=layout.plane_addressing(), bases=bases,
                    device=device, views=views, num_slots=None, pinned=False)


# Building a plan costs ~150 us of Python; SGLang calls these per layer on the
# hot path with the same pool tensors, so plans are cached by what defines them:
# the tensors' addresses, shapes, strides, dtypes and devices, the scalar
# arguments, and for address tables also their contents' version.
_PLANS: "OrderedDict[tuple, tuple[TransferPlan, object]]" = OrderedDict()
_PLAN_CACHE_SIZE = 512


def _fingerprint(value, content: bool = False):
    if isinstance(value, torch.Tensor):
        fp = (value.data_ptr(), value.shape, value.stride(), value.dtype, value.device)
        return fp + (value._version,) if content else fp
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(v, content) for v in value)
    return value


def _cached_plan(key: tuple, build, backend: str | None = None) -> tuple[TransferPlan, object]:
    """``(plan, backend module)`` for ``key``, built (and fully checked) on a miss."""
    backend = backend or _backend()
    key = key + (backend,)
    try:
        hit = _PLANS.get(key)
    except TypeError:  # an unhashable argument: let the builder report it
        key, hit = None, None
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    plan = build()
    module, _ = backends.choose(plan, backend)
    check_devices(plan, module)
    if key is not None:
        _PLANS[key] = (plan, module)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan, module


def _plan(label: str, src: PlaneSet, dst: PlaneSet, head_num: int, item_size: int) -> TransferPlan:
    return TransferPlan(src, dst, head_num=head_num, head_bytes=item_size // head_num, label=label)


def _run(cached: tuple[TransferPlan, object], src_indices, dst_indices, block_quota,
         num_warps_per_block) -> None:
    plan, module = cached
    check_launch_options(block_quota, num_warps_per_block)
    execute(plan, src_indices, dst_indices, backend_module=module, sm_budget=block_quota,
            num_warps=num_warps_per_block)


# -- kernel forms ----------------------------------------------------------------------

def transfer_kv_per_layer(src_k, dst_k, src_v, dst_v, src_indices, dst_indices, item_size,
                          block_quota=2, num_warps_per_block=32):
    """One layer, layer-first -> layer-first, K and V."""
    def build():
        _check_item_size(item_size)
        return _plan("lf->lf layer", _layer_first(("src_k", "src_v"), (src_k, src_v), item_size, 1),
                     _layer_first(("dst_k", "dst_v"), (dst_k, dst_v), item_size, 1), 1, item_size)
    key = ("lf_lf", _fingerprint((src_k, dst_k, src_v, dst_v)), item_size)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_pf_lf(src_k, dst_k, src_v, dst_v, src_indices, dst_indices, layer_id,
                                item_size, src_layout_dim, block_quota=2, num_warps_per_block=32):
    """Layer ``layer_id`` of a page-first ``[slots, layers, ...]`` source into layer-first."""
    def build():
        _check_item_size(item_size)
        src = _host_pool(LayoutKind.PAGE_FIRST, ("src_k", "src_v"), (src_k, src_v),
                         _one_layer(layer_id), item_size, src_layout_dim)
        dst = _layer_first(("dst_k", "dst_v"), (dst_k, dst_v), item_size, 1)
        return _plan(f"pf->lf L{layer_id}", src, dst, 1, item_size)
    key = ("pf_lf", _fingerprint((src_k, dst_k, src_v, dst_v)), layer_id, item_size, src_layout_dim)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


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
    key = ("ph_lf", _fingerprint((src_k, dst_k, src_v, dst_v)), layer_id, item_size,
           src_layout_dim, page_size, head_num)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


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
    key = ("lf_lf_all", _fingerprint((src_k_layers, dst_k_layers, src_v_layers, dst_v_layers), True),
           item_size, num_layers)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


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
    key = ("lf_pf_all", _fingerprint((src_k_layers, src_v_layers), True),
           _fingerprint((dst_k, dst_v)), item_size, dst_layout_dim, num_layers)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


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
    key = ("lf_ph_all", _fingerprint((src_k_layers, src_v_layers), True),
           _fingerprint((dst_k, dst_v)), item_size, dst_layout_dim, num_layers, page_size, head_num)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_mla(src, dst, src_indices, dst_indices, item_size, block_quota=2,
                              num_warps_per_block=32):
    """MLA, one layer, layer-first -> layer-first."""
    def build():
        _check_item_size(item_size)
        return _plan("mla lf->lf layer", _layer_first(("src",), (src,), item_size, 1),
                     _layer_first(("dst",), (dst,), item_size, 1), 1, item_size)
    key = ("mla_lf_lf", _fingerprint((src, dst)), item_size)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_per_layer_mla_pf_lf(src, dst, src_indices, dst_indices, layer_id, item_size,
                                    src_layout_dim, block_quota=2, num_warps_per_block=32):
    """MLA, layer ``layer_id`` of a page-first source into layer-first."""
    def build():
        _check_item_size(item_size)
        src_side = _host_pool(LayoutKind.PAGE_FIRST, ("src",), (src,), _one_layer(layer_id),
                              item_size, src_layout_dim)
        return _plan(f"mla pf->lf L{layer_id}", src_side,
                     _layer_first(("dst",), (dst,), item_size, 1), 1, item_size)
    key = ("mla_pf_lf", _fingerprint((src, dst)), layer_id, item_size, src_layout_dim)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


def transfer_kv_all_layer_mla(src_layers, dst_layers, src_indices, dst_indices, item_size,
                              num_layers, block_quota=2, num_warps_per_block=32):
    """MLA, every layer, layer-first -> layer-first, through address tables."""
    def build():
        _check_item_size(item_size)
        return _plan("mla lf->lf all",
                     _address_tables(("src_layers",), (src_layers,), num_layers, item_size),
                     _address_tables(("dst_layers",), (dst_layers,), num_layers, item_size),
                     1, item_size)
    key = ("mla_lf_lf_all", _fingerprint((src_layers, dst_layers), True), item_size, num_layers)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


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
    key = ("mla_lf_pf_all", _fingerprint(src_layers, True), _fingerprint(dst), item_size,
           dst_layout_dim, num_layers)
    _run(_cached_plan(key, build), src_indices, dst_indices, block_quota, num_warps_per_block)


def _one_layer(layer_id) -> range:
    if not isinstance(layer_id, int) or isinstance(layer_id, bool):
        raise TypeError(f"layer_id: expected an int, got {type(layer_id).__name__}")
    return range(layer_id, layer_id + 1)


# -- direct (copy-engine) forms -----------------------------------------------------------

def _direct_backend() -> str:
    requested = _backend()
    if requested == "auto" and backends.get("copy_engine").available()[0]:
        return "copy_engine"
    return requested


def _tensor_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError(f"{name}: expected a non-empty list of tensors")
    return list(tensors)


def _row_bytes(name: str, t) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name}: expected a tensor [slots, ...]")
    return t[0].numel() * t.element_size()


def _per_layer_rows(name: str, tensors: list[torch.Tensor], row_bytes: int) -> PlaneSet:
    """A list of layer-first per-layer tensors, each plane one tensor."""
    rows = []
    for i, t in enumerate(tensors):
        r = _bytes(f"{name}[{i}]", t, row_bytes)
        if r.shape[0] != t.shape[0]:
            raise ValueError(f"{name}[{i}]: expected rows of {row_bytes} bytes like {name}[0], "
                             f"got {_row_bytes(name, t)}")
        rows.append(r.view(-1, 1, row_bytes))
    devices = {r.device for r in rows}
    if len(devices) != 1:
        raise ValueError(f"{name}: expected every tensor on one device, got {sorted(map(str, devices))}")
    layout = KVLayout(LayoutKind.LAYER_FIRST, num_layers=1, num_slots=min(r.shape[0] for r in rows),
                      head_num=1, head_dim=row_bytes, dtype=torch.uint8)
    return PlaneSet(
        name=name, addressing=layout.plane_addressing(), bases=[r.data_ptr() for r in rows],
        device=rows[0].device, views=lambda _m: [r.unsqueeze(1) for r in rows],
        num_slots=layout.num_slots,
        pinned=rows[0].device.type == "cpu" and all(r.is_pinned() for r in rows),
    )


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


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size):
    """Per-layer layer-first tensors (K layers then V layers, or any list) ->
    the same, copying runs of slots contiguous on both sides, with no kernel."""
    src_list = _tensor_list("src_layers", src_layers)
    dst_list = _tensor_list("dst_layers", dst_layers)
    src_idx, dst_idx = _page_runs(src_indices, dst_indices, page_size)

    def build():
        if len(src_list) != len(dst_list):
            raise ValueError(f"dst_layers: expected {len(src_list)} tensors like src_layers, "
                             f"got {len(dst_list)}")
        row = _row_bytes("src_layers[0]", src_list[0])
        return _plan("direct lf->lf", _per_layer_rows("src_layers", src_list, row),
                     _per_layer_rows("dst_layers", dst_list, row), 1, row)
    key = ("direct", _fingerprint(src_list), _fingerprint(dst_list))
    _run(_cached_plan(key, build, _direct_backend()), src_idx, dst_idx, None, None)


def _direct_pool(name: str, tensors: list[torch.Tensor], page_size: int,
                 layers: range) -> tuple[PlaneSet, int]:
    """A page_first_direct pool ``[pages, layers, page_size, ...]`` per plane,
    and its item size (bytes of one slot of one layer)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 3 or first.shape[2] != page_size:
        raise ValueError(f"{name}[0]: expected [pages, layers, page_size={page_size}, ...], got "
                         f"{list(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}")
    num_layers = first.shape[1]
    if layers.start < 0 or layers.stop > num_layers:
        raise ValueError(f"layer_id: expected layers within [0, {num_layers}), got {layers}")
    item = first[0, 0, 0].numel() * first.element_size()
    _check_item_size(item)
    slot_bytes = item * num_layers
    names = [f"{name}[{i}]" for i in range(len(tensors))]
    rows = [_bytes(n, t, slot_bytes) for n, t in zip(names, tensors)]
    _same_slots(names, rows)
    layout = KVLayout(LayoutKind.PAGE_FIRST_DIRECT, num_layers=num_layers,
                      num_slots=rows[0].shape[0], head_num=1, head_dim=item, dtype=torch.uint8,
                      page_size=page_size, mla=len(rows) == 1)
    planes = [r.view(layout.shape) for r in rows]
    buf = KVBuffer(layout, planes[0], planes[1] if len(planes) == 2 else None)
    return buf.plane_set(layers, name), item


def _expand_pages(first_slots: torch.Tensor, page_size: int, whole_pages: bool) -> torch.Tensor:
    """Each page's first index -> its ``page_size`` consecutive slots (SGLang copies
    whole pages: a host page is found from its first index, a device run starts there)."""
    start = first_slots[::page_size]
    if whole_pages:
        start = torch.div(start, page_size, rounding_mode="floor") * page_size
    slots = start[:, None] + torch.arange(page_size)
    return torch.where(start[:, None] >= 0, slots, -1).reshape(-1)  # a padded page stays skipped


def transfer_kv_per_layer_direct_pf_lf(src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id,
                                       page_size):
    """Copy-engine load from page_first_direct ``[pages, layers, page_size, ...]``
    (``src_ptrs=[k_pool, v_pool]``, or ``[kv_pool]`` for MLA) into per-layer
    layer-first tensors (``dst_ptrs``: K layers then V layers), starting at
    layer ``layer_id``."""
    src_list = _tensor_list("src_ptrs", src_ptrs)
    dst_list = _tensor_list("dst_ptrs", dst_ptrs)
    if len(src_list) not in (1, 2) or len(dst_list) % len(src_list):
        raise ValueError(f"dst_ptrs: expected K layers then V layers for {len(src_list)} source "
                         f"pools, got {len(dst_list)} tensors")
    src_idx, dst_idx = _page_runs(src_indices, dst_indices, page_size)

    def build():
        layers = range(_one_layer(layer_id).start, layer_id + len(dst_list) // len(src_list))
        src, item = _direct_pool("src_ptrs", src_list, page_size, layers)
        dst = _per_layer_rows("dst_ptrs", dst_list, item)
        return _plan(f"direct pfd->lf L{layer_id}", src, dst, 1, item)
    key = ("direct_pf_lf", _fingerprint(src_list), _fingerprint(dst_list), layer_id, page_size)
    _run(_cached_plan(key, build, _direct_backend()), _expand_pages(src_idx, page_size, True),
         _expand_pages(dst_idx, page_size, False), None, None)


def transfer_kv_all_layer_direct_lf_pf(src_ptrs, dst_ptrs, src_indices, dst_indices, page_size):
    """Copy-engine backup from per-layer layer-first tensors (``src_ptrs``: K
    layers then V layers) into page_first_direct pools (``dst_ptrs``)."""
    src_list = _tensor_list("src_ptrs", src_ptrs)
    dst_list = _tensor_list("dst_ptrs", dst_ptrs)
    if len(dst_list) not in (1, 2) or len(src_list) % len(dst_list):
        raise ValueError(f"src_ptrs: expected K layers then V layers for {len(dst_list)} "
                         f"destination pools, got {len(src_list)} tensors")
    src_idx, dst_idx = _page_runs(src_indices, dst_indices, page_size)

    def build():
        dst, item = _direct_pool("dst_ptrs", dst_list, page_size,
                                 range(len(src_list) // len(dst_list)))
        return _plan("direct lf->pfd all", _per_layer_rows("src_ptrs", src_list, item), dst, 1, item)
    key = ("direct_lf_pf", _fingerprint(src_list), _fingerprint(dst_list), page_size)
    _run(_cached_plan(key, build, _direct_backend()), _expand_pages(src_idx, page_size, False),
         _expand_pages(dst_idx, page_size, True), None, None)
