"""A slow, obvious oracle: copy item bytes one (item, layer, head) at a time using
``KVLayout.byte_offset``. Used to check the reference backend itself; the
reference (torch views) and this (the formula) agree only if both are right."""

from __future__ import annotations

import torch

from hicache_kernels import KVBuffer


def _head_bytes(buf: KVBuffer, plane: int, layer: int, slot: int, head: int) -> torch.Tensor:
    lay = buf.layout
    tensor = buf.planes()[plane]
    if buf.per_layer:
        flat = tensor[layer].reshape(-1).view(torch.uint8)
        off = slot * lay.item_bytes + head * lay.head_bytes
    else:
        flat = tensor.reshape(-1).view(torch.uint8)
        off = lay.byte_offset(slot, layer, head)
    return flat[off:off + lay.head_bytes]


def oracle_copy(src: KVBuffer, dst: KVBuffer, src_idx, dst_idx, layers: range) -> None:
    for plane in range(len(src.planes())):
        for layer in layers:
            for s, d in zip(src_idx.tolist(), dst_idx.tolist()):
                if s < 0 or d < 0:
                    continue
                for h in range(src.layout.head_num):
                    _head_bytes(dst, plane, layer, d, h).copy_(_head_bytes(src, plane, layer, s, h))
