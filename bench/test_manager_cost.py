"""The manager's own CPU cost: scheduling a layer-wise load, waiting on a layer, and the
other calls a serving loop makes each step.

Run with ``python -m pytest -q -s bench/test_manager_cost.py`` (not part of
CI). The device is the CPU emulation with deferred, never-executed copies, so only the
manager's work is timed: page-table lookups and updates, slot allocation, index tensors,
events and the launches. Each round runs right after an untimed reset (the previous
load retired and evicted), as a load runs in a serving loop, after other work.

Targets (on a 2-core CPU-only VM), for the whole call:

- ``load()`` of 8192 tokens (128 pages), 32 layers: <= 20 us; one layer no worse
- ``handle.wait(layer)``: <= 5 us
- issuing a load's launches: <= 1 us of Python per layer above the driver's launch
- one prepared ``Transfer`` call (``t(src, dst, check=False)``): <= 1 us above the
  library's own call (its host logic, timed in C in the twin; on a GPU, the driver's launch)

Geometry: Llama-3.1-8B (32 layers, 8 KV heads x 128, bf16), 64-token pages. The pools
are never touched (memory stays virtual). The other serving-loop calls (hit, lookup,
alloc_device with and without evicting, evict_device, poll retiring a load) are
reported, not asserted, with 128 pages each; so is how load() scales with pages.

What load() does here: the page-table work (one compiled call, csrc/manager/fastload.c),
the handle, the wait on the compute stream and one layer-wise launch. The index
tensors (one int64 page index per page and side) are made by the first layer's
launch, which the emulation queues and never runs; on a GPU that launch happens
inside load(). Both are also reported: load() plus making the index tensors, and
load() on the numpy path alone (when the C extension is not built).

On a GPU, load() also issues every layer's kernel launch and event record. The
section "launches issued" times that on the CPU: the manager on CudaDevice's own
launch logic with fake streams and events (tests/host_twin.py), its transfers on
the ``cuda`` backend launching into the CUDA library's host twin with the launch
stubbed, so everything but the driver's launch runs: the index tensors, the
prepared launch's checks, one ctypes call, and in C the descriptions' checks, the
kernel's launch plans and the event records. It compares the compiled launch of
every layer in one call with a prepared call per layer and with the checked path
per layer. Next to it, where ``sglang`` imports (the tests' environment), SGLang's
own HiCacheController schedules the same load and a backup of 128 pages with
``sgl_kernel.kvcacheio`` replaced by no-ops.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import EmulatedDevice, HiCacheManager
from launch_stub import import_sglang, median_us, stubbed, twin_library  # noqa: F401  (fixtures)

PAGE = 64
TOKENS = 8192
PAGES = TOKENS // PAGE
LAYERS = 32
TARGET_LOAD_US = 20.0
TARGET_WAIT_US = 5.0
ROUNDS = 500
_results: dict[str, float] = {}


def _manager(layers: int, device_pages: int = PAGES + 2):
    lay = KVLayout("layer_first", num_layers=layers, num_slots=device_pages * PAGE, head_num=8,
                   head_dim=128, dtype=torch.bfloat16, page_size=PAGE)
    pool = KVBuffer.allocate(lay)
    dev = EmulatedDevice(defer=True, execute=False)
    mgr = HiCacheManager(pool, device=dev, backend="reference", host_reserve_gb=0,
                         hicache_ratio=2.0)
    ids = [("page", i) for i in range(PAGES)]
    mgr.alloc_host(ids)
    return mgr, dev, ids


def _reset(mgr, dev, ids):
    """Untimed: finish the (skipped) copies and put the pages back on host only."""
    dev.run_all()
    mgr.poll()
    if mgr.table.get(ids[0]).device_page >= 0:
        mgr.evict_device(ids)


def _median_us(benchmark) -> float:
    return benchmark.stats.stats.median * 1e6


@pytest.mark.parametrize("layers", [1, LAYERS])
def test_schedule_layerwise_load(benchmark, layers):
    mgr, dev, ids = _manager(layers)

    def setup():
        _reset(mgr, dev, ids)
        return (ids,), {}

    benchmark.pedantic(mgr.load, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    us = _results[f"load{layers}"] = _median_us(benchmark)
    benchmark.extra_info.update(tokens=TOKENS, pages=PAGES, layers=layers, per_call_us=round(us, 2))
    line = f"\nload() of {TOKENS} tokens ({PAGES} pages), {layers} layer(s): {us:.1f} us per call"
    if layers == LAYERS and "load1" in _results:
        line += f" ({(us - _results['load1']) / (LAYERS - 1):.2f} us per extra layer)"
    print(line + f" (target <= {TARGET_LOAD_US})")
    mgr.close()
    assert us <= TARGET_LOAD_US, (f"load() of {TOKENS} tokens, {layers} layer(s): {us:.1f} us, "
                                  f"target {TARGET_LOAD_US} us (docs/manager.md, Cost)")


@pytest.mark.parametrize("variant", ["with index tensors", "numpy path"])
def test_load_variants(benchmark, variant):
    """Reported: load() plus what its first launch adds (the index tensors), and
    load() without the compiled page-table call."""
    mgr, dev, ids = _manager(LAYERS)
    if variant == "numpy path":
        mgr._claimer = None
        call = mgr.load
    else:
        def call(ids):
            mgr.load(ids)._make_indices(None)

    def setup():
        _reset(mgr, dev, ids)
        return (ids,), {}

    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    print(f"\nload() of {TOKENS} tokens, {LAYERS} layers, {variant}: {_median_us(benchmark):.1f} us")
    mgr.close()


@pytest.mark.parametrize("pages", [1, 8, 32])
def test_load_scaling_with_pages(benchmark, pages):
    """Reported: the fixed part of a load() and its cost per page."""
    mgr, dev, ids = _manager(LAYERS)
    ids = ids[:pages]

    def setup():
        _reset(mgr, dev, ids)
        return (ids,), {}

    benchmark.pedantic(mgr.load, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    print(f"\nload() of {pages} page(s), {LAYERS} layers: {_median_us(benchmark):.1f} us")
    mgr.close()


def test_wait_on_a_layer(benchmark):
    mgr, dev, ids = _manager(LAYERS)
    state = {}

    def setup():
        _reset(mgr, dev, ids)
        state["handle"] = mgr.load(ids)
        dev.current_stream().ops.clear()     # only this round's wait is queued
        return (state["handle"], 7), {}

    benchmark.pedantic(_wait, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    us = _median_us(benchmark)
    benchmark.extra_info.update(wait_us=round(us, 2))
    print(f"\nwait(layer): {us:.2f} us (target <= {TARGET_WAIT_US}), of which calling an "
          f"empty function through the benchmark costs {_call_overhead_us():.2f} us")
    mgr.close()
    assert us <= TARGET_WAIT_US, f"wait(layer): {us:.2f} us, target {TARGET_WAIT_US} us"


def _wait(handle, layer):
    handle.wait(layer)


def _call_overhead_us() -> float:
    def nothing(handle, layer):
        pass
    best = []
    for _ in range(2000):
        t = time.perf_counter()
        nothing(None, 7)
        best.append(time.perf_counter() - t)
    return sorted(best)[len(best) // 2] * 1e6


# -- the rest of a serving step (reported) -------------------------------------------------------

def _resident(device_pages: int = PAGES + 2):
    """128 pages on the device with host copies (backed up), nothing in flight."""
    mgr, dev, ids = _manager(LAYERS, device_pages)
    mgr.free(ids)
    mgr.alloc_device(ids)
    mgr.backup(ids)
    dev.run_all()
    mgr.poll()
    return mgr, dev, ids


def _report(benchmark, what: str) -> None:
    us = _median_us(benchmark)
    benchmark.extra_info.update(per_call_us=round(us, 2))
    print(f"\n{what}: {us:.1f} us")


def test_hit(benchmark):
    mgr, _, ids = _resident()
    benchmark.pedantic(mgr.hit, args=(ids,), rounds=ROUNDS, warmup_rounds=50)
    _report(benchmark, f"hit() of {PAGES} pages already on host")
    mgr.close()


def test_lookup(benchmark):
    mgr, _, ids = _resident()
    benchmark.pedantic(mgr.lookup, args=(ids,), rounds=ROUNDS, warmup_rounds=50)
    _report(benchmark, f"lookup() of {PAGES} pages")
    mgr.close()


@pytest.mark.parametrize("evicting", [False, True])
def test_alloc_device(benchmark, evicting):
    """New pages; with ``evicting`` the pool is full and 128 LRU pages must go first."""
    mgr, dev, ids = _resident(2 * PAGES if evicting else 2 * PAGES + 2)
    if evicting:
        more = [("more", i) for i in range(PAGES)]
        mgr.alloc_device(more)
        mgr.hit(more)
        dev.run_all()
        mgr.poll()
        ids = ids + more               # the device pool is full of backed-up pages
    new = [("new", i) for i in range(PAGES)]

    def setup():
        if new[0] in mgr.table:
            mgr.free(new)
            evicted = [i for i, s in zip(ids, mgr.lookup(ids)) if not s & 1]
            if evicted:
                mgr.load(evicted)
                dev.run_all()
            mgr.poll()
        return (new,), {}

    benchmark.pedantic(mgr.alloc_device, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    _report(benchmark, f"alloc_device() of {PAGES} pages" +
            (f", evicting {PAGES} LRU pages of {2 * PAGES}" if evicting else ""))
    mgr.close()


def test_evict_device_lru(benchmark):
    mgr, dev, ids = _resident()

    def setup():
        _reset_resident(mgr, dev, ids)
        return (), {"num_pages": PAGES}

    benchmark.pedantic(mgr.evict_device, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    _report(benchmark, f"evict_device(num_pages={PAGES}) of {PAGES} backed-up pages")
    mgr.close()


def _reset_resident(mgr, dev, ids):
    if mgr.lookup(ids[:1])[0] & 1 == 0:
        mgr.load(ids)
        dev.run_all()
        mgr.poll()


def test_poll_retires_a_load(benchmark):
    mgr, dev, ids = _manager(LAYERS)

    def setup():
        _reset(mgr, dev, ids)
        mgr.load(ids)
        dev.run_all()                  # finished on the device, not yet reported
        return (), {}

    benchmark.pedantic(mgr.poll, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    _report(benchmark, f"poll() retiring a {LAYERS}-layer load of {PAGES} pages")
    mgr.close()


# -- launches issued (launch stubbed) -------------------------------------------------------------

TARGET_LAUNCH_US_PER_LAYER = 1.0


def _launching_manager(host_twin):
    """A manager on CudaDevice's launch logic whose transfers launch (stubbed) at once."""
    lay = KVLayout("layer_first", num_layers=LAYERS, num_slots=(PAGES + 2) * PAGE, head_num=8,
                   head_dim=128, dtype=torch.bfloat16, page_size=PAGE)
    mgr = HiCacheManager(KVBuffer.allocate(lay), device=host_twin.TwinDevice(), backend="cuda",
                         host_reserve_gb=0, hicache_ratio=2.0)
    ids = [("page", i) for i in range(PAGES)]
    mgr.alloc_host(ids)
    return mgr, ids


