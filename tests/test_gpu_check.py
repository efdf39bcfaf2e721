"""bench/gpu_check.sh, run as a dry run: the same script with every step's
command stubbed, checking what a device call gets back ($OUT: at most 8 files,
at most 2 folders down, plain names, a summary with every step's exit code and
seconds) and that one deadline bounds the whole run (a step that is too slow is
cut at what is left, the later ones get what remains)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
CORE_STEPS = ["machine", "install", "wheels", "smoke", "cuda", "triton", "manager", "peers", "suite",
              "blocks", "sanitizer"]

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="the GPU check needs bash and coreutils' timeout")


def dry_run(out: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": sys.executable, "HOME": str(out.parent),
                **env}
    start = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - start


def check_contract(out: Path) -> dict:
    """The device tool's rules for what comes back, and the summary's content."""
    entries = [p for p in out.rglob("*")]
    files = [p for p in entries if p.is_file()]
    assert 0 < len(files) <= 8, files
    for p in entries:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, f"{rel}: more than 2 folders down"
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    assert (out / "summary.txt").is_file() and (out / "logs.tar.gz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    text = (out / "summary.txt").read_text()
    for s in summary["steps"]:
        assert isinstance(s["seconds"], int) and s["exit"] != "", s
        assert re.search(rf"^{s['name']}\s+{s['exit']}\s+{s['seconds']}\s", text, re.M), s["name"]
    assert "contract: " in text and text.rstrip().endswith(": ok")
    return summary


def test_a_dry_run_returns_the_whole_picture_in_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    done, seconds = dry_run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = check_contract(out)
    assert summary["dry_run"] is True and summary["deadline_s"] == 540 and summary["failed"] == 0
    assert [s["name"] for s in summary["steps"]] == CORE_STEPS
    by_name = {s["name"]: s for s in summary["steps"]}
    assert by_name["cuda"]["exit"] == "0" and by_name["cuda"]["limit"] == 120
    if not (ROOT / ".whl").is_dir():
        assert by_name["wheels"]["exit"] == "skip" and "no .whl/" in by_name["wheels"]["note"]
    if not shutil.which("compute-sanitizer", path="/usr/bin:/bin:/usr/local/cuda/bin"):
        assert by_name["sanitizer"]["exit"] == "skip"
        assert "compute-sanitizer not found" in by_name["sanitizer"]["note"]
    assert sorted(p.name for p in out.iterdir()) == [
        "blocks.csv", "kernels.csv", "kernels.json", "kernels.png", "logs.tar.gz", "summary.json",
        "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    for step in CORE_STEPS:
        if by_name[step]["exit"] != "skip":
            assert f"./logs/{step}.log" in names, step
    assert "./logs/cuda.xml" in names and "./suite/kernels-dry.json" in names
    text = (out / "summary.txt").read_text()
    assert "smoke on cuda (dry run)" in text, "the smoke table is in the summary"
    assert "dry run: suite would run: bash -c" in done.stdout
    assert seconds < 60


def test_the_deadline_cuts_a_slow_step_and_bounds_the_run(tmp_path):
    out = tmp_path / "out"
    done, seconds = dry_run(out, GPU_CHECK_DEADLINE="20", GPU_CHECK_PACK_RESERVE="2",
                            GPU_CHECK_FAKE_SLOW="cuda:100")
    assert done.returncode == 1, "a step cut by the deadline is a failure"
    assert seconds <= 20 + 3, f"the run took {seconds:.1f}s of a 20s deadline"
    summary = check_contract(out)
    by_name = {s["name"]: s for s in summary["steps"]}
    cuda = by_name["cuda"]
    assert cuda["exit"] == "124" and cuda["note"] == "cut at its limit"
    assert 3 <= cuda["seconds"] <= cuda["limit"] + 2 < 20
    assert summary["failed"] == 1 and summary["deadline_s"] == 20
    # every step is accounted for, run in what was left or skipped with the reason
    assert [s["name"] for s in summary["steps"]] == CORE_STEPS
    for s in summary["steps"]:
        assert s["exit"] in ("0", "124", "skip"), s
        if s["exit"] == "skip" and s["name"] not in ("wheels", "sanitizer"):
            assert s["note"] == "skipped: no time left before the deadline"
    assert sum(s["seconds"] for s in summary["steps"] if "background" not in s["note"]) <= 20


def test_whatever_else_is_in_out_goes_into_the_archive(tmp_path):
    out = tmp_path / "out"
    deep = out / "old run" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x y.txt").write_text("from an earlier run")
    for i in range(9):
        (out / f"stale{i}.log").write_text("stale")
    done, _ = dry_run(out)
    assert done.returncode == 0, done.stdout[-3000:]
    check_contract(out)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "./found-in-out/old run/a/b/c/x y.txt" in names and "./found-in-out/stale8.log" in names


def test_an_unknown_argument_is_refused(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and "usage: bash bench/gpu_check.sh" in done.stderr
    assert not (tmp_path / "out").exists(), "nothing is written"


def _smoke_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "bench" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_step_names_a_backend_that_moves_wrong_bytes(monkeypatch, capsys, tmp_path):
    """The smoke table runs every available backend against the reference; one that
    writes a wrong byte, and one that raises, are both reported and fail the step."""
    smoke = _smoke_module()
    real = smoke.transfer

    def transfer(src, dst, s, d, *, backend, **kw):
        if backend == "raises":
            raise RuntimeError("launch failed")
        real(src, dst, s, d, backend="reference", **kw)
        if backend == "broken":
            dst.tensors()[0].view(-1).view(torch.uint8)[0] ^= 1

    monkeypatch.setattr(smoke, "transfer", transfer)
    monkeypatch.setattr(smoke.backends, "status", lambda: {
        "good": (True, "stands in"), "broken": (True, "stands in"), "raises": (True, "stands in"),
        "absent": (False, "not built here"), "reference": (True, "reference")})
    assert smoke.main(["--json", str(tmp_path / "smoke.json")]) == 1
    text = capsys.readouterr().out
    assert re.search(r"^good\s+yes\s+ok\s+ok", text, re.M)
    assert re.search(r"^broken\s+yes\s+\S+\s+\S+", text, re.M) and "WRONG BYTES: broken, raises" in text
    assert re.search(r"^raises\s+yes\s+WRONG\s+WRONG\s+-\s+error: RuntimeError: launch failed", text, re.M)
    assert re.search(r"^absent\s+no\s+-\s+-\s+-\s+not built here", text, re.M)
    rows = {r["backend"]: r for r in json.loads((tmp_path / "smoke.json").read_text())["rows"]}
    assert rows["good"]["load_ok"] and rows["good"]["backup_ok"]
    assert not (rows["broken"]["load_ok"] and rows["broken"]["backup_ok"])


def test_the_block_shape_step_merges_every_run_into_one_csv(tmp_path):
    """``--blocks`` runs hicache-bench once per block shape and merges their rows
    (JSON, or JSONL as newer bench versions append) into blocks.csv."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if args[:2] != ["-m", "hicache_kernels.bench"]:
    os.execv({sys.executable!r}, [{sys.executable!r}, *args])
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
row = dict(op="load", backend=args[args.index("--backend") + 1], sm_budget=2, blocks="2", gbps=40.5,
           gbps_under_load=35.25, gemm_slowdown_pct=3.5, verified=True,
           note=os.environ.get("HICACHE_BULK_SMEM", "-"))
doc = json.dumps(dict(benchmark="kernels", rows=[row, dict(row, sm_budget=8)]))
if "cuda" in str(out):
    (out / "kernels.jsonl").write_text(doc + "\\n")
else:
    (out / "kernels.json").write_text(doc)
""")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(["bash", str(SCRIPT), "--blocks"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "WORK": str(work)}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((work / "blocks.csv").open()))
    assert [(r["shape"], r["sm_budget"]) for r in rows] == [
        (shape, budget) for shape in ("bulk-smem0", "bulk-smem65536", "cuda-8warps")
        for budget in ("2", "8")]
    assert {r["note"] for r in rows if r["shape"].startswith("bulk")} == {"0", "65536"}
    assert all(r["gbps_under_load"] == "35.25" and r["gemm_slowdown_pct"] == "3.5" for r in rows)
    assert "blocks: 6 rows" in done.stdout
