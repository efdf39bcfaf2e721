"""The drop-in's fixed CPU cost per SGLang call (``hicache_kernels.sglang``).

Run with ``.venv/bin/python -m pytest -q -s bench/test_sglang_cost.py`` (not part of
CI). Every call is made the way SGLang's host pool makes it, on CPU tensors, with the
backend's final launch replaced by a no-op, so only the drop-in's own work is timed:
finding the cached plan for the call's tensors, checking the indices and handing the
plan to the backend.

Target (issue 11): <= 10 us per call for the calls SGLang makes once per layer (a
load); the all-layer calls (a backup) are reported. Each line also splits the call
into the drop-in's own part (the plan lookup; ``ops.execute`` stubbed too) and what
``ops.execute`` adds (index checks; on CPU indices these include a bounds check
that device indices, as SGLang passes them to the kernel forms, skip).

When ``sglang`` is importable, the same calls are also timed through SGLang's own
host pool (``MHATokenToKVPoolHost``, page_first and layer_first) with
``sgl_kernel.kvcacheio`` replaced first by no-ops (SGLang's own cost per call) and
then by this drop-in: the difference is what the drop-in costs SGLang.

Geometry: Llama-3.1-8B (32 layers, 8 KV heads x 128, bf16), 64-token pages, a load or
backup of 1024 tokens. Tensors are never touched (memory stays virtual).
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch

import hicache_kernels.sglang as kvio
from hicache_kernels import backends

L, H, D, PAGE = 32, 8, 128, 64
DEV_SLOTS, HOST_SLOTS, TOKENS = 8192, 16384, 1024
TARGET_US = 10.0
ROUNDS, ITERATIONS = 300, 10
DT = torch.bfloat16
ITEM = H * D * 2


class NoLaunch:
    """A backend whose launch does nothing."""

    name = "no_launch"
    host_indices = True

    def available(self):
        return True, "the launch is stubbed"

    def run(self, plan, src_indices, dst_indices, **_):
        pass


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    kvio.clear_plan_cache()
    backend = NoLaunch()
    monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (backend, "stub"))
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
    """name -> (per layer?, call), arguments as SGLang passes them."""
    hk, hv, hi, di, layer = p["pf"][0], p["pf"][1], p["host_idx"], p["dev_idx"], 7
    dk, dv = p["dev_k"][layer], p["dev_v"][layer]
    lf_k, lf_v = p["lf"][0], p["lf"][1]
    ph_k, ph_v = p["ph"][0], p["ph"][1]
    pfd = [p["pfd"][0], p["pfd"][1]]
    all_dev = p["dev_k"] + p["dev_v"]
    all_lf = list(lf_k) + list(lf_v)
    return {
        "load layer, page_first (transfer_kv_per_layer_pf_lf)": (True, lambda: (
            kvio.transfer_kv_per_layer_pf_lf(hk, dk, hv, dv, hi, di, layer, ITEM, ITEM * L))),
        "load layer, layer_first (transfer_kv_per_layer)": (True, lambda: (
            kvio.transfer_kv_per_layer(lf_k[layer], dk, lf_v[layer], dv, hi, di, ITEM))),
        "load layer, page_head (transfer_kv_per_layer_ph_lf)": (True, lambda: (
            kvio.transfer_kv_per_layer_ph_lf(ph_k, dk, ph_v, dv, hi, di, layer, ITEM, ITEM * L,
                                             PAGE, H))),
        "load layer, MLA page_first (transfer_kv_per_layer_mla_pf_lf)": (True, lambda: (
            kvio.transfer_kv_per_layer_mla_pf_lf(p["mla_pf"], p["mla_dev"], hi, di, layer, 1152,
                                                 1152 * L))),
        "load layer, direct layer_first (transfer_kv_direct)": (True, lambda: (
            kvio.transfer_kv_direct([lf_k[layer], lf_v[layer]], [dk, dv], hi, di, PAGE))),
        "load layer, direct page_first_direct (transfer_kv_per_layer_direct_pf_lf)": (True, lambda: (
            kvio.transfer_kv_per_layer_direct_pf_lf(pfd, [dk, dv], hi, di, layer, PAGE))),
        "backup, page_first (transfer_kv_all_layer_lf_pf, tables)": (False, lambda: (
            kvio.transfer_kv_all_layer_lf_pf(p["k_ptrs"], hk, p["v_ptrs"], hv, di, hi, ITEM,
                                             ITEM * L, L))),
        "backup, direct layer_first (transfer_kv_direct, 64 tensors)": (False, lambda: (
            kvio.transfer_kv_direct(all_dev, all_lf, di, hi, PAGE))),
        "backup, direct page_first_direct (transfer_kv_all_layer_direct_lf_pf)": (False, lambda: (
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
    call()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(ITERATIONS):
            call()
        times.append((time.perf_counter() - t) / ITERATIONS)
    return sorted(times)[rounds // 2] * 1e6


@pytest.mark.parametrize("name", list(_CALLS))
def test_drop_in_cost_per_call(benchmark, monkeypatch, name):
    per_layer, call = _CALLS[name]
    total = _time(benchmark, call)
    monkeypatch.setattr(kvio, "execute", lambda *a, **k: None)
    own = _time_plainly(call)
    hi, di = _POOLS["host_idx"], _POOLS["dev_idx"]
    bounds = _time_plainly(lambda: (int(hi.max()), int(di.max())))
    benchmark.extra_info.update(per_call_us=round(total, 2), lookup_us=round(own, 2))
    print(f"\n{name}: {total:.1f} us per call (plan lookup {own:.1f}, ops.execute "
          f"{total - own:.1f} of which {bounds:.1f} bound the CPU indices)"
          + (f", target <= {TARGET_US}" if per_layer else ""))
    if per_layer:
        assert total <= TARGET_US, f"{name}: {total:.1f} us per call, target {TARGET_US} us"


# -- next to SGLang's own cost --------------------------------------------------------------

def _sglang():
    """SGLang's pool modules, or the reason they cannot be imported here."""
    try:
        memory_pool = importlib.import_module("sglang.srt.mem_cache.memory_pool")
        mha = importlib.import_module("sglang.srt.mem_cache.pool_host.mha")
    except Exception as e:  # noqa: BLE001 - any failure to import is reported, not raised
        return None, f"{type(e).__name__}: {e}"
    return (memory_pool, mha), ""


SGLANG_CALLS = {
    "page_first": ("load_to_device_per_layer", "kernel", "transfer_kv_per_layer_pf_lf"),
    "layer_first": ("load_to_device_per_layer", "kernel", "transfer_kv_per_layer"),
    "layer_first direct": ("load_to_device_per_layer", "direct", "transfer_kv_direct"),
    "page_first backup": ("backup_from_device_all_layer", "kernel", "transfer_kv_all_layer_lf_pf"),
}


@pytest.mark.parametrize("case", list(SGLANG_CALLS))
def test_next_to_sglang(monkeypatch, case):
    modules, why = _sglang()
    if modules is None:
        print(f"\nsglang is not importable here, so SGLang's own cost is not measured ({why})")
        return
    memory_pool, mha = modules
    method, io_backend, kernel = SGLANG_CALLS[case]
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
    print(f"\nSGLang {method} ({layout}, io_backend={io_backend}): {sglang_alone:.1f} us per "
          f"call with kvcacheio a no-op, {with_drop_in:.1f} us with this drop-in (launch "
          f"stubbed): the drop-in adds {with_drop_in - sglang_alone:.1f} us")
