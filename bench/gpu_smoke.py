"""The GPU check's first step: one load and one backup per backend against the
reference, by raw bytes, and a table of which backends move the right bytes.

    python bench/gpu_smoke.py [--json smoke.json]

A load is one layer of a page_first host pool (bf16, 8 heads of 128, 16-token
pages, padded indices) into a device pool of per-layer tensors; a backup is
every layer back into a poisoned host pool. Device indices for the kernels,
host indices for the copy engines. A backend that is not available here is
listed with the reason; one that raises is listed with the error, and the
others still run.

Exit status: 0 when every available backend matched the reference (and at
least one kernel backend ran on a GPU), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from hicache_kernels import KVBuffer, KVLayout, backends, transfer  # noqa: E402

HOST_INDEX_BACKENDS = ("copy_engine", "reference")


def _fill(buf: KVBuffer, gen: torch.Generator | None) -> KVBuffer:
    for t in buf.tensors():
        b = t.view(torch.uint8)
        b.copy_(torch.full_like(b, 0xA5) if gen is None else
                torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
    return buf


def _same(a: KVBuffer, b: KVBuffer) -> bool:
    return all(torch.equal(x.view(torch.uint8).cpu(), y.view(torch.uint8).cpu())
               for x, y in zip(a.tensors(), b.tensors()))


def _case(device: str, gen: torch.Generator):
    lay = KVLayout("page_first", num_layers=4, num_slots=512, head_num=8, head_dim=128,
                   dtype=torch.bfloat16, page_size=16)
    host = _fill(KVBuffer.allocate(lay, pin_memory=device == "cuda"), gen)
    pages = torch.randperm(512 // 16, generator=gen)[:12]
    h_idx = (pages[:, None] * 16 + torch.arange(16)).reshape(-1)
    d_idx = torch.randperm(384, generator=gen)[:h_idx.numel()]
    h_idx[5], d_idx[17] = -1, -1  # padding on each side
    return host, h_idx, d_idx


def _device_pool(host: KVBuffer, device: str) -> KVBuffer:
    lay = host.layout
    k = [torch.empty(384, lay.head_num, lay.head_dim, dtype=lay.dtype, device=device)
         for _ in range(lay.num_layers)]
    v = [torch.empty_like(t) for t in k]
    return _fill(KVBuffer.from_layers(k, v, page_size=lay.page_size), None)


def run(name: str, host: KVBuffer, h_idx: torch.Tensor, d_idx: torch.Tensor, device: str):
    """``(device pool after the load, host pool after the backup, seconds)``."""
    dev = _device_pool(host, device)
    back = _fill(KVBuffer.allocate(host.layout, pin_memory=device == "cuda"), None)
    s, d = (h_idx, d_idx) if name in HOST_INDEX_BACKENDS or device == "cpu" else (h_idx.cuda(), d_idx.cuda())
    start = time.perf_counter()
    transfer(host, dev, s, d, layers=2, backend=name)
    transfer(dev, back, d, s, backend=name)
    if device == "cuda":
        torch.cuda.synchronize()
    return dev, back, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(11)
    host, h_idx, d_idx = _case(device, gen)
    want_dev, want_back, _ = run("reference", host, h_idx, d_idx, device)
    rows = []
    for name, (ok, why) in backends.status().items():
        row = dict(backend=name, available=ok, load_ok=None, backup_ok=None, seconds=None, note=why)
        if ok and name != "reference":
            try:
                dev, back, seconds = run(name, host, h_idx, d_idx, device)
                row.update(load_ok=_same(dev, want_dev), backup_ok=_same(back, want_back),
                           seconds=round(seconds, 4))
            except Exception as exc:  # noqa: BLE001 - reported in the table, the others still run
                row.update(load_ok=False, backup_ok=False,
                           note=f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300])
                traceback.print_exc()
        elif name == "reference":
            row.update(load_ok=True, backup_ok=True, note="the oracle")
        rows.append(row)

    print(f"smoke on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"{'backend':12s} {'available':9s} {'load':5s} {'backup':6s} {'seconds':>8s}  note")
    mark = {True: "ok", False: "WRONG", None: "-"}
    for r in rows:
        secs = f"{r['seconds']:.3f}" if r["seconds"] is not None else "-"
        print(f"{r['backend']:12s} {'yes' if r['available'] else 'no':9s} {mark[r['load_ok']]:5s} "
              f"{mark[r['backup_ok']]:6s} {secs:>8s}  {r['note']}")
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, rows=rows), indent=2) + "\n")
    wrong = [r["backend"] for r in rows if r["available"] and not (r["load_ok"] and r["backup_ok"])]
    ran_kernel = any(r["seconds"] is not None for r in rows if r["backend"] != "copy_engine")
    if wrong:
        print("WRONG BYTES: " + ", ".join(wrong))
    if device == "cuda" and not ran_kernel:
        print("no kernel backend ran on the GPU")
    return 1 if wrong or (device == "cuda" and not ran_kernel) else 0


if __name__ == "__main__":
    sys.exit(main())
