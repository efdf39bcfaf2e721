"""The SGLang storage backend against the real SGLang: built by SGLang's own
StorageBackendFactory ("dynamic"), moving pages of SGLang's own host pools
through NIXL's POSIX plugin, checked with SGLang's own page accessors."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import textwrap

import pytest
import torch

import sglang_env  # noqa: F401  (SGLang importable on CPU; must precede sglang imports)
from conftest import POISON, random_bytes_
from sglang_env import TESTS, make_pools, run_child
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.observability.metrics_collector import StorageMetrics

from hicache_kernels.integrations.sglang_storage import HiCacheKernelsStorage, host_buffer

DYNAMIC = {"backend_name": "hicache_kernels",
           "module_path": "hicache_kernels.integrations.sglang_storage",
           "class_name": "HiCacheKernelsStorage", "interface_v1": 1}
LAYOUTS = [("mha", "layer_first"), ("mha", "page_first"), ("mha", "page_first_direct"),
           ("mha", "page_head"), ("mla", "layer_first"), ("mla", "page_first"),
           ("mla", "page_first_direct")]


def storage_config(directory, *, mla=False, tp_rank=0, tp_size=1, model="Qwen/Qwen3-0.6B",
                   metrics=False, **extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=metrics, is_page_first_layout=False,
        model_name=model, extra_config={**DYNAMIC, "directory": str(directory), **extra})


def attach(config: HiCacheStorageConfig, host) -> HiCacheKernelsStorage:
    """What SGLang's cache controller does on attach."""
    backend = StorageBackendFactory.create_backend("dynamic", config, host)
    backend.register_mem_pool_host(host)
    return backend


def host_pool(kind="mha", layout="page_first", seed=0):
    """SGLang's host pool, full of random bytes."""
    _, host = make_pools(kind, layout)
    random_bytes_(host.kv_buffer, torch.Generator().manual_seed(seed))
    return host


def slots(host, pages) -> torch.Tensor:
    P = host.page_size
    return (torch.as_tensor(pages)[:, None] * P + torch.arange(P)).reshape(-1)


def pages_of(host, pages) -> list[torch.Tensor]:
    """Each page's bytes, through SGLang's own accessor."""
    return [host.get_data_page(p * host.page_size, flat=True).clone() for p in pages]


def keys(n, page_size=4, seed=1) -> list[str]:
    tokens = torch.randint(0, 2**31, (n * page_size,), generator=torch.Generator().manual_seed(seed))
    return get_hash_str(tokens.tolist(), None, page_size=page_size)


def assert_only_pages_changed(host, pages, want):
    """The pages hold ``want`` and every other byte is still POISON: each page
    is checked and then poisoned again through SGLang's own accessors."""
    for p, expected in zip(pages, want):
        got = host.get_data_page(p * host.page_size, flat=True)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), f"page {p}"
        host.set_from_flat_data_page(p * host.page_size, torch.full_like(
            expected.view(torch.uint8), POISON).view(expected.dtype))
    assert bool((host.kv_buffer.view(torch.uint8) == POISON).all()), "bytes outside the pages changed"


@pytest.mark.parametrize("kind,layout", LAYOUTS)
def test_round_trip_through_sglang_factory(tmp_path, kind, layout):
    host = host_pool(kind, layout)
    backend = attach(storage_config(tmp_path, mla=kind == "mla"), host)
    assert isinstance(backend, HiCacheKernelsStorage)
    view = host_buffer(host)           # what NIXL registers: SGLang's own memory, no copy
    assert [t.data_ptr() for t in view.tensors()] == [t.data_ptr() for t in (
        [host.kv_buffer] if kind == "mla" else host.kv_buffer.unbind(0))]
    ks, src, dst = keys(5), [3, 7, 1, 9, 4], [11, 2, 14, 5, 8]
    want = pages_of(host, src)
    assert backend.batch_exists(ks) == 0
    assert backend.batch_set_v1(ks, slots(host, src)) == [True] * 5
    host.kv_buffer.view(torch.uint8).fill_(POISON)
    assert backend.batch_exists(ks) == 5
    assert backend.batch_get_v1(ks, slots(host, dst)) == [True] * 5
    assert_only_pages_changed(host, dst, want)
    assert backend.batch_exists(keys(2, seed=2)) == 0
    backend.close()


