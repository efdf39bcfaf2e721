"""HiCacheManager behaviour on the CPU emulation: policies, eviction, layer-wise loads,
acks, errors, storage hooks, logging and NVTX. The randomized proof is in
test_manager_stateful.py; these pin down each documented behaviour once."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
import torch

from conftest import HAS_GPU, poison_, random_bytes_
from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import (EmulatedDevice, HiCacheManager, InMemoryStorage, OutOfPages,
                                     PageState)
from hicache_kernels.manager import manager as manager_module

P = 4


def make(*, pages=4, layers=3, mla=False, dtype=torch.bfloat16, defer=False, storage=None,
         on_evict=None, **options):
    lay = KVLayout("layer_first", num_layers=layers, num_slots=pages * P, head_num=1 if mla else 2,
                   head_dim=8, dtype=dtype, page_size=P, mla=mla)
    pool = KVBuffer.allocate(lay)
    for t in pool.tensors():
        poison_(t)
    options.setdefault("backend", "reference")
    options.setdefault("host_reserve_gb", 0)
    dev = EmulatedDevice(defer=defer)
    mgr = HiCacheManager(pool, device=dev, storage=storage, on_evict=on_evict, **options)
    for t in mgr.host.tensors():
        poison_(t)
    return mgr, dev


def slots_bytes(buf: KVBuffer, slots: torch.Tensor, layers=None) -> torch.Tensor:
    layers = range(buf.layout.num_layers) if layers is None else layers
    out = []
    for view in buf.layer_views(layers):
        p = view.shape[1]
        out.append(view[slots // p, slots % p])
    return torch.stack(out)


def write_pages(mgr, ids, gen) -> torch.Tensor:
    """The model's prefill: allocate device pages and write random KV there."""
    slots = mgr.alloc_device(ids)
    data = torch.randint(0, 256, slots_bytes(mgr.device_pool, slots).shape, dtype=torch.uint8,
                         generator=gen)
    for view, rows in zip(mgr.device_pool.layer_views(range(mgr.num_layers)), data):
        p = view.shape[1]
        view[slots // p, slots % p] = rows
    return data


def kinds(acks):
    return [a.kind for a in acks]


# -- the documentation's examples run as written (on a CPU, and on a GPU where there is one) ------

DOC = Path(__file__).resolve().parent.parent / "docs" / "manager.md"
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("code", DOC_BLOCKS, ids=[f"block{i}" for i in range(len(DOC_BLOCKS))])
def test_docs_manager_examples_run(code):
    assert len(DOC_BLOCKS) >= 2
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})


def test_docs_manager_name_no_development_machine():
    text = DOC.read_text()
    assert "/work/" not in text and "device=\"cuda\")" not in text


def test_lookup_shows_what_synchronize_retired_and_poll_acks_it(gen):
    """As docs/manager.md says: a transfer shows in flight until it is retired (here by
    synchronize), and its ack comes from poll."""
    mgr, dev = make(defer=True)
    write_pages(mgr, ["a"], gen)
    op = mgr.backup(["a"])
    dev.run_all()
    assert mgr.lookup(["a"]) == [PageState.DEVICE | PageState.HOST | PageState.BACKING_UP]
    mgr.synchronize()
    assert mgr.lookup(["a"]) == [PageState.DEVICE | PageState.HOST]
    assert [(a.kind, a.op_id) for a in mgr.poll()] == [("backup", op)]
    mgr.close()


# -- the round trip, every host layout ------------------------------------------------------------

@pytest.mark.parametrize("host_layout, mla, dtype", [
    ("layer_first", False, torch.bfloat16), ("page_first", False, torch.float8_e4m3fn),
    ("page_first_direct", True, torch.float16), ("page_head", False, torch.float32),
    ("page_first", True, torch.int8),
])
def test_round_trip_through_host(host_layout, mla, dtype, gen):
    mgr, _ = make(host_layout=host_layout, mla=mla, dtype=dtype)
    # whole pages move as one item where both layouts keep a page contiguous
    assert mgr._by_page == (host_layout in ("layer_first", "page_first_direct"))
    data = write_pages(mgr, ["a", "b", "c"], gen)
    mgr.hit(["a", "b", "c"])                                   # write_through: backs up
    assert kinds(mgr.poll()) == ["backup"]
    host = slots_bytes(mgr.host, mgr.host_indices(["a", "b", "c"]))
    assert torch.equal(host, data)
    assert mgr.evict_device(["a", "c"]) == ["a", "c"]
    for t in mgr.device_pool.tensors():
        poison_(t)
    h = mgr.load(["c", "a"])
    assert kinds(mgr.poll()) == ["load"] and h.done
    got = slots_bytes(mgr.device_pool, h.device_indices)
    want = torch.cat([data[:, 2 * P:3 * P], data[:, 0:P]], dim=1)
    assert torch.equal(got, want)
    assert torch.equal(h.device_indices, mgr.device_indices(["c", "a"]))
    mgr.close()


