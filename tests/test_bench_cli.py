"""hicache-bench: the CLI, its files, and the pieces whose logic can be checked on a CPU.

Timings here are CPU numbers and are never asserted; what is asserted is that
the runs complete, write valid files, check bytes, refuse bad input before any
work, give one answer per seed, and that the checks can fail.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hicache_kernels.bench import cli, e2e, kernels, movers, options, report
from hicache_kernels.bench.presets import PRESETS, TINY
from hicache_kernels.bench.timing import Clock, percentile

CPU = Clock("cpu")
GPU = torch.cuda.is_available()
HAS_TIER = e2e.HiCacheTier.unavailable() is None
try:
    from hicache_kernels.storage.nixl_store import import_nixl
    import_nixl()
    HAS_NIXL = True
except ImportError:
    HAS_NIXL = False


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the command line -----------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["kernels", "--help"], ["e2e", "--help"]])
def test_help_reads_well(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hicache-bench" in out
    for internal in ("``", ":class:", ":mod:", ":func:", "issue", "ANCHORS"):
        assert internal not in out, internal
    if argv == ["--help"]:
        for word in ("kernels", "e2e", "check", "--quick", "--nvtx", "--out", "--tag", "--wide"):
            assert word in out
    if argv[0] == "kernels":
        for flag in ("--preset", "--layers", "--kv-heads", "--head-dim", "--dtype", "--tokens",
                     "--page-size", "--layout", "--backend", "--sm-budget", "--op",
                     "--under-load", "--suite", "--list-cases", "--compare"):
            assert flag in out
    if argv[0] == "e2e":
        for flag in ("--num-clients", "--num-rounds", "--request-length", "--input-len",
                     "--output-length", "--output-len", "--distribution", "--request-rate",
                     "--concurrency", "--shared-system-prompt", "--user-history-prompt"):
            assert flag in out


def test_version_says_whether_the_cuda_library_is_built(capsys):
    from hicache_kernels.backends import _native

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    out = capsys.readouterr().out
    lib, why = _native.library()
    if lib is not None:
        assert "libhicache_cuda built with CUDA" in out and "sm_" in out
    else:
        assert why in out


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one line must name) for every bad input or conflict."""
    afile = tmp / "afile"
    cases = [
        (["kernels", "--out", str(afile)], "--out"),
        (["kernels", "--out", str(afile / "sub")], "--out"),
        (["e2e", "--out", "/sys/hicache-bench-test"], "--out"),
        (["e2e", "--out", "/proc/hicache-bench-test"], "--out"),
        (["e2e", "--device-fraction", "2"], "--device-fraction"),
        (["e2e", "--device-fraction", "0.5", "--device-tokens", "100"], "--device-fraction"),
        (["e2e", "--device-tokens", "100", "--input-len", "512"], "--device-tokens"),
        (["e2e", "--host-ratio", "0"], "--host-ratio"),
        (["e2e", "--host-ratio", "0.0001"], "--host-ratio"),
        (["kernels", "--load-layer", "32" if GPU else "16"], "--load-layer"),
        (["kernels", "--quick", "--page-size", "3"], "--page-size 3"),
        (["kernels", "--tokens", "100000"], "--tokens 100000"),
        (["kernels", "--page-size", "0"], "--page-size"),
        (["e2e", "--storage", "none", "--storage-dir", str(tmp / "kv")], "--storage-dir"),
        (["e2e", "--request-rate", "0"], "--request-rate"),
        (["e2e", "--request-rate", "-1"], "--request-rate"),
        (["kernels", "--backend", "reference", "--no-baselines", "--sm-budget", "2"], "--sm-budget"),
        (["e2e", "--backend", "reference", "--sm-budget", "2"], "--sm-budget"),
        (["e2e", "--mla", "--kv-heads", "8"], "--kv-heads"),
        (["kernels", "--preset", "deepseek-v3", "--kv-heads", "8"], "--kv-heads"),
        (["kernels", "--tp", "3"], "--tp 3"),
        (["e2e", "--tp", "3"], "--tp 3"),
        (["e2e", "--storage-dir", str(afile)], "--storage-dir"),
        (["e2e", "--storage-dir", "/proc/hicache-bench-test"], "--storage-dir"),
        (["e2e", "--prefetch-policy", "timeout"], "--prefetch-policy"),
        (["e2e", "--concurrency", "64", "--num-clients", "8"], "--concurrency"),
        (["e2e", "--distribution", "normal"], "--distribution"),
        (["kernels", "--gemm-size", "64"], "--gemm-size"),
        (["kernels", "--mla", "--layout", "page_head"], "--layout page_head"),
        (["e2e", "--mla", "--host-layout", "page_head"], "--host-layout page_head"),
        (["kernels", "--compare", str(tmp / "missing.jsonl")], "--compare"),
        (["kernels", "--compare", str(afile)], "--compare"),
        (["kernels", "--layout", "sideways"], "layer_first"),
    ]
    if not GPU:
        cases += [
            (["kernels", "--backend", "cuda"], "--backend cuda"),
            (["e2e", "--backend", "cuda"], "--backend cuda"),
            (["kernels", "--suite", "targets"], "--suite targets"),
            (["kernels", "--device", "cuda"], "--device cuda"),
            (["e2e", "--storage-dir", str(tmp / "kv"), "--prefetch-policy", "best_effort"],
             "--prefetch-policy"),
        ]
    else:
        cases.append((["kernels", "--suite", "targets", "--page-size", "16"], "--suite targets"))
    return cases


