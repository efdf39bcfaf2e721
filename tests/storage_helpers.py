"""Helpers shared by the storage tests (and run as a script by the restart and
full-disk tests, which need a second process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def run_helper(mode: str, **args) -> dict:
    """Run this file as a second process in ``mode``; its last line of output, as JSON."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), mode, json.dumps(args)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{mode} process failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_unwritable(path) -> str:
    """Make ``path`` refuse new files, also for root: chmod, else chattr +i
    (skips the test where neither works). Undo with :func:`undo_unwritable`."""
    import pytest

    os.chmod(path, 0o555)
    if not _can_create(path):
        return "chmod"
    os.chmod(path, 0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        if not _can_create(path):
            return "chattr"
        subprocess.run(["chattr", "-i", str(path)])
    pytest.skip("cannot make a directory read-only here (root without chattr +i)")


def undo_unwritable(path, how: str) -> None:
    if how == "chattr":
        subprocess.run(["chattr", "-i", str(path)])
    os.chmod(path, 0o755)


def _can_create(path) -> bool:
    probe = os.path.join(path, ".can-create")
    try:
        open(probe, "w").close()
    except OSError:
        return False
    os.unlink(probe)
    return True


# -- a manager with the NIXL tier ---------------------------------------------------

MANAGER_P = 4


def manager_with_storage(directory, *, host_layout="page_first", device_pages=4, hicache_ratio=2.0,
                         open_store=None, **config):
    """A CPU manager (3 layers, 4-token pages, poisoned pools) over a NIXL
    :class:`StorageTier` in ``directory``; returns ``(mgr, tier)``."""
    from hicache_kernels.manager import HiCacheManager
    from hicache_kernels.storage import StorageTier

    lay = KVLayout("layer_first", num_layers=3, num_slots=device_pages * MANAGER_P, head_num=2,
                   head_dim=8, dtype=torch.bfloat16, page_size=MANAGER_P)
    pool = KVBuffer.allocate(lay)
    for t in pool.tensors():
        t.view(torch.uint8).fill_(POISON)
    tier = StorageTier({"directory": str(directory), "batch_pages": 2,
                        "prefetch_policy": "wait_complete", **config}, open_store=open_store)
    mgr = HiCacheManager(pool, storage=tier, backend="reference", host_reserve_gb=0,
                         host_layout=host_layout, hicache_ratio=hicache_ratio)
    for t in mgr.host.tensors():
        t.view(torch.uint8).fill_(POISON)
    return mgr, tier


def pool_bytes(buf: KVBuffer, slots: torch.Tensor) -> torch.Tensor:
    """uint8 ``[planes * layers, n, H, head_bytes]`` at token ``slots`` (torch indexing)."""
    out = []
    for view in buf.layer_views(range(buf.layout.num_layers)):
        p = view.shape[1]
        out.append(view[slots // p, slots % p])
    return torch.stack(out)


def write_device_pages(mgr, ids, seed: int) -> torch.Tensor:
    """The model's prefill: device pages for ``ids`` filled with random bytes
    (a function of ``seed``); returns them as :func:`pool_bytes` reads them."""
    slots = mgr.alloc_device(ids)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, pool_bytes(mgr.device_pool, slots).shape, dtype=torch.uint8,
                         generator=gen)
    write_pool(mgr.device_pool, slots, data)
    return data


def write_pool(buf: KVBuffer, slots: torch.Tensor, data: torch.Tensor) -> None:
    """The inverse of :func:`pool_bytes`."""
    for view, rows in zip(buf.layer_views(range(buf.layout.num_layers)), data):
        p = view.shape[1]
        view[slots // p, slots % p] = rows


def _manager_main(mode: str, args: dict) -> dict:
    import resource
    import signal

    keys = keys_for(args["pages"], MANAGER_P, seed=args["key_seed"])
    if mode == "manager-full":
        # Page files may not grow past this (EFBIG, also for root): a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args["file_limit"], resource.RLIM_INFINITY))
    mgr, tier = manager_with_storage(args["directory"], host_layout=args["host_layout"])
    data = write_device_pages(mgr, keys, seed=args["data_seed"])
    mgr.hit(keys)
    mgr.synchronize(storage=True)
    acks = [[a.kind, len(a.page_ids), len(a.failed)] for a in mgr.poll()]
    out = {"acks": acks}
    if mode == "manager-full":   # the cache keeps serving from host
        mgr.evict_device(keys)
        handle = mgr.load(keys)
        mgr.poll()
        out["served"] = bool(torch.equal(pool_bytes(mgr.device_pool, handle.device_indices), data))
    out["stats"] = mgr.stats()
    mgr.close()
    return out


def _main() -> None:
    """``python storage_helpers.py write|read|full ARGS_JSON``: one side of a
    two-process test; prints a JSON result on the last line."""
    import resource
    import signal

    from hicache_kernels.storage.nixl_store import NixlFileStore

    mode, args = sys.argv[1], json.loads(sys.argv[2])
    if mode.startswith("manager-"):
        print(json.dumps(_manager_main(mode, args)))
        return
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
