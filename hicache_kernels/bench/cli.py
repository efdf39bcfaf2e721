"""The ``hicache-bench`` command (also ``python -m hicache_kernels.bench``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace

import torch

from .. import __version__, backends, nvtx_ranges
from ..layouts import LayoutKind
from . import e2e, kernels, report
from .presets import DTYPES, PRESETS, ModelPreset
from .timing import Clock

DESCRIPTION = """\
Benchmark hicache-kernels on this machine.

  kernels  GB/s of each transfer backend for a model's KV geometry, next to the
           same-run ceiling (one contiguous copy of the same bytes) and
           baselines (torch indexing, one copy per page, sgl_kernel).
  e2e      a multi-turn chat workload with and without the host tier: hit
           rates, prefill tokens avoided, time to first token, throughput.
  check    a short self-check: every layout round-trips through every backend.

With no subcommand: check, then `kernels --quick`, then `e2e --quick`.
Without a GPU every subcommand runs a tiny CPU version and labels its numbers
as CPU numbers.
"""

EPILOG = """\
examples:
  hicache-bench kernels --preset llama-3.1-8b --op load --page-size 1 64 --sm-budget 2 4
  hicache-bench kernels --suite issue3            # issue 3's targets in one table
  hicache-bench kernels --under-load --op load    # next to a bf16 GEMM stream
  hicache-bench e2e --preset qwen3-0.6b --clients 64 --rounds 5
  nsys run with ranges: HICACHE_NVTX=1, or --nvtx (see docs/profiling.md)