def test_every_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    """Each bad value or conflict: one line on stderr naming the flag, exit 2, no
    traceback, nothing written (the results directory, the storage directory, the cwd)."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "afile").write_text("not a directory\n")
    results = work / "results"
    results.mkdir()
    (results / "e2e.jsonl").write_text('{"benchmark": "e2e"}\n')
    monkeypatch.chdir(work)

    def snapshot():
        return sorted((str(p.relative_to(tmp_path)), p.stat().st_size) for p in tmp_path.rglob("*"))

    before = snapshot()
    for argv, names in _bad_inputs(tmp_path):
        if not HAS_NIXL and "--storage-dir" in argv and names == "--prefetch-policy":
            continue
        argv = argv + (["--out", str(results)] if "--out" not in argv else [])
        code, out, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (argv, out, err)
        assert len(lines) == 1 and lines[0].startswith("hicache-bench: error: "), (argv, err)
        assert names in lines[0], (argv, lines[0])
        assert "Traceback" not in err + out and out == "", (argv, out)
        assert snapshot() == before, argv


def test_conflicts_resolved_quietly_before_are_refused_with_the_reason(tmp_path, capsys):
    code, _, err = run_cli(["kernels", "--load-layer", "16", "--out", str(tmp_path)], capsys)
    if not GPU:
        assert code == 2 and "keeps 4 of llama-3.1-8b's 32 layers" in err and "--layers" in err
    code, _, err = run_cli(["e2e", "--tp", "3", "--out", str(tmp_path)], capsys)
    assert code == 2 and "8 KV heads" in err
    if not GPU:
        code, _, err = run_cli(["kernels", "--backend", "cuda", "--out", str(tmp_path)], capsys)
        assert code == 2 and "no CUDA device" in err


def test_no_subcommand_runs_check_then_both_quick(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setitem(cli.COMMANDS, "kernels", lambda a, o, v: calls.append(("kernels", a)) or 0)
    monkeypatch.setitem(cli.COMMANDS, "e2e", lambda a, o, v: calls.append(("e2e", a)) or 1)
    monkeypatch.setattr(cli, "cmd_check", lambda a, o, v=None: calls.append(("check", None)) or 0)
    assert cli.main(["--out", str(tmp_path), "--tag", "t"]) == 1   # a failing part fails the run
    assert [name for name, _ in calls] == ["check", "kernels", "e2e"]
    for _, args in calls[1:]:
        assert args.quick and args.out == str(tmp_path) and args.tag == "t"


def test_out_before_the_subcommand_is_kept(tmp_path):
    args = cli.build_parser().parse_args(["--out", str(tmp_path), "kernels"])
    assert args.out == str(tmp_path)
    args = cli.build_parser().parse_args(["kernels", "--out", "x", "--page-size", "1,16", "64"])
    assert args.out == "x" and options._flat(args.page_size) == (1, 16, 64)


# -- kernels: runs, files, the table ---------------------------------------------------

QUICK_REF = ["kernels", "--quick", "--backend", "reference", "--no-progress"]


def test_kernels_quick_appends_jsonl_and_writes_csv_png(tmp_path, capsys):
    # the quick sweep, on the reference backend (the Triton interpreter is covered below)
    code, out, err = run_cli(QUICK_REF + ["--out", str(tmp_path), "--tag", "first"], capsys)
    assert code == 0, out + err
    assert "kernels: llama-3.1-8b" in out and "GB/s" in out
    assert out.count(report.CPU_LABEL) == 1, "the CPU caveat, once"
    assert all(len(line) <= 80 for line in out.splitlines()), "piped output reads at 80 columns"
    for op in ("load", "backup", "both"):
        assert re.search(rf"^{op}: reference \d+% of ceiling, [\d.]+ GB/s", out, re.M), op
    (doc,) = records(tmp_path / "kernels.jsonl")
    assert doc["benchmark"] == "kernels" and doc["tag"] == "first" and doc["cpu_only"] is True
    meta = doc["meta"]
    for key in ("timestamp", "command", "version", "git_sha", "cpu_model", "nvcc", "cuda_library",
                "torch", "triton"):
        assert meta.get(key) not in (None, ""), key
    assert meta["command"].startswith("hicache-bench kernels --quick")
    for key in ("torch", "triton", "cuda", "driver", "gpu"):
        assert key in doc["machine"]
    ours = [r for r in doc["rows"] if r["kind"] == "ours"]
    assert {r["op"] for r in ours} == {"load", "backup", "both"}
    assert all(r["verified"] is True and r["gbps"] > 0 for r in ours)
    baselines = {r["backend"]: r for r in doc["rows"] if r["kind"] == "baseline" and r["gbps"]}
    assert {"torch-index", "per-page"} <= set(baselines)
    assert all(r["verified"] for r in baselines.values())
    assert {c["op"] for c in doc["ceilings"]} == {"h2d", "d2h", "both"}
    (csv_path,) = tmp_path.glob("kernels-*-first.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and rows[0]["machine_torch"] == torch.__version__
    (png,) = tmp_path.glob("kernels-*-first.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run appends, never overwrites, and compares with the first
    code, out, _ = run_cli(QUICK_REF + ["--out", str(tmp_path), "--tag", "second",
                                        "--compare", str(tmp_path / "kernels.jsonl")], capsys)
    assert code == 0
    assert [d["tag"] for d in records(tmp_path / "kernels.jsonl")] == ["first", "second"]
    assert len(list(tmp_path.glob("kernels-*.csv"))) == 2
    m = re.search(r"compare: (\d+) cases, median change [+-][\d.]+%", out)
    assert m and int(m.group(1)) == len([r for r in doc["rows"] if r["gbps"]])


def test_cpu_ceilings_are_timed_like_the_cases(monkeypatch):
    """One torch thread while timing on a CPU, restored afterwards."""
    seen = []
    real = CPU.time_ms

    def spy(fn, **kw):
        seen.append(torch.get_num_threads())
        return real(fn, **kw)

    before = torch.get_num_threads()
    monkeypatch.setattr(CPU, "time_ms", spy)
    cfg = kernels.quick_config(PRESETS["llama-3.1-8b"], gpu=False)
    cfg.layouts, cfg.page_sizes, cfg.ops, cfg.baselines, cfg.backends = (
        ("layer_first",), (64,), ("load",), False, ("reference",))
    doc = kernels.run(cfg, CPU)
    assert seen and set(seen) == {1}, "cases and the ceiling both timed on one thread"
    assert torch.get_num_threads() == before
    assert len(doc["ceilings"]) == 1 and doc["rows"][0]["pct_of_ceiling"] > 0


def _row(op, layout, page, backend, kind="ours", **extra):
    row = dict(kind=kind, op=op, layout=layout, page_size=page, tokens=8192, backend=backend,
               sm_budget=2 if backend == "cuda" else None, label="", target="", blocks="2",
               bytes=2**25, ms=1.5, gbps=22.37, ceiling_gbps=24.5, pct_of_ceiling=91.3,
               verified=True, note="32 copies")
    row.update(extra)
    return row


def _kernels_doc(rows) -> dict:
    return dict(benchmark="kernels", cpu_only=False, rows=rows,
                machine=dict(gpu="NVIDIA H200", sm_count=132, driver="580", cuda="13.0",
                             torch="2.13", triton="3.9", cpu_only=False),
                geometry=dict(preset="llama-3.1-8b", token_layer_bytes=4096, layers=32),
                config=dict(suite=None),
                ceilings=[dict(op="h2d", blocks="0 (CE)", gbps=24.5, ms=1.3, note="ceiling")])


@pytest.mark.parametrize("extra", ["plain", "under_load", "suite"])  # the suite has GEMM rows too
def test_kernels_table_reads_at_80_columns(extra):
    rows = []
    for layout in ("layer_first", "page_first_direct"):
        for page in (1, 64):
            for backend in ("cuda", "triton", "copy_engine"):
                rows.append(_row("backup", layout, page, backend))
            rows.append(_row("backup", layout, page, "torch-index", kind="baseline"))
    for r in rows:
        if extra in ("under_load", "suite"):
            r.update(gemm_slowdown_pct=1.4, gbps_under_load=21.0)
        if extra == "suite":
            r.update(target=">=95% of ceiling", meets=False)
    doc = _kernels_doc(rows)
    rec = Console(width=80, record=True, file=open(os.devnull, "w"))
    rec.print(report.kernels_table(doc))
    text = rec.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text, "no column is cut short"
    header = "\n".join(lines[:4])
    for word in ("op", "host", "P", "backend", "SMs", "GB/s", "% of", "ceil",
                 "meets" if extra == "suite" else "ok"):
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header, re.M), word
    body = [line.split() for line in lines if line.strip().startswith("backup")]
    assert len(body) == len(rows)
    pages = [int(cells[2]) for cells in body]        # the P column, readable per row
    assert pages == [r["page_size"] for r in rows]
    hosts = {cells[1] for cells in body}
    assert hosts == {"lf", "pfd"}
    assert all(("no" if extra == "suite" else "yes") in cells and "22.4" in cells and "91" in cells
               for cells in body)
    if extra == "under_load":
        assert "GEMM" in header and "+1.4%" in text
    if extra == "suite":
        assert "meets" in header and ">=95%" in text
    legend = report.kernel_legend(doc)
    assert "lf layer_first" in legend[0] and "pfd page_first_direct" in legend[0]
    wide = Console(width=200, record=True, file=open(os.devnull, "w"))
    wide.print(report.kernels_table(doc, wide=True))
    text = wide.export_text()
    assert "32 copies" in text and "page_first_direct" in text and "8192" in text


def test_headline_names_the_best_backend_per_op():
    rows = [_row("load", "layer_first", 64, "cuda", pct_of_ceiling=95.0, gbps=23.0),
            _row("load", "layer_first", 1, "cuda", pct_of_ceiling=85.0, gbps=21.0),
            _row("load", "layer_first", 64, "triton", pct_of_ceiling=80.0, gbps=20.0),
            _row("load", "layer_first", 1, "triton", pct_of_ceiling=70.0, gbps=17.0),
            _row("load", "layer_first", 64, "per-page", kind="baseline", pct_of_ceiling=99.0)]
    (line,) = report.kernel_headlines(_kernels_doc(rows))
    assert line == "load: cuda sm=2 90% of ceiling, 22.0 GB/s (mean of 2; worst 85% lf P=1)"
    assert len(line) <= 80


def test_list_cases_estimates_and_writes_nothing(tmp_path, capsys):
    code, out, _ = run_cli(QUICK_REF + ["--list-cases", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and re.search(r"about \d+ s in all", out)
    assert "load layer_first P=1 T=256 reference" in out
    code, out, _ = run_cli(["e2e", "--list-cases", "--concurrency", "2,4", "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0 and "concurrency 4, with HiCache" in out and "~" in out
    assert not (tmp_path / "r").exists()


def test_ctrl_c_stops_kernels_and_saves_what_finished(monkeypatch, tmp_path, capsys):
    calls = []
    real = kernels.KernelBench.run

    def interrupted(self, case):
        calls.append(case)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, case)

    monkeypatch.setattr(kernels.KernelBench, "run", interrupted)
    code, out, err = run_cli(QUICK_REF + ["--out", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in out + err
    assert "interrupted" in out and "2 of" in out
    (doc,) = records(tmp_path / "kernels.jsonl")
    assert doc["interrupted"] is True and len(doc["rows"]) == 2 and doc["cases_planned"] > 2
    assert torch.get_num_threads() >= 1


def test_kernels_triton_interpreter_case(tmp_path, capsys):
    if not kernels.available_backends().get("triton"):
        pytest.skip("triton is not usable here (needs TRITON_INTERPRET=1 without a GPU)")
    code, out, _ = run_cli(["kernels", "--backend", "triton", "--op", "load", "--page-size", "64",
                            "--layout", "page_head", "--tokens", "128", "--layers", "2",
                            "--sm-budget", "2", "--no-baselines", "--reps", "1", "--warmup", "0",
                            "--out", str(tmp_path)], capsys)
    assert code == 0, out
    (doc,) = records(tmp_path / "kernels.jsonl")
    (row,) = doc["rows"]
    assert row["backend"] == "triton" and row["blocks"] == "2" and row["verified"] is True


def test_suite_needs_a_gpu(tmp_path, capsys):
    if GPU:
        pytest.skip("this checks the message on a machine without a GPU")
    code, _, err = run_cli(["kernels", "--suite", "targets", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no GPU" in err


# -- e2e -------------------------------------------------------------------------------

def _strip_wall(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("timestamp", "meta", "wall")}


def test_e2e_quick_writes_blocks_and_jsonl(tmp_path, capsys):
    code, out, err = run_cli(["e2e", "--quick", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, out + err
    assert "Median TTFT (ms):" in out and "P99 ITL (ms):" in out and "Cache hit rate" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    (doc,) = records(tmp_path / "e2e.jsonl")
    (level,) = doc["levels"]
    base = level["runs"]["without HiCache"]
    assert doc["cpu_only"] and doc["time"] == ("measured" if GPU else "modeled")
    assert base["completed"] == 6 * 3 and base["failed"] == 0
    assert base["host_hit_rate_pct"] == 0 and base["verify_failures"] == 0
    assert base["prefill_tokens_computed"] + base["prefill_tokens_avoided"] == \
        sum(w * (48 + 16) + 48 for w in range(3)) * 6
    for key in ("mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
                "p99_itl_ms", "median_e2e_latency_ms", "request_throughput", "input_throughput",
                "output_throughput", "total_throughput", "duration", "concurrency"):
        assert isinstance(base[key], float) and base[key] > 0, key
    if HAS_TIER:
        tier = level["runs"]["with HiCache"]
        assert tier["host_hit_rate_pct"] > 0 and tier["verify_failures"] == 0
        assert tier["prefill_tokens_computed"] < base["prefill_tokens_computed"]
        assert "with HiCache" in level["ratio"] and "HiCache vs without" in out


@pytest.mark.skipif(GPU, reason="on a GPU e2e runs in real time: hit rates may vary run to run")
def test_e2e_same_seed_same_answer(tmp_path, capsys):
    """Two runs with one seed give the same JSON, wall-clock fields aside."""
    argv = ["e2e", "--quick", "--concurrency", "4", "--seed", "3", "--out", str(tmp_path),
            "--no-progress", "--shared-system-prompt", "16"]
    if HAS_NIXL and HAS_TIER:
        argv += ["--storage", "nixl", "--host-ratio", "1"]
    for _ in range(2):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, out + err
    first, second = records(tmp_path / "e2e.jsonl")
    assert _strip_wall(first) == _strip_wall(second)
    assert first["wall"] != second["wall"] or first["wall"]["seconds"] > 0
    runs = first["levels"][0]["runs"]
    assert runs["without HiCache"]["device_hit_rate_pct"] > 0
    if "with HiCache + storage" in runs:
        assert runs["with HiCache + storage"]["storage_hit_rate_pct"] > 0
    docs = []
    for seed in (3, 4):
        cfg = e2e.quick_config(TINY, gpu=False)
        cfg.workload.seed = seed
        docs.append(e2e.run(cfg, CPU)["levels"])
    assert docs[0] != docs[1], "the seed matters (so the comparison above can fail)"


@pytest.mark.skipif(not HAS_TIER, reason="the manager is not in this build")
def test_e2e_sweep_reports_each_level_and_plots(tmp_path, capsys):
    code, out, err = run_cli(["e2e", "--concurrency", "2,4", "--input-len", "64", "--output-len", "8",
                              "--num-clients", "8", "--num-rounds", "2", "--out", str(tmp_path),
                              "--no-progress"], capsys)
    assert code == 0, out + err
    assert "e2e: concurrency 2" in out and "e2e: concurrency 4" in out and "e2e sweep" in out
    (doc,) = records(tmp_path / "e2e.jsonl")
    assert [lv["concurrency"] for lv in doc["levels"]] == [2, 4]
    assert doc["workload"]["clients"] == 8 and doc["workload"]["request_length"] == 64
    for lv in doc["levels"]:
        assert lv["complete"] and set(lv["runs"]) == {"without HiCache", "with HiCache"}
        assert lv["request_rate"] == "inf"   # strict JSON
        for run in lv["runs"].values():
            assert run["completed"] == 16 and run["total_output_tokens"] == 16 * 8
    (png,) = tmp_path.glob("e2e-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_system_prompt_is_reused_across_clients(tmp_path, capsys):
    hit = {}
    for shared in ("0", "32"):
        code, out, err = run_cli(["e2e", "--quick", "--num-rounds", "1", "--shared-system-prompt", shared,
                                  "--user-history-prompt", "16", "--out", str(tmp_path), "--no-progress"],
                                 capsys)
        assert code == 0, out + err
        run = records(tmp_path / "e2e.jsonl")[-1]["levels"][0]["runs"]["without HiCache"]
        assert run["verify_failures"] == 0, "shared pages hold the shared KV"
        hit[shared] = run["device_hit_tokens"]
    assert hit["0"] == 0 and hit["32"] >= 32 * 5, hit     # 6 clients, one round: 5 reuse it


def test_worse_with_hicache_is_said_plainly():
    worse, text = e2e.verdict({"median_ttft_ms": 3.1, "request_throughput": 0.6})
    assert worse and "x3.10" in text
    assert e2e.verdict({"median_ttft_ms": 0.5, "request_throughput": 1.9}) == (
        False, "median TTFT x0.50, request throughput x1.90: better")
    level = dict(verdict={"with HiCache": dict(worse=True, text=text)})
    (line,) = report.e2e_verdicts(level)
    assert line.startswith("[bold red]WORSE[/]: HiCache made this level slower")


def test_ctrl_c_stops_e2e_and_saves_what_finished(monkeypatch, tmp_path, capsys):
    calls = []
    real = e2e.simulate

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(e2e, "simulate", interrupted)
    code, out, err = run_cli(["e2e", "--quick", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 130 and "Traceback" not in out + err and "interrupted" in out
    (doc,) = records(tmp_path / "e2e.jsonl")
    (level,) = doc["levels"]
    assert doc["interrupted"] and not level["complete"] and list(level["runs"]) == ["without HiCache"]


@pytest.mark.skipif(not (HAS_TIER and HAS_NIXL), reason="needs the manager and NIXL")
def test_e2e_storage_nixl_shows_the_third_tier(tmp_path, capsys):
    """A host pool as small as the device pool: histories come back from files."""
    kept = tmp_path / "kv"
    code, out, err = run_cli(["e2e", "--quick", "--storage-dir", str(kept), "--host-ratio", "1",
                              "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, out + err
    assert "Storage hit rate (%):" in out and "+storage" in out
    (doc,) = records(tmp_path / "e2e.jsonl")
    (level,) = doc["levels"]
    assert "storage tier: NIXL POSIX store at " + str(kept) in doc["caches"]["with HiCache + storage"]
    assert doc["pools"]["storage"] == "nixl" and doc["pools"]["prefetch_policy"] == "wait_complete"
    base, host, tier = (level["runs"][n] for n in e2e.RUN_NAMES)
    assert base["storage_hit_rate_pct"] == 0 and host["storage_hit_rate_pct"] == 0
    assert tier["storage_hit_rate_pct"] > 0 and tier["storage_tokens_fetched"] > 0
    assert tier["verify_failures"] == 0, "pages fetched from files are checked by bytes"
    assert tier["prefill_tokens_avoided"] == \
        tier["device_hit_tokens"] + tier["host_hit_tokens"] + tier["storage_hit_tokens"]
    cache = tier["cache"]
    assert cache["storage_bytes_read"] > 0 and cache["storage_bytes_written"] > 0
    assert cache["storage_corrupt_pages"] == 0 and cache["storage_store_failed_pages"] == 0
    assert not any(k.endswith("_seconds") for k in cache), "wall-clock counters live under 'wall'"
    assert any(f.endswith(".kvpage") for _, _, files in os.walk(kept) for f in files)


def test_e2e_storage_temporary_directory_is_removed(monkeypatch, tmp_path):
    import tempfile

    made = []
    monkeypatch.setattr(e2e, "tempfile", types.SimpleNamespace(
        mkdtemp=lambda **kw: made.append(tempfile.mkdtemp(dir=tmp_path, **kw)) or made[-1]))
    cfg = e2e.quick_config(TINY, gpu=False)
    cfg.workload.clients, cfg.workload.rounds = 2, 2
    cfg.storage = "nixl"
    doc = e2e.run(cfg, CPU)
    assert doc["pools"]["storage_dir"] is None
    if HAS_TIER and HAS_NIXL:
        assert len(made) == 1 and not os.path.exists(made[0])
    other = e2e.quick_config(TINY, gpu=False)
    other.storage, other.workload.seed = "nixl", 1
    a, b = e2e.storage_config(cfg, CPU), e2e.storage_config(other, CPU)
    assert a["namespace"] != b["namespace"], "runs with other KV content share no pages"
    c = e2e.storage_config(cfg, CPU, level=4)
    assert c["namespace"] != a["namespace"], "each concurrency level has its own pages"
    for d in (a, b, c):
        os.rmdir(d["directory"])


# -- kernels: pieces -----------------------------------------------------------------

def test_presets_match_published_geometry():
    assert PRESETS["llama-3.1-8b"].item_bytes == 2048          # issue 3's 2 KiB per token per layer
    assert PRESETS["llama-3.1-8b"].token_layer_bytes == 4096
    assert PRESETS["llama-3.1-70b"].kv_heads_per_rank == 1     # 8 KV heads over tp 8
    assert PRESETS["deepseek-v3"].item_bytes == 1152           # (512 + 64) x bf16
    assert PRESETS["deepseek-v3"].planes == 1
    assert PRESETS["qwen3-0.6b"].layers == 28
    for p in PRESETS.values():
        assert p.source and all(i > 0 and o > 0 for i, o in p.gemm_shapes())


def test_explicit_geometry_overrides_the_preset():
    args = cli.build_parser().parse_args(["kernels", "--preset", "qwen3-0.6b", "--layers", "3",
                                          "--kv-heads", "2", "--head-dim", "64", "--dtype", "fp8"])
    p = options.preset_for(args, PRESETS["llama-3.1-8b"])
    assert (p.layers, p.kv_heads_per_rank, p.head_dim, p.element_size) == (3, 2, 64, 1)
    args = cli.build_parser().parse_args(["kernels", "--mla", "--head-dim", "576"])
    p = options.preset_for(args, PRESETS["llama-3.1-8b"])
    assert p.mla and p.item_bytes == 1152 and p.kv_lora_rank == 512


def test_targets_suite_has_every_target():
    cfg, cases = kernels.targets_suite()
    assert cfg.preset.item_bytes == 2048
    want = {("load", 64, 8192, 2, 95), ("backup", 64, 4096, 2, 95), ("load", 1, 8192, 4, 85),
            ("both", 64, 4096, 2, 90)}
    got = {(c.op, c.page_size, c.tokens, c.sm_budget, c.target_pct) for c in cases
           if c.backend == "cuda" and c.target_pct}
    assert want <= got
    assert any(c.backend == "copy_engine" and c.target_pct == 90 and c.sm_budget is None for c in cases)
    assert any(c.under_load and c.target_gemm_pct == 2 for c in cases)


def _bench(tokens=64, layers=2, page=16):
    cfg = kernels.KernelConfig(preset=PRESETS["llama-3.1-8b"].with_geometry(layers=layers),
                               tokens=tokens, page_sizes=(page,), layouts=("layer_first",),
                               gemm_size=32, warmup=0, reps=2)
    cases = [kernels.Case("load", "layer_first", page, tokens, "reference")]
    return kernels.KernelBench(cfg, CPU, cases)


def test_verify_catches_a_copy_that_did_not_happen():
    bench = _bench()
    mover = movers.ours(bench.pools, "backup", "layer_first", 16, 64, "reference", None,
                        num_warps=None, load_layer=0, side_streams=None)
    movers.poison(mover)
    mover.fn()
    assert movers.verify(mover)
    movers.poison(mover)                          # now skip the copy
    assert not movers.verify(mover)


def test_both_uses_disjoint_slots():
    bench = _bench()
    h0, d0 = bench.pools.indices(16, 64, part=0)
    h1, d1 = bench.pools.indices(16, 64, part=1)
    assert not set(h0.tolist()) & set(h1.tolist()) and not set(d0.tolist()) & set(d1.tolist())
    assert (h0.view(-1, 16).diff(dim=1) == 1).all()    # whole pages


def test_sgl_kernel_baseline_through_a_stand_in(monkeypatch):
    """The sgl_kernel calls, checked against our drop-in of the same interface."""
    from hicache_kernels import sglang

    monkeypatch.setitem(sys.modules, "sgl_kernel", types.ModuleType("sgl_kernel"))
    monkeypatch.setitem(sys.modules, "sgl_kernel.kvcacheio", sglang)
    for preset in (PRESETS["llama-3.1-8b"], PRESETS["deepseek-v3"]):
        cfg = kernels.KernelConfig(preset=preset.with_geometry(layers=2), tokens=32,
                                   warmup=0, reps=1)
        cases = [kernels.Case(op, layout, 8, 32, "sgl_kernel", 2, kind="baseline")
                 for op in ("load", "backup") for layout in ("layer_first", "page_first")]
        bench = kernels.KernelBench(cfg, CPU, cases)
        for case in cases:
            row = bench.run(case)
            assert row["verified"] is True, (preset.name, case.id, row["note"])
            assert row["blocks"] == "2"


def test_under_load_on_cpu_reports_no_overlap():
    bench = _bench()
    row = bench.run(kernels.Case("load", "layer_first", 16, 64, "reference", under_load=True))
    assert row["verified"] and row["gemm_ms_alone"] > 0 and row["overlapped"] is False


def test_overlap_medians_keeps_only_overlapping_spans():
    gemms = [(0, 1), (1, 3), (3, 5), (5, 6)]        # the first and last ran alone
    transfers = [(1, 2), (2, 4), (4, 5)]
    assert kernels.overlap_medians(gemms, transfers) == (2.0, 1.0, True)
    assert kernels.overlap_medians([(0, 1)], [(2, 5)]) == (1.0, 3.0, False)


# -- e2e: pieces ---------------------------------------------------------------------

def test_simulate_respects_rounds_and_parallelism():
    w = e2e.Workload(clients=5, rounds=3, max_parallel=2, seed=3)
    in_flight = []
    records = e2e.simulate(w, rate=50.0, serve=lambda c, r: 0.01, decode_step_s=lambda b: 0.05 / 63)
    assert len(records) == 15
    by_client = {}
    for r in records:
        by_client.setdefault(r["client"], []).append(r)
    for rs in by_client.values():
        assert [r["round"] for r in rs] == [0, 1, 2]
        for prev, nxt in zip(rs, rs[1:]):
            assert nxt["arrival"] >= prev["done"]          # the next round waits for the answer
    for r in records:
        in_flight.append(sum(1 for o in records if o["arrival"] <= r["arrival"] < o["done"]))
        assert r["ttft"] >= r["service"] - 1e-12 and r["service"] > 0
        assert r["latency"] == pytest.approx(r["ttft"] + 63 * r["itl"])
    assert max(in_flight) <= 2
    starts = [r["start"] for r in records]
    assert starts == sorted(starts)                         # one server, arrival order


def test_percentile():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5
    assert percentile(list(range(11)), 90) == 9


def _pool(slots=64, page=8):
    return e2e._device_pool(TINY, slots, page, "cpu")


def test_device_cache_evicts_tails_first_and_never_pinned_pages():
    cache = e2e.DeviceCache(_pool(slots=48, page=8))       # 6 pages
    a = [("a", i) for i in range(3)]
    slots_a, _ = cache.acquire(a, 0, 0)
    cache.release(a, keep=3)
    b = [("b", i) for i in range(2)]
    cache.acquire(b, 0, 0)                                 # pinned while in use
    c = [("c", i) for i in range(2)]
    slots_c, _ = cache.acquire(c, 0, 0)                    # evicts a's tail, not b
    assert cache.match(a)[:2] == (2, 0)
    assert not set(slots_c.tolist()) & set(cache.acquire(a[:2], 2, 0)[0].tolist())
    with pytest.raises(RuntimeError, match="pinned"):
        cache.acquire([("d", i) for i in range(3)], 0, 0)


class _MisplacingCache(e2e.DeviceCache):
    """Hands back device hits in the wrong order: the engine's byte check must notice."""

    name = "misplacing"

    def acquire(self, page_ids, on_device, on_host):
        slots, handle = super().acquire(page_ids, on_device, on_host)
        if on_device >= 2:
            P = self.page_size
            slots = slots.clone()
            slots[:P], slots[P:2 * P] = slots[P:2 * P].clone(), slots[:P].clone()
        return slots, handle


