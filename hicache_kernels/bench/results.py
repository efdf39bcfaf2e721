"""Where results go: run metadata, JSONL history, per-run files, baselines to compare.

Every run appends one line to ``<out>/<benchmark>.jsonl`` (the whole result
document, with ``timestamp``, ``tag`` and ``meta``), so earlier runs are never
overwritten; files that are not line-shaped (CSV, PNG) carry the run id in
their names. ``--compare FILE`` reads the last run of the same benchmark from
a JSON or JSONL file.

Example:
    >>> run_id("2025-01-02T03:04:05+00:00", "h200 main")
    '20250102-030405-h200_main'
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import __version__

__all__ = ["UsageError", "check_writable_dir", "run_metadata", "run_id", "append_jsonl",
           "load_baseline", "timestamp"]


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2, nothing written."""


# -- checking a directory before any work ------------------------------------------

def check_writable_dir(flag: str, value: str | os.PathLike) -> Path:
    """Refuse (``UsageError``) a path that cannot be, or become, a writable directory.

    Nothing is left behind: an existing directory is probed with a temporary
    file that is removed at once; a missing one is not created (its nearest
    existing parent is probed instead)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: expected a directory, and this is a file")
    probe = path
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {value}: cannot create a directory under {probe}, which is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".hicache-bench-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == path else f" (its parent {probe})"
        raise UsageError(f"{flag} {value}: cannot write there{where}: {exc.strerror or exc}") from None
    return path


# -- metadata ------------------------------------------------------------------------

def timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def run_id(stamp: str, tag: str | None) -> str:
    """A file-name-safe id for a run: its UTC time, and the tag if any."""
    when = _dt.datetime.fromisoformat(stamp).strftime("%Y%m%d-%H%M%S")
    if not tag:
        return when
    return f"{when}-{re.sub(r'[^A-Za-z0-9._-]+', '_', tag).strip('_')[:40]}"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_sha() -> str:
    """The commit of the source checkout this package runs from, or why not."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists() or shutil.which("git") is None:
        return "not a git checkout"
    sha = _run(["git", "rev-parse", "HEAD"], cwd=source)
    if sha is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source)
    return sha + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvcc() -> str:
    nvcc = None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            nvcc = os.path.join(home, "bin", "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    text = _run([nvcc, "--version"]) or ""
    m = re.search(r"release ([\d.]+), (V[\d.]+)", text)
    return f"{m.group(1)} ({m.group(2)})" if m else "unknown version"


def cuda_library() -> dict:
    """Whether the CUDA library is built, and for which CUDA and architectures."""
    from ..backends import _native

    lib, why = _native.library()
    if lib is None:
        return dict(built=False, why=why)
    info = _native.build_info(lib)
    return dict(built=True, cuda=info.get("cuda", "?"), archs=info.get("archs", "?"),
                path=str(_native.library_path()))


def run_metadata(argv: list[str] | None, tag: str | None) -> dict:
    """What a result depends on besides its config: when, how invoked, which
    build, which machine (the GPU's own details are in ``machine``)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    argv = sys.argv[1:] if argv is None else argv
    return dict(
        timestamp=timestamp(),
        tag=tag or "",
        command=shlex.join(["hicache-bench", *argv]),
        version=__version__,
        git_sha=_git_sha(),
        host=platform.node(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton_version,
        torch_cuda=torch.version.cuda or "none",
        nvcc=_nvcc(),
        cuda_library=cuda_library(),
    )


# -- files ---------------------------------------------------------------------------

def _plain(value):
    """Strict JSON: infinities as the strings "inf"/"-inf", NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def append_jsonl(path: Path, doc: dict) -> Path:
    """Append ``doc`` as one line of strict JSON (the file and its directory are
    created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_plain(doc), default=str, allow_nan=False)
    with path.open("a") as f:
        f.write(line + "\n")
    return path


def load_baseline(flag: str, value: str, benchmark: str) -> dict:
    """The last ``benchmark`` document in a JSON or JSONL file (``UsageError`` if none)."""
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag} {value}: no such file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{flag} {value}: cannot read it: {exc.strerror or exc}") from None
    docs = []
    try:
        whole = json.loads(text)
        docs = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{flag} {value}: line {n} is not JSON ({exc.msg})") from None
    found = [d for d in docs if isinstance(d, dict) and d.get("benchmark") == benchmark]
    if not found:
        raise UsageError(f"{flag} {value}: expected a hicache-bench {benchmark} result, found none")
    return found[-1]
