"""From parsed flags to a run's configuration, every flag checked first.

Each check runs against the configuration that will actually run (a CPU run
that cuts a preset to 4 layers checks ``--load-layer`` against 4), before any
pool is allocated or file written, and fails with :class:`UsageError`: one
line that names the flag and says what was expected.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from .. import backends
from ..layouts import LayoutKind
from . import e2e, kernels, movers
from .presets import DTYPES, PRESETS, TINY, ModelPreset
from .results import UsageError, check_writable_dir
from .timing import Clock

__all__ = ["clock_for", "preset_for", "kernels_config", "e2e_config", "UsageError"]

# Kept free on the host when checking that pools fit (the manager keeps 4 GiB by default).
HOST_RESERVE_GB = 4.0


def clock_for(args) -> Clock:
    """The device a run measures on (``--device``)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here "
                         "(torch.cuda.is_available() is False)")
    gpu = torch.cuda.is_available() and args.device != "cpu"
    return Clock("cuda" if gpu else "cpu")


def preset_for(args, default: ModelPreset) -> ModelPreset:
    """``--preset`` (or ``default``) with the explicit geometry flags applied."""
    base = PRESETS[args.preset] if args.preset else default
    mla = args.mla or base.mla
    if mla and args.kv_heads is not None:
        why = f"{base.name} uses MLA" if base.mla else "with --mla"
        raise UsageError(f"--kv-heads: {why}, every token keeps one latent vector, not KV heads; "
                         "drop --kv-heads")
    tp = args.tp if args.tp is not None else base.tp
    kv = args.kv_heads if args.kv_heads is not None else base.kv_heads
    if not mla and kv % tp and tp % kv:
        raise UsageError(f"--tp {tp}: the {kv} KV heads cannot be split evenly over {tp} ranks "
                         f"(expected a divisor or a multiple of {kv})")
    changes = {}
    for flag in ("layers", "kv_heads", "head_dim", "tp"):
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
    if args.dtype:
        changes["dtype"] = DTYPES[args.dtype]
    head_dim = changes.get("head_dim", base.head_dim)
    if args.mla and not base.mla:
        rope = min(64, head_dim // 2)
        changes.update(mla=True, kv_heads=1, kv_lora_rank=head_dim - rope,
                       q_lora_rank=base.q_lora_rank or base.hidden // 4,
                       v_head_dim=base.v_head_dim or 128)
    elif base.mla and "head_dim" in changes:
        if head_dim <= 64:
            raise UsageError(f"--head-dim {head_dim}: {base.name}'s latent is kv_lora_rank + 64 "
                             "rope dims; expected more than 64")
        changes["kv_lora_rank"] = head_dim - 64
    return base.with_geometry(**changes) if changes else base


def _given(args, *flags: str) -> list[str]:
    """The flags among ``flags`` (dest names) that were given on the command line."""
    out = []
    for dest in flags:
        value = getattr(args, dest, None)
        if value not in (None, False, [], ()):
            out.append("--" + dest.replace("_", "-"))
    return out


def _available(name: str) -> tuple[bool, str]:
    return backends.status()[name]


def _check_backend(flag: str, name: str) -> None:
    ok, why = _available(name)
    if not ok:
        raise UsageError(f"{flag} {name}: not available here: {why}")


def _memory(flag: str, what: str, host_bytes: int, device_bytes: int, clock: Clock) -> None:
    """Refuse a run whose pools cannot fit."""
    from ..manager.host_pool import available_memory_bytes

    gib = 2**30
    if clock.gpu:
        free, _ = torch.cuda.mem_get_info(clock.device)
        if device_bytes > 0.9 * free:
            raise UsageError(f"{flag}: {what} need {device_bytes / gib:.1f} GiB of GPU memory, "
                             f"{free / gib:.1f} GiB is free")
    else:
        host_bytes += device_bytes
    available = available_memory_bytes()
    if host_bytes + HOST_RESERVE_GB * gib > available:
        raise UsageError(f"{flag}: {what} need {host_bytes / gib:.1f} GiB of host memory, "
                         f"{available / gib:.1f} GiB is available and {HOST_RESERVE_GB:g} GiB is "
                         "kept free")


# -- kernels -------------------------------------------------------------------------

_SWEEP_FLAGS = ("preset", "layers", "kv_heads", "head_dim", "dtype", "mla", "tp", "tokens",
                "page_size", "layout", "backend", "sm_budget", "op", "under_load", "no_baselines",
                "load_layer", "num_warps", "quick")


def kernels_config(args, clock: Clock) -> tuple[kernels.KernelConfig, list | None]:
    """The kernels run the flags ask for: ``(config, cases or None for the sweep)``."""
    if args.suite:
        if not clock.gpu:
            raise UsageError(f"--suite {args.suite}: measures GPU targets; there is no GPU here")
        extra = _given(args, *_SWEEP_FLAGS)
        if extra:
            raise UsageError(f"--suite {args.suite} runs a fixed set of cases; drop {extra[0]}")
        cfg, cases = kernels.targets_suite()
        cfg.warmup = args.warmup if args.warmup is not None else cfg.warmup
        cfg.reps = args.reps or cfg.reps
        cfg.seed = args.seed
        cfg.gemm_size = args.gemm_size or cfg.gemm_size
        return cfg, cases
    preset = preset_for(args, PRESETS["llama-3.1-8b"])
    cfg = (kernels.quick_config(preset, clock.gpu) if args.quick or not clock.gpu
           else kernels.KernelConfig(preset=preset))
    if args.layers is not None and not clock.gpu:   # asked for: not cut to the CPU's 4
        cfg.preset = replace(cfg.preset, layers=args.layers)
        cfg.notes = [n for n in cfg.notes if "cut to" not in n]
    if not clock.gpu and not args.quick:
        cfg.notes.append("no GPU: the tiny CPU version (what --quick runs)")
    updates = dict(tokens=args.tokens, page_sizes=_flat(args.page_size), layouts=_flat(args.layout),
                   backends=_flat(args.backend), sm_budgets=_flat(args.sm_budget), ops=_flat(args.op),
                   gemm_size=args.gemm_size, warmup=args.warmup, reps=args.reps,
                   num_warps=args.num_warps, load_layer=args.load_layer)
    for name, value in updates.items():
        if value is not None and value != ():
            setattr(cfg, name, value)
    cfg.under_load = args.under_load
    cfg.baselines = not args.no_baselines
    cfg.seed = args.seed
    _check_kernels(args, cfg, clock, preset)
    return cfg, None


def _flat(values) -> tuple:
    return tuple(dict.fromkeys(v for group in values for v in group)) if values else ()


def _check_kernels(args, cfg: kernels.KernelConfig, clock: Clock, asked: ModelPreset) -> None:
    g = cfg.preset
    if cfg.load_layer is not None and not 0 <= cfg.load_layer < g.layers:
        cut = (f" (this CPU run keeps {g.layers} of {asked.name}'s {asked.layers} layers; "
               "--layers keeps more)" if g.layers != asked.layers else "")
        raise UsageError(f"--load-layer {cfg.load_layer}: expected 0 <= layer < {g.layers}{cut}")
    for page in cfg.page_sizes:
        if cfg.tokens % page:
            raise UsageError(f"--page-size {page}: --tokens {cfg.tokens} is not a whole number of "
                             f"{page}-token pages (indices are whole pages)")
    if g.mla and LayoutKind.PAGE_HEAD.value in _flat(args.layout):
        raise UsageError("--layout page_head: defined for MHA only, and this geometry is MLA")
    for name in _flat(args.backend):
        _check_backend("--backend", name)
    names = cfg.backends or kernels.default_backends(clock.gpu)
    takes_budget = [n for n in names if n in kernels.KERNEL_BACKENDS]
    if cfg.baselines and movers.sgl_kernel() is not None:
        takes_budget.append("sgl_kernel")
    for flag, given in (("--sm-budget", any(b is not None for b in cfg.sm_budgets)),
                        ("--num-warps", cfg.num_warps is not None)):
        if given and not takes_budget:
            why = "; ".join(f"{n}: {_available(n)[1]}" for n in ("cuda", "triton"))
            raise UsageError(f"{flag}: no backend in this run uses it here ({why})")
    if args.gemm_size is not None and not cfg.under_load:
        raise UsageError("--gemm-size: sizes the GEMM of --under-load, which is not given")
    unit = math.lcm(*cfg.page_sizes)
    slots = -(-2 * cfg.tokens // unit) * unit
    pool = slots * g.token_layer_bytes * g.layers
    gemm = 3 * cfg.gemm_size**2 * 2 if cfg.under_load else 0
    _memory("--tokens" if args.tokens else "--preset", f"pools of {slots} slots x {g.layers} layers",
            pool + 2 * cfg.tokens * g.token_layer_bytes * g.layers, pool + gemm, clock)


# -- e2e -----------------------------------------------------------------------------

def e2e_config(args, clock: Clock) -> e2e.E2EConfig:
    """The e2e run the flags ask for, checked."""
    preset = preset_for(args, PRESETS["llama-3.1-8b"])   # checks the flags against the model named
    if clock.gpu:
        cfg = e2e.quick_config(preset, True) if args.quick else e2e.E2EConfig(preset=preset)
    else:
        # the tiny stand-in model; explicit geometry flags still apply to it
        cfg = e2e.quick_config(PRESETS[args.preset] if args.preset else TINY, False)
        cfg.preset = _tiny_with(args)
    w = cfg.workload
    for flag, dest in (("clients", "clients"), ("rounds", "rounds"),
                       ("request_length", "request_length"), ("output_length", "output_length"),
                       ("request_rate", "request_rate"), ("shared_system_prompt", "shared_prefix"),
                       ("user_history_prompt", "user_history")):
        if getattr(args, flag) is not None:
            setattr(w, dest, getattr(args, flag))
    w.ready_policy = args.ready_policy
    w.distribution = args.distribution
    w.seed = args.seed
    levels = _flat(args.concurrency)
    if levels:
        if args.clients is None:
            w.clients = max(w.clients, 2 * max(levels))
        elif max(levels) > w.clients:
            raise UsageError(f"--concurrency {max(levels)}: more than the {w.clients} clients "
                             "(--num-clients), so it cannot be reached")
        cfg.concurrency = levels
    if not clock.gpu and w.request_length > 64:
        cfg.page_size = 64   # the CPU default of 16 suits its tiny requests only
    for flag in ("page_size", "device_fraction", "device_tokens", "host_ratio", "sm_budget"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    cfg.host_layout, cfg.write_policy, cfg.backend = args.host_layout, args.write_policy, args.backend
    storage = args.storage or ("nixl" if args.storage_dir else "none")
    cfg.storage, cfg.storage_dir = storage, args.storage_dir
    cfg.prefetch_policy = args.prefetch_policy or "wait_complete"
    cfg.kv_events = args.kv_events
    cfg.verify = not args.no_verify
    _check_e2e(args, cfg, clock)
    return cfg


def _tiny_with(args) -> ModelPreset:
    """The CPU stand-in model with the explicit geometry flags applied."""
    class _Args:   # preset_for reads these names
        preset = None
    for name in ("layers", "kv_heads", "head_dim", "dtype", "mla", "tp"):
        setattr(_Args, name, getattr(args, name))
    return preset_for(_Args, TINY)


def _check_e2e(args, cfg: e2e.E2EConfig, clock: Clock) -> None:
    from ..manager.host_pool import host_pool_slots

    if args.device_fraction is not None and args.device_tokens is not None:
        raise UsageError("--device-tokens: gives the device pool's size, and so does "
                         "--device-fraction; give one of them")
    if not 0 < cfg.device_fraction <= 1:
        raise UsageError(f"--device-fraction {cfg.device_fraction:g}: expected a fraction of all "
                         "final histories in (0, 1]")
    try:
        device_tokens = e2e.pool_tokens(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    g = cfg.preset
    if not cfg.host_ratio > 0:
        raise UsageError(f"--host-ratio {cfg.host_ratio:g}: expected a positive multiple of the "
                         "device pool")
    try:
        host_tokens = host_pool_slots(device_tokens, g.token_layer_bytes * g.layers, cfg.page_size,
                                      hicache_ratio=cfg.host_ratio)
    except ValueError as exc:
        raise UsageError(f"--host-ratio {cfg.host_ratio:g}: {str(exc).split(': ', 1)[-1]}") from None
    if g.mla and cfg.host_layout == LayoutKind.PAGE_HEAD.value:
        raise UsageError("--host-layout page_head: defined for MHA only, and this geometry is MLA")
    if args.storage == "none" and args.storage_dir:
        raise UsageError("--storage-dir: given with --storage none; drop one of them")
    if args.prefetch_policy and cfg.storage == "none":
        raise UsageError("--prefetch-policy: applies to the storage tier; add --storage nixl")
    if cfg.storage != "none":
        from ..storage.nixl_store import import_nixl

        try:
            import_nixl()
        except ImportError:
            raise UsageError("--storage nixl: NIXL is not installed "
                             "(pip install 'hicache-kernels[storage]')") from None
        if cfg.storage_dir:
            check_writable_dir("--storage-dir", cfg.storage_dir)
        if cfg.modeled and cfg.prefetch_policy != "wait_complete":
            raise UsageError(f"--prefetch-policy {cfg.prefetch_policy}: decides by the clock, and "
                             "this run's time is modeled (no GPU); only wait_complete applies")
    if cfg.backend != "auto":
        _check_backend("--backend", cfg.backend)
    if cfg.sm_budget is not None:
        kernel_backend = (cfg.backend in kernels.KERNEL_BACKENDS
                          or (cfg.backend == "auto" and (clock.gpu or _available("triton")[0])))
        if not kernel_backend:
            raise UsageError(f"--sm-budget: the tier's backend here ({cfg.backend}: the torch "
                             "reference) uses no SM budget; no CUDA device and no Triton "
                             "interpreter here")
    pool = device_tokens * g.token_layer_bytes * g.layers
    host = host_tokens * g.token_layer_bytes * g.layers
    _memory("--host-ratio" if args.host_ratio else "--device-fraction",
            f"a device pool of {device_tokens} and a host pool of {host_tokens} tokens",
            host, pool, clock)


def usable_out(value: str) -> None:
    """``--out`` must be a directory this process can write (or create)."""
    check_writable_dir("--out", os.fspath(value))
