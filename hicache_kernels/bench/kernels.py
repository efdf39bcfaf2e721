"""``hicache-bench kernels``: GB/s of every backend next to ceilings and baselines
measured in the same run.

A case is (op, host layout, page size, tokens, backend, SM budget). Ops:

* ``load``: one layer host -> device (a forward pass waits on this, layer by layer);
* ``backup``: every layer device -> host;
* ``both``: every layer loaded (one call per layer) while another range backs
  up, on two streams.

Each case is checked by bytes (a sample of its items, destinations poisoned
first), then timed with CUDA events: the median of ``reps`` runs after
``warmup``. Its ceiling is a contiguous copy of the same bytes in the same
direction (``both``: the two contiguous copies at once). On a machine without a
GPU every number is a CPU number and says so; there torch runs on one thread
while anything is timed, cases and ceilings alike, so busy cores cannot make
one look faster than the other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from .. import backends
from ..layouts import LayoutKind
from ..nvtx_ranges import nvtx_range
from . import baselines, movers
from .presets import PRESETS, ModelPreset
from .timing import Clock, machine_info, median, pinned_threads

__all__ = ["Case", "KernelConfig", "run", "sweep", "targets_suite", "overlap_medians",
           "estimate_seconds"]

OPS = ("load", "backup", "both")
KERNEL_BACKENDS = ("cuda", "cuda_bulk", "triton")   # the ones an SM budget applies to
CEILING_OF = {"load": "h2d", "backup": "d2h", "both": "both"}
# A case whose runs would take longer than this gets fewer of them (slow baselines).
CASE_SECONDS = 3.0


@dataclass(frozen=True)
class Case:
    """One measurement. ``kind`` is ``ours`` (a backend of the ops API) or
    ``baseline``; ``target_pct`` (suites only) is the % of ceiling to reach."""

    op: str
    layout: str
    page_size: int
    tokens: int
    backend: str
    sm_budget: int | None = None
    kind: str = "ours"
    under_load: bool = False
    target_pct: float | None = None
    target_gemm_pct: float | None = None
    label: str = ""

    @property
    def id(self) -> str:
        sm = "" if self.sm_budget is None else f" sm={self.sm_budget}"
        return f"{self.op} {self.layout} P={self.page_size} T={self.tokens} {self.backend}{sm}"


@dataclass
class KernelConfig:
    """Everything a kernels run needs; the CLI builds it from flags."""

    preset: ModelPreset
    tokens: int = 8192
    page_sizes: tuple[int, ...] = (1, 16, 64, 256)
    layouts: tuple[str, ...] = tuple(k.value for k in LayoutKind)
    backends: tuple[str, ...] = ()          # () = every backend available here
    sm_budgets: tuple[int | None, ...] = (None,)
    ops: tuple[str, ...] = ("load", "backup", "both")
    baselines: bool = True
    under_load: bool = False
    gemm_size: int = 8192
    warmup: int = 3
    reps: int = 20
    seed: int = 0
    num_warps: int | None = None
    load_layer: int | None = None           # None: the middle layer
    suite: str | None = None
    notes: list[str] = field(default_factory=list)


def available_backends() -> dict[str, str]:
    """Backends usable here -> reason; those that are not, with why, under ``"!name"``."""
    out = {}
    for name, (ok, why) in backends.status().items():
        out[name if ok else f"!{name}"] = why
    return out


def default_backends(gpu: bool) -> tuple[str, ...]:
    """Every backend available here; on a GPU not the reference (a test oracle,
    not a way to move KV: the torch-index baseline stands for plain torch)."""
    names = [n for n in available_backends() if not n.startswith("!")]
    return tuple(n for n in names if not (gpu and n == "reference"))


def sweep(cfg: KernelConfig, *, gpu: bool = False) -> list[Case]:
    """The cases of a sweep, grouped by (layout, page size) so host pools are reused."""
    names = cfg.backends or default_backends(gpu)
    cases = []
    for layout in cfg.layouts:
        if cfg.preset.mla and layout == LayoutKind.PAGE_HEAD.value:
            note = "page_head skipped: it is defined for MHA only (SGLang has no MLA page_head)"
            if note not in cfg.notes:
                cfg.notes.append(note)
            continue
        for page in cfg.page_sizes:
            for op in cfg.ops:
                for name in names:
                    budgets = cfg.sm_budgets if name in KERNEL_BACKENDS else (None,)
                    for sm in budgets:
                        cases.append(Case(op, layout, page, cfg.tokens, name, sm,
                                          under_load=cfg.under_load))
                if cfg.baselines and op != "both":
                    for name in movers.BASELINES:
                        budgets = cfg.sm_budgets if name == "sgl_kernel" else (None,)
                        for sm in budgets:
                            cases.append(Case(op, layout, page, cfg.tokens, name, sm,
                                              kind="baseline"))
    return cases + baselines.cases(cfg, Case)  # SGLang's own kernels, kind "peer"


def targets_suite() -> tuple[KernelConfig, list[Case]]:
    """The CUDA kernels' targets, one case each (Llama-3.1-8B geometry, host layer_first).

    Every backend is listed, available or not, so a missing one shows as a gap.
    """
    cfg = KernelConfig(preset=PRESETS["llama-3.1-8b"], suite="targets", tokens=8192,
                       page_sizes=(1, 64), layouts=("layer_first",))
    lf = "layer_first"
    cases = []
    for name in KERNEL_BACKENDS:
        cases += [
            Case("load", lf, 64, 8192, name, 2, target_pct=95, label="load, 64-token pages, <=2 blocks"),
            Case("backup", lf, 64, 4096, name, 2, target_pct=95, label="backup 32 layers, <=2 blocks"),
            Case("load", lf, 1, 8192, name, 4, target_pct=85, label="page size 1, <=4 blocks"),
            Case("backup", lf, 1, 4096, name, 4, target_pct=85, label="page size 1, <=4 blocks"),
            Case("both", lf, 64, 4096, name, 2, target_pct=90, label="load + backup at once"),
            Case("load", lf, 64, 8192, name, 2, under_load=True, target_gemm_pct=2,
                 label="next to a bf16 GEMM stream"),
        ]
    cases += [
        Case("load", lf, 64, 8192, "copy_engine", target_pct=90, label="copy engines, 0 SMs"),
        Case("backup", lf, 64, 4096, "copy_engine", target_pct=90, label="copy engines, 0 SMs"),
        Case("both", lf, 64, 4096, "copy_engine", target_pct=90, label="load + backup at once"),
        Case("load", lf, 64, 8192, "copy_engine", under_load=True, target_gemm_pct=2,
             label="next to a bf16 GEMM stream"),
    ]
    for name in movers.BASELINES:
        cases.append(Case("load", lf, 64, 8192, name, 2 if name == "sgl_kernel" else None,
                          kind="baseline", label="baseline"))
    cases.append(Case("load", lf, 64, 8192, "sgl_kernel", 8, kind="baseline", label="baseline"))
    cases += baselines.cases(replace(cfg, page_sizes=(64,), ops=("load", "backup")), Case)
    return cfg, cases


# -- running -------------------------------------------------------------------------

class KernelBench:
    """Runs cases on one device, measuring each ceiling once per byte count."""

    def __init__(self, cfg: KernelConfig, clock: Clock, cases: list[Case]):
        self.cfg, self.clock = cfg, clock
        g = cfg.preset
        self.load_layer = cfg.load_layer if cfg.load_layer is not None else g.layers // 2
        if not 0 <= self.load_layer < g.layers:
            raise ValueError(f"load_layer: expected 0 <= layer < {g.layers}, got {self.load_layer}")
        pages = [c.page_size for c in cases] or [1]
        unit = math.lcm(*pages)
        most = max([c.tokens for c in cases] or [cfg.tokens])
        slots = -(-2 * most // unit) * unit
        self.pools = movers.Pools(g, clock, slots=slots, seed=cfg.seed)
        # two side streams for ``both``; the load one ahead of queued compute
        self.side = [clock.stream(high_priority=True), clock.stream()] if clock.gpu else None
        self._ceilings: dict[tuple[str, int], dict] = {}
        self._gemm: dict | None = None
        self.status = available_backends()

    # ceilings ---------------------------------------------------------------------
    def ceiling(self, direction: str, nbytes: int) -> dict:
        """The contiguous copy of ``nbytes`` (per direction), measured once."""
        key = (direction, nbytes)
        if key not in self._ceilings:
            each = nbytes // 2 if direction == "both" else nbytes
            mover = movers.contiguous(self.clock, direction, each, streams=self.side)
            with nvtx_range(f"bench.ceiling {direction} {_size(each)}"):
                # cheap next to the cases: more warm-up and runs, so it is never the noisy one
                ms = median(self.clock.time_ms(mover.fn, warmup=max(3, self.cfg.warmup),
                                               reps=max(20, self.cfg.reps)))
            self._ceilings[key] = dict(
                kind="ceiling", op=direction, backend="contiguous", layout="-", page_size=None,
                tokens=None, blocks=mover.blocks, bytes=mover.nbytes, ms=ms,
                gbps=mover.nbytes / ms / 1e6, verified=None,
                note=f"ceiling: {_size(each)} contiguous" + (" each way at once" if direction == "both" else ""),
            )
            del mover
        return self._ceilings[key]

    def ceilings(self) -> list[dict]:
        return list(self._ceilings.values())

    # one case -----------------------------------------------------------------------
    def run(self, case: Case) -> dict:
        row = dict(kind=case.kind, op=case.op, layout=case.layout, page_size=case.page_size,
                   tokens=case.tokens, backend=case.backend, sm_budget=case.sm_budget,
                   label=case.label, target=_target_text(case), blocks="-", bytes=None,
                   ms=None, gbps=None, ceiling_gbps=None, pct_of_ceiling=None, verified=None,
                   note="")
        if case.kind == "ours" and f"!{case.backend}" in self.status:
            row["note"] = f"not available: {self.status[f'!{case.backend}']}"
            return row
        if case.kind == "ours" and case.backend not in self.status:
            row["note"] = f"unknown backend {case.backend!r}"
            return row
        try:
            mover = self._mover(case)
            if isinstance(mover, str):       # does not apply here: say why
                row["note"] = mover
                return row
            self._measure(case, mover, row)
        except (RuntimeError, ValueError, TypeError) as exc:
            row.update(note=f"error: {type(exc).__name__}: {exc}", error=True)
        return row

    def _measure(self, case: Case, mover: movers.Mover, row: dict) -> None:
        with nvtx_range(f"bench.case {case.id}"):
            movers.poison(mover, seed=self.cfg.seed)
            started = time.perf_counter()
            mover.fn()
            self.clock.sync()
            warmup, reps = self._runs(time.perf_counter() - started)
            row["verified"] = movers.verify(mover, seed=self.cfg.seed)
            ms = median(self.clock.time_ms(mover.fn, warmup=warmup, reps=reps))
        ceiling = self.ceiling(CEILING_OF[case.op], mover.nbytes)
        gbps = mover.nbytes / ms / 1e6
        row.update(blocks=mover.blocks, bytes=mover.nbytes, ms=ms, reps=reps, gbps=gbps,
                   ceiling_gbps=ceiling["gbps"], pct_of_ceiling=100.0 * gbps / ceiling["gbps"],
                   note=mover.note)
        if not row["verified"]:
            row["note"] = ("BYTES DIFFER; " + row["note"]).strip("; ")
        if case.under_load:
            row.update(self.under_load(case, mover, ms))
        if case.target_pct is not None or case.target_gemm_pct is not None:
            row["meets"] = self._meets(case, row)

    def _runs(self, first_s: float) -> tuple[int, int]:
        """(warmup, reps): the configured ones, fewer (at least 3 timed) when a case
        is so slow that they would take more than ``CASE_SECONDS``."""
        cfg = self.cfg
        if first_s * (cfg.warmup + cfg.reps) <= CASE_SECONDS:
            return cfg.warmup, cfg.reps
        return min(cfg.warmup, 1), max(3, min(cfg.reps, int(CASE_SECONDS / max(first_s, 1e-9))))

    def _mover(self, case: Case):
        args = (self.pools, case.op, case.layout, case.page_size, case.tokens)
        if case.kind == "peer":
            return baselines.mover(*args, case.backend, case.sm_budget, load_layer=self.load_layer)
        if case.kind == "baseline":
            return movers.baseline(*args, case.backend, case.sm_budget, load_layer=self.load_layer)
        return movers.ours(*args, case.backend, case.sm_budget, num_warps=self.cfg.num_warps,
                           load_layer=self.load_layer, side_streams=self.side)

    @staticmethod
    def _meets(case: Case, row: dict) -> bool:
        ok = bool(row["verified"])
        if case.target_pct is not None:
            ok &= row["pct_of_ceiling"] >= case.target_pct
        if case.target_gemm_pct is not None:
            ok &= row.get("gemm_slowdown_pct", math.inf) <= case.target_gemm_pct
            ok &= row.get("pct_of_alone", 0.0) >= 95.0   # "the load runs at full speed"
        return ok

    # next to a GEMM stream --------------------------------------------------------
    def gemm(self) -> dict:
        """A bf16 GEMM (fp32 on CPU) and its time alone, measured once."""
        if self._gemm is None:
            n = self.cfg.gemm_size
            dtype = torch.bfloat16 if self.clock.gpu else torch.float32
            gen = torch.Generator(device=self.clock.device).manual_seed(self.cfg.seed)
            a = torch.randn(n, n, dtype=dtype, device=self.clock.device, generator=gen)
            b = torch.randn(n, n, dtype=dtype, device=self.clock.device, generator=gen)
            c = torch.empty(n, n, dtype=dtype, device=self.clock.device)

            def fn():
                torch.matmul(a, b, out=c)

            with nvtx_range(f"bench.gemm {n}^3 alone"):
                ms = median(self.clock.time_ms(fn, warmup=self.cfg.warmup, reps=max(10, self.cfg.reps)))
            self._gemm = dict(fn=fn, ms=ms, size=n, tflops=2 * n**3 / ms / 1e9)
        return self._gemm

    def under_load(self, case: Case, mover: movers.Mover, transfer_ms: float) -> dict:
        """Run GEMMs on one stream and the transfer on a high-priority one at once;
        report the GEMM's slowdown and the transfer's speed while both run."""
        gemm = self.gemm()
        clock = self.clock
        n_gemm = int(min(400, max(10, math.ceil(200.0 / gemm["ms"]))))
        n_transfer = int(min(2000, max(5, math.ceil(n_gemm * gemm["ms"] / transfer_ms) + 2)))
        gemm_stream = clock.stream()
        transfer_stream = clock.stream(high_priority=True)
        queued = []
        with nvtx_range(f"bench.under-load {case.id}"):
            clock.sync()
            go = clock.event()
            clock.hold(30.0)   # both streams start together after this
            go.record()
            for stream, fn, n in ((gemm_stream, gemm["fn"], n_gemm),
                                  (transfer_stream, mover.fn, n_transfer)):
                clock.wait(stream, clock.current_stream())
                with clock.on(stream):
                    queued.append(clock.bracketed(fn, n))
            clock.sync()
        g_spans, t_spans = ([(go.elapsed_time(s), go.elapsed_time(e)) for s, e in pairs]
                            for pairs in queued)
        gemm_ms, t_ms, overlapped = overlap_medians(g_spans, t_spans)
        out = dict(
            gemm_size=gemm["size"], gemm_ms_alone=gemm["ms"], gemm_ms_together=gemm_ms,
            gemm_slowdown_pct=100.0 * (gemm_ms / gemm["ms"] - 1.0),
            gbps_under_load=mover.nbytes / t_ms / 1e6,
            pct_of_alone=100.0 * transfer_ms / t_ms,
            overlapped=overlapped,
        )
        return out


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _target_text(case: Case) -> str:
    parts = []
    if case.target_pct is not None:
        parts.append(f">={case.target_pct:.0f}% of ceiling")
    if case.target_gemm_pct is not None:
        parts.append(f"GEMM <={case.target_gemm_pct:.0f}% slower, load >=95% of alone")
    return ", ".join(parts)


def overlap_medians(gemm_spans: list[tuple[float, float]],
                    transfer_spans: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """Median duration of the GEMMs that ran entirely while transfers ran, and of
    the transfers that ran entirely while GEMMs ran; falls back to every span
    (and says so) when the two never overlapped.

    Example:
        >>> overlap_medians([(0, 2), (2, 4), (4, 6)], [(1, 3), (3, 5), (5, 9)])
        (2.0, 2.0, True)
    """
    def inside(spans, lo, hi):
        return [e - s for s, e in spans if s >= lo and e <= hi]

    def dur(spans):
        return [e - s for s, e in spans]

    if not gemm_spans or not transfer_spans:
        raise ValueError("overlap_medians: expected spans on both sides")
    t_lo, t_hi = transfer_spans[0][0], max(e for _, e in transfer_spans)
    g_lo, g_hi = gemm_spans[0][0], max(e for _, e in gemm_spans)
    g_in = inside(gemm_spans, t_lo, t_hi)
    t_in = inside(transfer_spans, g_lo, g_hi)
    if g_in and t_in:
        return median(g_in), median(t_in), True
    return median(dur(gemm_spans)), median(dur(transfer_spans)), False


def run(cfg: KernelConfig, clock: Clock, cases: list[Case] | None = None, *,
        progress=None) -> dict:
    """Run ``cases`` (default: the sweep of ``cfg``); return the result document.

    A Ctrl-C stops the run between (or inside) cases; the document then holds
    the cases that finished and ``interrupted: True``."""
    cases = sweep(cfg, gpu=clock.gpu) if cases is None else cases
    rows = []
    interrupted = False
    started = time.perf_counter()
    # on a CPU, one torch thread for every timed copy (see the module docstring)
    with pinned_threads(1 if not clock.gpu else None):
        bench = KernelBench(cfg, clock, cases)
        task = progress.add_task("kernels", total=len(cases)) if progress is not None else None
        try:
            for case in cases:
                if progress is not None:
                    progress.update(task, description=case.id)
                rows.append(bench.run(case))
                if progress is not None:
                    progress.advance(task)
        except KeyboardInterrupt:
            interrupted = True
    g = cfg.preset
    return dict(
        benchmark="kernels",
        cpu_only=not clock.gpu,
        interrupted=interrupted,
        cases_planned=len(cases),
        units="GB/s = 1e9 bytes/s; each byte counted once",
        machine=machine_info(clock),
        geometry=dict(preset=g.name, layers=g.layers, kv_heads_per_rank=g.kv_heads_per_rank,
                      head_dim=g.head_dim, dtype=str(g.dtype).removeprefix("torch."), mla=g.mla,
                      tp=g.tp, item_bytes=g.item_bytes, token_layer_bytes=g.token_layer_bytes,
                      source=g.source, load_layer=bench.load_layer),
        config=dict(tokens=cfg.tokens, page_sizes=list(cfg.page_sizes), layouts=list(cfg.layouts),
                    backends=sorted({c.backend for c in cases if c.kind == "ours"}),
                    sm_budgets=list(cfg.sm_budgets),
                    ops=list(cfg.ops), baselines=cfg.baselines, under_load=cfg.under_load,
                    gemm_size=cfg.gemm_size, warmup=cfg.warmup, reps=cfg.reps, seed=cfg.seed,
                    num_warps=cfg.num_warps, suite=cfg.suite),
        backends={k.lstrip("!"): dict(available=not k.startswith("!"), why=v)
                  for k, v in bench.status.items()},
        notes=list(cfg.notes),
        rows=rows,
        ceilings=bench.ceilings(),
        wall=dict(seconds=time.perf_counter() - started),
    )


def quick_config(preset: ModelPreset, gpu: bool) -> KernelConfig:
    """A short sweep: seconds on a GPU; on a CPU, a tiny labeled version."""
    if gpu:
        return KernelConfig(preset=preset, tokens=8192, page_sizes=(1, 64),
                            layouts=("layer_first", "page_first_direct"), ops=("load", "backup"),
                            warmup=2, reps=10)
    small = preset if preset.layers <= 4 else replace(preset, layers=4)
    notes = [] if small is preset else [f"CPU: {preset.name} cut to 4 of {preset.layers} layers"]
    return KernelConfig(preset=small, tokens=256, page_sizes=(1, 64),
                        layouts=("layer_first", "page_first"), ops=("load", "backup", "both"),
                        gemm_size=128, warmup=1, reps=3, notes=notes)


# Rough speeds for --list-cases (no work is done to list): bytes per second of
# our backends and of the ceilings, and the cost of one Python-issued copy.
_EST = {True: dict(ours=20e9, index=6e9, copy_s=6e-6, case_s=0.05),
        False: dict(ours=0.3e9, index=1.0e9, copy_s=4e-6, case_s=0.15)}


def estimate_seconds(cfg: KernelConfig, cases: list[Case], gpu: bool) -> list[float]:
    """A rough wall time for each case (first run, check, warm-up, timed runs)."""
    est = _EST[gpu]
    g = cfg.preset
    out = []
    for c in cases:
        layers = 1 if c.op == "load" else g.layers * (2 if c.op == "both" else 1)
        nbytes = c.tokens * g.token_layer_bytes * layers
        if c.backend == "per-page":
            one = c.tokens // c.page_size * g.planes * layers * est["copy_s"]
        elif c.backend in ("torch-index", "reference"):
            one = nbytes / est["index"]
        else:
            one = nbytes / est["ours"]
        runs = cfg.warmup + cfg.reps + 1
        seconds = min(one * runs, CASE_SECONDS + 4 * one)
        if c.under_load:
            seconds += 0.5
        out.append(est["case_s"] + seconds)
    return out
