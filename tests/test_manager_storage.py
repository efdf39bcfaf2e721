"""The manager with the NIXL storage tier (real nixl, POSIX plugin, CPU): write-through
to files, lookups that come back from files, prefetch policies, storage trouble that
never stops the cache, and host slots that storage still reads or writes never reused.

Page ids are the storage keys (SGLang's chained page hashes, ``page_keys``)."""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import numpy as np
import pytest
import torch

from hicache_kernels import KVBuffer
from hicache_kernels.manager import PageState
from hicache_kernels.storage.nixl_store import NixlFileStore, import_nixl
from hicache_kernels.storage.pages import HEADER_BYTES
from storage_helpers import (MANAGER_P as P, keys_for, make_unwritable, manager_with_storage,
                             pool_bytes, run_helper, undo_unwritable, write_device_pages,
                             write_pool)

import_nixl()  # these tests need NIXL: an ImportError fails them, never skips

WAIT = 30  # seconds; only reached when something is broken
HOST, ABSENT = PageState.HOST, PageState.ABSENT


def kinds(acks):
    return [a.kind for a in acks]


def wait_prefetch(mgr, ids) -> None:
    """The scheduler's loop: check every step until the policy lets the request go."""
    deadline = time.monotonic() + WAIT
    while not mgr.check_prefetch(ids):
        assert time.monotonic() < deadline, "prefetch never became ready"
        time.sleep(0.001)


def stored(mgr, ids, seed):
    """Pages written on the device, backed up (write_through hit) and written to storage."""
    data = write_device_pages(mgr, ids, seed=seed)
    mgr.hit(ids)
    mgr.synchronize(storage=True)
    acks = mgr.poll()
    assert [(a.kind, a.failed) for a in acks] == [("backup", ()), ("store", ())]
    return data


def loaded_bytes(mgr, ids) -> torch.Tensor:
    handle = mgr.load(ids)
    handle.synchronize()
    mgr.poll()
    return pool_bytes(mgr.device_pool, handle.device_indices)


def read_back(mgr, directory, keys) -> torch.Tensor | None:
    """The stored pages as another reader sees them (None if not all are readable)."""
    host = KVBuffer.allocate(mgr.host.layout)
    store = NixlFileStore(host, {"directory": str(directory)})
    try:
        slots = torch.arange(len(keys) * P)
        if store.batch_get(keys, slots) != [True] * len(keys):
            return None
        return pool_bytes(host, slots)
    finally:
        store.close()


class Gate:
    """A PageStore wrapper whose ``batch_get``/``batch_set`` wait for the test's
    ``release(kind)``, so "a storage transfer is in flight" is exact, not timing."""

    def __init__(self):
        self.store = None
        self.entered = {"get": threading.Semaphore(0), "set": threading.Semaphore(0)}
        self._permits = {"get": threading.Semaphore(0), "set": threading.Semaphore(0)}

    def open_store(self, host, config):
        self.store = NixlFileStore(host, config)
        return self

    def __getattr__(self, name):        # page_size, check_pages, batch_exists, status, ...
        return getattr(self.store, name)

    def _gated(self, kind, call, keys, slots):
        self.entered[kind].release()
        assert self._permits[kind].acquire(timeout=WAIT)
        return call(keys, slots)

    def batch_get(self, keys, slots):
        return self._gated("get", self.store.batch_get, keys, slots)

    def batch_set(self, keys, slots):
        return self._gated("set", self.store.batch_set, keys, slots)

    def wait_entered(self, kind):
        assert self.entered[kind].acquire(timeout=WAIT), f"no {kind} batch started"

    def release(self, kind, n=1):
        for _ in range(n):
            self._permits[kind].release()


