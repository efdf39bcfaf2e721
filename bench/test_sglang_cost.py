"""The drop-in's fixed CPU cost per SGLang call (``hicache_kernels.sglang``).

Run with ``.venv/bin/python -m pytest -q -s bench/test_sglang_cost.py`` (not part of
CI). Every call is made the way SGLang's host pool makes it, on CPU tensors, with
the driver's launch stubbed, so only the drop-in's own work is timed.

The kernel forms (SGLang's ``kernel`` io backend: the per-layer loads and the
all-layer backups) run on the ``cuda`` backend launching into the CUDA library's
host twin (tests/host_twin.py) with the launch stubbed: everything but the driver's
launch runs, the plan lookup, the prepared launch's index checks, one ctypes call,
and in C the description's checks and the kernel's launch plan. Their indices are
where SGLang passes them on a GPU: where the kernel reads them (here the CPU stands
in for the device), so no bounds check runs, as on a GPU.

Target: <= 10 us per call for the kernel forms SGLang calls once per layer (a
load); the all-layer calls (a backup) are reported. Each line splits the call into
the drop-in's own part (the plan lookup; the launch stubbed too) and the launch.

The direct forms (SGLang's ``direct`` io backend) hand host indices to the copy
engines, which build their descriptors on the CPU per call (merging runs): that
backend is stubbed whole here (its ``run()`` a no-op), so their lines give the
drop-in's work up to it: the plan lookup, the index checks, the page expansion and
the bounds check of host indices. Target: <= 10 us per call for the per-layer loads,
like the kernel forms; the all-layer backups, which name 64 to 128 tensors in their
key (each read once, about a quarter of a microsecond), are reported.

When ``sglang`` is importable (the tests' environment), the same calls are also
timed through SGLang's own host pool (``MHATokenToKVPoolHost``, page_first and
layer_first) with ``sgl_kernel.kvcacheio`` replaced first by no-ops (SGLang's own
cost per call) and then by this drop-in: the difference is what the drop-in costs
SGLang.

Geometry: Llama-3.1-8B (32 layers, 8 KV heads x 128, bf16), 64-token pages, a load or
backup of 1024 tokens. Tensors are never touched (memory stays virtual).
"""

from __future__ import annotations


import pytest
import torch

import hicache_kernels.sglang as kvio
from hicache_kernels import backends
from launch_stub import import_sglang, median_us, stubbed, twin_library  # noqa: F401  (fixtures)
L, H, D, PAGE = 32, 8, 128, 64
DEV_SLOTS, HOST_SLOTS, TOKENS = 8192, 16384, 1024
TARGET_US = 10.0
ROUNDS, ITERATIONS = 300, 10
DT = torch.bfloat16
ITEM = H * D * 2


class NoLaunch:
    """A backend whose run() does nothing (the direct forms' copy engines, stubbed whole)."""

    name = "no_launch"
    host_indices = True

    def available(self):
        return True, "the launch is stubbed"

    def run(self, plan, src_indices, dst_indices, **_):
        pass


@pytest.fixture
def kernel_forms(stubbed, monkeypatch):
    """The ``cuda`` backend on CPU tensors, launching into the host twin, launch stubbed."""
    monkeypatch.setenv("HICACHE_BACKEND", "cuda")
    kvio.clear_plan_cache()
    yield
    kvio.clear_plan_cache()


@pytest.fixture
def direct_forms(monkeypatch):
    backend = NoLaunch()
    monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (backend, "stub"))
    kvio.clear_plan_cache()
    yield
    kvio.clear_plan_cache()


