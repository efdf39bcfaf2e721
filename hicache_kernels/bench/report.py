"""What a person reads (rich tables and text blocks sized for 80 columns) and
the files a run leaves (CSV, PNG plots)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from .e2e import RUN_NAMES, WITH, WITH_STORAGE, WITHOUT

__all__ = ["console", "kernels_table", "kernel_headlines", "skipped_baselines", "e2e_blocks",
           "e2e_sweep_table", "e2e_verdicts", "write_csv", "plot_kernels", "plot_sweep",
           "compare_kernels", "compare_e2e", "machine_line", "CPU_LABEL", "LAYOUT_SHORT"]

CPU_LABEL = "CPU run (no GPU here): numbers show the code runs, not how fast a GPU is"
LAYOUT_SHORT = {"layer_first": "lf", "page_first": "pf", "page_first_direct": "pfd",
                "page_head": "ph"}
RUN_SHORT = {WITHOUT: "without", WITH: "HiCache", WITH_STORAGE: "+storage"}
WIDTH = 80


def console(*, wide: bool = False) -> Console:
    """A console for the tables: the terminal's width; piped, 80 columns
    (or 200 with ``wide``), so files and logs read like the terminal."""
    c = Console()
    if not c.is_terminal:
        c = Console(width=200 if wide else WIDTH, soft_wrap=False)
    return c


def _num(value, fmt: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return none if not (isinstance(value, float) and math.isinf(value)) else "inf"
    return format(value, fmt)


def machine_line(machine: dict) -> str:
    if machine.get("cpu_only"):
        return f"CPU ({machine['cpu']}), torch {machine['torch']}, triton {machine['triton']}"
    return (f"{machine['gpu']} ({machine['sm_count']} SMs), driver {machine['driver']}, "
            f"CUDA {machine['cuda']}, torch {machine['torch']}, triton {machine['triton']}")


def _table(title: str, caption: str | None = None) -> Table:
    """A table that spends its width on columns: no edges, one space of padding;
    at least as wide as its title (up to 80 columns), so the title stays one line."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, collapse_padding=True, caption=caption, caption_justify="left",
                 min_width=min(len(title), WIDTH))


# -- kernels -------------------------------------------------------------------------

def _backend_label(r: dict) -> str:
    return r["backend"] + (" *" if r["kind"] == "baseline" else "")


def kernels_table(result: dict, *, wide: bool = False) -> Table:
    """One row per case: GB/s, % of the same-run ceiling, SMs (blocks) used.

    Narrow (the default) fits 80 columns: short layout names (see
    :func:`kernel_legend`), units in the headers, notes under the table;
    ``wide`` adds tokens, milliseconds, the ceiling's GB/s and the notes."""
    geo = result["geometry"]
    cfg = result["config"]
    rows = [r for r in result["rows"]
            if not (r["kind"] == "baseline" and r["gbps"] is None and not r.get("error"))]
    tokens = sorted({r["tokens"] for r in rows})
    title = (f"kernels: {geo['preset']}, {geo['token_layer_bytes']} B/token/layer, "
             f"{geo['layers']} layers" + (f", {tokens[0]} tokens" if len(tokens) == 1 else "")
             + (f", suite {cfg['suite']}" if cfg.get("suite") else ""))
    table = _table(title, caption=machine_line(result["machine"]) if wide else None)
    suite = any(r.get("target") for r in rows)
    loaded = any("gemm_slowdown_pct" in r for r in rows)
    show_tokens = wide or len(tokens) > 1
    cols = [("op", "left"), ("host\nlayout" if wide else "host", "left"), ("P", "right")]
    if show_tokens:
        cols.append(("tokens", "right"))
    cols += [("backend", "left"), ("SMs", "right"), ("GB/s", "right"), ("% of\nceil", "right")]
    if wide:
        cols += [("ms", "right"), ("ceiling\nGB/s", "right")]
    if not suite:   # the suite's "meets" includes the byte check
        cols.append(("ok", "center"))
    if loaded:
        cols += [("GEMM\nGB/s", "right"), ("GEMM\n+%", "right")]
    if suite:
        cols += [("target", "right"), ("meets", "center")]
    for name, just in cols:
        table.add_column(name, justify=just, no_wrap=True)
    if wide:
        table.add_column("note", overflow="fold")
    layout = (lambda v: v) if wide else (lambda v: LAYOUT_SHORT.get(v, v))
    for r in rows:
        verified = {True: "yes", False: "[red]NO[/]", None: "-"}[r.get("verified")]
        cells = [r["op"], layout(r["layout"]), _num(r["page_size"], "d")]
        if show_tokens:
            cells.append(_num(r["tokens"], "d"))
        cells += [_backend_label(r), str(r["blocks"]), _num(r["gbps"]), _num(r["pct_of_ceiling"], ".0f")]
        if wide:
            cells += [_num(r["ms"], ".3f"), _num(r["ceiling_gbps"])]
        if not suite:
            cells.append(verified)
        if loaded:
            slow = r.get("gemm_slowdown_pct")
            cells += [_num(r.get("gbps_under_load")), _num(slow, "+.1f") + ("%" if slow is not None else "")]
        if suite:
            cells += [(r.get("target") or "-").replace(" of ceiling", ""),
                      {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.get("meets")]]
        if wide:
            cells.append(r.get("note", ""))
        table.add_row(*cells)
    ceilings = result.get("ceilings", [])
    if ceilings:
        table.add_section()
    for c in ceilings:
        cells = [c["op"], "-", "-"] + (["-"] if show_tokens else [])
        cells += ["contiguous", c["blocks"], _num(c["gbps"]), "100"]
        if wide:
            cells += [_num(c["ms"], ".3f"), "-"]
        cells += ["-"] * (not suite) + ["-", "-"] * loaded + ["-", "-"] * suite
        if wide:
            cells.append(c["note"])
        table.add_row(*cells, style="dim")
    return table


