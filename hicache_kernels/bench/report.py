"""Tables (rich), machine-readable files (JSON, CSV) and the plot (matplotlib)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["console", "kernels_table", "skipped_baselines", "e2e_table", "write_json", "write_csv", "plot_kernels",
           "machine_line"]

CPU_LABEL = "CPU numbers (no GPU here): they check that the code runs, not how fast a GPU is"


def console() -> Console:
    """A console that prints whole tables even when stdout is not a terminal."""
    c = Console()
    if not c.is_terminal:
        c = Console(width=max(160, c.width), soft_wrap=False)
    return c


def _num(value, fmt: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def machine_line(machine: dict) -> str:
    if machine.get("cpu_only"):
        return (f"CPU ({machine['cpu']}), torch {machine['torch']}, triton {machine['triton']}"
                f" - {CPU_LABEL}")
    return (f"{machine['gpu']} ({machine['sm_count']} SMs), driver {machine['driver']}, "
            f"CUDA {machine['cuda']}, torch {machine['torch']}, triton {machine['triton']}")


def kernels_table(result: dict) -> Table:
    """One row per case: GB/s, % of the same-run ceiling, blocks (SMs) used."""
    cpu = result["cpu_only"]
    unit = "CPU GB/s" if cpu else "GB/s"
    geo = result["geometry"]
    title = (f"hicache-bench kernels: {geo['preset']} ({geo['token_layer_bytes']} B/token/layer, "
             f"{geo['layers']} layers){' - suite ' + result['config']['suite'] if result['config'].get('suite') else ''}")
    table = Table(title=title, caption=machine_line(result["machine"]), title_justify="left",
                  caption_justify="left")
    rows = result["rows"]
    suite = any(r.get("target") for r in rows)
    loaded = any("gemm_slowdown_pct" in r for r in rows)
    for name, just in (("op", "left"), ("host layout", "left"), ("P", "right"), ("tokens", "right"),
                       ("backend", "left"), ("blocks", "right"), (unit, "right"),
                       ("% ceiling", "right"), ("ceiling", "right"), ("bytes ok", "center")):
        table.add_column(name, justify=just, no_wrap=True)
    if loaded:
        table.add_column(f"{unit} w/ GEMM", justify="right")
        table.add_column("GEMM slowdown", justify="right")
    if suite:
        table.add_column("target", justify="right")
        table.add_column("meets", justify="center")
    table.add_column("note", overflow="fold")
    for r in rows:
        if r["kind"] == "baseline" and r["gbps"] is None and not r.get("error"):
            continue   # a baseline that does not apply: listed once by skipped_baselines()
        backend = r["backend"] + (" (baseline)" if r["kind"] == "baseline" else "")
        verified = {True: "yes", False: "[red]NO[/]", None: "-"}[r.get("verified")]
        cells = [r["op"], r["layout"], _num(r["page_size"], "d"), _num(r["tokens"], "d"), backend,
                 str(r["blocks"]), _num(r["gbps"]), _num(r["pct_of_ceiling"], ".0f"),
                 _num(r["ceiling_gbps"]), verified]
        if loaded:
            cells += [_num(r.get("gbps_under_load")),
                      _num(r.get("gemm_slowdown_pct"), "+.1f") + ("%" if "gemm_slowdown_pct" in r else "")]
        if suite:
            cells += [r.get("target") or "-",
                      {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.get("meets")]]
        cells.append(r.get("note", ""))
        table.add_row(*cells)
    table.add_section()
    for c in result.get("ceilings", []):
        cells = [c["op"], "-", "-", "-", "contiguous copy", c["blocks"], _num(c["gbps"]), "100",
                 "-", "-"]
        if loaded:
            cells += ["-", "-"]
        if suite:
            cells += ["-", "-"]
        cells.append(c["note"])
        table.add_row(*cells, style="dim")
    return table


def skipped_baselines(result: dict) -> list[str]:
    """Why baselines were not run, once per reason."""
    seen: dict[str, list[str]] = {}
    for r in result["rows"]:
        if r["kind"] == "baseline" and r["gbps"] is None and not r.get("error"):
            seen.setdefault(f"{r['backend']}: {r['note']}", []).append(r["layout"])
    return [f"{why} ({', '.join(sorted(set(where)))})" for why, where in seen.items()]


def e2e_table(result: dict) -> Table:
    """With and without the host tier (and the storage tier below it, if any), side by
    side, and their ratio."""
    cpu = result["cpu_only"]
    runs = result["runs"]
    title = (f"hicache-bench e2e: {result['workload']['clients']} clients x "
             f"{result['workload']['rounds']} rounds, {result['model']['name']}"
             f"{' (CPU stand-in)' if cpu else ''}")
    table = Table(title=title, caption=machine_line(result["machine"]), title_justify="left",
                  caption_justify="left")
    table.add_column("metric")
    names = list(runs)
    for name in names:
        table.add_column(name, justify="right")
    if "ratio" in result:
        table.add_column("with / without", justify="right")
    ms = "CPU ms" if cpu else "ms"
    metrics = [
        ("requests", "requests", "d"),
        ("device hit rate %", "device_hit_rate_pct", ".1f"),
        ("host hit rate %", "host_hit_rate_pct", ".1f"),
        ("prefill tokens computed", "prefill_tokens_computed", "d"),
        ("prefill tokens avoided", "prefill_tokens_avoided", "d"),
        ("tokens loaded from host", "host_tokens_loaded", "d"),
    ]
    if result["pools"].get("storage", "none") != "none":
        metrics += [
            ("storage hit rate %", "storage_hit_rate_pct", ".1f"),
            ("tokens fetched from storage", "storage_tokens_fetched", "d"),
            (f"waiting for storage ({ms})", "storage_wait_ms", ".1f"),
        ]
    metrics += [
        (f"TTFT p50 ({ms})", "ttft_p50_ms", ".2f"),
        (f"TTFT p90 ({ms})", "ttft_p90_ms", ".2f"),
        ("throughput (req/s)", "throughput_rps", ".2f"),
        ("input throughput (tok/s)", "input_tokens_per_s", ".0f"),
        ("reused KV checked by bytes", "loads_verified", "s"),
    ]
    for label, key, fmt in metrics:
        cells = [label]
        for name in names:
            value = runs[name].get(key)
            cells.append(str(value) if fmt == "s" else _num(value, fmt))
        if "ratio" in result:
            cells.append(_num(result["ratio"].get(key), ".2f") + ("x" if key in result["ratio"] else ""))
        table.add_row(*cells)
    return table


def write_json(path: Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def write_csv(path: Path, result: dict) -> Path:
    """The rows and ceilings, each with the card and versions (one file, no nesting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = result["machine"]
    fixed = {f"machine_{k}": machine.get(k) for k in ("device", "gpu", "sm_count", "driver",
                                                      "cuda", "torch", "triton", "cpu_only")}
    fixed["preset"] = result["geometry"]["preset"]
    rows = [dict(fixed, **r) for r in result["rows"] + result.get("ceilings", [])]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_kernels(path: Path, result: dict) -> Path | None:
    """GB/s by page size, one line per backend (and SM budget), one panel per
    (op, host layout); the same-run ceiling as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("gbps") is not None]
    panels = sorted({(r["op"], r["layout"]) for r in rows}, key=lambda p: (p[0], p[1]))
    if not panels:
        return None
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
            key = (r["kind"], r["backend"], r["sm_budget"])
            lines.setdefault(key, []).append((r["page_size"], r["gbps"]))
        for (kind, backend, sm), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            baseline = kind == "baseline"
            label = backend + ("" if sm is None else f" sm={sm}") + (" (baseline)" if baseline else "")
            ax.plot([p for p, _ in pts], [g for _, g in pts], marker="x" if baseline else "o",
                    linestyle=":" if baseline else "-", color=color[(kind, backend, sm)],
                    label=label)
        ceilings = {r["ceiling_gbps"] for r in mine if r.get("ceiling_gbps")}
        for c in sorted(ceilings):
            ax.axhline(c, linestyle="--", color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        pages = sorted({r["page_size"] for r in mine})
        ax.set_xticks(pages, [str(p) for p in pages])
        ax.set_title(f"{op}, host {layout}", fontsize=9)
        ax.set_xlabel("page size (tokens)")
        ax.set_ylabel("CPU GB/s" if result["cpu_only"] else "GB/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    who = result["machine"].get("gpu") if not result["cpu_only"] else "CPU (not a GPU number)"
    fig.suptitle(f"{result['geometry']['preset']} on {who}; dashed: contiguous copy", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def out_dir(value: str | os.PathLike) -> Path:
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path