@pytest.mark.skipif(HAS_GPU, reason="Triton runs CPU tensors only in its interpreter, "
                    "which conftest enables only without a GPU")
@pytest.mark.parametrize("host_layout", ["page_first", "layer_first"])   # tokens; whole pages
def test_triton_interpreter_path(host_layout, gen):
    """The same manager with the Triton backend (interpreter on CPU), a small case."""
    mgr, _ = make(backend="triton", layers=2, pages=2, host_layout=host_layout)
    assert mgr._by_page == (host_layout == "layer_first")
    data = write_pages(mgr, [1, 2], gen)
    mgr.backup([1, 2])
    mgr.poll()
    mgr.evict_device([1, 2])
    h = mgr.load([2, 1])
    mgr.poll()
    got = slots_bytes(mgr.device_pool, h.device_indices)
    assert torch.equal(got, torch.cat([data[:, P:], data[:, :P]], dim=1))
    assert mgr._load_transfers[0].backend.name == "triton"
    mgr.close()


# -- write policies ------------------------------------------------------------------------------

def test_write_through_backs_up_on_first_hit(gen):
    mgr, _ = make(write_policy="write_through")
    write_pages(mgr, ["a"], gen)
    assert mgr.lookup(["a"]) == [PageState.DEVICE]
    assert mgr.hit(["a"]) is not None
    assert mgr.lookup(["a"]) == [PageState.DEVICE | PageState.HOST | PageState.BACKING_UP]
    mgr.poll()
    assert mgr.lookup(["a"]) == [PageState.DEVICE | PageState.HOST]
    assert mgr.hit(["a"]) is None                             # already on host


def test_write_through_selective_backs_up_on_second_hit(gen):
    mgr, _ = make(write_policy="write_through_selective")
    write_pages(mgr, ["a"], gen)
    assert mgr.hit(["a"]) is None and mgr.lookup(["a"]) == [PageState.DEVICE]
    assert mgr.hit(["a"]) is not None
    mgr.poll()
    assert PageState.HOST in mgr.lookup(["a"])[0]


def test_write_through_drops_unbacked_pages_on_eviction(gen):
    removed = []
    mgr, _ = make(write_policy="write_through_selective", on_evict=removed.append)
    write_pages(mgr, ["a"], gen)
    assert mgr.evict_device(["a"]) == ["a"]
    assert mgr.lookup(["a"]) == [PageState.ABSENT]
    assert removed[0].tier == "device" and removed[0].removed == ("a",)


def test_write_back_backs_up_on_eviction_and_the_slot_waits_for_the_copy(gen):
    mgr, dev = make(write_policy="write_back", pages=2, defer=True)
    data = write_pages(mgr, ["a", "b"], gen)
    dev.run_all()
    assert mgr.hit(["a", "b"]) is None                        # write_back: never on a hit
    mgr.evict_device(["a"])
    assert mgr.lookup(["a"]) == [PageState.HOST | PageState.BACKING_UP]
    assert mgr.device_pages.deferred_count == 1               # slot held by the copy
    assert mgr.device_pages.free_count == 0
    # the pool is full: allocating must wait for the copy, then reuse the slot
    slots = mgr.alloc_device(["c"])
    assert not mgr.backup_stream.ops, "the copy ran before the slot was reused"
    assert torch.equal(slots_bytes(mgr.host, mgr.host_indices(["a"])), data[:, :P])
    assert kinds(mgr.poll()) == ["backup"]
    assert slots.tolist() == list(range(0, P)) or slots.tolist() == list(range(P, 2 * P))


def test_threshold_option(gen):
    mgr, _ = make(write_policy="write_through", write_through_threshold=3)
    write_pages(mgr, ["a"], gen)
    assert mgr.hit(["a"]) is None and mgr.hit(["a"]) is None and mgr.hit(["a"]) is not None