"""


# -- argument parsing -----------------------------------------------------------------

def _list(convert):
    """Parse one argument of a list flag: space- or comma-separated values."""
    def parse(text: str):
        return [convert(v) for v in text.split(",") if v]
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _budget(text: str) -> int | None:
    return None if text == "default" else _positive(text)


def _choice(options):
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(options)}, got {text!r}")
        return text
    parse.__name__ = "choice"
    return parse


def _flat(values) -> tuple:
    return tuple(v for group in values for v in group) if values else ()


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """Flags every subcommand takes. On subcommands their defaults are suppressed,
    so ``hicache-bench --out X kernels`` keeps X (argparse would reset it)."""
    def add(*names, default=None, **kw):
        g.add_argument(*names, default=default if top else argparse.SUPPRESS, **kw)

    g = p.add_argument_group("run")
    add("--quick", action="store_true", default=False,
        help="a short version (seconds on a GPU; the tiny CPU version without one)")
    add("--out", metavar="DIR", default="hicache-bench-results",
        help="where JSON, CSV and PNG files go (default: hicache-bench-results)")
    add("--nvtx", action="store_true", default=False,
        help="mark each case and operation with NVTX ranges in domain 'hicache' "
             "(same as HICACHE_NVTX=1)")
    add("--device", choices=("auto", "cuda", "cpu"), default="auto",
        help="run on the GPU or the CPU (default: the GPU if there is one)")
    add("--seed", type=int, default=0, help="seed for indices, data and arrivals")
    add("--no-progress", action="store_true", default=False, help="no progress bar")


def _geometry(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model geometry (a preset, or explicit values that override it)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model preset (default: llama-3.1-8b)")
    g.add_argument("--layers", type=_positive, help="layers holding KV")
    g.add_argument("--kv-heads", type=_positive, help="KV heads of the model (split over --tp)")
    g.add_argument("--head-dim", type=_positive,
                   help="elements per KV head (MLA: kv_lora_rank + rope dim, e.g. 576)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="KV dtype (default: bf16)")
    g.add_argument("--mla", action="store_true", help="one latent vector per token (no V)")
    g.add_argument("--tp", type=_positive, help="tensor-parallel ranks; KV heads are split over them")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="hicache-bench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"hicache-kernels {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="{kernels,e2e,check}")

    k = sub.add_parser("kernels", help="GB/s per backend vs same-run ceilings and baselines",
                       description=kernels.__doc__, formatter_class=fmt)
    _common(k)
    _geometry(k)
    s = k.add_argument_group("what to sweep (lists: space- or comma-separated)")
    s.add_argument("--tokens", type=_positive, help="tokens per call (default 8192; CPU 256)")
    s.add_argument("--page-size", type=_list(_positive), nargs="+", metavar="P",
                   help="tokens per page: indices are whole pages in random order (default 1 16 64 256)")
    s.add_argument("--layout", type=_list(_choice([k.value for k in LayoutKind])), nargs="+",
                   metavar="KIND", help="host pool layouts (default: all four)")
    s.add_argument("--backend", type=_list(_choice(backends.NAMES)), nargs="+", metavar="NAME",
                   help=f"our backends, of {', '.join(backends.NAMES)} (default: all available here)")
    s.add_argument("--sm-budget", type=_list(_budget), nargs="+", metavar="N",
                   help="blocks a kernel backend may use; 'default' = its own (default: default)")
    s.add_argument("--op", type=_list(_choice(kernels.OPS)), nargs="+", metavar="OP",
                   help="load = one layer host->device, backup = all layers device->host, "
                        "both = the two at once on two streams (default: all)")
    s.add_argument("--under-load", action="store_true",
                   help="also run each of our cases next to a bf16 GEMM stream; report the "
                        "GEMM's slowdown and the transfer's speed")
    s.add_argument("--gemm-size", type=_positive, help="M=N=K of that GEMM (default 8192)")
    s.add_argument("--no-baselines", action="store_true", help="skip torch-index, per-page, sgl_kernel")
    s.add_argument("--suite", choices=("issue3",),
                   help="a fixed set of cases instead of a sweep (issue3: the CUDA kernels' targets)")
    t = k.add_argument_group("timing")
    t.add_argument("--warmup", type=int, help="untimed runs first (default 3)")
    t.add_argument("--reps", type=_positive, help="timed runs; the median is reported (default 20)")
    t.add_argument("--num-warps", type=int, help="warps per block for kernel backends")
    t.add_argument("--load-layer", type=int, help="which layer 'load' moves (default: the middle one)")

    e = sub.add_parser("e2e", help="multi-turn workload with and without the host tier",
                       description=e2e.__doc__, formatter_class=fmt)
    _common(e)
    _geometry(e)
    w = e.add_argument_group("workload (as SGLang's bench_multiturn)")
    w.add_argument("--clients", type=_positive, help="conversations (default 32; quick 16)")
    w.add_argument("--rounds", type=_positive, help="rounds per conversation (default 4)")
    w.add_argument("--request-length", type=_positive, help="new tokens per request (default 512)")
    w.add_argument("--output-length", type=_positive, help="tokens per answer (default 64)")
    w.add_argument("--request-rate", type=float,
                   help="requests/s, Poisson (default: 70%% of the full-recompute capacity measured here)")
    w.add_argument("--max-parallel", type=_positive, help="requests in flight at most (default: clients)")
    w.add_argument("--ready-policy", choices=("random", "fifo"), default="random",
                   help="which ready client sends next (default: %(default)s)")
    c = e.add_argument_group("cache")
    c.add_argument("--page-size", type=_positive, help="tokens per page (default 64)")
    c.add_argument("--device-fraction", type=float,
                   help="device pool as a fraction of all final histories (default 0.3)")
    c.add_argument("--device-tokens", type=_positive, help="device pool in tokens (overrides the fraction)")
    c.add_argument("--host-ratio", type=float, help="host pool / device pool (default 4; SGLang's default 2)")
    c.add_argument("--host-layout", choices=[k.value for k in LayoutKind], default="layer_first",
                   help="host pool layout (default: %(default)s)")
    c.add_argument("--write-policy", choices=("write_through", "write_through_selective", "write_back"),
                   default="write_through", help="when pages are backed up (default: %(default)s)")
    c.add_argument("--backend", choices=("auto",) + backends.NAMES, default="auto",
                   help="transfer backend of the tier (default: %(default)s)")
    c.add_argument("--sm-budget", type=_positive, help="blocks the tier's kernels may use")
    c.add_argument("--storage", choices=("none", "nixl"), default="none",
                   help="a third tier below the host pool: nixl writes every page backed up to "
                        "host to files through NIXL and fetches lost histories back (default: "
                        "%(default)s)")
    c.add_argument("--storage-dir", metavar="DIR",
                   help="where --storage nixl keeps its files, kept after the run so a later run "
                        "finds them (implies --storage nixl; default: a temporary directory)")
    c.add_argument("--prefetch-policy", choices=("best_effort", "wait_complete", "timeout"),
                   default="wait_complete",
                   help="when a request stops waiting for pages from storage, as in SGLang "
                        "(default: %(default)s; best_effort barely waits here, as this server "
                        "prefills a request as soon as it arrives)")
    c.add_argument("--kv-events", metavar="ENDPOINT",
                   help="publish the tier's KV events (stored/removed per tier, SGLang's format, "
                        "topic kv-events) on this ZMQ endpoint, e.g. tcp://*:5557")
    c.add_argument("--no-verify", action="store_true",
                   help="skip checking the bytes of cached and loaded pages")

    sub.add_parser("check", help="round-trip every layout through every backend",
                   formatter_class=fmt)
    return parser


# -- resolving flags ---------------------------------------------------------------------

def _preset(args, default: ModelPreset) -> ModelPreset:
    base = PRESETS[args.preset] if args.preset else default
    changes = {}
    for flag, name in (("layers", "layers"), ("kv_heads", "kv_heads"), ("head_dim", "head_dim"),
                       ("tp", "tp")):
        if getattr(args, flag, None) is not None:
            changes[name] = getattr(args, flag)
    if getattr(args, "dtype", None):
        changes["dtype"] = DTYPES[args.dtype]
    if getattr(args, "mla", False) and not base.mla:
        head_dim = changes.get("head_dim", base.head_dim)
        changes.update(mla=True, kv_heads=1, kv_lora_rank=max(1, head_dim - 64),
                       q_lora_rank=base.q_lora_rank or base.hidden // 4,
                       v_head_dim=base.v_head_dim or 128)
    if not changes:
        return base
    if base.mla and "head_dim" in changes:
        changes["kv_lora_rank"] = max(1, changes["head_dim"] - 64)
    return base.with_geometry(**changes)


def _clock(args) -> Clock:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hicache-bench: --device cuda: no CUDA device is available here")
    gpu = torch.cuda.is_available() and args.device != "cpu"
    return Clock("cuda" if gpu else "cpu")


def kernels_config(args, clock: Clock) -> tuple[kernels.KernelConfig, list | None]:
    if args.suite:
        if not clock.gpu:
            raise SystemExit("hicache-bench: --suite issue3 measures GPU targets; no GPU here")
        cfg, cases = kernels.issue3_suite()
        cfg.warmup = args.warmup if args.warmup is not None else cfg.warmup
        cfg.reps = args.reps or cfg.reps
        cfg.seed = args.seed
        cfg.gemm_size = args.gemm_size or cfg.gemm_size
        return cfg, cases
    preset = _preset(args, PRESETS["llama-3.1-8b"])
    cfg = (kernels.quick_config(preset, clock.gpu) if args.quick or not clock.gpu
           else kernels.KernelConfig(preset=preset))
    if not clock.gpu and not args.quick:
        cfg.notes.append("no GPU: the tiny CPU version (what --quick runs)")
    updates = dict(
        tokens=args.tokens, page_sizes=_flat(args.page_size), layouts=_flat(args.layout),
        backends=_flat(args.backend), sm_budgets=_flat(args.sm_budget), ops=_flat(args.op),
        gemm_size=args.gemm_size, warmup=args.warmup, reps=args.reps, num_warps=args.num_warps,
        load_layer=args.load_layer,
    )
    for name, value in updates.items():
        if value is not None and value != ():
            setattr(cfg, name, value)
    cfg.under_load = args.under_load
    cfg.baselines = not args.no_baselines
    cfg.seed = args.seed
    if args.layers is not None and not clock.gpu:   # asked for: not cut to the CPU's 4
        cfg.preset = replace(cfg.preset, layers=args.layers)
    return cfg, None


def e2e_config(args, clock: Clock) -> e2e.E2EConfig:
    preset = _preset(args, PRESETS["llama-3.1-8b"])
    if clock.gpu and not args.quick:
        cfg = e2e.E2EConfig(preset=preset)
    else:
        cfg = e2e.quick_config(preset, clock.gpu)
    w = cfg.workload
    for flag in ("clients", "rounds", "request_length", "output_length", "request_rate",
                 "max_parallel"):
        if getattr(args, flag) is not None:
            setattr(w, flag, getattr(args, flag))
    w.ready_policy = args.ready_policy
    w.seed = args.seed
    for flag in ("page_size", "device_fraction", "device_tokens", "host_ratio", "sm_budget"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    cfg.host_layout, cfg.write_policy, cfg.backend = args.host_layout, args.write_policy, args.backend
    cfg.storage = "nixl" if args.storage_dir else args.storage
    cfg.storage_dir, cfg.prefetch_policy = args.storage_dir, args.prefetch_policy
    cfg.kv_events = args.kv_events
    cfg.verify = not args.no_verify
    if not clock.gpu:
        cfg.notes.append(report.CPU_LABEL)
    return cfg


# -- running ----------------------------------------------------------------------------

def _progress(console, args):
    if args.no_progress or not console.is_terminal:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def cmd_kernels(args, console) -> int:
    clock = _clock(args)
    cfg, cases = kernels_config(args, clock)
    with _progress(console, args) as progress:
        result = kernels.run(cfg, clock, cases, progress=progress)
    console.print(report.kernels_table(result))
    for note in result["notes"]:
        console.print(f"note: {note}")
    for why in report.skipped_baselines(result):
        console.print(f"baseline not run: {why}")
    if any(r.get("overlapped") is False for r in result["rows"]):
        console.print("note: under load, this device ran the GEMMs and the transfers one after "
                      "the other (no overlap), so 'w/ GEMM' numbers are not interference")
    out = report.out_dir(args.out)
    stem = "kernels" + (f"-{cfg.suite}" if cfg.suite else "")
    paths = [report.write_json(out / f"{stem}.json", result),
             report.write_csv(out / f"{stem}.csv", result),
             report.plot_kernels(out / f"{stem}.png", result)]
    console.print("wrote " + ", ".join(str(p) for p in paths if p))
    rows = result["rows"]
    if cfg.suite:
        judged = [r for r in rows if "meets" in r]
        console.print(f"targets met: {sum(r['meets'] for r in judged)} of {len(judged)} measured "
                      f"({sum(1 for r in rows if r.get('target') and 'meets' not in r)} not measured)")
    bad = [r for r in rows if r.get("verified") is False or r.get("error")]
    for r in bad:
        console.print(f"[red]FAILED[/]: {r['op']} {r['layout']} P={r['page_size']} {r['backend']}: "
                      f"{r['note']}")
    return 1 if bad else 0


def cmd_e2e(args, console) -> int:
    clock = _clock(args)
    cfg = e2e_config(args, clock)
    with _progress(console, args) as progress:
        result = e2e.run(cfg, clock, progress=progress)
    console.print(report.e2e_table(result))
    for name, text in result["caches"].items():
        console.print(f"{name}: {text}")
    pools = result["pools"]
    console.print(f"device pool {pools['device_tokens']} tokens for {pools['all_histories_tokens']} "
                  f"tokens of final histories; {result['workload']['request_rate']:.2f} requests/s")
    for note in result["notes"]:
        console.print(f"note: {note}")
    path = report.write_json(report.out_dir(args.out) / "e2e.json", result)
    console.print(f"wrote {path}")
    failures = sum(r.get("verify_failures", 0) for r in result["runs"].values())
    if failures:
        console.print(f"[red]FAILED[/]: {failures} requests found cached KV bytes that differ")
    return 1 if failures else 0


def cmd_check(args, console) -> int:
    from .selfcheck import run_selfcheck

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    console.print(f"hicache-kernels {__version__}, torch {torch.__version__}, GPU: {gpu}")
    for name, (ok, why) in backends.status().items():
        console.print(f"  backend {name:12s} {'yes' if ok else 'no ':3s}  {why}")
    rows = run_selfcheck()
    bad = [r for r in rows if not r["bytes_equal"]]
    for r in bad:
        console.print(f"  [red]MISMATCH[/] {r['layout']} {r['attn']} {r['backend']}")
    console.print(f"self-check: {len(rows)} round trips, "
                  + ("[red]FAILED[/]" if bad else "every layout round-trips bit-exactly"))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nvtx:
        nvtx_ranges.enable()
    console = report.console()
    if args.command == "kernels":
        return cmd_kernels(args, console)
    if args.command == "e2e":
        return cmd_e2e(args, console)
    if args.command == "check":
        return cmd_check(args, console)
    # no subcommand: the short default of everything
    status = cmd_check(args, console)
    for command in ("kernels", "e2e"):
        console.rule(f"hicache-bench {command} --quick")
        sub = parser.parse_args([command, "--quick", "--out", args.out, "--device", args.device,
                                 "--seed", str(args.seed)]
                                + (["--nvtx"] if args.nvtx else [])
                                + (["--no-progress"] if args.no_progress else []))
        status |= cmd_kernels(sub, console) if command == "kernels" else cmd_e2e(sub, console)
    return status


if __name__ == "__main__":
    sys.exit(main())