def test_stored_prefix_is_not_written_again(tmp_path):
    host = host_pool()
    backend = attach(storage_config(tmp_path), host)
    ks = keys(4)
    assert backend.batch_set_v1(ks[:2], slots(host, [0, 1])) == [True, True]
    assert backend.batch_set_v1(ks, slots(host, [0, 1, 2, 3])) == [True] * 4
    assert backend.stats()["pages_written"] == 4


_READER = textwrap.dedent("""
    import hashlib, json, sys, torch
    from sglang_env import make_pools
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from test_sglang_storage import keys, slots, storage_config
    _, host = make_pools("mha", "page_first")
    host.kv_buffer.zero_()
    backend = StorageBackendFactory.create_backend("dynamic", storage_config({directory!r}), host)
    backend.register_mem_pool_host(host)
    ks = keys(4)
    found = backend.batch_exists(ks)
    ok = backend.batch_get_v1(ks, slots(host, [6, 5, 4, 3]))
    digests = [hashlib.sha256(host.get_data_page(p * host.page_size).view(torch.uint8).numpy()
                              .tobytes()).hexdigest() for p in (6, 5, 4, 3)]
    print(json.dumps({{"found": found, "ok": ok, "digests": digests}}))
""")


def test_second_process_reads_the_pages(tmp_path):
    host = host_pool(seed=5)
    backend = attach(storage_config(tmp_path), host)
    assert backend.batch_set_v1(keys(4), slots(host, [0, 1, 2, 3])) == [True] * 4
    backend.close()
    want = [hashlib.sha256(page.view(torch.uint8).numpy().tobytes()).hexdigest()
            for page in pages_of(host, [0, 1, 2, 3])]
    out, _ = run_child(_READER.format(directory=str(tmp_path)), paths=[TESTS])
    assert out == {"found": 4, "ok": [True] * 4, "digests": want}


def _damage(path: str, how: str) -> None:
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(os.path.getsize(path) - 1)
            return
        offset = 4096 + 100 if how == "payload" else 40   # a payload byte, or the header's key
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["payload", "header", "truncated"])
def test_damaged_page_is_a_miss(tmp_path, how):
    host = host_pool(seed=3)
    backend = attach(storage_config(tmp_path), host)
    ks = keys(4)
    want = pages_of(host, [0, 1])
    assert backend.batch_set_v1(ks, slots(host, [0, 1, 2, 3])) == [True] * 4
    (path,) = glob.glob(os.path.join(tmp_path, "**", ks[2] + ".kvpage"), recursive=True)
    _damage(path, how)
    host.kv_buffer.view(torch.uint8).fill_(POISON)
    assert backend.batch_exists(ks) == (2 if how == "truncated" else 4)   # sizes are checked on lookup
    assert backend.batch_get_v1(ks, slots(host, [8, 9, 10, 11])) == [True, True, False, False]
    got = pages_of(host, [8, 9])
    assert all(torch.equal(g.view(torch.uint8), w.view(torch.uint8)) for g, w in zip(got, want))
    if how != "truncated":
        assert backend.stats()["corrupt_pages"] == 1
        assert not os.path.exists(path), "a damaged page is removed, never offered again"
    assert backend.batch_exists(ks) == 2