# -- eviction -----------------------------------------------------------------------------------

def test_device_lru_eviction_skips_pinned_and_reports(gen):
    events = []
    mgr, _ = make(pages=3, on_evict=events.append)
    write_pages(mgr, ["a", "b", "c"], gen)
    mgr.hit(["a", "b", "c"])
    mgr.poll()
    mgr.pin(["a"])
    mgr.hit(["b"])                                            # b is now most recent
    write_pages(mgr, ["d"], gen)                              # full: evicts LRU unpinned = c
    assert events[-1].tier == "device" and events[-1].page_ids == ("c",)
    assert events[-1].removed == ()                           # c is still on host
    assert mgr.lookup(["c"]) == [PageState.HOST]
    mgr.pin(["b"])
    mgr.pin(["d"])
    with pytest.raises(OutOfPages, match="device pool: need 1 pages"):
        mgr.alloc_device(["e"])
    assert "e" not in mgr.table                               # nothing half-done


def test_host_lru_eviction_order_and_callback(gen):
    events = []
    mgr, _ = make(pages=4, hicache_ratio=1.0, on_evict=events.append)
    write_pages(mgr, ["a", "b", "c"], gen)
    mgr.hit(["a", "b", "c"])
    mgr.poll()
    mgr.evict_device(["a", "b"])                              # a, b host-only; c on both
    mgr.hit(["a"])                                            # a more recent than b
    assert mgr.evict_host(1) == ["b"]                         # host-only pages first, LRU
    assert events[-1].tier == "host" and events[-1].removed == ("b",)
    assert mgr.evict_host(2) == ["a", "c"]                    # then redundant copies
    assert mgr.lookup(["a", "c"]) == [PageState.ABSENT, PageState.DEVICE]


def test_host_pages_held_by_a_load_are_not_evicted(gen):
    mgr, dev = make(defer=True)
    write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    dev.run_all()
    mgr.poll()
    mgr.evict_device(["a"])
    h = mgr.load(["a"])
    assert mgr.evict_host(4) == []                            # the load holds a's host page
    dev.run_all()
    assert kinds(mgr.poll()) == ["load"] and h.done
    assert mgr.evict_host(4) == ["a"]


# -- layer-wise loads ------------------------------------------------------------------------------

def _page_on_host(mgr, dev, ids, gen):
    data = write_pages(mgr, ids, gen)
    mgr.backup(ids)
    dev.run_all()
    mgr.poll()
    mgr.evict_device(ids)
    return data


def test_wait_on_one_layer_lets_it_run_before_later_layers(gen):
    mgr, dev = make(defer=True, layers=3)
    data = _page_on_host(mgr, dev, ["a", "b"], gen)
    h = mgr.load(["a", "b"])
    assert h.num_layers == 3 and not h.query(0)
    h.wait(0)
    seen = []
    dev.launch(dev.current_stream(), lambda s: seen.append(
        slots_bytes(mgr.device_pool, h.device_indices, range(0, 1))), "attention L0")
    h.wait(2)
    dev.launch(dev.current_stream(), lambda s: seen.append("L2"), "attention L2")
    with pytest.raises(IndexError, match="layer: expected 0 <= layer < 3, got 3"):
        h.wait(3)
    load = mgr.load_stream
    while not dev.runnable(dev.current_stream()):
        assert dev.step(load)
    assert h.query(0) and not h.query(1), "layer 0 landed, later layers still in flight"
    while not seen:                                           # the wait, then the read
        assert dev.step(dev.current_stream())
    assert not h.query(1)
    assert torch.equal(seen[0], data[[0, 3]])                 # K and V of layer 0
    assert not dev.step(dev.current_stream())                 # waits for layer 2
    dev.run_all()
    assert seen[-1] == "L2" and h.query()


def test_several_loads_in_flight_and_poll_never_blocks(gen):
    mgr, dev = make(defer=True, pages=4)
    _page_on_host(mgr, dev, ["a", "b", "c"], gen)
    h1 = mgr.load(["a"])
    h2 = mgr.load(["b", "c"])
    queued = len(mgr.load_stream.ops)
    assert mgr.poll() == [] and len(mgr.load_stream.ops) == queued   # nothing ran
    assert mgr.in_flight == 2
    h1.synchronize()
    acks = mgr.poll()
    assert [(a.kind, a.page_ids) for a in acks] == [("load", ("a",))]
    assert h1.done and not h2.done
    h2.wait_all()
    dev.run_all()
    assert [(a.kind, a.op_id) for a in mgr.poll()] == [("load", h2.op_id)]