def kernel_legend(result: dict, *, wide: bool = False) -> list[str]:
    """The lines under the table: what short names and marks mean (notes of
    single rows are in --wide and the files)."""
    rows = result["rows"]
    lines = []
    if not wide:
        used = [k for k in LAYOUT_SHORT if any(r["layout"] == k for r in rows)]
        if used:
            lines.append("host: " + ", ".join(f"{LAYOUT_SHORT[k]} {k}" for k in used))
    extras = []
    if any(r["kind"] == "baseline" and r["gbps"] is not None for r in rows):
        extras.append("* baseline")
    extras.append("P: tokens per page")
    extras.append("ok: bytes checked")
    lines.append("; ".join(extras))
    lines.append("ceil: one contiguous copy of the same bytes, timed the same way")
    if any("gemm_slowdown_pct" in r for r in rows):
        lines.append("GEMM GB/s: the transfer next to a bf16 GEMM stream; GEMM +%: the GEMM's slowdown")
    return lines


def kernel_headlines(result: dict) -> list[str]:
    """One line per op, like nccl-tests' bus bandwidth line: our best backend (by
    mean % of ceiling over its cases) with its mean GB/s and its worst case."""
    out = []
    rows = [r for r in result["rows"] if r["kind"] == "ours" and r.get("pct_of_ceiling") is not None]
    for op in dict.fromkeys(r["op"] for r in rows):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["op"] == op:
                groups.setdefault((r["backend"], r["sm_budget"]), []).append(r)
        (backend, sm), best = max(groups.items(),
                                  key=lambda kv: sum(r["pct_of_ceiling"] for r in kv[1]) / len(kv[1]))
        pct = sum(r["pct_of_ceiling"] for r in best) / len(best)
        gbps = sum(r["gbps"] for r in best) / len(best)
        worst = min(best, key=lambda r: r["pct_of_ceiling"])
        name = backend + ("" if sm is None else f" sm={sm}")
        line = f"{op}: {name} {pct:.0f}% of ceiling, {gbps:.1f} GB/s"
        if len(best) > 1:
            line += (f" (mean of {len(best)}; worst {worst['pct_of_ceiling']:.0f}% "
                     f"{LAYOUT_SHORT.get(worst['layout'], worst['layout'])} P={worst['page_size']})")
        out.append(line)
    return out


def skipped_baselines(result: dict) -> list[str]:
    """Why baselines were not run, once per reason."""
    seen: dict[str, list[str]] = {}
    for r in result["rows"]:
        if r["kind"] == "baseline" and r["gbps"] is None and not r.get("error"):
            seen.setdefault(f"{r['backend']}: {r['note']}", []).append(r["layout"])
    return [f"{why} ({', '.join(sorted(set(where)))})" for why, where in seen.items()]


# -- e2e -----------------------------------------------------------------------------