# -- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("host_layout", ["page_first", "layer_first"])
def test_write_through_evict_then_prefetch_back_from_files(tmp_path, host_layout, caplog):
    mgr, tier = manager_with_storage(tmp_path, host_layout=host_layout)
    keys = keys_for(3, P, seed=1)
    data = stored(mgr, keys, seed=1)
    assert tier.batch_exists(keys) == 3
    mgr.evict_device(keys)
    assert sorted(mgr.evict_host(3)) == sorted(keys)
    assert mgr.lookup(keys) == [ABSENT] * 3

    got = mgr.prefetch(keys + keys_for(1, P, seed=99))     # the stored prefix only
    assert got == tuple(keys)
    assert all(s & PageState.FETCHING for s in mgr.lookup(keys))
    with pytest.raises(ValueError, match="still arriving from storage"):
        mgr.load(keys)
    wait_prefetch(mgr, got)
    assert mgr.lookup(keys) == [HOST] * 3
    assert kinds(mgr.poll()) == ["prefetch"]
    assert torch.equal(loaded_bytes(mgr, keys), data)

    stats = mgr.stats()
    page_bytes = tier.store.page_bytes
    assert stats["storage_prefetch_loaded_pages"] == 3
    assert stats["storage_bytes_read"] == 3 * page_bytes and stats["storage_read_seconds"] > 0
    assert stats["storage_bytes_written"] == 3 * page_bytes and stats["storage_write_seconds"] > 0
    assert stats["storage_lookup_hit_pages"] == 3 + 3   # the test asked once, the manager once
    assert stats["storage_in_flight"] == 0
    with caplog.at_level(logging.WARNING):
        mgr.close()
    assert not tier.enabled, "close() detaches the tier before the host pool goes"
    assert "still refer to the pool" not in caplog.text


def test_a_page_already_stored_is_not_written_again(tmp_path):
    mgr, tier = manager_with_storage(tmp_path)
    keys = keys_for(2, P, seed=2)
    stored(mgr, keys, seed=2)
    mgr.free(keys)
    stored(mgr, keys, seed=2)
    stats = mgr.stats()
    assert stats["storage_store_written_pages"] == 2 and stats["storage_store_existing_pages"] == 2
    mgr.close()


def test_a_page_the_manager_knows_is_stored_is_not_handed_to_storage_again(tmp_path):
    """Backed up again after its host copy was evicted (write_through hits it while it
    is still on the device), or loaded from storage and backed up: storage holds it."""
    mgr, tier = manager_with_storage(tmp_path)
    keys = keys_for(2, P, seed=3)
    data = stored(mgr, keys, seed=3)
    assert mgr.evict_host(2) == keys
    mgr.hit(keys)                                # a second backup to host
    mgr.synchronize(storage=True)
    assert kinds(mgr.poll()) == ["backup"]       # and no store
    assert mgr.stats()["storage_stores"] == 1
    assert torch.equal(read_back(mgr, tmp_path, keys), pool_bytes(mgr.host, mgr.host_indices(keys)))
    mgr.evict_device(keys)
    assert mgr.evict_host(2) == keys             # gone from the cache; storage has it
    assert mgr.prefetch(keys) == tuple(keys)
    wait_prefetch(mgr, keys)
    assert torch.equal(loaded_bytes(mgr, keys), data)
    mgr.hit(keys)
    mgr.synchronize(storage=True)
    assert "store" not in kinds(mgr.poll())
    assert mgr.stats()["storage_stores"] == 1
    mgr.close()


def test_a_second_process_finds_the_pages_the_first_wrote(tmp_path):
    result = run_helper("manager-write", directory=str(tmp_path), host_layout="page_first",
                        pages=3, key_seed=3, data_seed=5)
    assert result["acks"] == [["backup", 3, 0], ["store", 3, 0]]
    # Another process, another host pool size: the same keys find the same bytes.
    mgr, _ = manager_with_storage(tmp_path, host_layout="page_first", hicache_ratio=3.0)
    keys = keys_for(3, P, seed=3)
    wait_prefetch(mgr, mgr.prefetch(keys))
    got = loaded_bytes(mgr, keys)
    want = torch.randint(0, 256, got.shape, dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want), "bytes differ from what the first process wrote"
    mgr.close()


def test_a_corrupted_page_file_is_a_miss_and_never_served(tmp_path, caplog):
    mgr, tier = manager_with_storage(tmp_path)
    keys = keys_for(3, P, seed=4)
    data = stored(mgr, keys, seed=4)
    mgr.free(keys)
    path = tier.store.page_path(keys[1])
    with open(path, "r+b") as f:            # one flipped payload byte
        f.seek(HEADER_BYTES + 37)
        byte = f.read(1)
        f.seek(HEADER_BYTES + 37)
        f.write(bytes([byte[0] ^ 0x10]))
    assert tier.batch_exists(keys) == 3     # only a read can tell
    with caplog.at_level(logging.WARNING, logger="hicache_kernels.storage"):
        wait_prefetch(mgr, mgr.prefetch(keys))
    (ack,) = mgr.poll()
    assert ack.kind == "prefetch" and ack.failed == tuple(keys[1:])
    assert mgr.lookup(keys) == [HOST, ABSENT, ABSENT]
    assert mgr.host_pages.used_count == 1, "the slots of unchecked pages are free again"
    assert "corrupt" in caplog.text and mgr.stats()["storage_corrupt_pages"] == 1
    assert torch.equal(loaded_bytes(mgr, keys[:1]), data[:, :P])
    assert tier.batch_exists(keys) == 1, "the corrupt page is not offered again"
    mgr.close()