def test_e2e_byte_check_catches_misplaced_pages():
    cfg = e2e.quick_config(TINY, gpu=False)
    cfg.device_fraction = 1.0                              # everything stays: many device hits
    doc = e2e.run(cfg, CPU, tier_factory=_MisplacingCache)
    (level,) = doc["levels"]
    assert level["runs"]["without HiCache"]["verify_failures"] == 0
    assert level["runs"]["with HiCache"]["verify_failures"] > 0


@pytest.mark.skipif(e2e.HiCacheTier.unavailable() is not None,
                    reason="the manager is not in this build")
def test_hicache_tier_loads_evicted_history_bytes_intact():
    pool = _pool(slots=48, page=8)
    fwd = e2e.StandInForward(TINY, pool, max_tokens=48, compute_dtype=torch.float32)
    tier = e2e.HiCacheTier(pool, host_ratio=4.0, host_layout="page_first", write_policy="write_through",
                           backend="reference", sm_budget=None, host_reserve_gb=0)
    try:
        a = [("a", i) for i in range(3)]
        slots, _ = tier.acquire(a, 0, 0)
        fwd.prefill(client=7, slots=slots, first=0, end=24)
        tier.release(a, keep=3)
        tier.mgr.synchronize()
        for name in ("b", "c"):                            # push a off the device
            ids = [(name, i) for i in range(3)]
            s, _ = tier.acquire(ids, 0, 0)
            tier.release(ids, keep=3)
        on_device, on_host, from_storage, _ = tier.match(a)
        assert on_host > 0 and from_storage == 0
        slots, handle = tier.acquire(a, on_device, on_host)
        assert handle is not None
        handle.synchronize()
        assert fwd.check(7, slots, torch.arange(24))
        tier.release(a, keep=3)
    finally:
        tier.close()