def _pools():
    """SGLang's shapes: per-layer device K/V, host pools of each layout, address tables."""
    dev_k = [torch.empty(DEV_SLOTS, H, D, dtype=DT) for _ in range(L)]
    dev_v = [torch.empty(DEV_SLOTS, H, D, dtype=DT) for _ in range(L)]
    return dict(
        dev_k=dev_k, dev_v=dev_v,
        k_ptrs=torch.tensor([t.data_ptr() for t in dev_k], dtype=torch.uint64),
        v_ptrs=torch.tensor([t.data_ptr() for t in dev_v], dtype=torch.uint64),
        pf=torch.empty(2, HOST_SLOTS, L, H, D, dtype=DT),
        lf=torch.empty(2, L, HOST_SLOTS, H, D, dtype=DT),
        ph=torch.empty(2, HOST_SLOTS // PAGE, H, PAGE, L, D, dtype=DT),
        pfd=torch.empty(2, HOST_SLOTS // PAGE, L, PAGE, H, D, dtype=DT),
        mla_pf=torch.empty(HOST_SLOTS, L, 1, 576, dtype=DT),
        mla_dev=torch.empty(DEV_SLOTS, 1, 576, dtype=DT),
        host_idx=torch.arange(4096, 4096 + TOKENS),
        dev_idx=torch.arange(2048, 2048 + TOKENS),
    )


def _calls(p):
    """name -> (per layer?, direct form?, call), arguments as SGLang passes them."""
    hk, hv, hi, di, layer = p["pf"][0], p["pf"][1], p["host_idx"], p["dev_idx"], 7
    dk, dv = p["dev_k"][layer], p["dev_v"][layer]
    lf_k, lf_v = p["lf"][0], p["lf"][1]
    lf_k_layer, lf_v_layer = lf_k[layer], lf_v[layer]   # (SGLang's indexing, not the drop-in's)
    ph_k, ph_v = p["ph"][0], p["ph"][1]
    pfd = [p["pfd"][0], p["pfd"][1]]
    all_dev = p["dev_k"] + p["dev_v"]
    all_lf = list(lf_k) + list(lf_v)
    return {  # name -> (per layer?, direct form?, call)
        "load layer, page_first (transfer_kv_per_layer_pf_lf)": (True, False, lambda: (
            kvio.transfer_kv_per_layer_pf_lf(hk, dk, hv, dv, hi, di, layer, ITEM, ITEM * L))),
        "load layer, layer_first (transfer_kv_per_layer)": (True, False, lambda: (
            kvio.transfer_kv_per_layer(lf_k_layer, dk, lf_v_layer, dv, hi, di, ITEM))),
        "load layer, page_head (transfer_kv_per_layer_ph_lf)": (True, False, lambda: (
            kvio.transfer_kv_per_layer_ph_lf(ph_k, dk, ph_v, dv, hi, di, layer, ITEM, ITEM * L,
                                             PAGE, H))),
        "load layer, MLA page_first (transfer_kv_per_layer_mla_pf_lf)": (True, False, lambda: (
            kvio.transfer_kv_per_layer_mla_pf_lf(p["mla_pf"], p["mla_dev"], hi, di, layer, 1152,
                                                 1152 * L))),
        "load layer, direct layer_first (transfer_kv_direct)": (True, True, lambda: (
            kvio.transfer_kv_direct([lf_k_layer, lf_v_layer], [dk, dv], hi, di, PAGE))),
        "load layer, direct page_first_direct (transfer_kv_per_layer_direct_pf_lf)": (True, True, lambda: (
            kvio.transfer_kv_per_layer_direct_pf_lf(pfd, [dk, dv], hi, di, layer, PAGE))),
        "backup, page_first (transfer_kv_all_layer_lf_pf, tables)": (False, False, lambda: (
            kvio.transfer_kv_all_layer_lf_pf(p["k_ptrs"], hk, p["v_ptrs"], hv, di, hi, ITEM,
                                             ITEM * L, L))),
        "backup, direct layer_first (transfer_kv_direct, 64 tensors)": (False, True, lambda: (
            kvio.transfer_kv_direct(all_dev, all_lf, di, hi, PAGE))),
        "backup, direct page_first_direct (transfer_kv_all_layer_direct_lf_pf)": (False, True, lambda: (
            kvio.transfer_kv_all_layer_direct_lf_pf(all_dev, pfd, di, hi, PAGE))),
    }


_POOLS = _pools()
_CALLS = _calls(_POOLS)


def _time(benchmark, call) -> float:
    call()                                        # the plan is built once, untimed
    benchmark.pedantic(call, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=20)
    return benchmark.stats.stats.median * 1e6


def _time_plainly(call, rounds: int = ROUNDS) -> float:
    """Median us per call, for calls the benchmark fixture does not time (one per test)."""
    return median_us(call, rounds, ITERATIONS)


@pytest.mark.parametrize("name", list(_CALLS))
def test_drop_in_cost_per_call(benchmark, request, monkeypatch, name):
    per_layer, direct, call = _CALLS[name]
    request.getfixturevalue("direct_forms" if direct else "kernel_forms")
    total = _time(benchmark, call)
    if direct:
        benchmark.extra_info.update(per_call_us=round(total, 2))
        print(f"\n{name}: {total:.1f} us per call up to the copy engines, which are stubbed whole"
              + (f", target <= {TARGET_US}" if per_layer else ""))
        if per_layer:
            assert total <= TARGET_US, f"{name}: {total:.1f} us per call, target {TARGET_US} us"
        return
    monkeypatch.setattr(kvio, "launch_prepared", lambda *a, **k: True)
    monkeypatch.setattr(kvio, "execute", lambda *a, **k: None)
    own = _time_plainly(call)
    benchmark.extra_info.update(per_call_us=round(total, 2), lookup_us=round(own, 2))
    print(f"\n{name}: {total:.1f} us per call, the driver's launch stubbed (plan lookup {own:.1f}, "
          f"prepared launch {total - own:.1f})" + (f", target <= {TARGET_US}" if per_layer else ""))
    if per_layer:
        assert total <= TARGET_US, f"{name}: {total:.1f} us per call, target {TARGET_US} us"


# -- next to SGLang's own cost --------------------------------------------------------------

SGLANG_CALLS = {
    "page_first": ("load_to_device_per_layer", "kernel", "transfer_kv_per_layer_pf_lf"),
    "layer_first": ("load_to_device_per_layer", "kernel", "transfer_kv_per_layer"),
    "layer_first direct": ("load_to_device_per_layer", "direct", "transfer_kv_direct"),
    "page_first backup": ("backup_from_device_all_layer", "kernel", "transfer_kv_all_layer_lf_pf"),
}


@pytest.mark.parametrize("case", list(SGLANG_CALLS))
def test_next_to_sglang(request, monkeypatch, case):
    modules, why = import_sglang("sglang.srt.mem_cache.memory_pool",
                                 "sglang.srt.mem_cache.pool_host.mha")
    if modules is None:
        print(f"\nsglang is not importable here, so SGLang's own cost is not measured ({why})")
        return
    memory_pool, mha = modules
    method, io_backend, kernel = SGLANG_CALLS[case]
    request.getfixturevalue("direct_forms" if io_backend == "direct" else "kernel_forms")
    layout = case.split()[0]
    # small heads: the cost per call does not depend on them, SGLang zeroes its pools
    dev = memory_pool.MHATokenToKVPool(size=4 * TOKENS + PAGE, page_size=PAGE, dtype=DT,
                                       head_num=1, head_dim=64, layer_num=L, device="cpu",
                                       enable_memory_saver=False, enable_alt_stream=False)
    host = mha.MHATokenToKVPoolHost(dev._mha_buffer_info(), 2.0, 0, PAGE, layout,
                                    pin_memory=False, device="cpu",
                                    device_capacity_tokens=4 * TOKENS + PAGE, start_layer=0,
                                    end_layer=L)
    host.can_use_jit = host.can_use_write_back_jit = False   # sgl_kernel's path, not SGLang's JIT
    hi, di = torch.arange(TOKENS, 2 * TOKENS), torch.arange(TOKENS)
    if method == "load_to_device_per_layer":
        def call():
            host.load_to_device_per_layer(dev, hi, di, 7, io_backend)
    else:
        def call():
            host.backup_from_device_all_layer(dev, hi, di, io_backend)
    # on a machine without CUDA, SGLang imports no kvcacheio names: they are set here
    monkeypatch.setattr(mha, kernel, lambda *a, **k: None, raising=False)
    sglang_alone = _time_plainly(call)
    monkeypatch.setattr(mha, kernel, getattr(kvio, kernel))
    with_drop_in = _time_plainly(call)
    stub = "copy engines stubbed whole" if io_backend == "direct" else "driver's launch stubbed"
    print(f"\nSGLang {method} ({layout}, io_backend={io_backend}): {sglang_alone:.1f} us per "
          f"call with kvcacheio a no-op, {with_drop_in:.1f} us with this drop-in ({stub}): "
          f"the drop-in adds {with_drop_in - sglang_alone:.1f} us")
