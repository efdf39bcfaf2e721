"""SGLang plugin: SGLang's HiCache transfers run on hicache-kernels.

Installing hicache-kernels registers :func:`register` in SGLang's
``sglang.srt.plugins`` entry-point group. SGLang's ``load_plugins()`` calls it
early in every SGLang process (launcher, engine, each scheduler rank,
detokenizer), so no process needs patching by hand. It routes every
``sgl_kernel.kvcacheio`` function that :mod:`hicache_kernels.sglang` provides:

- where ``sgl_kernel`` imports (CUDA): one REPLACE hook per function through
  SGLang's ``HookRegistry``; SGLang applies them after its plugins ran and
  rebinds the names its modules imported with ``from sgl_kernel.kvcacheio
  import ...``;
- on a machine without a GPU, where SGLang's host-pool modules import nothing
  from ``sgl_kernel`` and leave those names unbound (their transfers fail with
  ``NameError``): it binds them there, so SGLang's host pools work on CPU
  tensors.

Environment:

- ``HICACHE_SGLANG_PLUGIN=0`` turns the plugin off (so does SGLang's own
  ``SGLANG_PLUGINS`` list without ``hicache_kernels``).
- ``HICACHE_SGLANG_ROUTE_JIT=1`` also answers SGLang's
  ``can_use_hicache_jit_kernel`` and ``can_use_write_back_jit_kernel`` with
  False (REPLACE hooks): ``layer_first`` and ``page_first`` pools with
  ``--hicache-io-backend kernel`` then take the kvcacheio path, that is this
  package, instead of SGLang's JIT kernels.
- ``HICACHE_BACKEND`` picks the backend, as for :mod:`hicache_kernels.sglang`.

Each process logs one INFO line (logger ``hicache_kernels.integrations.sglang_plugin``):
what was routed, the backend and why. Importing this module imports nothing
from SGLang, and :func:`register` does nothing in a process without SGLang.
"""

from __future__ import annotations

import importlib
import logging
import os

__all__ = ["register", "ENTRY_POINT_GROUP", "ENTRY_POINT_NAME"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "hicache_kernels"

KVCACHEIO = "sgl_kernel.kvcacheio"
JIT_MODULE = "sglang.kernels.ops.kvcache.hicache"
JIT_CHECKS = ("can_use_hicache_jit_kernel", "can_use_write_back_jit_kernel")
# SGLang's modules that import kvcacheio names only on CUDA/ROCm/XPU.
HOST_POOL_MODULES = (
    "sglang.srt.mem_cache.pool_host.mha",
    "sglang.srt.mem_cache.pool_host.mla",
    "sglang.srt.mem_cache.pool_host.dsa",
    "sglang.srt.mem_cache.pool_host.mamba",
    "sglang.srt.mem_cache.pool_host.unified",
    "sglang.srt.mem_cache.memory_pool_host",
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_registered = False


def register() -> None:
    """SGLang's entry point: route SGLang's kvcacheio calls (see the module doc).

    Raises ValueError naming a malformed environment variable, before
    anything is changed (SGLang logs it and starts without the plugin).
    """
    global _registered
    enabled = _flag("HICACHE_SGLANG_PLUGIN", True)
    route_jit = _flag("HICACHE_SGLANG_ROUTE_JIT", False)
    if not enabled:
        log.info("hicache-kernels: SGLang plugin off (HICACHE_SGLANG_PLUGIN=%s); SGLang's own "
                 "kvcacheio runs", os.environ["HICACHE_SGLANG_PLUGIN"])
        return
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:  # not inside SGLang: nothing to route
        return
    import torch

    from .. import sglang as dropin

    platform = _platform(torch)
    backend = _backend_reason(platform)
    if _registered:
        return
    if platform not in ("cuda", "cpu"):
        log.info("hicache-kernels: nothing routed: SGLang runs on %s here; hicache-kernels "
                 "moves CUDA and CPU tensors", platform)
        return
    kvcacheio, why = _import_kvcacheio()
    hooked = [name for name in dropin.__all__ if kvcacheio is not None and hasattr(kvcacheio, name)]
    bound = _bind_unbound(dropin) if platform == "cpu" else []
    if not hooked and not bound:
        log.warning("hicache-kernels: nothing routed: %s does not import (%s)", KVCACHEIO, why)
        return
    for name in hooked:
        HookRegistry.register(f"{KVCACHEIO}.{name}", getattr(dropin, name), HookType.REPLACE)
    if route_jit:
        for name in JIT_CHECKS:
            HookRegistry.register(f"{JIT_MODULE}.{name}", _jit_kernel_refused, HookType.REPLACE)
    _registered = True
    how = []
    if hooked:
        how.append(f"{len(hooked)} REPLACE hooks on {KVCACHEIO}")
    if bound:
        how.append(f"{len(bound)} bound in SGLang's host-pool modules, which leave them unbound "
                   "without a GPU")
    jit = ("SGLang's JIT transfer kernels routed here too (HICACHE_SGLANG_ROUTE_JIT=1)" if route_jit
           else "SGLang's JIT transfer kernels kept where they build "
                "(HICACHE_SGLANG_ROUTE_JIT=1 routes them here too)")
    log.info("hicache-kernels: SGLang's kvcacheio calls run on hicache_kernels.sglang (%s); %s; %s",
             "; ".join(how), backend, jit)


def _jit_kernel_refused(*args, **kwargs) -> bool:
    """SGLang's JIT-kernel checks, answered False: use the kvcacheio path."""
    return False


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected 1 or 0 (true/false, on/off), got {os.environ[name]!r}")


def _platform(torch) -> str:
    """``"cuda"``, ``"cpu"`` (no accelerator), or the accelerator SGLang runs on."""
    if torch.version.hip is not None:
        return "rocm"
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "npu", "mps", "musa"):
        device = getattr(torch, name, None)
        if device is not None and device.is_available():
            return name
    return "cpu"


def _import_kvcacheio():
    try:
        return importlib.import_module(KVCACHEIO), ""
    except Exception as e:  # missing, or built for another CUDA/torch
        return None, f"{type(e).__name__}: {e}"


def _bind_unbound(dropin) -> list[str]:
    """Bind each drop-in function in SGLang's host-pool modules that lack it;
    the names bound."""
    bound = set()
    for module_name in HOST_POOL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # another SGLang version
            log.debug("hicache-kernels: %s not bound into: %s", module_name, e)
            continue
        for name in dropin.__all__:
            if not hasattr(module, name):
                setattr(module, name, getattr(dropin, name))
                bound.add(name)
    return sorted(bound)


def _backend_reason(platform: str) -> str:
    """The backend SGLang's calls will take, and why (no GPU is touched)."""
    from .. import backends

    requested = os.environ.get("HICACHE_BACKEND", "auto")
    if requested != "auto":
        try:
            backends.get(requested)
        except ValueError as e:
            raise ValueError(f"HICACHE_BACKEND: {e}") from None
        return f"backend {requested} (HICACHE_BACKEND)"
    if platform != "cpu":
        return ("backend auto: the CUDA kernels where libhicache_cuda is built for the GPU, else "
                "Triton, and the copy engines for long runs (each pool logs its choice at its "
                "first transfer)")
    ok, why = backends.get("triton").available()
    if ok:
        return f"backend auto: triton ({why})"
    return "backend auto: reference (CPU tensors: the torch reference; Triton needs a GPU or TRITON_INTERPRET=1)"