def _reset_launched(mgr, ids):
    mgr.poll()
    if mgr.table.get(ids[0]).device_page >= 0:
        mgr.evict_device(ids)


LAUNCH_VARIANTS = {
    "every layer in one compiled call": None,
    "a prepared call per layer": "per layer",
    "the checked path per layer (before)": "checked",
}


@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_load_with_its_launches_issued(benchmark, stubbed, monkeypatch, variant):
    """load() as on a GPU: the index tensors and every layer's launch and event record,
    the driver's launch stubbed (reported; the per-layer target is asserted below)."""
    mgr, ids = _launching_manager(stubbed)
    how = LAUNCH_VARIANTS[variant]
    if how is not None:
        monkeypatch.setattr(type(mgr._load_layer), "all_layers", lambda *args: False)
    if how == "checked":
        for t in mgr._load_transfers:
            t._launcher = False

    def setup():
        _reset_launched(mgr, ids)
        return (ids,), {}

    benchmark.pedantic(mgr.load, setup=setup, rounds=ROUNDS, warmup_rounds=50)
    us = _results[f"launched {variant}"] = _median_us(benchmark)
    benchmark.extra_info.update(per_call_us=round(us, 2))
    print(f"\nload() of {TOKENS} tokens, {LAYERS} layers, launches issued (stubbed), {variant}: "
          f"{us:.1f} us")
    mgr.close()


