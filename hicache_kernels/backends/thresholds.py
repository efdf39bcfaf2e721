"""The numbers ``backend="auto"`` and the copy engine go by, and the one-time
calibration that measures them on the running GPU.

Built-in defaults come from measurements on an H200: copy engines
reach 93% of the host link on 128 KiB runs spread over 4 streams and use no
SMs, while a transfer kernel takes SMs from the forward pass; below that run
size a kernel wins. :func:`calibrate` measures both on this GPU and stores the
result in ``$HICACHE_CACHE_DIR/thresholds.json`` (default
``~/.cache/hicache_kernels``), keyed by GPU name; :func:`current` reads it.

Example:
    >>> from hicache_kernels.backends import thresholds
    >>> thresholds.calibrate()           # once per machine, on its GPU (~10 s)
    >>> thresholds.current().copy_engine_min_run_bytes
    262144
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Thresholds", "current", "cache_file", "save", "calibrate", "choose_min_run_bytes"]

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Thresholds:
    """Tunables of the copy-engine path and of ``backend="auto"``."""

    # auto sends a call to the copy engines when its merged runs average at least
    # this many bytes: from 128 KiB, 4 streams of batched copies reach 93% of the link
    copy_engine_min_run_bytes: int = 128 * KiB
    # helper streams a large batch spreads over: 128 KiB runs went 40.8 -> 50.7 GB/s from 1 to 4
    copy_engine_streams: int = 4
    # a further helper stream only for each this many bytes: small batches gain nothing from more
    bytes_per_stream: int = 4 * MiB
    # descriptors per cudaMemcpyBatchAsync call: ~0.5 us of CPU each, so a call stays under ~1 ms
    max_descriptors_per_call: int = 2048
    # ask the driver to keep the copies off the SMs (CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE)
    prefer_overlap: bool = True
    source: str = "built-in defaults (measured on an H200)"

    def replace(self, **changes) -> "Thresholds":
        return dataclasses.replace(self, **changes)


def cache_file() -> Path:
    root = os.environ.get("HICACHE_CACHE_DIR")
    if root:
        return Path(root) / "thresholds.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "hicache_kernels" / "thresholds.json"


def _read() -> dict:
    path = cache_file()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable thresholds ({exc}); delete it or run calibrate() again") from None


_CURRENT: dict[str, Thresholds] = {}


def _device_name(device: torch.device | int | str | None) -> str:
    if isinstance(device, str) and not device.startswith("cuda"):
        return device  # a GPU name, as the cache file keys it
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"


def current(device: torch.device | int | str | None = None) -> Thresholds:
    """The thresholds for ``device`` (a CUDA device or a GPU name): calibrated
    ones from the cache file if present, else the built-in defaults."""
    name = _device_name(device)
    if name not in _CURRENT:
        entry = _read().get(name)
        if entry:
            fields = {f.name for f in dataclasses.fields(Thresholds)}
            _CURRENT[name] = Thresholds(**{k: v for k, v in entry.items() if k in fields})
        else:
            _CURRENT[name] = Thresholds()
    return _CURRENT[name]


def save(values: Thresholds, device: torch.device | int | str | None = None,
         measured: dict | None = None) -> Path:
    """Store ``values`` for ``device`` (or a GPU name) in the cache file; return its path."""
    name = _device_name(device)
    data = _read()
    entry = dataclasses.asdict(values)
    if measured is not None:
        entry["measured"] = measured
    data[name] = entry
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    _CURRENT[name] = values
    return path


def choose_min_run_bytes(measured: dict[int, tuple[float, float]], *, ratio: float = 0.95) -> int:
    """The smallest run size from which the copy engines keep at least ``ratio``
    of the kernel's GB/s at every larger size measured (``measured``: run bytes
    -> (copy-engine GB/s, kernel GB/s)); never, when they do not."""
    sizes = sorted(measured)
    best = 1 << 62
    for size in reversed(sizes):
        ce, kernel = measured[size]
        if ce < ratio * kernel:
            break
        best = size
    return best


Measure = Callable[[int, str], float]


def calibrate(device: torch.device | int | None = None, *, save_result: bool = True,
              run_sizes: tuple[int, ...] = (16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB,
                                            512 * KiB, 2 * MiB),
              ratio: float = 0.95, measure: Measure | None = None,
              kernel: str | None = None) -> Thresholds:
    """Measure copy engines against the transfer kernel on this GPU and keep
    the run size from which the copy engines (0 SMs) are worth taking.

    Args:
        run_sizes: contiguous run sizes to try (bytes).
        ratio: the share of the kernel's GB/s the copy engines must keep; below
            1 because they leave the SMs to the model.
        measure: ``measure(run_bytes, backend) -> GB/s``; default: a host ->
            device load of 64 MiB in runs of that size, median of 10 (CUDA events).
        kernel: the kernel backend to compare with (default: cuda, else triton).
    """
    from . import get

    if kernel is None:
        kernel = "cuda" if get("cuda").available()[0] else "triton"
    if measure is None:
        if not torch.cuda.is_available():
            raise RuntimeError("calibrate: needs a CUDA device (or pass measure=)")
        measure = _gpu_measure(device)
    measured = {size: (measure(size, "copy_engine"), measure(size, kernel)) for size in run_sizes}
    result = current(device).replace(
        copy_engine_min_run_bytes=choose_min_run_bytes(measured, ratio=ratio),
        source=f"calibrated against {kernel} (copy engines kept >= {ratio:.0%})",
    )
    if save_result:
        save(result, device, measured={str(k): list(v) for k, v in measured.items()})
    return result


def _gpu_measure(device, total_bytes: int = 64 * MiB, repeats: int = 10) -> Measure:
    from ..buffers import KVBuffer
    from ..layouts import KVLayout
    from ..ops import Transfer

    dev = torch.device("cuda", torch.cuda.current_device() if device is None else torch.device(device).index)
    item = 2 * KiB  # one token of one layer of Llama-3.1-8B
    slots = total_bytes // item
    lay = KVLayout("layer_first", num_layers=1, num_slots=slots, head_num=1, head_dim=item,
                   dtype=torch.uint8, mla=True)
    host = KVBuffer.allocate(lay, pin_memory=True)
    pool = KVBuffer.allocate(lay, device=dev)
    gen = torch.Generator().manual_seed(0)

    def measure(run_bytes: int, backend: str) -> float:
        per_run = max(1, run_bytes // item)
        runs = slots // per_run
        order_src = torch.randperm(runs, generator=gen)
        order_dst = torch.randperm(runs, generator=gen)
        offs = torch.arange(per_run)
        src = (order_src[:, None] * per_run + offs).reshape(-1)
        dst = (order_dst[:, None] * per_run + offs).reshape(-1)
        if backend != "copy_engine":
            src, dst = src.to(dev), dst.to(dev)
        load = Transfer(host, pool, backend=backend)  # the kernel's default launch
        load(src, dst)  # warm-up
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            load(src, dst)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return src.numel() * item / statistics.median(times) / 1e9

    return measure
