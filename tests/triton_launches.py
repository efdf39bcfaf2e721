"""What the Triton backend launches, and compiling it as a launch would, without a GPU.

:func:`recorded_launches` drives the public API (the ops layer and the SGLang drop-in,
address tables included) over the CPU test matrix's geometries with the kernel replaced
by a recorder, so each entry is exactly what the launcher
(``backends.triton_kernels.run``) passes: grid, arguments, constexprs and num_warps.

:func:`compile_launch` hands one of them to Triton's own JIT, under a driver that only
names the GPU target: the JIT's binder specializes the arguments as it does for a launch
(ints equal to 1 or divisible by 16, pointer alignment, i32/i64, constexprs, the
kernel's ``JIT_OPTIONS``), the JIT's cache keeps one kernel per distinct
specialization, and each is compiled down to a cubin, only not launched.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from conftest import DTYPES
from test_sglang import KV_DIM, H, L, N_DEV, N_HOST, P, head_dim_for, indices, poisoned, rnd, \
    table
from test_transfer import HEAD_DIMS, KINDS_ATTN, PAGE_SIZES, like, make_device_pool, make_host, \
    paged_indices

import hicache_kernels.sglang as kvio
from hicache_kernels import LayoutKind, backup_all_layers, load_layer, transfer
from hicache_kernels.backends import triton_kernels as tk

ARCHS = (80, 90, 100)
# None: the launcher's default; the rest: every value the ops layer accepts.
NUM_WARPS = (None, 1, 2, 4, 8, 16, 32)


@dataclass
class Launch:
    what: str          # the call that made it, for messages
    grid: tuple
    args: tuple
    kwargs: dict       # constexprs and num_warps

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.what}: {opts}"


class _Recorder:
    """Stands in for the kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.what = ""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.what, tuple(grid), args, dict(kwargs)))
        return launch


@contextlib.contextmanager
def _recording():
    recorder = _Recorder()
    kernel = tk._copy_items_kernel
    tk._copy_items_kernel = recorder
    try:
        yield recorder
    finally:
        tk._copy_items_kernel = kernel


def _ops_matrix(rec: _Recorder, gen) -> None:
    """test_transfer's geometries: every layout (MHA and MLA), dtype, page size and
    head dim; a per-layer load and an all-layer backup; same-layout copies."""
    for kind, mla in KINDS_ATTN:
        for dtype in DTYPES:
            for page_size in PAGE_SIZES:
                for head_dim in HEAD_DIMS:
                    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size,
                                     head_dim=head_dim, gen=gen)
                    dev = make_device_pool(host)
                    h, d = paged_indices(host.layout.num_slots, dev.layout.num_slots, 70,
                                         page_size, gen)
                    rec.what = (f"{kind.value} {'mla' if mla else 'mha'} {dtype} P={page_size} "
                                f"D={head_dim}")
                    for num_warps in NUM_WARPS:
                        load_layer(host, dev, h, d, 1, backend="triton", num_warps=num_warps)
                        backup_all_layers(dev, host, d, h, backend="triton", num_warps=num_warps)
    for kind in LayoutKind:
        host = make_host(kind, mla=False, dtype=torch.bfloat16, page_size=16, head_dim=24, gen=gen)
        for src in (host, make_device_pool(host, fill="random", gen=gen)):
            n = src.layout.num_slots
            s, d = paged_indices(n, n, 50, 16, gen)
            rec.what = f"same-layout {kind.value} {'per-layer' if src.per_layer else 'pool'}"
            for layers, num_warps in itertools.product((2, None), NUM_WARPS):
                transfer(src, like(src), s, d, layers=layers, backend="triton", num_warps=num_warps)


