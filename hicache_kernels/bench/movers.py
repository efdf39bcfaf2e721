"""What the kernels benchmark times: our backends, the baselines and the ceilings.

A :class:`Mover` is one prepared copy: a callable that moves ``nbytes``, plus
the (source, destination, indices, layers) it copies so the result can be
checked by bytes. Builders here only prepare; :mod:`.kernels` times them.

Baselines (what people use today):

* ``torch-index``: torch ``index_select`` into a staging buffer, one copy, then
  ``index_copy_`` into the destination (host layer_first or page_first).
* ``per-page``: one copy per page, as SGLang's ``direct`` backend issues them
  (host layer_first or page_first_direct, where a page of a layer is contiguous).
* ``sgl_kernel``: ``sgl_kernel.kvcacheio``, when it is importable (host
  layer_first or page_first), with ``block_quota`` as the SM budget.

Ceiling: one contiguous copy of the same bytes (each way, and both at once).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends
from ..buffers import KVBuffer
from ..layouts import LayoutKind
from ..ops import Transfer
from .timing import Clock

__all__ = ["BASELINES", "Copy", "Mover", "Pools", "ours", "baseline", "contiguous", "sgl_kernel"]

BASELINES = ("torch-index", "per-page", "sgl_kernel")
# More copies than this per call and the per-page baseline measures Python, not the link.
MAX_PAGE_COPIES = 50_000
POISON = 0xA5


@dataclass
class Copy:
    """One logical copy a mover makes: items ``src_idx[i] -> dst_idx[i]`` of ``layers``."""

    src: KVBuffer
    dst: KVBuffer
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    layers: range


@dataclass
class Mover:
    """A prepared copy: ``fn()`` moves ``nbytes`` (on the current stream)."""

    fn: Callable[[], None]
    nbytes: int
    blocks: str
    copies: list[Copy] = field(default_factory=list)
    note: str = ""


def sgl_kernel():
    """``sgl_kernel.kvcacheio`` if importable, else None."""
    try:
        return importlib.import_module("sgl_kernel.kvcacheio")
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return None


# -- the buffers every case shares ---------------------------------------------------

class Pools:
    """A device pool (per-layer layer_first tensors, like SGLang's) and one host
    pool at a time in the layout being measured, both filled with random bytes.

    Indices are whole pages in random order on each side; ``part`` 0 and 1 are
    disjoint, so a load and a backup can run at once without touching the same
    slots.
    """

    def __init__(self, preset, clock: Clock, *, slots: int, seed: int):
        self.preset, self.clock, self.slots, self.seed = preset, clock, slots, seed
        g = preset
        rows = (slots, g.kv_heads_per_rank, g.head_dim)
        dev = clock.device
        k = [torch.empty(rows, dtype=g.dtype, device=dev) for _ in range(g.layers)]
        v = None if g.mla else [torch.empty(rows, dtype=g.dtype, device=dev) for _ in range(g.layers)]
        self.device = KVBuffer.from_layers(k, v)
        self._fill_random(self.device, seed)
        self._host_key: tuple | None = None
        self.host: KVBuffer | None = None

    def host_pool(self, layout: str, page_size: int) -> KVBuffer:
        key = (layout, page_size)
        if key != self._host_key:
            self.host = None  # free the previous one first: host pools are large
            lay = self.device.layout.with_(kind=layout, page_size=page_size)
            self.host = KVBuffer.allocate(lay, pin_memory=self.clock.gpu)
            self._fill_random(self.host, self.seed + 1)
            self._host_key = key
        return self.host

    def indices(self, page_size: int, tokens: int, part: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(host_idx, device_idx)``: ``tokens`` slots in random whole pages, int64 on
        the device (what a kernel reads without a copy)."""
        if tokens % page_size:
            raise ValueError(f"--tokens: {tokens} is not a multiple of the page size {page_size}")
        if 2 * tokens > self.slots:
            raise ValueError(f"tokens: {tokens} needs a pool of at least {2 * tokens} slots")
        out = []
        for side in (0, 1):
            gen = torch.Generator().manual_seed(self.seed * 1009 + page_size * 31 + side)
            pages = torch.randperm(self.slots // page_size, generator=gen)
            n = tokens // page_size
            chosen = pages[:n] if part == 0 else pages[-n:]
            slots = (chosen[:, None] * page_size + torch.arange(page_size)).reshape(-1)
            out.append(slots.to(self.clock.device))
        return out[0], out[1]

    def _fill_random(self, buf: KVBuffer, seed: int) -> None:
        chunk = 1 << 26
        gen_dev = self.clock.device if self.clock.gpu else torch.device("cpu")
        gen = torch.Generator(device=gen_dev).manual_seed(seed)
        for t in buf.tensors():
            flat = t.view(-1).view(torch.uint8)
            for start in range(0, flat.numel(), chunk):
                part = flat[start:start + chunk]
                part.copy_(torch.randint(0, 256, part.shape, dtype=torch.uint8, device=gen_dev,
                                         generator=gen))


def _blocks(backend: str, sm_budget: int | None) -> str:
    """What a backend occupies, for the table: SMs (blocks) or copy engines."""
    if backend == "copy_engine":
        return "0 (CE)"
    if backend == "reference":
        return "torch"
    default = getattr(backends.get(backend), "DEFAULT_SM_BUDGET", None)
    budget = sm_budget if sm_budget is not None else default
    return str(budget) if budget is not None else "default"


# -- our backends --------------------------------------------------------------------

def ours(pools: Pools, op: str, layout: str, page_size: int, tokens: int, backend: str,
         sm_budget: int | None, *, num_warps: int | None, load_layer: int, side_streams) -> Mover:
    """Our ops API on ``backend``: ``load`` one layer host->device, ``backup`` every
    layer device->host, or ``both`` at once on two streams (every layer loaded one
    call per layer, as a forward pass would, while another range backs up)."""
    host, dev = pools.host_pool(layout, page_size), pools.device
    g = pools.preset
    opts = dict(backend=backend, sm_budget=sm_budget, num_warps=num_warps)
    blocks = _blocks(backend, sm_budget)
    layer_bytes = tokens * g.token_layer_bytes
    if op == "load":
        h, d = pools.indices(page_size, tokens)
        t = Transfer(host, dev, layers=load_layer, **opts)
        return Mover(lambda: t(h, d), layer_bytes, blocks,
                     [Copy(host, dev, h, d, range(load_layer, load_layer + 1))])
    if op == "backup":
        h, d = pools.indices(page_size, tokens)
        t = Transfer(dev, host, **opts)
        return Mover(lambda: t(d, h), layer_bytes * g.layers, blocks,
                     [Copy(dev, host, d, h, range(g.layers))])
    if op == "both":
        h0, d0 = pools.indices(page_size, tokens, part=0)
        h1, d1 = pools.indices(page_size, tokens, part=1)
        loads = [Transfer(host, dev, layers=layer, **opts) for layer in range(g.layers)]
        backup = Transfer(dev, host, **opts)

        def load_all():
            for t in loads:
                t(h0, d0)

        def fn():
            pools.clock.fork_join(load_all, lambda: backup(d1, h1), streams=side_streams)

        return Mover(fn, 2 * layer_bytes * g.layers, f"{blocks} x2",
                     [Copy(host, dev, h0, d0, range(g.layers)),
                      Copy(dev, host, d1, h1, range(g.layers))])
    raise ValueError(f"--op: expected load, backup or both, got {op!r}")


# -- baselines -----------------------------------------------------------------------

def _slot_rows(buf: KVBuffer, plane, layer: int) -> torch.Tensor | None:
    """One layer of one plane as ``[slots, H, D]`` (a view), or None when a slot is
    not one dimension of this layout."""
    if buf.per_layer:
        return plane[layer]
    kind = buf.layout.kind
    if kind is LayoutKind.LAYER_FIRST:
        return plane[layer]
    if kind is LayoutKind.PAGE_FIRST:
        return plane[:, layer]
    return None


def _page_view(buf: KVBuffer, plane, layer: int, first_slot: int, page_size: int):
    """The ``page_size`` slots from ``first_slot`` of one layer, if contiguous there."""
    kind = buf.layout.kind
    if buf.per_layer or kind is LayoutKind.LAYER_FIRST:
        return plane[layer][first_slot:first_slot + page_size]
    if kind is LayoutKind.PAGE_FIRST_DIRECT:
        return plane[first_slot // page_size, layer]
    return None


def baseline(pools: Pools, op: str, layout: str, page_size: int, tokens: int, name: str,
             sm_budget: int | None, *, load_layer: int) -> Mover | str:
    """A baseline mover, or a string saying why it does not apply here."""
    if op not in ("load", "backup"):
        return "baselines run load and backup only"
    host, dev = pools.host_pool(layout, page_size), pools.device
    h, d = pools.indices(page_size, tokens)
    layers = range(load_layer, load_layer + 1) if op == "load" else range(pools.preset.layers)
    src, dst, s_idx, d_idx = (host, dev, h, d) if op == "load" else (dev, host, d, h)
    copy = Copy(src, dst, s_idx, d_idx, layers)
    nbytes = tokens * pools.preset.token_layer_bytes * len(layers)
    if name == "torch-index":
        return _torch_index(pools, copy, nbytes)
    if name == "per-page":
        return _per_page(pools, copy, nbytes, page_size)
    if name == "sgl_kernel":
        return _sgl_kernel(pools, copy, nbytes, op, sm_budget)
    raise ValueError(f"baseline: expected one of {', '.join(BASELINES)}, got {name!r}")


def _torch_index(pools: Pools, copy: Copy, nbytes: int) -> Mover | str:
    """Gather with ``index_select`` into a staging buffer, copy it, scatter with
    ``index_copy_``. A host-side gather/scatter runs on the CPU, then syncs."""
    clock = pools.clock
    pairs = []
    for sp, dp in zip(copy.src.planes(), copy.dst.planes()):
        for layer in copy.layers:
            s, t = _slot_rows(copy.src, sp, layer), _slot_rows(copy.dst, dp, layer)
            if s is None or t is None:
                return f"torch-index needs layer_first or page_first, not {copy.src.layout.kind.value}"
            pairs.append((s, t))
    n = copy.src_idx.numel()
    row = pairs[0][0].shape[1:]
    dtype = pairs[0][0].dtype
    on_host = copy.src.device.type == "cpu"   # load: gather on the host
    src_idx = copy.src_idx.to(copy.src.device)
    dst_idx = copy.dst_idx.to(copy.dst.device)
    gathered = torch.empty((len(pairs), n, *row), dtype=dtype, device=copy.src.device,
                           pin_memory=clock.gpu and on_host)
    landed = torch.empty((len(pairs), n, *row), dtype=dtype, device=copy.dst.device,
                         pin_memory=clock.gpu and not on_host)

    def fn():
        if on_host:
            clock.sync_stream()  # the previous run's copy may still read ``gathered``
        for i, (s, _) in enumerate(pairs):
            torch.index_select(s, 0, src_idx, out=gathered[i])
        landed.copy_(gathered, non_blocking=True)
        if not on_host:
            clock.sync_stream()  # the host scatter reads ``landed``: wait for the copy
        for i, (_, t) in enumerate(pairs):
            t.index_copy_(0, dst_idx, landed[i])

    return Mover(fn, nbytes, "torch", [copy])


def _per_page(pools: Pools, copy: Copy, nbytes: int, page_size: int) -> Mover | str:
    """One ``copy_`` per page and layer, as SGLang's ``direct`` backend issues them."""
    n_pages = copy.src_idx.numel() // page_size
    planes = len(copy.src.planes())
    n_copies = n_pages * planes * len(copy.layers)
    if n_copies > MAX_PAGE_COPIES:
        return f"{n_copies} copies per call (> {MAX_PAGE_COPIES}): measures Python, skipped"
    firsts_s = copy.src_idx[::page_size].tolist()
    firsts_d = copy.dst_idx[::page_size].tolist()
    pairs = []
    for sp, dp in zip(copy.src.planes(), copy.dst.planes()):
        for layer in copy.layers:
            for fs, fd in zip(firsts_s, firsts_d):
                s = _page_view(copy.src, sp, layer, fs, page_size)
                t = _page_view(copy.dst, dp, layer, fd, page_size)
                if s is None or t is None:
                    return ("per-page needs layer_first or page_first_direct, not "
                            f"{copy.src.layout.kind.value if s is None else copy.dst.layout.kind.value}")
                pairs.append((t, s))

    def fn():
        for t, s in pairs:
            t.copy_(s, non_blocking=True)

    return Mover(fn, nbytes, "0 (CE)", [copy], note=f"{n_copies} copies")


def _address_table(tensors, device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64, device=device)


def _sgl_kernel(pools: Pools, copy: Copy, nbytes: int, op: str, sm_budget: int | None) -> Mover | str:
    """``sgl_kernel.kvcacheio`` with SGLang's launch (32 warps a block) and
    ``block_quota`` = the SM budget (SGLang's default, 2, when none is given)."""
    kio = sgl_kernel()
    if kio is None:
        return "sgl_kernel is not installed"
    g = pools.preset
    host = copy.src if op == "load" else copy.dst
    dev = copy.dst if op == "load" else copy.src
    kind = host.layout.kind
    if kind not in (LayoutKind.LAYER_FIRST, LayoutKind.PAGE_FIRST):
        return f"sgl_kernel has no {kind.value} kernel for this"
    quota = dict(block_quota=sm_budget or 2, num_warps_per_block=32)
    item = g.item_bytes
    s_idx, d_idx = copy.src_idx, copy.dst_idx
    device = pools.clock.device
    pf = kind is LayoutKind.PAGE_FIRST
    layout_dim = item * g.layers
    if op == "load":
        layer = copy.layers.start
        if g.mla:
            if pf:
                fn = lambda: kio.transfer_kv_per_layer_mla_pf_lf(  # noqa: E731
                    src=host.k, dst=dev.k[layer], src_indices=s_idx, dst_indices=d_idx,
                    layer_id=layer, item_size=item, src_layout_dim=layout_dim, **quota)
            else:
                fn = lambda: kio.transfer_kv_per_layer_mla(  # noqa: E731
                    src=host.k[layer], dst=dev.k[layer], src_indices=s_idx, dst_indices=d_idx,
                    item_size=item, **quota)
        elif pf:
            fn = lambda: kio.transfer_kv_per_layer_pf_lf(  # noqa: E731
                src_k=host.k, dst_k=dev.k[layer], src_v=host.v, dst_v=dev.v[layer],
                src_indices=s_idx, dst_indices=d_idx, layer_id=layer, item_size=item,
                src_layout_dim=layout_dim, **quota)
        else:
            fn = lambda: kio.transfer_kv_per_layer(  # noqa: E731
                src_k=host.k[layer], dst_k=dev.k[layer], src_v=host.v[layer], dst_v=dev.v[layer],
                src_indices=s_idx, dst_indices=d_idx, item_size=item, **quota)
    else:
        dev_k = _address_table(dev.k, device)
        dev_v = None if g.mla else _address_table(dev.v, device)
        if pf:
            if g.mla:
                fn = lambda: kio.transfer_kv_all_layer_mla_lf_pf(  # noqa: E731
                    src_layers=dev_k, dst=host.k, src_indices=s_idx, dst_indices=d_idx,
                    item_size=item, dst_layout_dim=layout_dim, num_layers=g.layers, **quota)
            else:
                fn = lambda: kio.transfer_kv_all_layer_lf_pf(  # noqa: E731
                    src_k_layers=dev_k, dst_k=host.k, src_v_layers=dev_v, dst_v=host.v,
                    src_indices=s_idx, dst_indices=d_idx, item_size=item,
                    dst_layout_dim=layout_dim, num_layers=g.layers, **quota)
        else:
            host_k = _address_table([host.k[i] for i in range(g.layers)], device)
            if g.mla:
                fn = lambda: kio.transfer_kv_all_layer_mla(  # noqa: E731
                    src_layers=dev_k, dst_layers=host_k, src_indices=s_idx, dst_indices=d_idx,
                    item_size=item, num_layers=g.layers, **quota)
            else:
                host_v = _address_table([host.v[i] for i in range(g.layers)], device)
                fn = lambda: kio.transfer_kv_all_layer(  # noqa: E731
                    src_k_layers=dev_k, dst_k_layers=host_k, src_v_layers=dev_v,
                    dst_v_layers=host_v, src_indices=s_idx, dst_indices=d_idx, item_size=item,
                    num_layers=g.layers, **quota)
    return Mover(fn, nbytes, str(quota["block_quota"]), [copy])


# -- the ceiling ---------------------------------------------------------------------

def contiguous(clock: Clock, direction: str, nbytes: int, streams=None) -> Mover:
    """One contiguous copy of ``nbytes``: ``h2d``, ``d2h``, or ``both`` (``nbytes``
    each way at once, on two streams)."""
    def pair(to_device: bool):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=clock.gpu)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=clock.device)
        src, dst = (host, dev) if to_device else (dev, host)
        return lambda: dst.copy_(src, non_blocking=True)

    if direction == "h2d":
        return Mover(pair(True), nbytes, "0 (CE)")
    if direction == "d2h":
        return Mover(pair(False), nbytes, "0 (CE)")
    if direction == "both":
        up, down = pair(True), pair(False)
        return Mover(lambda: clock.fork_join(up, down, streams=streams), 2 * nbytes, "0 (CE)")
    raise ValueError(f"direction: expected h2d, d2h or both, got {direction!r}")


# -- checking bytes ------------------------------------------------------------------

def _sample(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[:k]
    return torch.cat([pick, torch.tensor([0, n - 1])]).unique()


def _items(buf: KVBuffer, layers: range, slots: torch.Tensor) -> list[torch.Tensor]:
    """The bytes of ``slots`` in each plane of ``layers`` (views, on the buffer's device)."""
    out = []
    for view in buf.layer_views(layers):
        s = slots.to(view.device)
        p = view.shape[1]
        out.append((view, s // p, s % p))
    return out


def poison(mover: Mover, *, sample: int = 64, seed: int = 0) -> None:
    """Overwrite a sample of each copy's destination items, so a copy that does not
    happen cannot pass :func:`verify` on bytes an earlier case left."""
    for i, c in enumerate(mover.copies):
        pick = _sample(c.dst_idx.numel(), sample, seed + i)
        for view, page, slot in _items(c.dst, c.layers, c.dst_idx.cpu()[pick]):
            view[page, slot] = POISON


def verify(mover: Mover, *, sample: int = 64, seed: int = 0) -> bool:
    """Whether the sampled destination items equal their sources, byte for byte."""
    ok = True
    for i, c in enumerate(mover.copies):
        pick = _sample(c.dst_idx.numel(), sample, seed + i)
        src = _items(c.src, c.layers, c.src_idx.cpu()[pick])
        dst = _items(c.dst, c.layers, c.dst_idx.cpu()[pick])
        for (sv, sp, ss), (dv, dp, ds) in zip(src, dst):
            ok &= torch.equal(sv[sp, ss].cpu(), dv[dp, ds].cpu())
    return bool(ok)
