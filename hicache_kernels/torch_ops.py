"""``torch.ops.hicache.transfer``: the ops API as a PyTorch custom op.

The schema marks the destination tensors as written (``mutates_args``) and a
fake implementation gives torch.compile the (empty) output without running,
so compiled graphs and CUDA graph capture keep the copy and order later reads
after it. The op runs on the current stream.

Example:
    >>> from hicache_kernels import torch_ops
    >>> torch_ops.transfer(host, dev, host_idx, dev_idx, layers=3)     # eager or compiled
    >>> torch.ops.hicache.transfer                                     # the registered op
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from .buffers import KVBuffer
from .layouts import KVLayout
from .ops import Transfer

__all__ = ["transfer", "describe_layout"]

_FIELDS = ("kind", "num_layers", "num_slots", "head_num", "head_dim", "page_size", "mla", "per_layer")


def describe_layout(buf: KVBuffer) -> str:
    """A buffer's layout as the op's string argument (the dtype travels with the tensors)."""
    lay = buf.layout
    values = (lay.kind.value, lay.num_layers, lay.num_slots, lay.head_num, lay.head_dim,
              lay.page_size, int(lay.mla), int(buf.per_layer))
    return ";".join(f"{k}={v}" for k, v in zip(_FIELDS, values))


def _buffer(text: str, tensors: Sequence[torch.Tensor]) -> KVBuffer:
    try:
        fields = dict(part.split("=", 1) for part in text.split(";"))
        ints = {k: int(fields[k]) for k in _FIELDS[1:]}
        kind = fields["kind"]
    except (KeyError, ValueError):
        raise ValueError(f"layout: expected 'kind=...;num_layers=...;...' as describe_layout() "
                         f"writes, got {text!r}") from None
    if not tensors:
        raise ValueError("tensors: expected the buffer's tensors, got none")
    lay = KVLayout(kind, num_layers=ints["num_layers"], num_slots=ints["num_slots"],
                   head_num=ints["head_num"], head_dim=ints["head_dim"], dtype=tensors[0].dtype,
                   page_size=ints["page_size"], mla=bool(ints["mla"]))
    tensors = list(tensors)
    if ints["per_layer"]:
        n = lay.num_layers
        return KVBuffer(lay, tensors[:n], None if lay.mla else tensors[n:])
    return KVBuffer(lay, tensors[0], None if lay.mla else tensors[1])


# Prepared transfers, keyed by what defines them (tensor addresses, shapes,
# layouts, options): building one costs ~100 us of Python, a hit a dict lookup.
_PREPARED: "OrderedDict[tuple, Transfer]" = OrderedDict()
_PREPARED_SIZE = 256


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in tensors)


@torch.library.custom_op("hicache::transfer", mutates_args=("dst_tensors",))
def _transfer_op(src_tensors: list[torch.Tensor], dst_tensors: list[torch.Tensor],
                 src_indices: torch.Tensor, dst_indices: torch.Tensor, src_layout: str,
                 dst_layout: str, layer_begin: int, layer_end: int, backend: str,
                 sm_budget: int, num_warps: int) -> None:
    key = (_key(src_tensors), _key(dst_tensors), src_layout, dst_layout, layer_begin, layer_end,
           backend, sm_budget, num_warps)
    prepared = _PREPARED.get(key)
    if prepared is None:
        prepared = Transfer(_buffer(src_layout, src_tensors), _buffer(dst_layout, dst_tensors),
                            layers=range(layer_begin, layer_end), backend=backend,
                            sm_budget=sm_budget or None, num_warps=num_warps or None)
        _PREPARED[key] = prepared
        if len(_PREPARED) > _PREPARED_SIZE:
            _PREPARED.popitem(last=False)
    else:
        _PREPARED.move_to_end(key)
    prepared(src_indices, dst_indices)


@_transfer_op.register_fake
def _transfer_fake(src_tensors, dst_tensors, src_indices, dst_indices, src_layout, dst_layout,
                   layer_begin, layer_end, backend, sm_budget, num_warps) -> None:
    return None


def transfer(src: KVBuffer, dst: KVBuffer, src_indices: torch.Tensor, dst_indices: torch.Tensor,
             *, layers: int | range | None = None, backend: str = "auto",
             sm_budget: int | None = None, num_warps: int | None = None) -> None:
    """:func:`hicache_kernels.ops.transfer` through ``torch.ops.hicache.transfer``
    (on the current stream); same arguments."""
    if layers is None:
        layers = range(src.layout.num_layers)
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers = range(layers, layers + 1)
    if not isinstance(layers, range):
        raise TypeError(f"layers: expected an int, a range or None, got {type(layers).__name__}")
    torch.ops.hicache.transfer(src.tensors(), dst.tensors(), src_indices, dst_indices,
                               describe_layout(src), describe_layout(dst), layers.start,
                               layers.stop, backend, sm_budget or 0, num_warps or 0)
