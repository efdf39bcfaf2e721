"""The manager's parts on their own: page allocator and table, the device emulation,
the host pool (mmap, NUMA, huge pages, sizing) and KVLayout.page_byte_runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import HAS_GPU, random_bytes_
from hicache_kernels import KVLayout
from hicache_kernels.layouts import layer_view
from hicache_kernels.manager import EmulatedDevice, HostPool, PageAllocator, PageTable, host_pool_slots
from hicache_kernels.manager.host_pool import available_memory_bytes

KINDS = ["layer_first", "page_first", "page_first_direct", "page_head"]


def _layout(kind="page_first", mla=False, slots=48, page=4, layers=3, dtype=torch.bfloat16):
    return KVLayout(kind, num_layers=layers, num_slots=slots, head_num=1 if mla else 3,
                    head_dim=8, dtype=dtype, page_size=page, mla=mla)


# -- page allocator and table --------------------------------------------------------------

def test_allocator_defers_locked_pages_and_refuses_double_free():
    a = PageAllocator(5, "host pool")
    pages = a.alloc(3)
    assert sorted(pages.tolist()) == [0, 1, 2] and a.free_count == 2
    assert a.alloc(3) is None and a.free_count == 2          # nothing taken on failure
    a.lock(pages[:2])
    a.free(pages)
    assert a.free_count == 3 and a.deferred_count == 2
    assert set(a.free_pages().tolist()).isdisjoint(pages[:2].tolist())
    with pytest.raises(ValueError, match=r"host pool: pages \[.*\] are not allocated"):
        a.free(pages[:1])
    a.unlock(pages[:2])
    assert a.free_count == 5 and a.deferred_count == 0 and a.used_count == 0


def test_allocator_lock_without_free_keeps_page():
    a = PageAllocator(2, "device pool")
    p = a.alloc(1)
    a.lock(p)
    a.unlock(p)
    assert a.state(int(p[0])) == "used" and a.free_count == 1


def test_table_lru_order():
    t = PageTable()
    entries = [t.add(i) for i in "abc"]
    for n, e in enumerate(entries):
        t.set_host(e, n)
    t.touch(entries[0])
    assert [e.page_id for e in t.host_lru] == ["b", "c", "a"]
    t.set_host(entries[1], -1)
    assert [e.page_id for e in t.host_lru] == ["c", "a"]
    t.remove(entries[2])
    assert "c" not in t and [e.page_id for e in t.host_lru] == ["a"]


# -- device emulation --------------------------------------------------------------------------

def test_emulated_wait_uses_the_record_at_wait_time():
    dev = EmulatedDevice(defer=True)
    a, b = dev.stream(name="a"), dev.stream(name="b")
    ran = []
    ev = dev.event()
    dev.launch(a, lambda s: ran.append("a1"))
    dev.record(ev, a)
    dev.wait(b, ev)
    dev.launch(b, lambda s: ran.append("b1"))
    dev.launch(a, lambda s: ran.append("a2"))
    dev.record(ev, a)                      # re-recorded: b's wait must not move
    assert not dev.step(b)                 # b waits for a1
    assert dev.step(a) and dev.step(b) and dev.step(b)
    assert ran == ["a1", "b1"] and not dev.query(ev)
    dev.synchronize(ev)
    assert ran == ["a1", "b1", "a2"] and dev.query(ev)


def test_emulated_immediate_mode_and_fresh_event():
    dev = EmulatedDevice()
    s = dev.stream()
    out = []
    dev.launch(s, lambda stream: out.append(stream.name))
    assert out == [s.name]
    assert dev.query(dev.event())           # never recorded: complete, like CUDA


def test_emulated_deadlock_is_reported():
    dev = EmulatedDevice(defer=True)
    a, b = dev.stream(name="a"), dev.stream(name="b")
    ea, eb = dev.event(), dev.event()
    dev.launch(a, lambda s: None)
    dev.record(ea, a)                       # ea: after a's first op
    dev.launch(b, lambda s: None)
    dev.record(eb, b)
    # a cycle: a waits for b's op, b waits for a's op, both queued before them
    a.ops.appendleft((None, (), None, (b, 1)))
    b.ops.appendleft((None, (), None, (a, 1)))
    with pytest.raises(RuntimeError, match="deadlock"):
        dev.synchronize(ea)


# -- KVLayout.page_byte_runs (foundation addition) ----------------------------------------------

@pytest.mark.parametrize("kind, mla", [(k, m) for k in KINDS for m in (False, True)
                                       if not (k == "page_head" and m)])   # no MLA page_head
def test_page_byte_runs_cover_exactly_the_page(kind, mla):
    lay = _layout(kind, mla, slots=24, page=4, layers=3)
    addressing = lay.plane_addressing()
    for page in (0, 1, 5):
        covered = np.zeros(lay.plane_bytes, dtype=np.int32)
        shift = addressing.item_offset(page * lay.page_size)
        for off, n in lay.page_byte_runs():
            covered[shift + off: shift + off + n] += 1
        want = np.zeros(lay.plane_bytes, dtype=np.int32)
        for layer in range(lay.num_layers):
            for slot in range(page * lay.page_size, (page + 1) * lay.page_size):
                for head in range(lay.head_num):
                    o = lay.byte_offset(slot, layer, head)
                    want[o:o + lay.head_bytes] += 1
        assert (covered == want).all(), f"{kind} page {page}"
    expected_runs = lay.num_layers if kind == "layer_first" else 1
    assert len(lay.page_byte_runs()) == expected_runs


# -- host pool ---------------------------------------------------------------------------------

def test_host_pool_slots_ratio_size_and_errors():
    assert host_pool_slots(1024, 100, 16, hicache_ratio=1.5) == 1536
    assert host_pool_slots(1024, 100, 16, hicache_ratio=2.0, hicache_size=0.0001) == 992  # 1e5/100
    with pytest.raises(ValueError, match="hicache_ratio"):
        host_pool_slots(1024, 100, 16, hicache_ratio=0)
    with pytest.raises(ValueError, match="less than one page"):
        host_pool_slots(4, 100, 16, hicache_ratio=1.0)
    with pytest.raises(ValueError, match="hicache_size"):
        host_pool_slots(4, 100, 16, hicache_size=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_host_pool_layout_and_pages_roundtrip(kind, gen):
    lay = _layout(kind, dtype=torch.float8_e4m3fn)
    with HostPool(lay, pin=False, reserve_gb=0) as pool:
        assert pool.buffer.k.shape == lay.shape and pool.buffer.v.shape == lay.shape
        assert pool.nbytes == lay.total_bytes and not pool.pinned
        assert pool.buffer.k.data_ptr() == pool.base_address
        assert pool.buffer.v.data_ptr() == pool.base_address + lay.plane_bytes
        for t in pool.buffer.tensors():
            random_bytes_(t, gen)
        pages = np.array([5, 0, 7], dtype=np.int64)
        data = pool.read_pages(pages)
        assert data.shape == (3, pool.page_bytes) and pool.page_bytes == 2 * lay.plane_bytes // 12
        # page bytes are exactly the page's slots, checked through torch views
        P = lay.page_size
        for i, page in enumerate(pages.tolist()):
            parts = []
            for plane in pool.buffer.planes():
                for layer in range(lay.num_layers):
                    v = layer_view(plane, lay, layer).reshape(-1, lay.item_bytes) \
                        if kind != "page_head" else None
                    if v is None:
                        v = torch.stack([layer_view(plane, lay, layer)[s // P, s % P].reshape(-1)
                                         for s in range(lay.num_slots)])
                    parts.append(v[page * P:(page + 1) * P].reshape(-1))
            assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(data[i]).values)
        new = torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=gen)
        pool.write_pages(pages, new)
        assert torch.equal(pool.read_pages(pages), new)
        with pytest.raises(ValueError, match="data: expected uint8"):
            pool.write_pages(pages, new[:2])


def test_host_pool_fails_early_without_the_memory():
    lay = _layout(slots=4, page=4)
    too_much = available_memory_bytes() / 2**30 + 1
    with pytest.raises(MemoryError, match=r"needs .* GiB .* available .* reserve"):
        HostPool(lay, pin=False, reserve_gb=too_much)


def test_host_pool_numa_and_huge_pages():
    lay = _layout()
    with HostPool(lay, pin=False, numa_node=0, huge_pages="transparent", reserve_gb=0) as pool:
        pool.buffer.k.view(torch.uint8).fill_(7)            # first touch after mbind
        assert "NUMA node 0" in pool.describe() and "transparent" in pool.describe()
    with pytest.raises(ValueError, match="numa_node: node 4096 does not exist"):
        HostPool(lay, pin=False, numa_node=4096, reserve_gb=0)
    with pytest.raises(ValueError, match="huge_pages: expected one of"):
        HostPool(lay, pin=False, huge_pages="yes", reserve_gb=0)


def test_host_pool_close_is_idempotent_and_survives_outside_views(caplog):
    pool = HostPool(_layout(), pin=False, reserve_gb=0)
    view = pool.buffer.k
    pool.close()
    assert "still refer to the pool" in caplog.text
    view.fill_(1)                     # the memory lives as long as the view
    pool.close()
    assert pool.buffer is None


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_host_pool_without_gpu_is_plain_memory(caplog):
    with HostPool(_layout(), reserve_gb=0) as pool:
        assert not pool.pinned and "no CUDA device" in caplog.text
    with pytest.raises(RuntimeError, match="pin: cudaHostRegister needs a CUDA device"):
        HostPool(_layout(), pin=True, reserve_gb=0)


@pytest.mark.gpu
def test_host_pool_pins_exact_size_on_gpu(caplog):
    # an odd size (604 MB): torch's pinned allocator would round it up to 1 GiB
    lay = _layout("page_first", slots=3 * 1024 * 1024 // 4 * 4 + 12, page=4, layers=2)
    with HostPool(lay, reserve_gb=0) as pool:
        assert pool.pinned and pool.buffer.is_pinned()
        assert pool.buffer.k.is_pinned(), "torch sees cudaHostRegister-ed memory as pinned"
        assert len(pool._map) == lay.total_bytes           # no rounding
        dev = torch.empty(lay.item_bytes * 4, dtype=torch.uint8, device="cuda").fill_(3)
        pool.buffer.k.view(torch.uint8).view(-1)[: dev.numel()].copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        assert int(pool.buffer.k.view(torch.uint8).view(-1)[0]) == 3
    assert not pool.pinned and "cudaHostUnregister failed" not in caplog.text


def test_docstring_examples():
    import doctest

    import hicache_kernels.manager.device as device
    import hicache_kernels.manager.host_pool as host_pool
    import hicache_kernels.manager.manager as manager
    import hicache_kernels.manager.pages as pages

    for module in (device, pages, host_pool, manager):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