def test_launch_cost_per_layer(stubbed, twin_library):
    """Issuing a prepared load's launches: one compiled call for every layer's launch and
    event record (target <= 1 us per layer), next to one prepared Transfer call (target
    <= 1 us above the library's own call, which the twin times in C)."""
    mgr, ids = _launching_manager(stubbed)
    handle = mgr.load(ids)
    src, dst = handle._src, handle._dst
    events = mgr.device._new_layer_events(LAYERS, mgr.load_stream)
    layers = mgr._load_layer._layers
    assert layers, "the load was launched in one compiled call"
    per_load = _time_call(lambda: layers(src, dst, events=events.handles, check=False))
    one = mgr._load_transfers[7]
    launcher = one.launcher()
    assert launcher.compiled is not None, "csrc/ops/prepared.c was not built"
    per_call = _time_call(lambda: one(src, dst, check=False))
    positional = _time_call(lambda: one(src, dst))
    library = twin_library.library_ns(launcher, src, dst) / 1e3
    per_layer = per_load / LAYERS
    print(f"\nlaunching a load's {LAYERS} layers (one compiled call, launch stubbed): "
          f"{per_load:.2f} us, {per_layer:.2f} us per layer (target <= {TARGET_LAUNCH_US_PER_LAYER}); "
          f"one prepared Transfer call: {per_call:.2f} us with check=False, "
          f"{positional:.2f} us with the indices alone, of which the library's host logic in C "
          f"{library:.2f} us (target: <= {TARGET_CALL_US} us above it)")
    mgr.close()
    assert per_layer <= TARGET_LAUNCH_US_PER_LAYER, \
        f"launching a load: {per_layer:.2f} us per layer, target {TARGET_LAUNCH_US_PER_LAYER} us"
    assert per_call - library <= TARGET_CALL_US, \
        f"one prepared Transfer call: {per_call - library:.2f} us above the library, target " \
        f"{TARGET_CALL_US} us"