def test_mla_pages_are_written_by_rank_0_and_read_by_every_rank(tmp_path):
    rank0, rank1 = host_pool("mla", "page_first", seed=1), host_pool("mla", "page_first", seed=2)
    b0 = attach(storage_config(tmp_path, mla=True, tp_rank=0, tp_size=2), rank0)
    b1 = attach(storage_config(tmp_path, mla=True, tp_rank=1, tp_size=2), rank1)
    ks = keys(3)
    assert b1.batch_set_v1(ks, slots(rank1, [0, 1, 2])) == [False] * 3   # not rank 1's to write
    assert glob.glob(os.path.join(tmp_path, "**", "*.kvpage"), recursive=True) == []
    want = pages_of(rank0, [0, 1, 2])
    assert b0.batch_set_v1(ks, slots(rank0, [0, 1, 2])) == [True] * 3
    files = glob.glob(os.path.join(tmp_path, "**", "*.kvpage"), recursive=True)
    assert len(files) == 3 and all(f.startswith(os.path.join(tmp_path, "Qwen-Qwen3-0.6B", "")) for f in files)
    assert b1.batch_exists(ks) == 3
    assert b1.batch_set_v1(ks, slots(rank1, [0, 1, 2])) == [True] * 3   # stored, by rank 0
    assert b1.stats()["pages_written"] == 0
    rank1.kv_buffer.view(torch.uint8).fill_(POISON)
    assert b1.batch_get_v1(ks, slots(rank1, [5, 6, 7])) == [True] * 3
    assert_only_pages_changed(rank1, [5, 6, 7], want)


def test_mha_pages_are_per_model_and_tp_rank(tmp_path):
    host = host_pool("mha", "page_head")
    b0 = attach(storage_config(tmp_path, tp_rank=0, tp_size=2), host)
    ks = keys(2)
    assert b0.batch_set_v1(ks, slots(host, [0, 1])) == [True, True]
    files = glob.glob(os.path.join(tmp_path, "**", "*.kvpage"), recursive=True)
    assert len(files) == 2 and all(f.startswith(os.path.join(tmp_path, "Qwen-Qwen3-0.6B_0_2", "")) for f in files)
    other_rank = attach(storage_config(tmp_path, tp_rank=1, tp_size=2), host_pool("mha", "page_head"))
    other_model = attach(storage_config(tmp_path, tp_rank=0, tp_size=2, model="meta-llama/Llama-3.1-8B"),
                         host_pool("mha", "page_head"))
    other_tp = attach(storage_config(tmp_path, tp_rank=0, tp_size=4), host_pool("mha", "page_head"))
    assert [b.batch_exists(ks) for b in (b0, other_rank, other_model, other_tp)] == [2, 0, 0, 0]


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_clear_removes_this_backends_pages_and_nothing_else(tmp_path, kind):
    """SGLang's storage clear (after a weight update): no page of this backend is served
    again, new ones are stored as before; another rank's or model's pages, and a write
    another process has in flight (its temporary file), stay."""
    mla = kind == "mla"
    host = host_pool(kind, "page_first", seed=3)
    backend = attach(storage_config(tmp_path, mla=mla, tp_size=2), host)
    other = attach(storage_config(tmp_path, mla=mla, tp_size=2, model="meta-llama/Llama-3.1-8B"),
                   host_pool(kind, "page_first", seed=4))
    rank1 = None if mla else attach(storage_config(tmp_path, tp_rank=1, tp_size=2),
                                    host_pool(kind, "page_first", seed=5))
    ks = keys(4)
    for b in filter(None, (backend, other, rank1)):
        assert b.batch_set_v1(ks, slots(host, [0, 1, 2, 3])) == [True] * 4
    page_file = backend._store.page_path(ks[0])
    temp = os.path.join(os.path.dirname(page_file), ".in-flight-write.tmp")
    open(temp, "wb").close()
    assert backend.clear() is True
    assert backend.batch_exists(ks) == 0 and not os.path.exists(page_file)
    host.kv_buffer.view(torch.uint8).fill_(POISON)
    assert backend.batch_get_v1(ks, slots(host, [4, 5, 6, 7])) == [False] * 4
    assert bool((host.kv_buffer.view(torch.uint8) == POISON).all()), "a cleared page was read"
    assert os.path.exists(temp)
    assert [b.batch_exists(ks) for b in filter(None, (other, rank1))] == [4] * (1 + (not mla))
    assert backend.clear() is True                       # again: nothing left, no error
    random_bytes_(host.kv_buffer, torch.Generator().manual_seed(6))
    want = pages_of(host, [0, 1])
    assert backend.batch_set_v1(ks[:2], slots(host, [0, 1])) == [True, True]
    host.kv_buffer.view(torch.uint8).fill_(POISON)
    assert backend.batch_get_v1(ks[:2], slots(host, [2, 3])) == [True, True]
    assert_only_pages_changed(host, [2, 3], want)
    for b in filter(None, (backend, other, rank1)):
        b.close()