# -- prefetch policies ------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["best_effort", "wait_complete", "timeout"])
def test_prefetch_policy_decides_when_the_request_goes(tmp_path, policy):
    writer, _ = manager_with_storage(tmp_path)
    keys = keys_for(4, P, seed=6)
    data = stored(writer, keys, seed=6)
    writer.close()

    gate = Gate()
    mgr, _ = manager_with_storage(tmp_path, open_store=gate.open_store, prefetch_policy=policy,
                                  prefetch_timeout_base=0.3, prefetch_timeout_per_ki_token=0.0)
    got = mgr.prefetch(keys)
    assert got == tuple(keys)
    gate.wait_entered("get")
    gate.release("get")
    gate.wait_entered("get")                # pages 0-1 arrived, pages 2-3 in flight
    arrived = 4
    if policy == "best_effort":
        assert mgr.check_prefetch(got)
        arrived = 2
    elif policy == "wait_complete":
        assert not mgr.check_prefetch(got)
        assert all(s & PageState.FETCHING for s in mgr.lookup(keys))
        gate.release("get")
        wait_prefetch(mgr, got)
    else:
        assert not mgr.check_prefetch(got)
        time.sleep(0.35)                    # past base + per_ki_token * tokens
        assert mgr.check_prefetch(got)
        arrived = 2
    assert mgr.lookup(keys) == [HOST] * arrived + [ABSENT] * (4 - arrived)
    if arrived < 4:
        # the batch in flight still writes into its two slots: they are not reusable yet
        assert mgr.host_pages.deferred_count == 2 and mgr.in_flight == 1
        gate.release("get")
        mgr.synchronize(storage=True)
        (ack,) = mgr.poll()
        assert ack.kind == "prefetch" and ack.failed == tuple(keys[2:])
        assert mgr.host_pages.deferred_count == 0
    assert torch.equal(loaded_bytes(mgr, keys[:arrived]), data[:, :arrived * P])
    mgr.close()


# -- storage trouble: the cache keeps serving ----------------------------------------------------