def test_load_waits_for_a_backup_still_writing_the_host_copy(gen):
    mgr, dev = make(defer=True)
    data = write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    mgr.evict_device(["a"])                                   # host copy still arriving
    assert mgr.lookup(["a"]) == [PageState.HOST | PageState.BACKING_UP]
    h = mgr.load(["a"])
    while dev.step(mgr.load_stream):
        pass
    assert mgr.backup_stream.ops, "the load ran ahead of the backup it reads"
    dev.run_all()
    mgr.poll()
    assert torch.equal(slots_bytes(mgr.device_pool, h.device_indices), data)


def test_free_during_a_load_defers_the_slots(gen):
    mgr, dev = make(defer=True, pages=2)
    _page_on_host(mgr, dev, ["a"], gen)
    h = mgr.load(["a"])
    mgr.free(["a"])
    assert mgr.device_pages.deferred_count == 1 and mgr.host_pages.deferred_count == 1
    dev.run_all()
    assert kinds(mgr.poll()) == ["load"] and h.done
    assert mgr.device_pages.deferred_count == 0 and mgr.host_pages.deferred_count == 0
    assert mgr.device_pages.free_count == 2


# -- errors: named, and nothing changed -----------------------------------------------------------

def test_errors_name_the_argument(gen):
    mgr, _ = make()
    write_pages(mgr, ["a"], gen)
    before = mgr.stats()
    with pytest.raises(KeyError, match="page_ids: 'zz' is not in the page table"):
        mgr.load(["zz"])
    with pytest.raises(ValueError, match="'a' cannot be loaded \\(already on the device"):
        mgr.load(["a"])
    with pytest.raises(ValueError, match="'a' is already in the page table"):
        mgr.alloc_device(["a"])
    with pytest.raises(ValueError, match="page_ids: 'x' appears more than once"):
        mgr.alloc_device(["x", "x"])
    mgr.pin(["a"])
    with pytest.raises(ValueError, match="'a' cannot leave the device \\(pinned\\)"):
        mgr.evict_device(["a"])
    with pytest.raises(ValueError, match="'a' is pinned"):
        mgr.free(["a"])
    mgr.unpin(["a"])
    with pytest.raises(ValueError, match="'a' is not pinned"):
        mgr.unpin(["a"])
    with pytest.raises(ValueError, match="expected at least one page"):
        mgr.load([])
    with pytest.raises(ValueError, match="page_ids: 'a' appears more than once"):
        mgr.evict_device(["a", "a"])
    with pytest.raises(ValueError, match="page_ids: 'a' appears more than once"):
        mgr.free(["a", "a"])
    with pytest.raises(ValueError, match="have no host copy"):
        mgr.host_indices(["a"])
    assert mgr.stats() == before
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['ratio'\]"):
        make(ratio=2)
    with pytest.raises(ValueError, match="write_policy: expected one of"):
        make(write_policy="write_sometimes")
    with pytest.raises(RuntimeError, match="prefetch: the manager has no storage tier"):
        mgr.prefetch(["a"])


def test_a_page_named_twice_in_one_call_is_refused(gen):
    """Every call refuses a repeated id (tests/test_manager_failures.py checks each)."""
    mgr, _ = make(write_policy="write_through_selective")
    write_pages(mgr, ["a"], gen)
    with pytest.raises(ValueError, match="page_ids: 'a' appears more than once"):
        mgr.hit(["a", "a"])
    assert mgr.table.get("a").hits == 0
    mgr.backup(["a"])
    mgr.evict_device(["a"])
    before = mgr.stats()
    with pytest.raises(ValueError, match="page_ids: 'a' appears more than once"):
        mgr.load(["a", "a"])
    assert mgr.stats() == before


def test_host_pool_sizing_by_ratio_and_by_size():
    mgr, _ = make(pages=4, hicache_ratio=3.0)
    assert mgr.host_pool.layout.num_slots == 12 * P
    mgr.close()
    bytes_per_token = 2 * 3 * 2 * 8 * 2            # K,V x layers x heads x dim x bf16
    mgr, _ = make(pages=4, hicache_size=bytes_per_token * 10 * P / 1e9)
    assert mgr.host_pool.layout.num_slots == 10 * P
    mgr.close()