TARGET_CALL_US = 1.0


def _time_call(call, repeats: int = 5) -> float:
    """The lowest of ``repeats`` medians (a shared machine's noise only adds)."""
    return min(median_us(call, ROUNDS // repeats, 20) for _ in range(repeats))


# -- next to SGLang's own controller --------------------------------------------------------------

def test_next_to_sglangs_controller(stubbed, monkeypatch):
    """SGLang's controller scheduling the same load (128 pages, 32 layers, page_first host
    pool, its kernel io backend) and a backup of 128 pages, copies no-ops; reported."""
    modules, why = import_sglang("sglang.srt.managers.cache_controller",
                                 "sglang.srt.mem_cache.memory_pool",
                                 "sglang.srt.mem_cache.pool_host.mha",
                                 "sglang.srt.mem_cache.allocator.paged")
    if modules is None:
        print(f"\nsglang is not importable here, so SGLang's controller is not measured ({why})")
        return
    cc, memory_pool, mha, paged = modules
    size = 2 * TOKENS + PAGE
    # one head of 64: the cost per call does not depend on it, and SGLang zeroes its pools
    dev = memory_pool.MHATokenToKVPool(size=size, page_size=PAGE, dtype=torch.bfloat16, head_num=1,
                                       head_dim=64, layer_num=LAYERS, device="cpu",
                                       enable_memory_saver=False, enable_alt_stream=False)
    alloc = paged.PagedTokenToKVPoolAllocator(size, PAGE, torch.bfloat16, "cpu", dev, need_sort=False)
    host = mha.MHATokenToKVPoolHost(dev._mha_buffer_info(), 2.0, 0, PAGE, "page_first",
                                    pin_memory=False, device="cpu", device_capacity_tokens=size,
                                    start_layer=0, end_layer=LAYERS)
    host.can_use_jit = host.can_use_write_back_jit = False   # sgl_kernel's path, not SGLang's JIT
    for name in ("transfer_kv_per_layer_pf_lf", "transfer_kv_all_layer_lf_pf"):
        monkeypatch.setattr(mha, name, lambda *a, **k: None, raising=False)
    ctrl = cc.HiCacheController(alloc, host, PAGE, None, threading.Event(), io_backend="kernel",
                                write_policy="write_through")
    host_slots, device_slots = host.alloc(TOKENS), alloc.alloc(TOKENS)
    held = {}

    def reset_load():
        if held.get("load") is not None:
            alloc.free(held.pop("load"))
        ctrl.ack_load_queue.clear()

    def load():
        held["load"] = ctrl.load(host_slots)
        ctrl.start_loading()

    def reset_backup():
        if held.get("backup") is not None:
            host.free(held.pop("backup"))
        ctrl.ack_write_queue.clear()

    def backup():
        held["backup"] = ctrl.write(device_slots)

    # one intra-op thread for SGLang's allocators' indexing: on a busy machine torch's
    # parallel kernels wait milliseconds for a descheduled thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sglang_load = _time_with_reset(load, reset_load)
        sglang_backup = _time_with_reset(backup, reset_backup)
    finally:
        torch.set_num_threads(threads)
    mgr, ids = _launching_manager(stubbed)
    ours_load = _time_with_reset(lambda: mgr.load(ids), lambda: _reset_launched(mgr, ids))
    mgr.free(ids)
    mgr.alloc_device(ids)

    def reset_ours():
        mgr.poll()
        if mgr.table.get(ids[0]).host_page >= 0:
            mgr.evict_host(PAGES)

    ours_backup = _time_with_reset(lambda: mgr.backup(ids), reset_ours)
    mgr.close()
    print(f"\nSGLang's HiCacheController (copies no-ops): load of {PAGES} pages x {LAYERS} layers "
          f"{sglang_load:.1f} us, backup of {PAGES} pages {sglang_backup:.1f} us; this manager "
          f"with every launch issued (stubbed): load {ours_load:.1f} us, backup {ours_backup:.1f} us")


def _time_with_reset(call, reset, rounds: int = ROUNDS) -> float:
    """Median us of ``call`` over ``rounds``, each after an untimed ``reset``."""
    reset()
    call()
    times = []
    for _ in range(rounds):
        reset()
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return sorted(times)[rounds // 2] * 1e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_schedule_layerwise_load_on_gpu(benchmark):
    """The same on real streams with the kernel backend: CPU time of load() including
    32 kernel launches (reported, not asserted: launch cost belongs to the backend)."""
    lay = KVLayout("layer_first", num_layers=LAYERS, num_slots=TOKENS + 2 * PAGE, head_num=8,
                   head_dim=128, dtype=torch.bfloat16, page_size=PAGE)
    k = [torch.zeros(lay.num_slots, 8, 128, dtype=torch.bfloat16, device="cuda")
         for _ in range(LAYERS)]
    pool = KVBuffer.from_layers(k, [torch.zeros_like(t) for t in k], page_size=PAGE)
    mgr = HiCacheManager(pool, host_reserve_gb=0)
    ids = [("page", i) for i in range(PAGES)]
    mgr.alloc_host(ids)

    def setup():
        mgr.synchronize()
        mgr.poll()
        if mgr.table.get(ids[0]).device_page >= 0:
            mgr.evict_device(ids)
        return (ids,), {}

    benchmark.pedantic(mgr.load, setup=setup, rounds=100, warmup_rounds=10)
    per_call = _median_us(benchmark)
    backend = mgr._load_transfers[0].backend.name
    benchmark.extra_info.update(per_call_us=round(per_call, 1), backend=backend,
                                gpu=torch.cuda.get_device_name())
    print(f"\nGPU ({torch.cuda.get_device_name()}, {backend}): load() of {TOKENS} tokens, "
          f"{LAYERS} layers: {per_call:.0f} us of CPU, {per_call / LAYERS:.1f} us per layer")
    setup()
    h = mgr.load(ids)
    waits = []
    for layer in range(LAYERS):
        t = time.perf_counter()
        h.wait(layer)
        waits.append(time.perf_counter() - t)
    print(f"GPU wait(layer): {sorted(waits)[LAYERS // 2] * 1e6:.1f} us of CPU")
    mgr.close()
