"""SGLang's own transfer kernels, timed by ``hicache-bench kernels`` on the same
geometry as ours.

SGLang 0.5.23 ships the CUDA sources of its HiCache transfer kernels in its
wheel (``sglang/kernels/jit/csrc/kvcacheio/``) and builds them at run time
through apache-tvm-ffi (``sglang.kernels.ops.kvcache.hicache``):

* ``sglang-jit``: ``hicache.cuh``, a register kernel of 1024-thread blocks,
  SGLang's default block quota 2;
* ``sglang-jit-tma``: ``hicache_tma.cuh`` (sm_90+), one loader warp issuing
  ``cp.async.bulk`` into six 32 KiB shared-memory stages drained by 4 store
  warps, block quota 4; SGLang uses it where a 64-token page tiles its chunks;
* ``sglang-jit-staged``: ``staged_write_back.cuh``, SGLang's all-layer backup
  into a page_first host pool through a device staging buffer (64 pages).

Each runs with its own default block count, or ``block_quota`` = the case's SM
budget when one is given. They apply to host pools whose token rows of a layer
are evenly spaced (layer_first, page_first); other layouts say so.

When sglang cannot be imported, or there is no GPU to build the kernels on,
every row says ``not available: <reason>``. SGLang's package ``__init__``
starts its server stack (tokenizers, web framework, ...), which the kernels do
not need: when sglang is not imported yet, its package is entered without
running that file, so only ``sglang.kernels`` and the ``sglang.srt`` utilities
it uses are imported. ``HICACHE_SGLANG_PEERS=0`` turns the peers off.

    python -m hicache_kernels.bench.baselines            # can they run here, and why not
    python -m hicache_kernels.bench.baselines --build    # build them now (a GPU machine)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import importlib.util
import os
import sys
import time
import types

import torch

from ..buffers import KVBuffer
from ..layouts import LayoutKind
from .movers import Copy, Mover, Pools

__all__ = ["NAMES", "load_module", "status", "cases", "mover", "block_quota"]

NAMES = ("sglang-jit", "sglang-jit-tma", "sglang-jit-staged")
MODULE = "sglang.kernels.ops.kvcache.hicache"
# SGLang's staging buffer for the page_first write-back, in pages.
STAGED_PAGES = 64


@functools.lru_cache(maxsize=None)
def load_module() -> tuple[types.ModuleType | None, str]:
    """``(sglang.kernels.ops.kvcache.hicache, "")`` or ``(None, why not)``."""
    if os.environ.get("HICACHE_SGLANG_PEERS", "1") == "0":
        return None, "turned off (HICACHE_SGLANG_PEERS=0)"
    entered = False
    if "sglang" not in sys.modules:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            return None, "sglang is not installed"
        package = types.ModuleType("sglang")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules["sglang"] = package
        entered = True
    try:
        module = importlib.import_module(MODULE)
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        if entered:  # leave no half-imported sglang behind
            for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
                del sys.modules[name]
        return None, f"sglang's JIT kernels do not import ({MODULE}): {type(exc).__name__}: {exc}"
    return module, ""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("sglang")
    except Exception:  # noqa: BLE001
        return "?"


def status(name: str) -> tuple[bool, str]:
    """Whether peer ``name`` can run here, and why (not)."""
    if name not in NAMES:
        raise ValueError(f"baseline: expected one of {', '.join(NAMES)}, got {name!r}")
    module, why = load_module()
    if module is None:
        return False, why
    if not torch.cuda.is_available():
        return False, (f"its kernels are built at run time for the GPU, and there is none here "
                       f"(sglang {_version()} imports)")
    if name == "sglang-jit-tma" and torch.cuda.get_device_capability()[0] < 9:
        return False, "the TMA kernel needs sm_90 or newer"
    return True, f"sglang {_version()}, {_source(name)}"


def _source(name: str) -> str:
    return {"sglang-jit": "kvcacheio/hicache.cuh", "sglang-jit-tma": "kvcacheio/hicache_tma.cuh",
            "sglang-jit-staged": "kvcacheio/staged_write_back.cuh"}[name]


def block_quota(name: str, module, sm_budget: int | None) -> int:
    """The block quota a peer runs with: the SM budget, else SGLang's own default."""
    if sm_budget is not None:
        return sm_budget
    return module.TMA_BLOCK_QUOTA if name == "sglang-jit-tma" else module.DEFAULT_BLOCK_QUOTA