def test_nvtx_flag_marks_cases_and_operations(monkeypatch, tmp_path, capsys):
    import contextlib

    import nvtx

    from hicache_kernels import nvtx_ranges

    seen = []
    monkeypatch.setattr(nvtx, "annotate",
                        lambda name, domain: seen.append((domain, name)) or contextlib.nullcontext())
    try:
        code, out, _ = run_cli(["kernels", "--nvtx", "--backend", "reference", "--op", "load",
                                "--page-size", "64", "--layout", "layer_first", "--no-baselines",
                                "--reps", "1", "--warmup", "0", "--out", str(tmp_path)], capsys)
        code2, _, _ = run_cli(["e2e", "--nvtx", "--clients", "2", "--rounds", "2",
                               "--out", str(tmp_path)], capsys)
    finally:
        nvtx_ranges.enable(False)
    assert code == code2 == 0
    names = [n for d, n in seen if d == "hicache"]
    assert len(names) == len(seen)
    for prefix in ("bench.case load layer_first P=64", "bench.ceiling h2d",
                   "layer_first->layer_first L", "bench.e2e.run without HiCache",
                   "bench.e2e.request client=", "bench.e2e.prefill n=", "bench.e2e.layer L0"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_a_case_that_errors_fails_the_run(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(movers, "ours", broken)
    code, out, _ = run_cli(["kernels", "--backend", "reference", "--op", "load", "--page-size", "64",
                            "--layout", "layer_first", "--no-baselines", "--reps", "1", "--warmup", "0",
                            "--out", str(tmp_path)], capsys)
    assert code == 1 and "FAILED" in out and "kernel launch failed" in " ".join(out.split())