def test_a_missing_directory_disables_storage_and_the_cache_serves(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        mgr, tier = manager_with_storage(blocker / "kv")
    assert not tier.enabled and "cannot be created" in caplog.text
    keys = keys_for(2, P, seed=7)
    data = write_device_pages(mgr, keys, seed=7)
    mgr.hit(keys)
    mgr.synchronize(storage=True)
    assert [(a.kind, len(a.failed)) for a in mgr.poll()] == [("backup", 0), ("store", 2)]
    mgr.evict_device(keys)
    assert torch.equal(loaded_bytes(mgr, keys), data)
    assert mgr.prefetch(keys_for(2, P, seed=8)) == ()
    assert mgr.stats()["storage_store_dropped_pages"] == 2
    mgr.close()


def test_a_read_only_directory_serves_stored_pages_and_the_cache_serves(tmp_path, caplog):
    writer, tier = manager_with_storage(tmp_path)
    old = keys_for(2, P, seed=9)
    old_data = stored(writer, old, seed=9)
    root = tier.store.root
    writer.close()
    how = make_unwritable(root)
    try:
        with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
            mgr, tier = manager_with_storage(tmp_path)
        assert "refuses writes" in caplog.text and "read-only" in tier.status()
        new = keys_for(2, P, seed=10)
        data = write_device_pages(mgr, new, seed=10)
        mgr.hit(new)
        mgr.synchronize(storage=True)
        assert [(a.kind, len(a.failed)) for a in mgr.poll()] == [("backup", 0), ("store", 2)]
        mgr.evict_device(new)
        assert torch.equal(loaded_bytes(mgr, new), data), "host copies still serve"
        wait_prefetch(mgr, mgr.prefetch(old))
        assert torch.equal(loaded_bytes(mgr, old), old_data), "stored pages still serve"
        assert mgr.stats()["storage_store_failed_pages"] == 2
        mgr.close()
    finally:
        undo_unwritable(root, how)


def test_a_full_directory_keeps_the_cache_serving(tmp_path):
    # A second process whose files may not grow past half a page: the disk fills mid-page.
    result = run_helper("manager-full", directory=str(tmp_path), host_layout="page_first",
                        pages=3, key_seed=11, data_seed=12, file_limit=HEADER_BYTES + 64)
    assert result["acks"] == [["backup", 3, 0], ["store", 3, 3]]
    assert result["served"], "pages stayed on host and loaded back bit-exactly"
    assert result["stats"]["storage_write_errors"] >= 1
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert not [f for f in leftovers if f.endswith((".tmp", ".kvpage"))], leftovers


# -- host slots that storage reads or writes are never reused ------------------------------------

@pytest.mark.parametrize("rule_on", [True, False], ids=["locked", "rule-off"])
def test_a_host_slot_is_not_reused_while_storage_reads_it(tmp_path, rule_on):
    """Pages freed while their write to storage waits: their host slots must not
    be handed out, or the file gets another page's bytes. With the lock switched
    off the test must see exactly that damage."""
    gate = Gate()
    mgr, _ = manager_with_storage(tmp_path, open_store=gate.open_store, hicache_ratio=1.0)
    mgr._rules.host_locked_during_storage = rule_on
    keys = keys_for(2, P, seed=13)
    data = write_device_pages(mgr, keys, seed=13)
    mgr.hit(keys)
    mgr.poll()                              # backup done: the store op starts
    gate.wait_entered("set")
    old_slots = set(mgr.host_indices(keys).tolist())
    mgr.free(keys)
    others = keys_for(2, P, seed=14)
    slots = mgr.alloc_host(others)          # a new request fills host pages directly
    write_pool(mgr.host, slots, torch.full(pool_bytes(mgr.host, slots).shape, 0x5A, dtype=torch.uint8))
    reused = old_slots & set(slots.tolist())
    gate.release("set")
    mgr.synchronize(storage=True)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("store", ())]
    got = read_back(mgr, tmp_path, keys)
    if rule_on:
        assert not reused and mgr.host_pages.deferred_count == 0
        assert torch.equal(got, data), "the file holds the page as it was backed up"
    else:
        assert reused and not torch.equal(got, data), "without the lock the file is damaged"
    mgr.close()


@pytest.mark.parametrize("rule_on", [True, False], ids=["locked", "rule-off"])
def test_a_host_slot_is_not_reused_while_storage_writes_it(tmp_path, rule_on):
    """A prefetch's pages freed while the read is in flight: the slots must stay
    out of reach until it lands, or it overwrites the new owner's bytes."""
    writer, _ = manager_with_storage(tmp_path)
    keys = keys_for(2, P, seed=15)
    stored(writer, keys, seed=15)
    writer.close()
    gate = Gate()
    mgr, _ = manager_with_storage(tmp_path, open_store=gate.open_store, hicache_ratio=1.0)
    mgr._rules.host_locked_during_storage = rule_on
    mgr.prefetch(keys)
    gate.wait_entered("get")
    fetching = set(mgr.host_indices(keys).tolist())
    mgr.free(keys)                          # the request was aborted
    others = keys_for(2, P, seed=16)
    slots = mgr.alloc_host(others)
    mine = torch.full(pool_bytes(mgr.host, slots).shape, 0x5A, dtype=torch.uint8)
    write_pool(mgr.host, slots, mine)
    reused = fetching & set(slots.tolist())
    gate.release("get")
    mgr.synchronize(storage=True)
    mgr.poll()
    intact = torch.equal(pool_bytes(mgr.host, mgr.host_indices(others)), mine)
    if rule_on:
        assert not reused and intact and mgr.host_pages.deferred_count == 0
    else:
        assert reused and not intact, "without the lock the read lands in another page"
    mgr.close()


def test_storage_ops_hold_their_slots_against_eviction_too(tmp_path):
    """Host LRU eviction skips pages whose write to storage is in flight."""
    gate = Gate()
    mgr, _ = manager_with_storage(tmp_path, open_store=gate.open_store, hicache_ratio=1.0)
    keys = keys_for(2, P, seed=17)
    write_device_pages(mgr, keys, seed=17)
    mgr.hit(keys)
    mgr.poll()
    gate.wait_entered("set")
    mgr.evict_device(keys)
    assert mgr.evict_host(2) == [], "pages being stored are not evicted"
    gate.release("set")
    mgr.synchronize(storage=True)
    mgr.poll()
    assert sorted(mgr.evict_host(2)) == sorted(keys)
    mgr.close()


