"""The ``hicache-bench`` command (also ``python -m hicache_kernels.bench``).

Flags are read and checked (:mod:`.options`) before any work; a bad one is one
line on stderr and exit status 2, with nothing written. Ctrl-C stops a run,
saves what finished and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from .. import __version__, backends, nvtx_ranges
from ..layouts import LayoutKind
from . import e2e, kernels, report
from .options import UsageError, clock_for, e2e_config, kernels_config, usable_out
from .presets import DTYPES, PRESETS
from .results import append_jsonl, load_baseline, run_id, run_metadata

DESCRIPTION = """\
Benchmark hicache-kernels on this machine.

  kernels  GB/s of each transfer backend for a model's KV geometry, next to the
           same-run ceiling (one contiguous copy of the same bytes) and
           baselines (torch indexing, one copy per page, sgl_kernel).
  e2e      a multi-turn chat workload without and with the host tier (and a
           storage tier): time to first token, inter-token latency,
           throughput and hit rates, at one or several concurrency levels.
  check    a short self-check: every layout round-trips through every backend.

With no subcommand: check, then `kernels --quick`, then `e2e --quick`.
Without a GPU every subcommand runs a tiny CPU version and says so once.
Results are appended to <out>/kernels.jsonl and <out>/e2e.jsonl.
"""

EPILOG = """\
examples:
  hicache-bench kernels --preset llama-3.1-8b --op load --page-size 1 64 --sm-budget 2 4
  hicache-bench kernels --suite targets           # the CUDA kernels' targets in one table
  hicache-bench kernels --under-load --op load    # next to a bf16 GEMM stream
  hicache-bench e2e --concurrency 2,4,8,16 --input-len 2048 --output-len 256
  hicache-bench e2e --list-cases --storage nixl   # what would run, and about how long
  hicache-bench kernels --compare hicache-bench-results/kernels.jsonl
  nsys run with ranges: HICACHE_NVTX=1, or --nvtx (see docs/profiling.md)
"""

KERNELS_DESCRIPTION = """\
GB/s of each transfer backend for a model's KV geometry.

A case is (op, host layout, page size, tokens, backend, SM budget):
  load    one layer, host -> device (what a forward pass waits on)
  backup  every layer, device -> host
  both    every layer loaded, one call per layer, while another range backs up
