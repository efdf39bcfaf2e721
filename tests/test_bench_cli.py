"""hicache-bench: the CLI, its files, and the pieces whose logic can be checked on a CPU.

Timings here are CPU numbers and are never asserted; what is asserted is that
the runs complete, write valid files, check bytes, and that the checks can fail.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import types

import pytest
import torch

from hicache_kernels.bench import cli, e2e, kernels, movers
from hicache_kernels.bench.presets import PRESETS, TINY
from hicache_kernels.bench.timing import Clock, percentile

CPU = Clock("cpu")


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().out


# -- the command line -----------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["kernels", "--help"], ["e2e", "--help"]])
def test_help_reads_well(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hicache-bench" in out
    if argv == ["--help"]:
        for word in ("kernels", "e2e", "check", "--quick", "--nvtx", "--out"):
            assert word in out
    if argv[0] == "kernels":
        for flag in ("--preset", "--layers", "--kv-heads", "--head-dim", "--dtype", "--tokens",
                     "--page-size", "--layout", "--backend", "--sm-budget", "--op",
                     "--under-load", "--suite"):
            assert flag in out


def test_bad_flag_values_are_named(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["kernels", "--page-size", "0"])
    assert exc.value.code == 2
    assert "--page-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["kernels", "--layout", "sideways"])
    assert "layer_first" in capsys.readouterr().err


def test_no_subcommand_runs_check_then_both_quick(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "cmd_check", lambda a, c: calls.append(("check", None)) or 0)
    monkeypatch.setattr(cli, "cmd_kernels", lambda a, c: calls.append(("kernels", a)) or 0)
    monkeypatch.setattr(cli, "cmd_e2e", lambda a, c: calls.append(("e2e", a)) or 1)
    assert cli.main(["--out", str(tmp_path)]) == 1          # a failing part fails the run
    assert [name for name, _ in calls] == ["check", "kernels", "e2e"]
    for _, args in calls[1:]:
        assert args.quick and args.out == str(tmp_path)


def test_out_before_the_subcommand_is_kept(tmp_path):
    args = cli.build_parser().parse_args(["--out", str(tmp_path), "kernels"])
    assert args.out == str(tmp_path)
    args = cli.build_parser().parse_args(["kernels", "--out", "x", "--page-size", "1,16", "64"])
    assert args.out == "x" and cli._flat(args.page_size) == (1, 16, 64)


def test_kernels_quick_writes_table_json_csv_png(tmp_path, capsys):
    # the quick sweep, on the reference backend (the Triton interpreter is covered below)
    code, out = run_cli(["kernels", "--quick", "--backend", "reference", "--out", str(tmp_path),
                         "--no-progress"], capsys)
    assert code == 0, out
    assert "hicache-bench kernels" in out and "CPU GB/s" in out and "CPU numbers" in out
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["cpu_only"] is True and doc["machine"]["device"] == "CPU"
    for key in ("torch", "triton", "cuda", "driver", "gpu"):
        assert key in doc["machine"]
    ours = [r for r in doc["rows"] if r["kind"] == "ours"]
    assert {r["op"] for r in ours} == {"load", "backup", "both"}
    assert all(r["verified"] is True and r["gbps"] > 0 for r in ours)
    baselines = {r["backend"]: r for r in doc["rows"] if r["kind"] == "baseline" and r["gbps"]}
    assert {"torch-index", "per-page"} <= set(baselines)
    assert all(r["verified"] for r in baselines.values())
    assert {c["op"] for c in doc["ceilings"]} == {"h2d", "d2h", "both"}
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert rows and rows[0]["machine_torch"] == torch.__version__
    assert (tmp_path / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernels_triton_interpreter_case(tmp_path, capsys):
    if not kernels.available_backends().get("triton"):
        pytest.skip("triton is not usable here (needs TRITON_INTERPRET=1 without a GPU)")
    code, out = run_cli(["kernels", "--backend", "triton", "--op", "load", "--page-size", "64",
                         "--layout", "page_head", "--tokens", "128", "--layers", "2",
                         "--sm-budget", "2", "--no-baselines", "--reps", "1", "--warmup", "0",
                         "--out", str(tmp_path)], capsys)
    assert code == 0, out
    (row,) = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert row["backend"] == "triton" and row["blocks"] == "2" and row["verified"] is True


def test_e2e_quick_writes_table_and_json(tmp_path, capsys):
    code, out = run_cli(["e2e", "--quick", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, out
    assert "hicache-bench e2e" in out and "TTFT p50 (CPU ms)" in out
    doc = json.loads((tmp_path / "e2e.json").read_text())
    base = doc["runs"]["without HiCache"]
    assert doc["cpu_only"] and base["requests"] == 6 * 3
    assert base["host_hit_rate_pct"] == 0 and base["verify_failures"] == 0
    assert base["prefill_tokens_computed"] + base["prefill_tokens_avoided"] == \
        sum(w * (48 + 16) + 48 for w in range(3)) * 6
    if e2e.HiCacheTier.unavailable() is None:     # once the manager is in the build
        tier = doc["runs"]["with HiCache"]
        assert tier["host_hit_rate_pct"] > 0 and tier["verify_failures"] == 0
        assert tier["prefill_tokens_computed"] < base["prefill_tokens_computed"]
        assert "ratio" in doc
    else:
        assert any("not run" in n for n in doc["notes"])


@pytest.mark.skipif(e2e.HiCacheTier.unavailable() is not None,
                    reason="the manager (issue 4) is not in this build yet")
def test_e2e_storage_nixl_shows_the_third_tier(tmp_path, capsys):
    """A host pool as small as the device pool: histories come back from files."""
    kept = tmp_path / "kv"
    code, out = run_cli(["e2e", "--quick", "--storage-dir", str(kept), "--host-ratio", "1",
                         "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, out
    assert "storage hit rate %" in out and "tokens fetched from storage" in out
    doc = json.loads((tmp_path / "e2e.json").read_text())
    assert "storage tier: NIXL POSIX store at " + str(kept) in doc["caches"]["with HiCache"]
    assert doc["pools"]["storage"] == "nixl" and doc["pools"]["prefetch_policy"] == "wait_complete"
    base, tier = doc["runs"]["without HiCache"], doc["runs"]["with HiCache"]
    assert base["storage_hit_rate_pct"] == 0
    assert tier["storage_hit_rate_pct"] > 0 and tier["storage_tokens_fetched"] > 0
    assert tier["verify_failures"] == 0, "pages fetched from files are checked by bytes"
    assert tier["prefill_tokens_avoided"] == \
        tier["device_hit_tokens"] + tier["host_hit_tokens"] + tier["storage_hit_tokens"]
    cache = tier["cache"]
    assert cache["storage_bytes_read"] > 0 and cache["storage_bytes_written"] > 0
    assert cache["storage_corrupt_pages"] == 0 and cache["storage_store_failed_pages"] == 0
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
    assert doc["pools"]["storage_dir"] is None and len(made) == 1 and not os.path.exists(made[0])
    other = e2e.quick_config(TINY, gpu=False)
    other.storage, other.workload.seed = "nixl", 1
    a, b = e2e.storage_config(cfg, CPU), e2e.storage_config(other, CPU)
    assert a["namespace"] != b["namespace"], "runs with other KV content share no pages"


def test_suite_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the message on a machine without a GPU")
    with pytest.raises(SystemExit, match="no GPU"):
        cli.main(["kernels", "--suite", "issue3"])


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
    p = cli._preset(args, PRESETS["llama-3.1-8b"])
    assert (p.layers, p.kv_heads_per_rank, p.head_dim, p.element_size) == (3, 2, 64, 1)
    args = cli.build_parser().parse_args(["kernels", "--mla", "--head-dim", "576"])
    p = cli._preset(args, PRESETS["llama-3.1-8b"])
    assert p.mla and p.item_bytes == 1152 and p.kv_lora_rank == 512


def test_issue3_suite_has_every_target():
    cfg, cases = kernels.issue3_suite()
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
    records = e2e.simulate(w, rate=50.0, serve=lambda c, r: 0.01, decode_s=0.05)
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
    assert doc["runs"]["without HiCache"]["verify_failures"] == 0
    assert doc["runs"]["with HiCache"]["verify_failures"] > 0


@pytest.mark.skipif(e2e.HiCacheTier.unavailable() is not None,
                    reason="the manager (issue 4) is not in this build yet")
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
        code, out = run_cli(["kernels", "--nvtx", "--backend", "reference", "--op", "load",
                             "--page-size", "64", "--layout", "layer_first", "--no-baselines",
                             "--reps", "1", "--warmup", "0", "--out", str(tmp_path)], capsys)
        code2, _ = run_cli(["e2e", "--nvtx", "--clients", "2", "--rounds", "2",
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


def test_unavailable_backends_are_listed_and_errors_fail_the_run(monkeypatch, tmp_path, capsys):
    small = ["--op", "load", "--page-size", "64", "--layout", "layer_first", "--no-baselines",
             "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    code, out = run_cli(["kernels", "--backend", "cuda", "copy_engine", *small], capsys)
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    if not torch.cuda.is_available():
        assert code == 0 and all(r["note"].startswith("not available") for r in rows)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(movers, "ours", broken)
    code, out = run_cli(["kernels", "--backend", "reference", *small], capsys)
    assert code == 1 and "FAILED" in out and "kernel launch failed" in out