def cases(cfg, make_case) -> list:
    """The peer cases for a kernels config (``make_case`` is kernels.Case): each peer
    on every load and backup of a layer_first or page_first host pool the config
    sweeps, or, where a peer cannot run here, one case whose row says why."""
    out = []
    if not cfg.baselines:
        return out
    layouts = [lay for lay in cfg.layouts if lay in ("layer_first", "page_first")]
    ops = [op for op in cfg.ops if op in ("load", "backup")]
    for name in NAMES:
        if not status(name)[0]:
            out.append(make_case("load", (layouts or cfg.layouts)[0], cfg.page_sizes[0], cfg.tokens, name,
                                 None, kind="peer"))
            continue
        for layout in layouts:
            for page in cfg.page_sizes:
                for op in ops:
                    if name == "sglang-jit-staged" and (op, layout) != ("backup", "page_first"):
                        continue
                    for sm in cfg.sm_budgets:
                        out.append(make_case(op, layout, page, cfg.tokens, name, sm, kind="peer"))
    return out


def _rows(buf: KVBuffer, plane, layer: int) -> torch.Tensor | None:
    """One layer of one plane as ``[slots, element_dim]`` rows (a view, rows evenly
    spaced), or None when this layout does not keep a layer's rows that way."""
    kind = buf.layout.kind
    if buf.per_layer or kind is LayoutKind.LAYER_FIRST:
        t = plane[layer]
    elif kind is LayoutKind.PAGE_FIRST:
        t = plane[:, layer]
    else:
        return None
    return t.view(t.shape[0], -1)


def _table(rows: list[torch.Tensor], device) -> torch.Tensor:
    return torch.tensor([r.data_ptr() for r in rows], dtype=torch.uint64, device=device)


def mover(pools: Pools, op: str, layout: str, page_size: int, tokens: int, name: str,
          sm_budget: int | None, *, load_layer: int) -> Mover | str:
    """Peer ``name`` moving what our ``op`` moves, or a sentence saying why it cannot."""
    ok, why = status(name)
    if not ok:
        return f"not available: {why}"
    if op not in ("load", "backup"):
        return "SGLang's kernels run load and backup only"
    module = load_module()[0]
    host, dev = pools.host_pool(layout, page_size), pools.device
    g = pools.preset
    h, d = pools.indices(page_size, tokens)
    layers = range(load_layer, load_layer + 1) if op == "load" else range(g.layers)
    src, dst, s_idx, d_idx = (host, dev, h, d) if op == "load" else (dev, host, d, h)
    copy = Copy(src, dst, s_idx, d_idx, layers)
    nbytes = tokens * g.token_layer_bytes * len(layers)
    quota = block_quota(name, module, sm_budget)
    src_rows = [[_rows(src, plane, layer) for layer in layers] for plane in src.planes()]
    dst_rows = [[_rows(dst, plane, layer) for layer in layers] for plane in dst.planes()]
    if any(r is None for side in (src_rows, dst_rows) for plane in side for r in plane):
        return f"SGLang's kernels take layer_first or page_first host pools, not {layout}"
    element_size = src_rows[0][0].shape[1] * src_rows[0][0].element_size()
    mla = host.v is None
    if name == "sglang-jit-staged":
        fn = _staged(module, op, layout, host, src_rows, s_idx, d_idx, page_size, quota, mla)
    else:
        fn = _kernel(module, name, op, src_rows, dst_rows, s_idx, d_idx, element_size, page_size,
                     quota, mla)
    if isinstance(fn, str):
        return fn
    return Mover(fn, nbytes, str(quota), [copy], note=f"SGLang {_source(name)}, block quota {quota}")


def _kernel(module, name, op, src_rows, dst_rows, s_idx, d_idx, element_size, page_size, quota, mla):
    """The register or TMA kernel: one layer per launch (load), or every layer
    through pointer tables (backup)."""
    if name == "sglang-jit-tma":
        if element_size % 16:
            return f"the TMA kernel takes rows of a multiple of 16 bytes, not {element_size}"
        rows_per_chunk = module.hicache_tma_rows_per_chunk(element_size)
        if page_size % rows_per_chunk:
            return (f"{page_size}-token pages do not tile its {rows_per_chunk}-row chunks: SGLang "
                    "takes its register kernel here")
        m = module._jit_hicache_tma_module(block_quota=quota)
        index = s_idx.device.index
        if index is None:
            index = torch.cuda.current_device() if s_idx.is_cuda else 0
        if not m.fits_device(index):
            return "the TMA kernel's shared memory does not fit this GPU"
        extra = (element_size,)
    else:
        unroll = module._default_unroll(element_size)
        if not module._tiles_across_lanes(element_size, unroll):
            return f"SGLang's register kernel does not take {element_size}-byte rows"
        m = module._jit_hicache_module(element_size=element_size, unroll=unroll, block_quota=quota)
        extra = ()
    if op == "load":  # one layer: [slots, element_dim] rows of each plane
        sk, dk = [p[0] for p in src_rows], [p[0] for p in dst_rows]
        if mla:
            return lambda: m.launch_one_mla(dk[0], d_idx, sk[0], s_idx)
        return lambda: m.launch_one(dk[0], dk[1], d_idx, sk[0], sk[1], s_idx)
    device = s_idx.device
    tables_src = [_table(p, device) for p in src_rows]
    tables_dst = [_table(p, device) for p in dst_rows]
    strides = (_row_bytes(src_rows), _row_bytes(dst_rows))  # source's, then destination's
    if mla:
        return lambda: m.launch_all_mla(tables_dst[0], d_idx, tables_src[0], s_idx, *strides, *extra)
    return lambda: m.launch_all(tables_dst[0], tables_dst[1], d_idx, tables_src[0], tables_src[1], s_idx,
                                *strides, *extra)


