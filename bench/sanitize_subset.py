"""A short subset of transfers for compute-sanitizer (memcheck), one of each
kernel path: 16-byte units, 1-byte units (odd fp8 heads), per-head chunks,
address tables with misaligned bases (run-time alignment checks), the bulk
kernel (capped and uncapped shared memory), 32-warp register blocks, the copy
engines (batched, spread over streams, per run), and a replay of a captured
CUDA graph. Each result is compared with the reference by bytes.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_subset.py

Exit status: 0 when every case matched, 1 on a mismatch, 2 when a backend the
machine should have is missing (use --backend to narrow).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from hicache_kernels import KVBuffer, KVLayout, Transfer, backends  # noqa: E402
from hicache_kernels import sglang as kvio  # noqa: E402


def _fill(buf: KVBuffer, gen: torch.Generator, poison: bool = False) -> KVBuffer:
    for t in buf.tensors():
        b = t.view(torch.uint8)
        b.copy_(torch.full_like(b, 0xA5) if poison else
                torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
    return buf


def _device_pool(lay: KVLayout, slots: int) -> KVBuffer:
    shape = (slots, lay.head_num, lay.head_dim)
    k = [torch.empty(shape, dtype=lay.dtype, device="cuda") for _ in range(lay.num_layers)]
    v = None if lay.mla else [torch.empty(shape, dtype=lay.dtype, device="cuda")
                              for _ in range(lay.num_layers)]
    return KVBuffer.from_layers(k, v, page_size=lay.page_size)


def _same(a: KVBuffer, b: KVBuffer) -> bool:
    return all(torch.equal(x.view(torch.uint8).cpu(), y.view(torch.uint8).cpu())
               for x, y in zip(a.tensors(), b.tensors()))


def _indices(n_src: int, n_dst: int, n: int, page: int, gen: torch.Generator):
    pages = min(n_src, n_dst) // page
    offs = torch.arange(page)
    s = (torch.randperm(n_src // page, generator=gen)[:pages, None] * page + offs).reshape(-1)[:n]
    d = (torch.randperm(n_dst // page, generator=gen)[:pages, None] * page + offs).reshape(-1)[:n]
    s[1], d[-2] = -1, -1
    return s, d


LAYOUTS = {
    "16-byte units": dict(kind="page_first", head_num=8, head_dim=128, dtype=torch.bfloat16, page_size=1),
    "1-byte units": dict(kind="page_first_direct", head_num=3, head_dim=5, dtype=torch.float8_e4m3fn,
                         page_size=16),
    "per-head chunks": dict(kind="page_head", head_num=4, head_dim=64, dtype=torch.float16, page_size=16),
    "MLA 8-byte units": dict(kind="page_first", head_num=1, head_dim=36, dtype=torch.bfloat16, page_size=1,
                             mla=True),
}


def run_layouts(backend: str, gen: torch.Generator) -> list[tuple[str, bool]]:
    out = []
    for what, geometry in LAYOUTS.items():
        lay = KVLayout(num_layers=3, num_slots=256, **geometry)
        host = _fill(KVBuffer.allocate(lay, pin_memory=True), gen)
        s, d = _indices(256, 192, 150, lay.page_size, gen)
        results = []
        for name in ("reference", backend):
            dev = _fill(_device_pool(lay, 192), gen, poison=True)
            back = _fill(KVBuffer.allocate(lay, pin_memory=True), gen, poison=True)
            si, di = (s, d) if name == "copy_engine" else (s.cuda(), d.cuda())
            stream = torch.cuda.Stream()
            Transfer(host, dev, layers=1, backend=name)(si, di, stream=stream)
            Transfer(dev, back, backend=name)(di, si, stream=stream)
            stream.synchronize()
            results.append((dev, back))
        out.append((f"{backend} {what}", _same(results[0][0], results[1][0]) and
                    _same(results[0][1], results[1][1])))
    return out


def run_variants(names: list[str], gen: torch.Generator) -> list[tuple[str, bool]]:
    """Launch shapes off the defaults: 32-warp blocks of the register kernel (run
    as 8-warp blocks) and the bulk kernel with no shared-memory cap."""
    from hicache_kernels.backends import cuda_bulk
    lay = KVLayout(num_layers=2, num_slots=256, **LAYOUTS["16-byte units"])
    host = _fill(KVBuffer.allocate(lay, pin_memory=True), gen)
    s, d = _indices(256, 192, 150, 1, gen)
    want = _fill(_device_pool(lay, 192), gen, poison=True)
    Transfer(host, want, layers=1, backend="reference")(s.cuda(), d.cuda())
    out = []
    for name, what, opts, smem in (("cuda", "32-warp blocks", dict(sm_budget=2, num_warps=32), None),
                                   ("cuda_bulk", "no shared-memory cap", {}, 0)):
        if name not in names:
            continue
        saved = cuda_bulk.SMEM_PER_BLOCK
        cuda_bulk.SMEM_PER_BLOCK = saved if smem is None else smem
        try:
            got = _fill(_device_pool(lay, 192), gen, poison=True)
            Transfer(host, got, layers=1, backend=name, **opts)(s.cuda(), d.cuda())
            torch.cuda.synchronize()
        finally:
            cuda_bulk.SMEM_PER_BLOCK = saved
        out.append((f"{name} {what}", _same(got, want)))
    return out


def run_misaligned_tables(gen: torch.Generator) -> list[tuple[str, bool]]:
    layers, item, n_dev, n_host = 3, 128, 128, 192
    raw = [torch.randint(0, 256, (n_dev * item + 64,), dtype=torch.uint8, generator=gen).cuda()
           for _ in range(layers)]
    s, d = _indices(n_dev, n_host, 100, 1, gen)
    outs = []
    for name in ("reference", "cuda"):
        host = torch.full((layers, (n_host + 1) * item), 0xA5, dtype=torch.uint8).pin_memory()
        src = torch.tensor([r.data_ptr() + 8 for r in raw], dtype=torch.uint64, device="cuda")
        dst = torch.tensor([host[l].data_ptr() + 4 for l in range(layers)], dtype=torch.uint64,
                           device="cuda")
        with _backend_env(name):
            kvio.transfer_kv_all_layer_mla(src, dst, s.cuda(), d.cuda(), item, layers)
        torch.cuda.synchronize()
        outs.append(host)
    return [("cuda address tables, bases 8/4 off", torch.equal(outs[0], outs[1]))]


@contextlib.contextmanager
def _backend_env(name: str):
    old = os.environ.get("HICACHE_BACKEND")
    os.environ["HICACHE_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HICACHE_BACKEND", None)
        else:
            os.environ["HICACHE_BACKEND"] = old


def run_copy_engine_paths(gen: torch.Generator) -> list[tuple[str, bool]]:
    from hicache_kernels.backends import copy_engine, thresholds

    lay = KVLayout("page_first_direct", num_layers=2, num_slots=1024, head_num=8, head_dim=128,
                   dtype=torch.bfloat16, page_size=64)
    host = _fill(KVBuffer.allocate(lay, pin_memory=True), gen)
    s, d = _indices(1024, 1024, 1024, 64, gen)
    want = _fill(_device_pool(lay, 1024), gen, poison=True)
    Transfer(host, want, layers=0, backend="reference")(s.cuda(), d.cuda())
    plan = Transfer(host, want, layers=0, backend="reference").plan
    runs = copy_engine.merge_runs(plan, s, d)
    out = []
    base = thresholds.current()
    for what, th, per_run in (("batched", base.replace(copy_engine_streams=1), False),
                              ("over 4 streams", base.replace(bytes_per_stream=1 << 16), False),
                              ("per run", base, True)):
        got = _fill(_device_pool(lay, 1024), gen, poison=True)
        plan = Transfer(host, got, layers=0, backend="reference").plan
        original = thresholds.current
        thresholds.current = lambda device=None, th=th: th
        try:
            copy_engine.issue(plan, runs, stream=torch.cuda.Stream(), force_per_run=per_run)
        finally:
            thresholds.current = original
        torch.cuda.synchronize()
        out.append((f"copy_engine {what}", _same(got, want)))
    return out


def run_graph(backend: str, gen: torch.Generator) -> list[tuple[str, bool]]:
    lay = KVLayout("page_first", num_layers=2, num_slots=256, head_num=2, head_dim=64,
                   dtype=torch.bfloat16)
    host = _fill(KVBuffer.allocate(lay, pin_memory=True), gen)
    s, d = _indices(256, 192, 128, 1, gen)
    si, di = (s, d) if backend == "copy_engine" else (s.cuda(), d.cuda())
    dev = _fill(_device_pool(lay, 192), gen, poison=True)
    load = Transfer(host, dev, layers=1, backend=backend)
    load(si, di)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        load(si, di)
    _fill(host, gen)
    graph.replay()
    torch.cuda.synchronize()
    want = _fill(_device_pool(lay, 192), gen, poison=True)
    Transfer(host, want, layers=1, backend="reference")(s.cuda(), d.cuda())
    torch.cuda.synchronize()
    return [(f"{backend} graph replay", _same(dev, want))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["cuda", "cuda_bulk", "copy_engine"],
                        help="backends to run (default: all three)")
    args = parser.parse_args(argv)
    names = args.backend or ["cuda", "cuda_bulk", "copy_engine"]
    gen = torch.Generator().manual_seed(0)
    results: list[tuple[str, bool]] = []
    for name in names:
        ok, why = backends.get(name).available()
        if not ok:
            print(f"MISSING {name}: {why}")
            return 2
        results += run_layouts(name, gen)
        results += run_graph(name, gen)
    results += run_variants(names, gen)
    if "cuda" in names:
        results += run_misaligned_tables(gen)
    if "copy_engine" in names:
        results += run_copy_engine_paths(gen)
    for what, same in results:
        print(f"{'ok  ' if same else 'FAIL'} {what}")
    failed = sum(not same for _, same in results)
    print(f"{len(results) - failed}/{len(results)} cases matched the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