_BLOCK = [  # (label, key, format); None key: a section rule
    ("Successful requests", "completed", "d"),
    ("Failed requests (bytes differ)", "failed", "d"),
    ("Benchmark duration (s)", "duration", ".2f"),
    ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"),
    ("Request throughput (req/s)", "request_throughput", ".2f"),
    ("Input token throughput (tok/s)", "input_throughput", ".0f"),
    ("Output token throughput (tok/s)", "output_throughput", ".0f"),
    ("Total token throughput (tok/s)", "total_throughput", ".0f"),
    ("Concurrency", "concurrency", ".2f"),
    ("Cache hit rate", None, ""),
    ("Device hit rate (%)", "device_hit_rate_pct", ".1f"),
    ("Host hit rate (%)", "host_hit_rate_pct", ".1f"),
    ("Storage hit rate (%)", "storage_hit_rate_pct", ".1f"),
    ("Prefill tokens computed", "prefill_tokens_computed", "d"),
    ("Tokens loaded from host", "host_tokens_loaded", "d"),
    ("Waiting for storage (ms)", "storage_wait_ms", ".1f"),
    ("Time to First Token", None, ""),
    ("Mean TTFT (ms)", "mean_ttft_ms", ".2f"),
    ("Median TTFT (ms)", "median_ttft_ms", ".2f"),
    ("P90 TTFT (ms)", "p90_ttft_ms", ".2f"),
    ("P99 TTFT (ms)", "p99_ttft_ms", ".2f"),
    ("Inter-Token Latency", None, ""),
    ("Mean ITL (ms)", "mean_itl_ms", ".2f"),
    ("Median ITL (ms)", "median_itl_ms", ".2f"),
    ("P99 ITL (ms)", "p99_itl_ms", ".2f"),
    ("End-to-End Latency", None, ""),
    ("Mean E2E Latency (ms)", "mean_e2e_latency_ms", ".2f"),
    ("Median E2E Latency (ms)", "median_e2e_latency_ms", ".2f"),
    ("P99 E2E Latency (ms)", "p99_e2e_latency_ms", ".2f"),
]
_STORAGE_ONLY = {"storage_hit_rate_pct", "storage_wait_ms"}


def _rule(text: str, char: str) -> str:
    text = f" {text} " if text else ""
    left = (WIDTH - 2 - len(text)) // 2
    return char * left + text + char * (WIDTH - 2 - left - len(text))


def e2e_blocks(result: dict) -> list[str]:
    """One bench_serving-style block per concurrency level (80 columns), each run
    a column, then its verdict lines."""
    storage = result["pools"].get("storage", "none") != "none"
    out = []
    w = result["workload"]
    for level in result["levels"]:
        runs = level["runs"]
        names = [n for n in RUN_NAMES if n in runs]
        if not names:
            continue
        rate = level["request_rate"]
        head = (f"e2e: concurrency {level['concurrency']}, "
                + ("each request when a slot frees" if math.isinf(rate) else f"{rate:.2f} req/s")
                + ("" if level.get("complete") else " (interrupted)"))
        lines = [_rule(head, "="), f"{'':34}" + "".join(f"{RUN_SHORT[n]:>14}" for n in names)]
        for label, key, fmt in _BLOCK:
            if key is None:
                lines.append(_rule(label, "-"))
                continue
            if key in _STORAGE_ONLY and not storage:
                continue
            cells = "".join(f"{_num(runs[n].get(key), fmt):>14}" for n in names)
            lines.append(f"{label + ':':34}{cells}")
        lines.append("=" * (WIDTH - 2))
        lines += e2e_verdicts(level)
        out.append("\n".join(lines))
    if out:
        out.insert(0, (f"{w['clients']} clients x {w['rounds']} rounds, {w['request_length']} new + "
                       f"{w['output_length']} output tokens per request"
                       + (f", shared prefix {w['shared_prefix']}" if w.get("shared_prefix") else "")
                       + (f", history {w['user_history']}" if w.get("user_history") else "")
                       + f"; {result['model']['name']}"))
    return out


def e2e_verdicts(level: dict) -> list[str]:
    """Plain lines: did HiCache help at this level? Worse is said first, in red."""
    out = []
    for name, v in level.get("verdict", {}).items():
        who = RUN_SHORT[name] if name != WITH else "HiCache"
        if v["worse"]:
            out.append(f"[bold red]WORSE[/]: {who} made this level slower than without it: {v['text']}")
        else:
            out.append(f"{who} vs without: {v['text']}")
    return out


