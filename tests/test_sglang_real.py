"""hicache_kernels.sglang under SGLang's own host pool (the tests' real SGLang).

SGLang 0.5.23's ``MHATokenToKVPoolHost`` and ``MHATokenToKVPool`` on CPU tensors, with
the names it imports from ``sgl_kernel.kvcacheio`` replaced by this drop-in: every host
layout and io backend backs up random device pages and loads them back per layer,
checked by raw bytes, on pools SGLang builds and destroys 150 times (where a plan cache
keyed by addresses served freed pools), and every pool's memory must be freed after.
Plans run on the copy-engine backend's descriptors executed with memmove, so a stale
plan would write to the wrong memory.
"""

from __future__ import annotations

import gc
import importlib

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import sglang_env  # noqa: F401  (puts the torchvision stand-in on the path first)
import hicache_kernels.sglang as kvio
from hicache_kernels import backends
from test_sglang_lifetime import HostCopyEngine

L, P, H, D, DEVICE_SLOTS = 4, 8, 2, 16, 256
REBUILDS = 150


def _sglang():
    return (importlib.import_module("sglang.srt.mem_cache.memory_pool"),
            importlib.import_module("sglang.srt.mem_cache.pool_host.mha"))


@pytest.fixture
def sglang(monkeypatch):
    memory_pool, mha = _sglang()
    for name in kvio.__all__:      # what SGLang imports from sgl_kernel.kvcacheio on a GPU
        monkeypatch.setattr(mha, name, getattr(kvio, name), raising=False)
    engine = HostCopyEngine()
    monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
    kvio.clear_plan_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield memory_pool, mha
    torch.set_num_threads(threads)
    kvio.clear_plan_cache()


def _pages(n_slots, gen, pages=6):
    chosen = torch.randperm(n_slots // P, generator=gen)[:pages]
    return (chosen[:, None] * P + torch.arange(P)).reshape(-1)


def _round_trip(memory_pool, mha, layout, io_backend, gen, freed):
    dev = memory_pool.MHATokenToKVPool(
        size=DEVICE_SLOTS + P, page_size=P, dtype=torch.bfloat16, head_num=H, head_dim=D,
        layer_num=L, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    host = mha.MHATokenToKVPoolHost(
        dev._mha_buffer_info(), 2.0, 0, P, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=DEVICE_SLOTS + P, start_layer=0, end_layer=L)
    host.can_use_jit = host.can_use_write_back_jit = False   # sgl_kernel's calls, not SGLang's JIT
    layers = dev.k_buffer + dev.v_buffer
    for t in layers:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
    dev_slots, host_slots = _pages(DEVICE_SLOTS, gen), _pages(host.size, gen)
    host.backup_from_device_all_layer(dev, host_slots, dev_slots, io_backend)
    want = [t[dev_slots].clone() for t in layers]
    for t in layers:
        t.view(torch.uint8).fill_(0xA5)
    back = _pages(DEVICE_SLOTS, gen)
    for layer in range(L):
        host.load_to_device_per_layer(dev, host_slots, back, layer, io_backend)
    for i, (w, t) in enumerate(zip(want, layers)):
        assert torch.equal(w.view(torch.uint8), t[back].view(torch.uint8)), f"plane {i}"
    freed += [StorageWeakRef(t.untyped_storage()) for t in (dev.k_buffer[0], host.kv_buffer)]
    host.destroy()


@pytest.mark.parametrize("layout, io_backend", [
    ("layer_first", "kernel"), ("page_first", "kernel"), ("page_head", "kernel"),
    ("layer_first", "direct"), ("page_first_direct", "direct"),
])
def test_sglang_builds_and_destroys_its_pools(sglang, layout, io_backend):
    memory_pool, mha = sglang
    gen = torch.Generator().manual_seed(0)
    freed = []
    for _ in range(REBUILDS):
        _round_trip(memory_pool, mha, layout, io_backend, gen, freed)
    gc.collect()
    assert all(ref.expired() for ref in freed)
