"""How ``backend="auto"`` chooses on a GPU: a kernel for small scattered
items, the copy engines for long runs.

Per plan: the kernel is the CUDA backend if it is available, else Triton. If
the copy engines are available too, and the two layouts allow runs at least
``copy_engine_min_run_bytes`` long (see :func:`longest_run_bytes`), the plan
gets an :class:`AutoDispatch` that decides per call: with indices on the host
it merges them into runs and sends the call to the copy engines when the runs
average at least that many bytes (0 SMs taken from the model); otherwise, and
always for indices already on the GPU, the kernel runs. The threshold is a
built-in default until :func:`hicache_kernels.backends.thresholds.calibrate`
measures it on the running GPU.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType

import torch

from ..plan import PlaneSet, TransferPlan, indices_to
from . import copy_engine, thresholds

__all__ = ["choose_on_gpu", "longest_run_bytes", "AutoDispatch"]

UNBOUNDED = sys.maxsize


def _side_run_bytes(side: PlaneSet, chunk_bytes: int, n_chunks: int, item_bytes: int) -> int:
    """Longest run of consecutive slots contiguous in one side's memory."""
    a = side.addressing
    if n_chunks > 1:
        return chunk_bytes  # heads of an item are apart on some side: runs are single heads
    if a.page_size == 1:
        return UNBOUNDED if a.page_stride == item_bytes else item_bytes
    if a.slot_stride != item_bytes:
        return item_bytes
    return UNBOUNDED if a.page_stride == a.page_size * item_bytes else a.page_size * item_bytes


def longest_run_bytes(plan: TransferPlan) -> int:
    """Bytes of the longest run the two layouts allow (``UNBOUNDED`` when consecutive
    slots stay contiguous on both sides forever)."""
    n_chunks, chunk_bytes, _, _ = plan.chunks()
    return min(_side_run_bytes(side, chunk_bytes, n_chunks, plan.item_bytes)
               for side in (plan.src, plan.dst))


class AutoDispatch:
    """A backend-like object that picks the copy engines or ``kernel`` per call."""

    name = "auto"
    host_indices = True  # the copy engines need them there; the kernel's are moved per call

    def __init__(self, kernel: ModuleType, min_run_bytes: int):
        self.kernel = kernel
        self.min_run_bytes = min_run_bytes
        self.last_choice: str | None = None  # which backend the last call ran (for tests, benchmarks)

    def available(self) -> tuple[bool, str]:
        return self.kernel.available()

    def run(self, plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor, *,
            sm_budget: int | None = None, num_warps: int | None = None,
            stream: "torch.cuda.Stream | None" = None) -> None:
        if src_indices.device.type == "cpu" and dst_indices.device.type == "cpu":
            runs = copy_engine.merge_runs(plan, src_indices, dst_indices)
            if len(runs) and runs.mean_bytes >= self.min_run_bytes:
                self.last_choice = copy_engine.name
                copy_engine.issue(plan, runs, stream=stream)
                return
        self.last_choice = self.kernel.name
        device = plan.device
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            src_indices = indices_to(src_indices, device, "src_indices")
            dst_indices = indices_to(dst_indices, device, "dst_indices")
        self.kernel.run(plan, src_indices, dst_indices, sm_budget=sm_budget, num_warps=num_warps,
                        stream=stream)


    def prepare(self, plan: TransferPlan, *, sm_budget: int | None = None,
                num_warps: int | None = None):
        """The kernel's prepared launch, for calls with device indices (which
        always go to the kernel); None when the kernel has none."""
        prepare = getattr(self.kernel, "prepare", None)
        if prepare is None:
            return None
        launcher = prepare(plan, sm_budget=sm_budget, num_warps=num_warps)
        if launcher is not None:
            launcher.on_launch = self._kernel_ran
        return launcher

    def _kernel_ran(self) -> None:
        self.last_choice = self.kernel.name


def choose_on_gpu(plan: TransferPlan, get) -> tuple[object, str]:
    """``(backend, reason)`` for a plan with a CUDA side; ``get`` maps names to modules."""
    skipped = []
    kernel = None
    for name in ("cuda", "triton"):
        ok, why = get(name).available()
        if ok:
            kernel = get(name)
            break
        skipped.append(f"{name} unavailable: {why}")
    note = f" ({'; '.join(skipped)})" if skipped else ""
    ce_ok, ce_why = copy_engine.available()
    if kernel is None:
        if ce_ok:
            return copy_engine, f"copy engines on {plan.device}: no kernel backend{note}"
        return get("reference"), "no kernel backend available: " + "; ".join(skipped + [f"copy_engine: {ce_why}"])
    if not ce_ok:
        return kernel, f"{kernel.name} kernel on {plan.device}{note}"
    th = thresholds.current(plan.device)
    longest = longest_run_bytes(plan)
    if longest < th.copy_engine_min_run_bytes:
        return kernel, (f"{kernel.name} kernel on {plan.device}: runs here are at most {longest} bytes, "
                        f"copy engines pay off from {th.copy_engine_min_run_bytes}{note}")
    return AutoDispatch(kernel, th.copy_engine_min_run_bytes), (
        f"per call on {plan.device}: copy engines when host indices merge into runs averaging "
        f">= {th.copy_engine_min_run_bytes} bytes, else the {kernel.name} kernel{note}")
