"""A short self-check: every layout, both directions, each usable backend vs the reference."""

from __future__ import annotations

import time

import torch

from .. import backends
from ..buffers import KVBuffer
from ..layouts import KVLayout, LayoutKind
from ..ops import transfer


def _random_bytes(buf: KVBuffer, gen: torch.Generator) -> None:
    for t in buf.tensors():
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))


def _poison(buf: KVBuffer) -> None:
    for t in buf.tensors():
        t.view(torch.uint8).fill_(0xA5)


def run_selfcheck(device: str | None = None) -> list[dict]:
    """Round-trip every layout through each usable backend; compare bytes with the reference."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pin = device == "cuda"
    usable = [n for n, (ok, _) in backends.status().items() if ok and n != "reference"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for kind in LayoutKind:
        for mla in (False, True):
            if mla and kind is LayoutKind.PAGE_HEAD:
                continue
            host_lay = KVLayout(kind, num_layers=3, num_slots=64, head_num=1 if mla else 2,
                                head_dim=72 if mla else 40, dtype=torch.bfloat16, page_size=16,
                                mla=mla)
            dev_lay = host_lay.with_(kind=LayoutKind.LAYER_FIRST, num_slots=48)
            host = KVBuffer.allocate(host_lay, pin_memory=pin)
            _random_bytes(host, gen)
            h_idx = torch.randperm(64, generator=gen)[:40]
            d_idx = torch.randperm(48, generator=gen)[:40]
            h_idx[::7] = -1
            results = {}
            for name in ["reference", *usable]:
                dev = KVBuffer.allocate(dev_lay, device=device)
                back = KVBuffer.allocate(host_lay, pin_memory=pin)
                _poison(dev)
                _poison(back)
                t0 = time.perf_counter()
                transfer(host, dev, h_idx, d_idx, layers=1, backend=name)
                transfer(dev, back, d_idx, h_idx, backend=name)
                if device == "cuda":
                    torch.cuda.synchronize()
                results[name] = (back, time.perf_counter() - t0)
            ref = results["reference"][0]
            for name in usable:
                same = all(torch.equal(a.view(torch.uint8).cpu(), b.view(torch.uint8).cpu())
                           for a, b in zip(ref.tensors(), results[name][0].tensors()))
                rows.append(dict(layout=kind.value, attn="MLA" if mla else "MHA", backend=name,
                                 device=device, bytes_equal=same,
                                 seconds=results[name][1]))
            if not usable:
                rows.append(dict(layout=kind.value, attn="MLA" if mla else "MHA",
                                 backend="reference", device=device, bytes_equal=True,
                                 seconds=results["reference"][1]))
    return rows