Each case is checked by bytes, then timed (median of --reps runs after
--warmup). Its ceiling is one contiguous copy of the same bytes, measured in
the same run the same way; "% of ceiling" is against it.
"""

E2E_DESCRIPTION = """\
A multi-turn chat workload (as SGLang's bench_multiturn) without and with
HiCache's host tier, and with a storage tier when asked.

Each request is the client's whole history plus --request-length new tokens
and yields --output-length tokens. The device pool is too small to keep every
history: without HiCache an evicted history is recomputed; with it, it comes
back from the host pool layer by layer while the forward pass runs.
On a GPU every prefill runs and is timed; without one the same work runs but
service times come from a fixed cost model, so one seed gives one answer.
"""


# -- argument parsing -----------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Errors are one line (no usage dump), raised for :func:`main` to print."""

    def error(self, message: str):
        raise UsageError(message.replace("argument ", "", 1))


def _list(convert):
    """Parse one argument of a list flag: space- or comma-separated values."""
    def parse(text: str):
        return [convert(v) for v in text.split(",") if v]
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = "int"
    return parse


_positive = _int_at_least(1, "a positive int")
_count = _int_at_least(0, "an int >= 0")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def _rate(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"expected requests/s > 0 (or inf: each request as soon as a slot is free), got {text}; "
            "leave it out for 70% of the full-recompute capacity")
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


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """Flags every subcommand takes. On subcommands their defaults are suppressed,
    so ``hicache-bench --out X kernels`` keeps X (argparse would reset it)."""
    def add(*names, default=None, **kw):
        g.add_argument(*names, default=default if top else argparse.SUPPRESS, **kw)

    g = p.add_argument_group("run")
    add("--quick", action="store_true", default=False,
        help="a short version (seconds on a GPU; the tiny CPU version without one)")
    add("--out", metavar="DIR", default="hicache-bench-results",
        help="where results go: each run appends to DIR/kernels.jsonl or DIR/e2e.jsonl "
             "and writes its CSV and plots named by time and tag (default: hicache-bench-results)")
    add("--tag", metavar="TEXT", default="", help="a label stored with the results and in file names")
    add("--wide", action="store_true", default=False,
        help="wider tables: tokens, milliseconds, ceilings' GB/s and notes per row")
    add("--nvtx", action="store_true", default=False,
        help="mark each case and operation with NVTX ranges in domain 'hicache' "
             "(same as HICACHE_NVTX=1)")
    add("--device", choices=("auto", "cuda", "cpu"), default="auto",
        help="run on the GPU or the CPU (default: the GPU if there is one)")
    add("--seed", type=int, default=0, help="seed for indices, data and arrivals (default: 0)")
    add("--no-progress", action="store_true", default=False, help="no progress bar")


def _results(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("listing and comparing")
    g.add_argument("--list-cases", action="store_true",
                   help="print what would run and a rough time for each, then stop")
    g.add_argument("--compare", metavar="FILE",
                   help="compare with the last run of this subcommand in FILE (.json or .jsonl)")


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
    g.add_argument("--tp", type=_positive,
                   help="tensor-parallel ranks; KV heads are split over them (a divisor or a "
                        "multiple of the KV heads)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="hicache-bench", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=version_text())
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="{kernels,e2e,check}", parser_class=Parser)

    k = sub.add_parser("kernels", help="GB/s per backend vs same-run ceilings and baselines",
                       description=KERNELS_DESCRIPTION, formatter_class=fmt)
    _common(k)
    _results(k)
    _geometry(k)
    s = k.add_argument_group("what to sweep (lists: space- or comma-separated)")
    s.add_argument("--tokens", type=_positive,
                   help="tokens per call, a whole number of pages (default 8192; CPU 256)")
    s.add_argument("--page-size", type=_list(_positive), nargs="+", metavar="P",
                   help="tokens per page: indices are whole pages in random order (default 1 16 64 256)")
    s.add_argument("--layout", type=_list(_choice([k.value for k in LayoutKind])), nargs="+",
                   metavar="KIND", help="host pool layouts (default: all four)")
    s.add_argument("--backend", type=_list(_choice(backends.NAMES)), nargs="+", metavar="NAME",
                   help=f"our backends, of {', '.join(backends.NAMES)} (default: all available here)")
    s.add_argument("--sm-budget", type=_list(_budget), nargs="+", metavar="N",
                   help="blocks a kernel backend may use; 'default' = its own (default: default); "
                        "refused when no backend of the run is a kernel")
    s.add_argument("--op", type=_list(_choice(kernels.OPS)), nargs="+", metavar="OP",
                   help="load = one layer host->device, backup = all layers device->host, "
                        "both = the two at once on two streams (default: all)")
    s.add_argument("--under-load", action="store_true",
                   help="also run each of our cases next to a bf16 GEMM stream; report the "
                        "GEMM's slowdown and the transfer's speed")
    s.add_argument("--gemm-size", type=_positive, help="M=N=K of that GEMM (default 8192)")
    s.add_argument("--no-baselines", action="store_true", help="skip torch-index, per-page, sgl_kernel")
    s.add_argument("--suite", choices=("targets",),
                   help="a fixed set of cases instead of a sweep (targets: the CUDA kernels' "
                        "targets, each with a 'meets' column; needs a GPU)")
    t = k.add_argument_group("timing")
    t.add_argument("--warmup", type=_count, help="untimed runs first (default 3)")
    t.add_argument("--reps", type=_positive, help="timed runs; the median is reported (default 20)")
    t.add_argument("--num-warps", type=_positive, help="warps per block for kernel backends")
    t.add_argument("--load-layer", type=_count,
                   help="which layer 'load' moves (default: the middle one of the layers run)")

    e = sub.add_parser("e2e", help="multi-turn workload without and with the host tier",
                       description=E2E_DESCRIPTION, formatter_class=fmt)
    _common(e)
    _results(e)
    _geometry(e)
    w = e.add_argument_group("workload (SGLang's bench_multiturn names work too)")
    w.add_argument("--clients", "--num-clients", dest="clients", type=_positive,
                   help="conversations (default 32; quick 16; CPU 6; with --concurrency at "
                        "least twice the highest level)")
    w.add_argument("--rounds", "--num-rounds", dest="rounds", type=_positive,
                   help="rounds per conversation (default 4; CPU 3)")
    w.add_argument("--request-length", "--input-len", dest="request_length", type=_positive,
                   help="new tokens per request (default 512; CPU 48)")
    w.add_argument("--output-length", "--output-len", dest="output_length", type=_positive,
                   help="tokens per answer (default 64; CPU 16)")
    w.add_argument("--concurrency", "--max-parallel", "--max-concurrency", dest="concurrency",
                   type=_list(_positive), nargs="+", metavar="N",
                   help="requests in flight at most; a list runs one level each, e.g. 2,4,8,16 "
                        "(default: every client, one level)")
    w.add_argument("--request-rate", type=_rate,
                   help="requests/s, or inf (default: inf with --concurrency, else 70%% of the "
                        "full-recompute capacity)")
    w.add_argument("--distribution", choices=("poisson", "uniform"), default="poisson",
                   help="gaps between requests (default: %(default)s)")
    w.add_argument("--ready-policy", "--ready-queue-policy", dest="ready_policy",
                   choices=("random", "fifo"), default="random",
                   help="which ready client sends next (default: %(default)s)")
    w.add_argument("--shared-system-prompt", type=_count, metavar="TOKENS",
                   help="a system prompt shared by every client, before each history (default 0)")
    w.add_argument("--user-history-prompt", type=_count, metavar="TOKENS",
                   help="each client's own history before its first round (default 0)")
    c = e.add_argument_group("cache")
    c.add_argument("--page-size", type=_positive, help="tokens per page (default 64; on a CPU 16 for requests of 64 tokens or fewer)")
    c.add_argument("--device-fraction", type=_number,
                   help="device pool as a fraction of all final histories, in (0, 1] (default 0.3)")
    c.add_argument("--device-tokens", type=_positive,
                   help="device pool in tokens (instead of --device-fraction)")
    c.add_argument("--host-ratio", type=_number,
                   help="host pool / device pool, > 0 (default 4; SGLang's default 2)")
    c.add_argument("--host-layout", choices=[k.value for k in LayoutKind], default="layer_first",
                   help="host pool layout (default: %(default)s)")
    c.add_argument("--write-policy", choices=("write_through", "write_through_selective", "write_back"),
                   default="write_through", help="when pages are backed up (default: %(default)s)")
    c.add_argument("--backend", choices=("auto",) + backends.NAMES, default="auto",
                   help="transfer backend of the tier (default: %(default)s)")
    c.add_argument("--sm-budget", type=_positive,
                   help="blocks the tier's kernels may use (refused when its backend is no kernel)")
    c.add_argument("--storage", choices=("none", "nixl"), default=None,
                   help="nixl adds a run with a third tier below the host pool: every page backed "
                        "up to host is written to files through NIXL and lost histories come back "
                        "from them (default: none)")
    c.add_argument("--storage-dir", metavar="DIR",
                   help="where --storage nixl keeps its files, kept after the run so a later run "
                        "finds them (implies --storage nixl; default: a temporary directory)")
    c.add_argument("--prefetch-policy", choices=("best_effort", "wait_complete", "timeout"),
                   default=None,
                   help="when a request stops waiting for pages from storage, as in SGLang "
                        "(default: wait_complete; the others need a GPU's real clock)")
    c.add_argument("--kv-events", metavar="ENDPOINT",
                   help="publish the tier's KV events (stored/removed per tier, SGLang's format, "
                        "topic kv-events) on this ZMQ endpoint, e.g. tcp://*:5557")
    c.add_argument("--no-verify", action="store_true",
                   help="skip checking the bytes of cached and loaded pages")

    sub.add_parser("check", help="round-trip every layout through every backend",
                   formatter_class=fmt)
    return parser


def version_text() -> str:
    """The version and whether the CUDA library is built (what ``make`` prints)."""
    from ..backends import _native

    lib, why = _native.library()
    native = _native.describe_build(_native.build_info(lib)) if lib is not None else why
    return f"hicache-kernels {__version__}: {native}"


# -- output --------------------------------------------------------------------------

class Output:
    """The console, and what is said only once per invocation (the machine, the
    CPU caveat)."""

    def __init__(self, *, wide: bool):
        self.console = report.console(wide=wide)
        self.wide = wide
        self._said: set[str] = set()

    def print(self, *args, **kw) -> None:
        self.console.print(*args, **kw)

    def machine(self, doc: dict) -> None:
        line = report.machine_line(doc["machine"])
        if "machine" not in self._said:
            self._said.add("machine")
            self.print(f"machine: {line}", highlight=False)
        if doc.get("cpu_only") and "cpu" not in self._said:
            self._said.add("cpu")
            self.print(f"[yellow]{report.CPU_LABEL}[/]")


def _progress(out: Output, args):
    if args.no_progress or not out.console.is_terminal:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=out.console, transient=True)


def _unique(path: Path) -> Path:
    n = 1
    while path.exists():
        path = path.with_name(f"{path.stem.rsplit('.', 1)[0]}.{n}{path.suffix}")
        n += 1
    return path


def _document(benchmark_doc: dict, argv, tag: str) -> dict:
    meta = run_metadata(argv, tag)
    return dict(benchmark=benchmark_doc.pop("benchmark"), timestamp=meta["timestamp"], tag=tag,
                meta=meta, **benchmark_doc)


# -- commands ------------------------------------------------------------------------

def cmd_kernels(args, out: Output, argv=None) -> int:
    usable_out(args.out)
    clock = clock_for(args)
    cfg, cases = kernels_config(args, clock)
    cases = kernels.sweep(cfg, gpu=clock.gpu) if cases is None else cases
    if args.list_cases:
        return _list_kernels(out, cfg, cases, clock)
    base = load_baseline("--compare", args.compare, "kernels") if args.compare else None
    with _progress(out, args) as progress:
        result = kernels.run(cfg, clock, cases, progress=progress)
    doc = _document(result, argv, args.tag)
    out.machine(doc)
    out.print(report.kernels_table(doc, wide=out.wide))
    for line in report.kernel_headlines(doc):
        out.print(line, highlight=False)
    for line in report.kernel_legend(doc, wide=out.wide):
        out.print(line, highlight=False, style="dim")
    for note in doc["notes"]:
        out.print(f"note: {note}", highlight=False)
    for why in report.skipped_baselines(doc):
        out.print(f"baseline not run: {why}", highlight=False)
    if any(r.get("overlapped") is False for r in doc["rows"]):
        out.print("note: under load, this device ran the GEMMs and the transfers one after "
                  "the other (no overlap), so 'w/ GEMM' numbers are not interference")
    if base is not None:
        table, lines = report.compare_kernels(doc, base)
        out.print(table)
        for line in lines:
            out.print(line, highlight=False)
    stem = "kernels" + (f"-{cfg.suite}" if cfg.suite else "")
    folder = Path(args.out)
    rid = run_id(doc["timestamp"], args.tag)
    paths = [append_jsonl(folder / f"{stem}.jsonl", doc),
             report.write_csv(_unique(folder / f"{stem}-{rid}.csv"), doc),
             report.plot_kernels(_unique(folder / f"{stem}-{rid}.png"), doc)]
    out.print("wrote " + ", ".join(str(p) for p in paths if p), highlight=False)
    rows = doc["rows"]
    if cfg.suite:
        judged = [r for r in rows if "meets" in r]
        out.print(f"targets met: {sum(r['meets'] for r in judged)} of {len(judged)} measured "
                  f"({sum(1 for r in rows if r.get('target') and 'meets' not in r)} not measured)")
    bad = [r for r in rows if r.get("verified") is False or r.get("error")]
    for r in bad:
        out.print(f"[red]FAILED[/]: {r['op']} {r['layout']} P={r['page_size']} {r['backend']}: "
                  f"{r['note']}", highlight=False)
    if doc["interrupted"]:
        out.print(f"[yellow]interrupted[/]: saved the {len(rows)} of {doc['cases_planned']} cases "
                  "that finished")
        return 130
    return 1 if bad else 0


def _list_kernels(out: Output, cfg, cases, clock) -> int:
    from rich import box
    from rich.table import Table

    seconds = kernels.estimate_seconds(cfg, cases, clock.gpu)
    table = Table(title=f"kernels: {len(cases)} cases on {clock.label()} ({cfg.preset.describe()})",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("case")
    table.add_column("s (rough)", justify="right")
    for i, (c, s) in enumerate(zip(cases, seconds), 1):
        table.add_row(str(i), c.id + (" (baseline)" if c.kind == "baseline" else "")
                      + (" + GEMM" if c.under_load else ""), f"{s:.1f}")
    out.print(table)
    out.print(f"about {sum(seconds):.0f} s in all (a rough estimate), plus start-up", highlight=False)
    return 0


def cmd_e2e(args, out: Output, argv=None) -> int:
    usable_out(args.out)
    clock = clock_for(args)
    cfg = e2e_config(args, clock)
    if args.list_cases:
        return _list_e2e(out, cfg, clock)
    base = load_baseline("--compare", args.compare, "e2e") if args.compare else None
    with _progress(out, args) as progress:
        result = e2e.run(cfg, clock, progress=progress)
    doc = _document(result, argv, args.tag)
    out.machine(doc)
    if doc["time"] == "modeled":
        out.print("times below are modeled (no GPU): see the cost model in the JSON", style="dim")
    for block in report.e2e_blocks(doc):
        out.print(block, highlight=False)
    if len(doc["levels"]) > 1:
        out.print(report.e2e_sweep_table(doc))
    for name, text in doc["caches"].items():
        out.print(f"{name}: {text}", highlight=False)
    pools = doc["pools"]
    out.print(f"device pool {pools['device_tokens']} tokens for {pools['all_histories_tokens']} "
              "tokens of final histories", highlight=False)
    for note in doc["notes"]:
        out.print(f"note: {note}", highlight=False)
    if base is not None:
        table, lines = report.compare_e2e(doc, base)
        out.print(table)
        for line in lines:
            out.print(line, highlight=False)
    folder = Path(args.out)
    rid = run_id(doc["timestamp"], args.tag)
    paths = [append_jsonl(folder / "e2e.jsonl", doc),
             report.plot_sweep(_unique(folder / f"e2e-{rid}.png"), doc)]
    out.print("wrote " + ", ".join(str(p) for p in paths if p), highlight=False)
    failures = sum(r.get("verify_failures", 0) for lv in doc["levels"] for r in lv["runs"].values())
    if failures:
        out.print(f"[red]FAILED[/]: {failures} requests found cached KV bytes that differ")
    if doc["interrupted"]:
        done = sum(len(lv["runs"]) for lv in doc["levels"])
        out.print(f"[yellow]interrupted[/]: saved the {done} runs that finished")
        return 130
    return 1 if failures else 0


def _list_e2e(out: Output, cfg, clock) -> int:
    rows = e2e.estimate_seconds(cfg, clock.gpu)
    w = cfg.workload
    out.print(f"e2e on {clock.label()}: {cfg.preset.describe()}; {w.clients} clients x {w.rounds} "
              f"rounds of {w.request_length} + {w.output_length} tokens", highlight=False)
    for label, requests, seconds in rows:
        out.print(f"  {label}: {requests} requests, ~{seconds:.0f} s", highlight=False)
    out.print(f"about {sum(s for _, _, s in rows):.0f} s in all (a rough estimate)", highlight=False)
    return 0


def cmd_check(args, out: Output, argv=None) -> int:
    from .selfcheck import run_selfcheck

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    out.print(f"{version_text()}, torch {torch.__version__}, GPU: {gpu}", highlight=False)
    for name, (ok, why) in backends.status().items():
        out.print(f"  backend {name:12s} {'yes' if ok else 'no ':3s}  {why}", highlight=False)
    rows = run_selfcheck()
    bad = [r for r in rows if not r["bytes_equal"]]
    for r in bad:
        out.print(f"  [red]MISMATCH[/] {r['layout']} {r['attn']} {r['backend']}")
    out.print(f"self-check: {len(rows)} round trips, "
              + ("[red]FAILED[/]" if bad else "every layout round-trips bit-exactly"))
    return 1 if bad else 0


COMMANDS = {"kernels": cmd_kernels, "e2e": cmd_e2e, "check": cmd_check}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad input, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except UsageError as exc:
        print(f"hicache-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hicache-bench: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nvtx:
        nvtx_ranges.enable()
    out = Output(wide=args.wide)
    if args.command:
        return COMMANDS[args.command](args, out, argv)
    # no subcommand: the short default of everything
    usable_out(args.out)
    status = cmd_check(args, out)
    for command in ("kernels", "e2e"):
        out.console.rule(f"hicache-bench {command} --quick")
        sub = parser.parse_args([command, "--quick", "--out", args.out, "--device", args.device,
                                 "--seed", str(args.seed), "--tag", args.tag]
                                + (["--nvtx"] if args.nvtx else [])
                                + (["--wide"] if args.wide else [])
                                + (["--no-progress"] if args.no_progress else []))
        code = COMMANDS[command](sub, out, argv)
        if code == 130:
            return code
        status |= code
    return status


if __name__ == "__main__":
    sys.exit(main())
