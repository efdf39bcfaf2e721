"""Backends: one module per way of moving bytes, the same semantics each.

Every backend module has ``name``, ``available() -> (bool, reason)`` and
``run(plan, src_indices, dst_indices, *, sm_budget, num_warps, stream)``.
``choose`` picks one for ``backend="auto"`` and says why.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from ..plan import TransferPlan

__all__ = ["NAMES", "get", "status", "choose"]

log = logging.getLogger("hicache_kernels")

# name -> module; on a GPU "auto" takes a kernel (cuda, else triton) and the copy
# engines for long runs (see auto.py); cuda_bulk is only taken when asked for
_MODULES = {
    "cuda": ".cuda",
    "triton": ".triton_kernels",
    "copy_engine": ".copy_engine",
    "cuda_bulk": ".cuda_bulk",
    "reference": ".reference",
}
NAMES = tuple(_MODULES)


def get(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"backend: expected 'auto' or one of {', '.join(NAMES)}, got {name!r}")
    return importlib.import_module(_MODULES[name], __name__)


def status() -> dict[str, tuple[bool, str]]:
    """Each backend's availability on this machine, with the reason."""
    return {n: get(n).available() for n in NAMES}


_logged: set[tuple[str, str]] = set()


def choose(plan: TransferPlan, requested: str = "auto") -> tuple[ModuleType, str]:
    """The backend module for ``plan`` and a one-line reason."""
    if requested != "auto":
        module = get(requested)
        ok, why = module.available()
        if not ok:
            raise RuntimeError(f"backend: {requested!r} is not available here: {why}")
        return module, f"asked for {requested}"
    if plan.device.type == "cuda":
        module, reason = _choose_on_gpu(plan)
    else:
        triton_ok, _ = get("triton").available()
        if triton_ok:
            module, reason = get("triton"), "CPU tensors with TRITON_INTERPRET=1: Triton interpreter"
        else:
            module, reason = get("reference"), "CPU tensors: torch reference (kernels need a GPU)"
    key = (module.name, reason)
    if key not in _logged:
        _logged.add(key)
        log.info("backend auto -> %s: %s", module.name, reason)
    return module, reason


def _choose_on_gpu(plan: TransferPlan) -> tuple[ModuleType, str]:
    from .auto import choose_on_gpu

    return choose_on_gpu(plan, get)