def _sglang_forms(rec: _Recorder, gen) -> None:
    """test_sglang's geometries: every kernel form of the drop-in, the address-table
    (``*_layers``) forms included (None: the drop-in's own default)."""
    for dtype, num_warps in itertools.product(DTYPES, NUM_WARPS):
        nw = {} if num_warps is None else {"num_warps_per_block": num_warps}
        d = head_dim_for(dtype)
        item = H * d * torch.empty((), dtype=dtype).element_size()
        mla_item = KV_DIM * 2 * torch.empty((), dtype=dtype).element_size()
        dev_k = [rnd((N_DEV, H, d), dtype, gen) for _ in range(L)]
        dev_v = [rnd((N_DEV, H, d), dtype, gen) for _ in range(L)]
        dk, dv = poisoned((N_DEV, H, d), dtype), poisoned((N_DEV, H, d), dtype)
        lf = rnd((2, L, N_HOST, H, d), dtype, gen)
        pf = rnd((2, N_HOST, L, H, d), dtype, gen)
        ph = rnd((2, N_HOST // P, H, P, L, d), dtype, gen)
        mla_lf = rnd((L, N_HOST, 1, KV_DIM * 2), dtype, gen)
        mla_pf = rnd((N_HOST, L, 1, KV_DIM * 2), dtype, gen)
        mla_dev = [rnd((N_DEV, 1, KV_DIM * 2), dtype, gen) for _ in range(L)]
        mla_dst = poisoned((N_DEV, 1, KV_DIM * 2), dtype)
        h, t = indices(N_HOST, N_DEV, 30, gen)
        calls = {
            "transfer_kv_per_layer": lambda: kvio.transfer_kv_per_layer(
                lf[0, 1], dk, lf[1, 1], dv, h, t, item, **nw),
            "transfer_kv_per_layer_pf_lf": lambda: kvio.transfer_kv_per_layer_pf_lf(
                pf[0], dk, pf[1], dv, h, t, 2, item, item * L, **nw),
            "transfer_kv_per_layer_ph_lf": lambda: kvio.transfer_kv_per_layer_ph_lf(
                ph[0], dk, ph[1], dv, h, t, 1, item, item * L, P, H, **nw),
            "transfer_kv_all_layer": lambda: kvio.transfer_kv_all_layer(
                table(dev_k), table(list(lf[0])), table(dev_v), table(list(lf[1])), t, h, item, L,
                **nw),
            "transfer_kv_all_layer_lf_pf": lambda: kvio.transfer_kv_all_layer_lf_pf(
                table(dev_k), pf[0], table(dev_v), pf[1], t, h, item, item * L, L, **nw),
            "transfer_kv_all_layer_lf_ph": lambda: kvio.transfer_kv_all_layer_lf_ph(
                table(dev_k), ph[0], table(dev_v), ph[1], t, h, item, item * L, L, P, H, **nw),
            "transfer_kv_per_layer_mla": lambda: kvio.transfer_kv_per_layer_mla(
                mla_lf[2], mla_dst, h, t, mla_item, **nw),
            "transfer_kv_per_layer_mla_pf_lf": lambda: kvio.transfer_kv_per_layer_mla_pf_lf(
                mla_pf, mla_dst, h, t, 0, mla_item, mla_item * L, **nw),
            "transfer_kv_all_layer_mla": lambda: kvio.transfer_kv_all_layer_mla(
                table(mla_dev), table(list(mla_lf)), t, h, mla_item, L, **nw),
            "transfer_kv_all_layer_mla_lf_pf": lambda: kvio.transfer_kv_all_layer_mla_lf_pf(
                table(mla_dev), mla_pf, t, h, mla_item, mla_item * L, L, **nw),
        }
        for name, call in calls.items():
            rec.what = f"sglang {name} {dtype}"
            call()


@functools.lru_cache(maxsize=None)
def recorded_launches() -> tuple[Launch, ...]:
    """Every launch the test matrix's geometries make, for every num_warps."""
    gen = torch.Generator().manual_seed(1234)
    with _recording() as rec, mock.patch.dict(os.environ, HICACHE_BACKEND="triton"):
        _ops_matrix(rec, gen)
        _sglang_forms(rec, gen)
    return tuple(rec.launches)


# -- compiling as a launch would ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jit_function() -> JITFunction:
    """The kernel as ``triton.jit`` makes it on a GPU machine (under TRITON_INTERPRET=1
    the module holds an interpreted one; the source and options are the same). One per
    process, so its cache compiles each specialization once across tests."""
    return JITFunction(tk._copy_items_kernel.fn, **tk.JIT_OPTIONS)


class _TargetOnly:
    """A driver that names a GPU target and nothing else: enough for the JIT to bind,
    specialize and compile; launching would fail."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch   # the JIT keeps one binder and kernel cache per device

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _target(arch: int):
    saved = dict(vars(driver))   # how the active driver is held differs between releases
    driver.set_active(_TargetOnly(arch))
    try:
        yield
    finally:
        vars(driver).clear()
        vars(driver).update(saved)


def compile_launch(jit: JITFunction, launch: Launch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` through ``jit`` (its cache makes a repeated
    specialization free); returns Triton's compiled kernel."""
    with _target(arch):
        return jit.warmup(*launch.args, grid=launch.grid, **launch.kwargs)


def compiled_count(jit: JITFunction, arch: int) -> int:
    """Distinct specializations ``jit`` has compiled for ``sm_<arch>``."""
    caches = jit.device_caches.get(arch)   # (kernel cache, ...) once anything was bound
    return len(caches[0]) if caches else 0