def test_close_finishes_transfers_and_unmaps(gen, caplog):
    mgr, dev = make(defer=True)
    write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    mgr.close()
    assert not mgr.backup_stream.ops and mgr.host_pool._map is None
    assert "still refer to the pool" not in caplog.text
    mgr.close()


# -- alloc_host and a storage tier ------------------------------------------------------------------

def test_alloc_host_then_load(gen):
    mgr, _ = make(host_layout="page_first")
    slots = mgr.alloc_host(["x"])
    data = torch.randint(0, 256, slots_bytes(mgr.host, slots).shape, dtype=torch.uint8,
                         generator=gen)
    for view, rows in zip(mgr.host.layer_views(range(mgr.num_layers)), data):
        p = view.shape[1]
        view[slots // p, slots % p] = rows
    h = mgr.load(["x"])
    mgr.poll()
    assert torch.equal(slots_bytes(mgr.device_pool, h.device_indices), data)


@pytest.mark.parametrize("defer", [False, True])
def test_storage_write_through_and_prefetch(defer, gen):
    store = InMemoryStorage(defer=defer)
    mgr, _ = make(storage=store, host_layout="layer_first")
    data = write_pages(mgr, ["a", "b"], gen)
    mgr.hit(["a", "b"])
    acks = mgr.poll()                                         # the store starts after the backup
    if defer:
        assert kinds(acks) == ["backup"]
        assert store.pages == {} and mgr.in_flight == 1
        assert mgr.host_pages.is_locked(mgr.table.get("a").host_page)
        store.complete()
        acks = mgr.poll()
    assert [(a.kind, a.page_ids, a.failed) for a in acks][-1] == ("store", ("a", "b"), ())
    assert set(store.pages) == {"a", "b"}
    mgr.free(["a", "b"])
    assert mgr.lookup(["a"]) == [PageState.ABSENT]
    assert mgr.prefetch(["a", "b", "zz"]) == ("a", "b")       # the stored prefix
    if defer:
        assert mgr.lookup(["a"]) == [PageState.HOST | PageState.FETCHING]
        with pytest.raises(ValueError, match="still arriving from storage"):
            mgr.load(["a"])
        store.complete()
    assert kinds(mgr.poll()) == ["prefetch"]
    h = mgr.load(["b", "a"])
    mgr.poll()
    got = slots_bytes(mgr.device_pool, h.device_indices)
    assert torch.equal(got, torch.cat([data[:, P:], data[:, :P]], dim=1))


def test_storage_get_failure_drops_the_page(gen):
    class Flaky(InMemoryStorage):
        def batch_get(self, keys, host_pages):
            super().batch_get(keys, host_pages)
            return [k != "b" for k in keys]

    store = Flaky()
    mgr, _ = make(storage=store)
    write_pages(mgr, ["a", "b"], gen)
    mgr.hit(["a", "b"])
    mgr.poll()
    mgr.poll()
    mgr.free(["a", "b"])
    mgr.prefetch(["a", "b"])
    (ack,) = mgr.poll()
    assert ack.kind == "prefetch" and ack.failed == ("b",)
    assert mgr.lookup(["a", "b"]) == [PageState.HOST, PageState.ABSENT]
    assert mgr.host_pages.used_count == 1


# -- logging and NVTX ----------------------------------------------------------------------------------

def test_startup_log_says_what_was_set_up(caplog):
    caplog.set_level(logging.INFO, logger="hicache_kernels")
    mgr, _ = make(pages=4, host_layout="page_first", numa_node=0)
    text = caplog.text
    assert "device pool: 16 tokens" in text and "GiB" in text
    assert "host pool: 32 tokens" in text and "page_first" in text
    pinned = "pinned (cudaHostRegister)" if HAS_GPU else "not pinned (no CUDA device)"
    assert pinned in text and "NUMA node 0" in text
    assert "load reference (asked for reference)" in text and "write policy write_through" in text
    mgr.close()


def test_debug_log_shows_each_transfer(gen, caplog):
    mgr, _ = make()
    caplog.set_level(logging.DEBUG, logger="hicache_kernels.manager")
    write_pages(mgr, ["a"], gen)
    mgr.hit(["a"])
    mgr.evict_device(["a"])
    mgr.load(["a"])
    mgr.poll()
    text = caplog.text
    assert "backup op 1 (write_through hit): 1 pages (4 tokens) device->host" in text
    assert "load op 2: 1 pages (4 tokens) host->device, 3 layers" in text
    assert "load op 2 done" in text


def test_nvtx_ranges_name_operation_layer_and_tokens(gen, monkeypatch):
    names = []
    monkeypatch.setattr(manager_module, "_nvtx_enabled", lambda: True)
    monkeypatch.setattr(manager_module, "nvtx_range", lambda name: (names.append(name), _Null())[1])
    mgr, _ = make(layers=2)
    write_pages(mgr, ["a", "b"], gen)
    mgr.hit(["a", "b"])
    mgr.evict_device(["a"])
    h = mgr.load(["a"])
    h.wait(1)
    mgr.poll()
    mgr.evict_host(1)
    for want in ("hicache.alloc_device n=8", "hicache.hit n=8", "hicache.backup n=8",
                 "hicache.evict_device n=4", "hicache.load n=4", "hicache.load L0 n=4",
                 "hicache.load L1 n=4", "hicache.poll n=0", "hicache.evict_host n=4"):
        assert want in names, (want, names)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.gpu
def test_gpu_layerwise_load_with_a_busy_compute_stream(gen):
    """Real streams: the compute stream is kept busy; a load waits for it, and
    attention on layer 0 reads the right bytes after wait(0)."""
    lay = KVLayout("layer_first", num_layers=4, num_slots=64 * P, head_num=8, head_dim=128,
                   dtype=torch.bfloat16, page_size=P)
    k = [torch.empty(lay.num_slots, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    v = [torch.empty_like(t) for t in k]
    pool = KVBuffer.from_layers(k, v, page_size=P)
    compute = torch.cuda.Stream()
    mgr = HiCacheManager(pool, compute_stream=compute, host_reserve_gb=0)
    ids = list(range(32))
    with torch.cuda.stream(compute):
        slots = mgr.alloc_device(ids)
        for t in pool.tensors():
            random_bytes_(t)
        want = [t[slots].clone() for t in pool.tensors()]
    mgr.hit(ids)                   # the backup waits for the compute stream's writes
    mgr.synchronize()
    mgr.poll()
    mgr.evict_device(ids)
    with torch.cuda.stream(compute):
        torch.cuda._sleep(50_000_000)          # a long forward still using the old slots
        for t in pool.tensors():
            t.fill_(0)
    h = mgr.load(ids)
    h.wait(0, stream=compute)
    with torch.cuda.stream(compute):
        got0 = [pool.k[0][h.device_indices].clone(), pool.v[0][h.device_indices].clone()]
    h.wait_all(stream=compute)
    compute.synchronize()
    assert torch.equal(got0[0], want[0]) and torch.equal(got0[1], want[4])
    for t, w in zip(pool.tensors(), want):
        assert torch.equal(t[h.device_indices], w)
    mgr.close()


@pytest.mark.gpu
def test_gpu_calls_do_not_block_on_a_busy_stream():
    """alloc_device, load (its index copies) and backup return while the compute
    stream is still busy: index copies come from pinned memory, which CUDA queues
    (from pageable memory it would first wait for the stream)."""
    lay = KVLayout("layer_first", num_layers=4, num_slots=64 * P, head_num=8, head_dim=128,
                   dtype=torch.bfloat16, page_size=P)
    k = [torch.zeros(lay.num_slots, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    pool = KVBuffer.from_layers(k, [torch.zeros_like(t) for t in k], page_size=P)
    compute = torch.cuda.Stream()
    mgr = HiCacheManager(pool, compute_stream=compute, host_reserve_gb=0)
    mgr.alloc_host(list(range(16)))
    # warm, with the same sizes: kernels, address tables, pinned staging blocks
    mgr.alloc_device(list(range(200, 208)))
    mgr.load(list(range(8)))
    mgr.backup(list(range(200, 208)))
    mgr.synchronize()
    mgr.poll()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(2_000_000_000)        # about a second of a busy forward pass
    start = time.perf_counter()
    mgr.alloc_device(list(range(100, 108)))
    h = mgr.load(list(range(8, 16)))
    mgr.backup(list(range(100, 108)))
    took = time.perf_counter() - start
    busy = not compute.query()
    torch.cuda.synchronize()
    mgr.poll()
    assert h.done
    assert busy, "the sleep finished before the calls returned: the test proves nothing"
    assert took < 0.1, f"the calls blocked for {took * 1e3:.0f} ms on the busy stream"
    mgr.close()


def test_page_size_option_on_a_per_layer_pool(gen):
    """SGLang's device pool is per-layer tensors with no page size of its own."""
    k = [torch.empty(32, 2, 8, dtype=torch.float16) for _ in range(2)]
    v = [torch.empty_like(t) for t in k]
    pool = KVBuffer.from_layers(k, v)                          # layout page_size 1
    mgr = HiCacheManager(pool, page_size=8, host_layout="page_head", backend="reference",
                         host_reserve_gb=0)
    assert mgr.page_size == 8 and mgr.device_pages.num_pages == 4
    assert mgr.host_pool.layout.page_size == 8
    assert not mgr._by_page          # page_head splits a page; see the next test
    data = write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    mgr.evict_device(["a"])
    h = mgr.load(["a"])
    assert torch.equal(slots_bytes(pool, h.device_indices), data)
    mgr.close()
    with pytest.raises(ValueError, match="page_size: expected a positive int"):
        HiCacheManager(pool, page_size=0, host_reserve_gb=0)
    with pytest.raises(ValueError, match="larger than the device pool"):
        HiCacheManager(pool, page_size=64, host_reserve_gb=0)


def test_whole_pages_on_a_per_layer_pool_of_page_size_one(gen):
    """SGLang's per-layer device pool (layout page size 1) with 8-token manager pages
    still moves whole pages, and the bytes land where device_indices say."""
    k = [torch.empty(32, 2, 8, dtype=torch.float16) for _ in range(2)]
    pool = KVBuffer.from_layers(k, [torch.empty_like(t) for t in k])
    for t in pool.tensors():
        poison_(t)
    mgr = HiCacheManager(pool, page_size=8, backend="reference", host_reserve_gb=0)
    assert mgr._by_page and mgr._load_transfers[0].plan.item_bytes == 8 * 2 * 8 * 2
    data = write_pages(mgr, ["a", "b"], gen)
    mgr.backup(["a", "b"])
    mgr.evict_device(["a", "b"])
    for t in pool.tensors():
        poison_(t)
    h = mgr.load(["b", "a"])
    assert torch.equal(slots_bytes(pool, h.device_indices),
                       torch.cat([data[:, 8:], data[:, :8]], dim=1))
    mgr.close()


def test_a_row_reused_while_its_old_transfer_is_in_flight_keeps_its_own_state(gen):
    """A page freed during its load (or backup) leaves the table; a new page may take
    its row, and start its own load (backup), before the old one retires. Retiring the
    old transfer must leave the new page's LOADING (BACKING_UP) mark alone."""
    mgr, dev = make(defer=True, pages=4)
    _page_on_host(mgr, dev, ["a"], gen)
    h = mgr.load(["a"])
    row = mgr.table.index["a"]
    mgr.free(["a"])
    mgr.alloc_host(["c"])
    assert mgr.table.index["c"] == row                       # c took a's row
    mgr.load(["c"])
    while not h.query():                                     # only a's load runs
        assert dev.step(mgr.load_stream)
    assert [(a.kind, a.page_ids) for a in mgr.poll()] == [("load", ("a",))]
    assert mgr.lookup(["c"]) == [PageState.DEVICE | PageState.HOST | PageState.LOADING]

    write_pages(mgr, ["x"], gen)
    mgr.backup(["x"])
    row = mgr.table.index["x"]
    mgr.free(["x"])
    write_pages(mgr, ["y"], gen)
    assert mgr.table.index["y"] == row                       # y took x's row
    mgr.backup(["y"])
    assert dev.step(mgr.backup_stream)                       # only x's backup runs
    assert [(a.kind, a.page_ids) for a in mgr.poll()] == [("backup", ("x",))]
    assert mgr.lookup(["y"]) == [PageState.DEVICE | PageState.HOST | PageState.BACKING_UP]
    dev.run_all()
    mgr.poll()
    assert mgr.lookup(["c", "y"]) == [PageState.DEVICE | PageState.HOST] * 2
