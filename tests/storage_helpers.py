"""Helpers shared by the storage tests (and run as a script by the restart and
full-disk tests, which need a second process)."""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hicache_kernels import KVBuffer, KVLayout  # noqa: E402
from hicache_kernels.layouts import layer_view  # noqa: E402
from hicache_kernels.storage import page_keys  # noqa: E402

POISON = 0xA5


def make_layout(kind="page_first", *, dtype=torch.bfloat16, mla=False, layers=3, pages=6,
                page_size=4, heads=2, head_dim=8) -> KVLayout:
    return KVLayout(kind, num_layers=layers, num_slots=pages * page_size, head_num=1 if mla else heads,
                    head_dim=head_dim, dtype=dtype, page_size=page_size, mla=mla)


def random_host(layout: KVLayout, seed: int = 0, *, split_kv: bool = False) -> KVBuffer:
    """A host pool full of random bytes. ``split_kv`` allocates V before K, as two
    tensors, so pools of one layout differ in where their planes live."""
    if split_kv and not layout.mla:
        v = torch.empty(layout.shape, dtype=layout.dtype)
        k = torch.empty(layout.shape, dtype=layout.dtype)
        host = KVBuffer(layout, k, v)
    else:
        host = KVBuffer.allocate(layout)
    gen = torch.Generator().manual_seed(seed)
    for t in host.tensors():
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
    return host


def poisoned_host(layout: KVLayout, *, split_kv: bool = False) -> KVBuffer:
    host = random_host(layout, split_kv=split_kv)
    for t in host.tensors():
        t.view(torch.uint8).fill_(POISON)
    return host


def slot_bytes(host: KVBuffer, slot: int) -> torch.Tensor:
    """Every byte of one token slot (all layers, K then V) via torch indexing,
    independent of the storage code's run arithmetic."""
    lay = host.layout
    parts = []
    for plane in host.planes():
        for layer in range(lay.num_layers):
            view = layer_view(plane, lay, layer)              # [pages, P, H, head_bytes]
            parts.append(view.reshape(-1, *view.shape[2:])[slot].reshape(-1))
    return torch.cat(parts)


def page_slots(first_page: int, n_pages: int, page_size: int) -> torch.Tensor:
    return torch.arange(first_page * page_size, (first_page + n_pages) * page_size)


def keys_for(n_pages: int, page_size: int, seed: int = 7) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2**31, (n_pages * page_size,), generator=gen)
    return page_keys(tokens, page_size)


def _main() -> None:
    """``python storage_helpers.py write|read|full ARGS_JSON``: one side of a
    two-process test; prints a JSON result on the last line."""
    import resource
    import signal

    from hicache_kernels.storage.nixl_store import NixlFileStore

    mode, args = sys.argv[1], json.loads(sys.argv[2])
    layout = make_layout(args["kind"], dtype=getattr(torch, args["dtype"]))
    p = layout.page_size
    keys = keys_for(args["pages"], p, seed=args["key_seed"])
    if mode == "write":
        host = random_host(layout, seed=args["seed"])
        store = NixlFileStore(host, {"directory": args["directory"]})
        ok = store.batch_set(keys, page_slots(args["first_page"], args["pages"], p))
        slots = page_slots(args["first_page"], args["pages"], p).tolist()
        torch.save(torch.stack([slot_bytes(host, s) for s in slots]), args["expected"])
        print(json.dumps({"ok": ok}))
    elif mode == "full":
        # Writes past this many bytes fail (EFBIG) even for root: a disk that fills
        # up in the middle of a page.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        host = random_host(layout, seed=args["seed"])
        store = NixlFileStore(host, {"directory": args["directory"]})
        resource.setrlimit(resource.RLIMIT_FSIZE, (args["file_limit"], resource.RLIM_INFINITY))
        ok = store.batch_set(keys, page_slots(args["first_page"], args["pages"], p))
        print(json.dumps({"ok": ok, "stats": store.io_stats(), "writable": store.writable}))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    _main()
