"""A stand-in forward pass: the shape of a prefill's work, not a model.

Per layer: wait for that layer's KV if a load is in flight, the layer's weight
GEMMs sized to the preset (one layer's weights reused for every layer: the
time is the same and the memory is not), the new tokens' K and V written into
the device pool, and attention of the new tokens over the whole context read
back from the pool. So a layer-wise load overlaps real compute, and attention
really reads what was loaded.

KV content is a function of (client, position, layer, plane), so any page
found in the wrong place, or overwritten, shows up in :meth:`check`; the first
``shared_prefix`` positions hold the same content for every client (a shared
system prompt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..buffers import KVBuffer
from ..nvtx_ranges import nvtx_range
from .presets import ModelPreset

__all__ = ["StandInForward"]

_ROWS = 8191  # rows of random KV content; a prime, so (client, position, layer) spread over it
_SHARED = 999_983  # the "client" whose content the shared prefix holds


class StandInForward:
    """Per-layer GEMMs, KV writes and attention over a device pool.

    Args:
        preset: sizes of the GEMMs and of the attention.
        pool: the device pool (per-layer ``[slots, H, D]`` tensors).
        max_tokens: longest sequence a request may have.
        compute_dtype: GEMM dtype (bf16 on a GPU, fp32 on a CPU).
        seed: for the weights and the KV content.
        shared_prefix: positions whose KV is the same for every client.
        max_rows: at most this many rows go through the GEMMs and attend (None:
            all); for runs whose time is modeled, where the compute only has to
            read what was loaded, not take the time it would.

    Example:
        >>> fwd = StandInForward(TINY, pool, max_tokens=256, compute_dtype=torch.float32)
        >>> fwd.prefill(client=0, slots=slots, first=0, end=96)   # computes 96 tokens
    """

    def __init__(self, preset: ModelPreset, pool: KVBuffer, *, max_tokens: int,
                 compute_dtype: torch.dtype, seed: int = 0, shared_prefix: int = 0,
                 max_rows: int | None = None):
        self.preset, self.pool = preset, pool
        self.shared_prefix, self.max_rows = shared_prefix, max_rows
        dev = pool.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        shapes = preset.gemm_shapes()
        widest = max(max(i, o) for i, o in shapes)
        self.weights = [torch.randn(i, o, dtype=compute_dtype, device=dev, generator=gen) / i**0.5
                        for i, o in shapes]
        self.act = torch.randn(max_tokens, widest, dtype=compute_dtype, device=dev, generator=gen)
        self.out = torch.empty(max_tokens * widest, dtype=compute_dtype, device=dev)
        lay = pool.layout
        self.heads, self.head_dim = lay.head_num, lay.head_dim
        self.q_heads = max(self.heads, preset.q_heads_per_rank)
        self.q_heads -= self.q_heads % self.heads   # a whole number of query heads per KV head
        self.compute_dtype = compute_dtype
        content = torch.randint(0, 256, (_ROWS, lay.item_bytes), dtype=torch.uint8,
                                device=dev, generator=gen)
        self.content = content.view(lay.dtype).view(_ROWS, lay.head_num, lay.head_dim)
        self.planes = pool.planes()

    # -- KV content ------------------------------------------------------------------
    def _rows(self, client: int, positions: torch.Tensor, layer: int, plane: int) -> torch.Tensor:
        owner = torch.where(positions < self.shared_prefix, _SHARED, client)
        return (owner * 1_000_003 + positions * 7919 + layer * 131 + plane * 17) % _ROWS

    def write_kv(self, client: int, slots: torch.Tensor, first: int, end: int, layer: int) -> None:
        """Write the KV of positions ``[first, end)`` of ``client`` at ``slots[first:end]``."""
        if end <= first:
            return
        pos = torch.arange(first, end, device=slots.device)
        for p, plane in enumerate(self.planes):
            plane[layer].index_copy_(0, slots[first:end], self.content[self._rows(client, pos, layer, p)])

    def check(self, client: int, slots: torch.Tensor, positions: torch.Tensor) -> bool:
        """Whether positions of ``client`` hold what :meth:`write_kv` wrote, in every layer."""
        pos = positions.to(slots.device)
        where = slots[pos]
        ok = True
        for layer in range(self.preset.layers):
            for p, plane in enumerate(self.planes):
                want = self.content[self._rows(client, pos, layer, p)]
                ok &= torch.equal(plane[layer][where].view(torch.uint8), want.view(torch.uint8))
        return bool(ok)

    # -- the pass --------------------------------------------------------------------
    def prefill(self, *, client: int, slots: torch.Tensor, first: int, end: int,
                handle=None) -> None:
        """Compute positions ``[first, end)`` over a context of ``end`` tokens at ``slots``.

        ``handle``: a layer-wise load in flight (``handle.wait(layer)`` before each
        layer reads the pool), or None.
        """
        n = end - first
        if n <= 0:
            raise ValueError(f"first, end: expected first < end, got {first}, {end}")
        ctx = slots[:end]
        rows = n if self.max_rows is None else min(n, self.max_rows)
        for layer in range(self.preset.layers):
            with nvtx_range(f"bench.e2e.layer L{layer} n={n}"):
                if handle is not None:
                    handle.wait(layer)
                self._gemms(rows)
                self.write_kv(client, slots, first, end, layer)
                self._attention(rows, ctx, layer)

    def decode_step(self, context: int, batch: int = 1) -> None:
        """One decode step of ``batch`` requests over ``context`` cached tokens each
        (KV writes aside); attention reads one context ``batch`` times."""
        ctx = torch.arange(context, device=self.act.device) % self.pool.layout.num_slots
        rows = min(batch, self.act.shape[0])
        for layer in range(self.preset.layers):
            self._gemms(rows)
            for _ in range(-(-batch // rows)):
                self._attention(rows, ctx, layer)

    def _gemms(self, n: int) -> None:
        for w in self.weights:
            i, o = w.shape
            torch.matmul(self.act[:n, :i], w, out=self.out[: n * o].view(n, o))

    def _attention(self, n: int, ctx_slots: torch.Tensor, layer: int) -> None:
        dt, h, d = self.compute_dtype, self.heads, self.head_dim
        q = self.act[:n, : self.q_heads * d] if self.act.shape[1] >= self.q_heads * d else \
            self.act[:n, :d].repeat(1, self.q_heads)
        q = q.reshape(1, n, self.q_heads, d).transpose(1, 2)
        k = self.planes[0][layer][ctx_slots].to(dt).transpose(0, 1).unsqueeze(0)   # [1, H, ctx, D]
        v = k if len(self.planes) == 1 else \
            self.planes[1][layer][ctx_slots].to(dt).transpose(0, 1).unsqueeze(0)
        group = self.q_heads // h
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        F.scaled_dot_product_attention(q, k, v)