def test_non_hash_page_ids_are_refused_clearly(tmp_path):
    mgr, _ = manager_with_storage(tmp_path)
    with pytest.raises(ValueError, match="page_keys"):
        mgr.prefetch(["turn-1"])
    mgr.close()


def test_host_pages_argument_is_page_indices(tmp_path):
    """The tier's batch calls take host page indices, as the manager passes them."""
    mgr, tier = manager_with_storage(tmp_path)
    keys = keys_for(1, P, seed=18)
    data = stored(mgr, keys, seed=18)
    page = int(mgr.table.get(keys[0]).host_page)
    other = (page + 1) % mgr.host_pages.num_pages
    op = tier.batch_get(keys, np.array([other]))
    assert op.wait(WAIT) and op.poll() == [True]
    assert torch.equal(pool_bytes(mgr.host, torch.arange(other * P, (other + 1) * P)), data)
    mgr.close()


# -- the documentation's examples run as written -------------------------------------------------

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "storage.md")
with open(DOC) as _f:
    DOC_BLOCKS = re.findall(r"```python\n(.*?)```", _f.read(), flags=re.S)


@pytest.mark.parametrize("code", [b for b in DOC_BLOCKS if "PeerPageServer" not in b],
                         ids=lambda c: c.splitlines()[0][:40])
def test_docs_storage_examples_run(code):
    exec(compile(code, DOC, "exec"), {"__name__": "docs_example"})


def test_a_read_without_a_policy_must_finish(tmp_path):
    """Storage ops without can_terminate (InMemoryStorage) count as wait_complete."""
    from hicache_kernels.manager import HiCacheManager, InMemoryStorage
    from hicache_kernels.layouts import KVLayout

    store = InMemoryStorage(defer=True)
    lay = KVLayout("layer_first", num_layers=2, num_slots=4 * P, head_num=2, head_dim=8,
                   dtype=torch.bfloat16, page_size=P)
    mgr = HiCacheManager(KVBuffer.allocate(lay), storage=store, backend="reference",
                         host_reserve_gb=0)
    data = write_device_pages(mgr, ["a"], seed=19)
    mgr.hit(["a"])
    mgr.poll()
    store.complete()
    mgr.poll()
    mgr.free(["a"])
    got = mgr.prefetch(["a"])
    assert got == ("a",) and not mgr.check_prefetch(got)
    store.complete()
    assert mgr.check_prefetch(got) and mgr.lookup(["a"]) == [HOST]
    assert torch.equal(loaded_bytes(mgr, ["a"]), data)
    mgr.close()


@pytest.mark.gpu
@pytest.mark.parametrize("host_layout", ["layer_first", "page_first_direct"])
def test_round_trip_with_a_cuda_device_pool(tmp_path, host_layout):
    """Real streams and a pinned host pool that NIXL registers too: a page backed up
    by a kernel is written to files only after the backup completed, and a page
    read from files is loaded only after it arrived."""
    from hicache_kernels.layouts import KVLayout
    from hicache_kernels.manager import HiCacheManager
    from hicache_kernels.storage import StorageTier

    lay = KVLayout("layer_first", num_layers=3, num_slots=4 * P, head_num=2, head_dim=8,
                   dtype=torch.bfloat16, page_size=P)
    pool = KVBuffer.allocate(lay, device="cuda")
    tier = StorageTier({"directory": str(tmp_path), "prefetch_policy": "wait_complete"})
    mgr = HiCacheManager(pool, storage=tier, host_layout=host_layout, host_reserve_gb=0)
    assert mgr.host_pool.pinned and tier.enabled
    keys = keys_for(3, P, seed=20)
    slots = mgr.alloc_device(keys)
    data = torch.randint(0, 256, pool_bytes(pool, slots).shape, dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(20)).cuda()
    write_pool(pool, slots, data)             # on the compute (current) stream
    mgr.hit(keys)
    mgr.synchronize(storage=True)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("backup", ()), ("store", ())]
    mgr.evict_device(keys)
    assert sorted(mgr.evict_host(3)) == sorted(keys)
    wait_prefetch(mgr, mgr.prefetch(keys))
    handle = mgr.load(keys)
    handle.wait_all()                         # the current stream waits for the last layer
    assert torch.equal(pool_bytes(pool, handle.device_indices), data)
    mgr.close()