def _row_bytes(rows: list[list[torch.Tensor]]) -> int:
    """Bytes from one token's row to the next (the same in every layer and plane)."""
    return rows[0][0].stride(0) * rows[0][0].element_size()


def _staged(module, op, layout, host, src_rows, s_idx, d_idx, page_size, quota, mla):
    """SGLang's page_first write-back: device rows into a staging buffer on the
    GPU, then into the host pool (host indices on the CPU, as SGLang keeps them)."""
    if op != "backup" or layout != LayoutKind.PAGE_FIRST.value:
        return "SGLang's staged write-back is its backup into a page_first host pool"
    element_dim = src_rows[0][0].shape[1]
    layers = len(src_rows[0])
    device = s_idx.device
    staging = [torch.empty(STAGED_PAGES * page_size, layers, element_dim, dtype=host.layout.dtype,
                           device=device) for _ in host.planes()]
    dst = [plane.view(plane.shape[0], layers, element_dim) for plane in host.planes()]
    tables = [_table(p, device) for p in src_rows]
    host_idx = d_idx.cpu()
    if mla:
        return lambda: module.transfer_hicache_all_layer_mla_staged_lf_pf(
            tables[0], s_idx, host_idx, staging[0], dst[0], page_size=page_size, block_quota=quota)
    return lambda: module.transfer_hicache_all_layer_staged_lf_pf(
        tables[0], tables[1], s_idx, host_idx, staging[0], staging[1], dst[0], dst[1],
        page_size=page_size, block_quota=quota)


def main(argv: list[str] | None = None) -> int:
    """Say whether each peer can run here; with ``--build``, build (and run once)
    each on a preset's geometry, so later runs find SGLang's JIT cache warm.
    Exit status 1 when a build failed."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--page-size", type=int, default=64)
    args = parser.parse_args(argv)
    from .presets import PRESETS
    from .timing import Clock
    for name in NAMES:
        ok, why = status(name)
        print(f"{name:18s} {'yes' if ok else 'no ':3s} {why}")
    if not args.build:
        return 0
    if not torch.cuda.is_available():
        print("--build: no GPU here")
        return 1
    preset = PRESETS[args.preset]
    module, why = load_module()
    if module is None:
        print(f"--build: {why}")
        return 1
    element_size = preset.item_bytes
    unroll = module._default_unroll(element_size)
    builds = {  # SGLang's module builders, with each kernel's own block quota
        "sglang-jit": lambda: module._jit_hicache_module(
            element_size=element_size, unroll=unroll, block_quota=module.DEFAULT_BLOCK_QUOTA),
        "sglang-jit-tma": lambda: module._jit_hicache_tma_module(block_quota=module.TMA_BLOCK_QUOTA),
        "sglang-jit-staged": lambda: module._jit_hicache_staged_module(
            element_size=element_size, unroll=unroll, block_quota=module.DEFAULT_BLOCK_QUOTA),
    }
    failed = 0
    # nvcc runs on the CPU: the three modules build at once
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(builds)) as pool:
        started = time.perf_counter()
        futures = {name: pool.submit(build) for name, build in builds.items() if status(name)[0]}
        for name, future in futures.items():
            try:
                future.result()
                print(f"{name}: built ({time.perf_counter() - started:.0f} s)")
            except Exception as exc:  # noqa: BLE001 - reported, the others still build
                failed += 1
                print(f"{name}: build FAILED: {type(exc).__name__}: {exc}")
    clock = Clock("cuda")
    pools = Pools(preset, clock, slots=4 * args.page_size * 8, seed=0)
    for name in NAMES:
        if not status(name)[0]:
            continue
        for op, layout in (("load", "layer_first"), ("backup", "layer_first"), ("backup", "page_first")):
            try:
                m = mover(pools, op, layout, args.page_size, 2 * args.page_size, name, None,
                          load_layer=0)
                if isinstance(m, Mover):
                    m.fn()
                    torch.cuda.synchronize()
                print(f"{name} {op} {layout}: {'ran' if isinstance(m, Mover) else m}")
            except Exception as exc:  # noqa: BLE001 - reported, the others still build
                failed += 1
                print(f"{name} {op} {layout}: FAILED: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