def e2e_sweep_table(result: dict) -> Table:
    """Every level and run in one 80-column table."""
    table = _table("e2e sweep")
    for name, just in (("conc", "right"), ("run", "left"), ("TTFT p50\nms", "right"),
                       ("TTFT p99\nms", "right"), ("ITL p50\nms", "right"),
                       ("output\ntok/s", "right"), ("hit %\ndev/host/sto", "right")):
        table.add_column(name, justify=just, no_wrap=True)
    for level in result["levels"]:
        for name in RUN_NAMES:
            r = level["runs"].get(name)
            if r is None:
                continue
            hits = "/".join(_num(r[k], ".0f") for k in
                            ("device_hit_rate_pct", "host_hit_rate_pct", "storage_hit_rate_pct"))
            table.add_row(str(level["concurrency"]), RUN_SHORT[name], _num(r["median_ttft_ms"], ".2f"),
                          _num(r["p99_ttft_ms"], ".2f"), _num(r["median_itl_ms"], ".2f"),
                          _num(r["output_throughput"], ".0f"), hits)
        table.add_section()
    return table


# -- files ---------------------------------------------------------------------------

def write_csv(path: Path, result: dict) -> Path:
    """The kernels rows and ceilings, each with the card and versions (one file, no nesting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = result["machine"]
    fixed = {f"machine_{k}": machine.get(k) for k in ("device", "gpu", "sm_count", "driver",
                                                      "cuda", "torch", "triton", "cpu_only")}
    fixed["preset"] = result["geometry"]["preset"]
    fixed["timestamp"] = result.get("timestamp")
    fixed["tag"] = result.get("tag")
    rows = [dict(fixed, **r) for r in result["rows"] + result.get("ceilings", [])]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_kernels(path: Path, result: dict) -> Path | None:
    """GB/s by page size, one line per backend (and SM budget), one panel per
    (op, host layout); the same-run ceiling as a dashed line."""
    rows = [r for r in result["rows"] if r.get("gbps") is not None]
    panels = sorted({(r["op"], r["layout"]) for r in rows}, key=lambda p: (p[0], p[1]))
    if not panels:
        return None
    plt = _pyplot()
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    names = sorted({(r["kind"], r["backend"], r["sm_budget"] or 0) for r in rows})
    palette = plt.get_cmap("tab10").colors
    color = {(k, b, sm or None): palette[i % len(palette)] for i, (k, b, sm) in enumerate(names)}
    for ax, (op, layout) in zip(axes.flat, panels):
        mine = [r for r in rows if (r["op"], r["layout"]) == (op, layout)]
        lines: dict[tuple, list] = {}
        for r in mine:
            lines.setdefault((r["kind"], r["backend"], r["sm_budget"]), []).append((r["page_size"], r["gbps"]))
        for (kind, backend, sm), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            baseline = kind == "baseline"
            label = backend + ("" if sm is None else f" sm={sm}") + (" (baseline)" if baseline else "")
            ax.plot([p for p, _ in pts], [g for _, g in pts], marker="x" if baseline else "o",
                    linestyle=":" if baseline else "-", color=color[(kind, backend, sm)], label=label)
        for c in sorted({r["ceiling_gbps"] for r in mine if r.get("ceiling_gbps")}):
            ax.axhline(c, linestyle="--", color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        pages = sorted({r["page_size"] for r in mine})
        ax.set_xticks(pages, [str(p) for p in pages])
        ax.set_title(f"{op}, host {layout}", fontsize=9)
        ax.set_xlabel("page size (tokens)")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    who = result["machine"].get("gpu") if not result["cpu_only"] else "CPU (not a GPU number)"
    fig.suptitle(f"{result['geometry']['preset']} on {who}; dashed: contiguous copy", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_sweep(path: Path, result: dict) -> Path | None:
    """TTFT (median, and p99 dashed) and output throughput against concurrency,
    one line per run (without HiCache, with it, with storage)."""
    levels = [lv for lv in result["levels"] if lv["runs"]]
    if not levels:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    unit = "ms (modeled)" if result.get("time") == "modeled" else "ms"
    for i, name in enumerate(RUN_NAMES):
        pts = [(lv["concurrency"], lv["runs"][name]) for lv in levels if name in lv["runs"]]
        if not pts:
            continue
        x = [c for c, _ in pts]
        color = f"C{i}"
        left.plot(x, [r["median_ttft_ms"] for _, r in pts], marker="o", color=color, label=f"{name} p50")
        left.plot(x, [r["p99_ttft_ms"] for _, r in pts], linestyle="--", color=color, label=f"{name} p99")
        right.plot(x, [r["output_throughput"] for _, r in pts], marker="o", color=color, label=name)
    conc = sorted({lv["concurrency"] for lv in levels})
    for ax, ylabel in ((left, f"TTFT, {unit}"), (right, "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency (requests in flight at most)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    left.set_title("time to first token", fontsize=9)
    right.set_title("throughput", fontsize=9)
    w = result["workload"]
    who = result["machine"].get("gpu") if not result["cpu_only"] else "CPU, modeled time"
    fig.suptitle(f"{result['model']['name']} on {who}: {w['clients']} clients x {w['rounds']} rounds, "
                 f"{w['request_length']} + {w['output_length']} tokens", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- comparing with a baseline run ---------------------------------------------------

def _change(now, base) -> str:
    if not now or not base:
        return "-"
    return f"{100.0 * (now / base - 1.0):+.1f}%"


def compare_kernels(result: dict, base: dict) -> tuple[Table, list[str]]:
    """GB/s of each case in both runs (matched by op, layout, page size, tokens,
    backend, SM budget), and a summary line."""
    def key(r):
        return (r["kind"], r["op"], r["layout"], r["page_size"], r["tokens"], r["backend"], r["sm_budget"])

    before = {key(r): r for r in base.get("rows", []) if r.get("gbps")}
    table = _table(f"compared with {base.get('tag') or 'baseline'} ({base.get('timestamp', '?')})")
    for name, just in (("op", "left"), ("host", "left"), ("P", "right"), ("backend", "left"),
                       ("GB/s\nbefore", "right"), ("GB/s\nnow", "right"), ("change", "right")):
        table.add_column(name, justify=just, no_wrap=True)
    changes = []
    for r in result["rows"]:
        b = before.get(key(r))
        if b is None or not r.get("gbps"):
            continue
        changes.append(r["gbps"] / b["gbps"] - 1.0)
        table.add_row(r["op"], LAYOUT_SHORT.get(r["layout"], r["layout"]), str(r["page_size"]),
                      _backend_label(r), _num(b["gbps"]), _num(r["gbps"]), _change(r["gbps"], b["gbps"]))
    lines = []
    if not changes:
        lines.append("compare: no case of this run is in the baseline")
    else:
        changes.sort()
        mid = changes[len(changes) // 2]
        slower = sum(1 for c in changes if c < -0.05)
        lines.append(f"compare: {len(changes)} cases, median change {100 * mid:+.1f}%, "
                     f"{slower} more than 5% slower")
    bm, m = base.get("machine", {}), result.get("machine", {})
    if (bm.get("gpu"), bm.get("cpu_only")) != (m.get("gpu"), m.get("cpu_only")):
        lines.append(f"note: the baseline ran on {machine_line(bm) if bm else 'another machine'}")
    return table, lines


def compare_e2e(result: dict, base: dict) -> tuple[Table, list[str]]:
    """Median TTFT, output throughput and hit rate per (concurrency, run) in both runs."""
    before = {(lv["concurrency"], n): r for lv in base.get("levels", []) for n, r in lv["runs"].items()}
    table = _table(f"compared with {base.get('tag') or 'baseline'} ({base.get('timestamp', '?')})")
    for name, just in (("conc", "right"), ("run", "left"), ("TTFT p50 ms\nbefore", "right"),
                       ("TTFT p50 ms\nnow", "right"), ("tok/s\nbefore", "right"),
                       ("tok/s\nnow", "right"), ("hit %\nbefore", "right"), ("hit %\nnow", "right")):
        table.add_column(name, justify=just, no_wrap=True)
    n = 0
    for lv in result["levels"]:
        for name, r in lv["runs"].items():
            b = before.get((lv["concurrency"], name))
            if b is None:
                continue
            n += 1
            table.add_row(str(lv["concurrency"]), RUN_SHORT.get(name, name), _num(b["median_ttft_ms"], ".2f"),
                          _num(r["median_ttft_ms"], ".2f"), _num(b["output_throughput"], ".0f"),
                          _num(r["output_throughput"], ".0f"), _num(b["cache_hit_rate_pct"]),
                          _num(r["cache_hit_rate_pct"]))
    lines = [] if n else ["compare: no concurrency level and run of this run is in the baseline"]
    return table, lines
