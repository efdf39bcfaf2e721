"""Timing on one device: CUDA events on a GPU, the host clock on a CPU.

:class:`Clock` hides the difference, so every benchmark runs the same code on
both: on a GPU, work is enqueued on streams and timed by CUDA events (median of
many runs after a warm-up, no sync per run); on a CPU, "streams" are the
calling thread and events read ``time.perf_counter`` when recorded.

Example:
    >>> clock = Clock(torch.device("cpu"))
    >>> times = clock.time_ms(lambda: torch.ones(1000).sum(), warmup=1, reps=5)
    >>> len(times)
    5
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import shutil
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

__all__ = ["Clock", "HostEvent", "machine_info", "median", "percentile", "pinned_threads"]


class HostEvent:
    """A stand-in for ``torch.cuda.Event`` on a CPU: the host time when recorded."""

    def __init__(self) -> None:
        self.t: float | None = None

    def record(self, stream=None) -> None:
        del stream
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to ``end`` (like ``torch.cuda.Event``)."""
        if self.t is None or end.t is None:
            raise RuntimeError("elapsed_time: both events must be recorded first")
        return (end.t - self.t) * 1e3


class Clock:
    """Streams, events and timing loops for one device.

    Args:
        device: ``cuda:N`` or ``cpu``.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    # -- streams and events ---------------------------------------------------
    def event(self):
        return torch.cuda.Event(enable_timing=True) if self.gpu else HostEvent()

    def stream(self, *, high_priority: bool = False):
        """A new stream (None on a CPU). High priority is how a transfer that a
        forward pass waits on gets ahead of queued compute."""
        if not self.gpu:
            return None
        # -1 is above the default 0 on every CUDA device (lower number, higher priority)
        return torch.cuda.Stream(self.device, priority=-1 if high_priority else 0)

    def current_stream(self):
        return torch.cuda.current_stream(self.device) if self.gpu else None

    def on(self, stream):
        """Make ``stream`` current for the block (nothing on a CPU)."""
        if stream is None or not self.gpu:
            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    def wait(self, waiter, producer) -> None:
        """Make stream ``waiter`` wait for all work queued so far on ``producer``."""
        if self.gpu and waiter is not None and producer is not None and waiter != producer:
            waiter.wait_stream(producer)

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def sync_stream(self) -> None:
        """Wait for the current stream only (other streams keep running)."""
        if self.gpu:
            torch.cuda.current_stream(self.device).synchronize()

    def hold(self, ms: float = 20.0) -> None:
        """Keep the current stream busy for about ``ms`` so work queued after it
        on other streams starts together. A no-op on CPU."""
        if self.gpu and hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(int(ms * 1.5e6))  # cycles at ~1.5 GHz; only roughly ms

    # -- running and timing ---------------------------------------------------
    def fork_join(self, *fns: Callable[[], None], streams: Sequence | None = None) -> None:
        """Run each ``fn`` on its own stream at once; the current stream then waits
        for all of them (on a CPU: one after the other)."""
        if not self.gpu:
            for fn in fns:
                fn()
            return
        cur = self.current_stream()
        streams = list(streams) if streams is not None else [self.stream() for _ in fns]
        for fn, s in zip(fns, streams):
            self.wait(s, cur)
            with self.on(s):
                fn()
        for s in streams:
            self.wait(cur, s)

    def time_ms(self, fn: Callable[[], None], *, warmup: int, reps: int) -> list[float]:
        """Milliseconds of each of ``reps`` runs of ``fn`` after ``warmup`` runs,
        each bracketed by events on the current stream; one sync at the end."""
        if reps < 1:
            raise ValueError(f"reps: expected at least 1, got {reps}")
        for _ in range(warmup):
            fn()
        self.sync()
        pairs = self.bracketed(fn, reps)
        self.sync()
        return [s.elapsed_time(e) for s, e in pairs]

    def bracketed(self, fn: Callable[[], None], reps: int) -> list[tuple]:
        """Queue ``reps`` runs of ``fn`` on the current stream, each between two
        recorded events; returns the event pairs (read them after a sync)."""
        pairs = []
        for _ in range(reps):
            start, end = self.event(), self.event()
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        return pairs

    def label(self) -> str:
        return str(self.device) if self.gpu else "CPU"


@contextlib.contextmanager
def pinned_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (None: leave them alone).

    On a CPU a small copy with every core's thread takes milliseconds when the
    cores are busy; with one it takes microseconds. Timing everything with one
    thread keeps cases and ceilings comparable."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between samples; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        pass
    return "unknown"


def machine_info(clock: Clock) -> dict:
    """The card, its SM count and the versions a result depends on."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "device": clock.label(),
        "cpu_only": not clock.gpu,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
    }
    if clock.gpu:
        props = torch.cuda.get_device_properties(clock.device)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
        )
    else:
        info.update(gpu="none", sm_count=0, driver="none")
    return info
