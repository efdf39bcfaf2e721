"""The CUDA library's host twin (csrc/tests/host_twin.cpp), for tests and
benchmarks on machines without a GPU.

The twin is the library's launch surface built by the host compiler: the same
checks, launch splitting, prepared loop and event records, with the register
kernel's own code run on the CPU (``mode(execute=True)``) or nothing at all
where the driver would launch (``mode(execute=False)``: the launch stubbed).
:func:`install` points the ``cuda`` backend at it for CPU tensors, so the
package's whole launch path (ops, the prepared launches, the backend, ctypes,
the C side) runs on this machine, and :meth:`Twin.log` says what was launched
and recorded, in order.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from hicache_kernels.backends import _native, cuda
from hicache_kernels.manager.device import CudaDevice

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "tests" / "host_twin.cpp"
LAUNCH = 1
RECORD = 2
CPU = torch.device("cpu")


def _digest() -> str:
    digest = hashlib.sha256()
    for path in [SOURCE, *sorted((ROOT / "csrc" / "include").rglob("*.h")),
                 *sorted((ROOT / "csrc" / "src").glob("*.h"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(out_dir: Path | None = None) -> Path:
    """The twin's shared library, built with the host C++ compiler (reused while
    its sources are unchanged)."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler: the host twin cannot be built")
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / f"hicache-twin-{os.getuid()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"libhicache_host_twin_{_digest()}.so"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                        "-fvisibility=hidden", "-I", str(ROOT / "csrc" / "include"),
                        "-I", str(ROOT / "csrc" / "src"), str(SOURCE), "-o", str(tmp)], check=True)
        tmp.rename(path)
    return path


class Twin:
    """The loaded twin: the library the ``cuda`` backend calls once installed."""

    def __init__(self, path: Path):
        self.lib = _native.bind_copy(ctypes.CDLL(str(path)))
        self.lib.hck_twin_mode.argtypes = [ctypes.c_int]
        self.lib.hck_twin_log.restype = ctypes.c_int64
        self.lib.hck_twin_log.argtypes = [ctypes.c_void_p, ctypes.c_int64]

    def mode(self, *, execute: bool = True, log: bool = True) -> None:
        """Whether launches run the kernel's code, and whether they are logged."""
        self.lib.hck_twin_mode(int(execute) | 2 * int(log))

    def log(self) -> list[tuple[int, int, int, int]]:
        """What happened since the last call, in order: ``(LAUNCH, stream, planes,
        bytes per plane)`` per kernel launch, ``(RECORD, stream, event, 0)`` per
        event record."""
        n = self.lib.hck_twin_log(None, 0)
        out = (ctypes.c_int64 * (4 * n))()
        n = min(n, self.lib.hck_twin_log(out, n))
        return [tuple(out[4 * i:4 * i + 4]) for i in range(n)]

    def library_ns(self, launcher, src_indices, dst_indices, reps: int = 100_000) -> float:
        """Nanoseconds per call of ``launcher``'s library call alone, timed in C (set
        ``mode(execute=False)`` first to time the host logic with the launch stubbed)."""
        fn = self.lib.hck_twin_time_prepared
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64]
        ns = fn(launcher.descs_address, launcher.n, src_indices.data_ptr(), dst_indices.data_ptr(),
                src_indices.numel(), reps)
        if ns < 0:
            raise RuntimeError(f"{launcher.what}: {self.lib.hck_last_error().decode()}")
        return ns

    def target(self, plan, kernel, backend) -> cuda.Target:
        """What ``cuda.target`` returns once installed: this library, the CPU as the
        device (its tensors are what the kernel reads), a fake stream's ``raw``."""
        return cuda.Target(self.lib, CPU, -1, _raw_stream)


def _raw_stream(stream) -> int:
    return 0 if stream is None else stream.raw


def install(monkeypatch, twin: Twin) -> Twin:
    """Make ``backend="cuda"`` available on CPU tensors, launching into ``twin``."""
    monkeypatch.setattr(cuda, "available", lambda: (True, "the host twin of libhicache_cuda"))
    monkeypatch.setattr(cuda, "target", twin.target)
    twin.mode()
    twin.log()
    return twin


class FakeStream:
    """A stream for the twin: only its raw handle matters (what the log shows)."""

    def __init__(self, raw: int):
        self.raw = raw


class FakeEvent:
    """An event for the twin: a raw handle (what the log shows), complete at once."""

    def __init__(self, raw: int):
        self.cuda_event = raw
        self.stream = None


class TwinDevice(CudaDevice):
    """:class:`CudaDevice`'s layer-wise launch (every layer's kernel and event record
    in one compiled call) on the CPU, launching into the twin: streams and events
    are fakes with raw handles. Work runs when launched (a synchronous device), so
    every event is complete once recorded. ``is_cuda`` is False: the manager keeps
    its indices in CPU memory, which the twin's kernels read."""

    is_cuda = False
    name = "CUDA device logic on the host twin"

    def __init__(self):
        self._layer_events = []
        self._handles = itertools.count(0x1000)
        self._compute = FakeStream(next(self._handles))

    def stream(self, priority: int = 0):
        return FakeStream(next(self._handles))

    def current_stream(self):
        return self._compute

    def event(self):
        return FakeEvent(next(self._handles))

    def record(self, event, stream) -> None:
        event.stream = stream

    def wait(self, stream, event) -> None:
        pass

    def query(self, event) -> bool:
        return True

    def synchronize(self, event) -> None:
        pass

    def launch(self, stream, work, tag=None) -> None:
        work(stream)

    def priority_range(self) -> tuple[int, int]:
        return (0, -1)