def test_clear_before_the_host_pool_is_registered_is_refused_by_name(tmp_path):
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(tmp_path), host_pool())
    with pytest.raises(RuntimeError, match="register_mem_pool_host"):
        backend.clear()


@pytest.mark.parametrize("kind,layout", [("mha", "page_head"), ("mla", "layer_first")])
def test_generic_get_set_use_sglang_flat_pages(tmp_path, kind, layout):
    """SGLang without interface_v1 moves flat pages (get_data_page /
    set_from_flat_data_page); they are the same bytes as the zero-copy path's."""
    host = host_pool(kind, layout, seed=4)
    backend = attach(storage_config(tmp_path, mla=kind == "mla"), host)
    ks = keys(3)
    flat = pages_of(host, [0, 1, 2])
    assert backend.batch_set(ks[:2], flat[:2]) is True
    assert backend.exists(ks[0]) and backend.exists(ks[1]) and not backend.exists(ks[2])
    assert backend.batch_set_v1(ks[2:], slots(host, [2])) == [True]
    host.kv_buffer.view(torch.uint8).fill_(POISON)
    assert backend.batch_get_v1(ks[:2], slots(host, [6, 7])) == [True, True]
    got = backend.batch_get(ks, [host.get_dummy_flat_data_page() for _ in ks])
    assert all(torch.equal(g.view(torch.uint8), w.view(torch.uint8)) for g, w in zip(got, flat))
    assert backend.get(keys(1, seed=9)[0], host.get_dummy_flat_data_page()) is None
    assert_only_pages_changed(host, [6, 7], flat[:2])
    with pytest.raises(ValueError, match="value: expected a contiguous CPU tensor of one page"):
        backend.set(ks[0], flat[0][:-1])


def test_get_stats_reports_sglang_storage_metrics(tmp_path):
    host = host_pool()
    backend = attach(storage_config(tmp_path, metrics=True), host)
    ks = keys(3)
    backend.batch_set_v1(ks, slots(host, [0, 1, 2]))
    backend.batch_get_v1(ks, slots(host, [3, 4, 5]))
    stats = backend.get_stats()
    assert isinstance(stats, StorageMetrics)
    assert stats.backup_pgs == [3] and stats.prefetch_pgs == [3]
    assert stats.backup_bandwidth[0] > 0 and stats.prefetch_bandwidth[0] > 0
    assert backend.get_stats() == StorageMetrics()   # drained, as SGLang's collector expects


def test_bad_input_is_named_and_changes_nothing(tmp_path):
    host = host_pool()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['directroy'\]"):
        StorageBackendFactory.create_backend("dynamic", storage_config(tmp_path, directroy="/x"), host)
    backend = attach(storage_config(tmp_path), host)
    ks = keys(2)
    with pytest.raises(ValueError, match="host_indices: expected 2 pages of 4 slots"):
        backend.batch_set_v1(ks, slots(host, [0]))
    with pytest.raises(ValueError, match="host_indices: each page needs 4 consecutive slots"):
        backend.batch_get_v1(ks, torch.arange(1, 9))
    assert backend.batch_exists(ks) == 0 and backend.stats()["pages_written"] == 0
    with pytest.raises(ValueError, match="mem_pool_host: layout 'page_unified' is not stored here"):
        backend.register_mem_pool_host(make_pools("mha", "page_unified")[1])
    assert backend.batch_set_v1(ks, slots(host, [0, 1])) == [True, True]   # still attached


def test_unusable_directory_gives_misses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    host = host_pool()
    backend = attach(storage_config(blocker / "pages"), host)
    ks = keys(2)
    assert backend.batch_set_v1(ks, slots(host, [0, 1])) == [False, False]
    assert backend.batch_exists(ks) == 0
    assert backend.batch_get_v1(ks, slots(host, [2, 3])) == [False, False]
    assert json.dumps(backend.stats()) == "{}"
