"""The storage tier a manager drives (the manager's storage protocol): writes and
prefetches on worker threads, prefetch policies, counters, and storage trouble
that never reaches the caller.

Round trips and the concurrency test use the real NIXL store; the policy
tests use a gated store double so that "a batch is in flight" is exact, not
a matter of timing."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from hicache_kernels.storage import StorageTier, StorageUnavailable
from hicache_kernels.storage.nixl_store import NixlFileStore
from storage_helpers import keys_for, make_layout, poisoned_host, random_host, slot_bytes

WAIT = 30  # seconds; only reached when something is broken


def nixl_tier(host, directory, **config) -> StorageTier:
    tier = StorageTier({"directory": str(directory), **config})
    tier.attach(host)
    assert tier.enabled, tier.status()
    return tier


def pages(first, n):
    return np.arange(first, first + n)


def same_pages(src, src_page, dst, dst_page, n):
    p = src.layout.page_size
    return all(torch.equal(slot_bytes(src, src_page * p + i), slot_bytes(dst, dst_page * p + i))
               for i in range(n * p))


def test_write_back_lookup_prefetch_round_trip(tmp_path):
    layout = make_layout("page_first_direct", dtype=torch.float8_e4m3fn, pages=8)
    src, dst = random_host(layout, seed=5), poisoned_host(layout)
    keys = keys_for(5, 4)
    writer = nixl_tier(src, tmp_path, batch_pages=2)
    op = writer.batch_set(keys, pages(1, 5))
    assert op.wait(WAIT) and op.poll() == [True] * 5
    again = writer.batch_set(keys[:3], pages(1, 3))
    assert again.wait(WAIT) and again.poll() == [True] * 3

    reader = nixl_tier(dst, tmp_path, batch_pages=2, prefetch_policy="wait_complete")
    assert reader.batch_exists(keys + keys_for(1, 4, seed=99)) == 5
    fetch = reader.batch_get(keys, pages(3, 5))
    assert fetch.wait(WAIT) and fetch.can_terminate() and fetch.poll() == [True] * 5
    assert fetch.terminate() == 5
    assert same_pages(src, 1, dst, 3, 5)

    w, r = writer.stats(), reader.stats()
    assert w["store_written_pages"] == 5 and w["store_existing_pages"] == 3
    assert w["bytes_written"] == 5 * writer.store.page_bytes and w["write_seconds"] > 0
    assert w["store_seconds"] >= w["write_seconds"]
    assert r["lookup_hit_pages"] == 5 and r["lookup_pages"] == 6
    assert r["prefetch_loaded_pages"] == 5 and r["bytes_read"] == 5 * reader.store.page_bytes
    writer.detach()
    reader.detach()
    assert writer.batch_exists(keys) == 0 and "detached" in writer.status()
    assert writer.stats()["bytes_written"] == w["bytes_written"], "counters outlive detach"


def test_prefetch_and_write_back_at_once(tmp_path):
    """Two threads of callers, the writer and prefetch workers, one NIXL agent:
    every byte lands where it should."""
    layout = make_layout("layer_first", pages=48, layers=4)
    stored_keys = keys_for(16, 4, seed=1)
    seed_host = random_host(layout, seed=10)
    seeder = nixl_tier(seed_host, tmp_path)
    assert seeder.batch_set(stored_keys, pages(0, 16)).wait(WAIT)
    seeder.detach()

    # Pages 24.. hold other random bytes: equal bytes afterwards mean they arrived.
    host = random_host(layout, seed=11)
    tier = nixl_tier(host, tmp_path, batch_pages=2, prefetch_policy="wait_complete")
    new_keys = keys_for(16, 4, seed=2)
    results = {}

    def write():
        results["write"] = tier.batch_set(new_keys, pages(0, 16))

    def fetch():
        results["fetch"] = [tier.batch_get(stored_keys[:8], pages(24, 8)),
                            tier.batch_get(stored_keys[8:], pages(40, 8))]

    threads = [threading.Thread(target=write), threading.Thread(target=fetch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["write"].wait(WAIT) and results["write"].poll() == [True] * 16
    first, second = results["fetch"]
    assert first.wait(WAIT) and second.wait(WAIT)
    assert first.terminate() == 8 and second.terminate() == 8
    assert same_pages(seed_host, 0, host, 24, 8) and same_pages(seed_host, 8, host, 40, 8)

    check = poisoned_host(layout)
    reader = NixlFileStore(check, {"directory": str(tmp_path)})
    assert reader.batch_get(new_keys, torch.arange(16 * 4)) == [True] * 16
    assert same_pages(host, 0, check, 0, 16)
    tier.detach()


# -- policies, on a store whose batches open only when the test says so -----------------

class GatedStore:
    """A PageStore double: every batch waits for ``release()``; ``misses`` are
    the keys it does not hold (writes always succeed); ``fail`` makes every
    call raise."""

    page_size = 4

    def __init__(self, misses=(), fail=False):
        self.misses = set(misses)
        self.fail = fail
        self.calls: list[tuple[str, list[str]]] = []
        self.entered = threading.Semaphore(0)
        self._gate = threading.Semaphore(0)
        self.closed = False

    def release(self, n=1):
        for _ in range(n):
            self._gate.release()

    def check_pages(self, keys, host_indices):
        if len(host_indices) != len(keys) * self.page_size:
            raise ValueError("host_indices: wrong length")
        return list(keys), None

    def batch_exists(self, keys):
        if self.fail:
            raise OSError("injected")
        hits = [k not in self.misses for k in keys]
        return hits.index(False) if False in hits else len(hits)

    def _batch(self, op, keys):
        self.calls.append((op, list(keys)))
        self.entered.release()
        assert self._gate.acquire(timeout=WAIT)
        if self.fail:
            raise OSError("injected")
        if op == "set":
            return [True] * len(keys)
        ok = [k not in self.misses for k in keys]
        first_miss = ok.index(False) if False in ok else len(ok)
        return [i < first_miss for i in range(len(ok))]

    def batch_get(self, keys, host_indices):
        return self._batch("get", keys)

    def batch_set(self, keys, host_indices):
        return self._batch("set", keys)

    def status(self):
        return "gated"

    def io_stats(self):
        return {}

    def close(self):
        self.closed = True


def gated_tier(store, **config):
    tier = StorageTier({"batch_pages": 2, **config}, open_store=lambda host, cfg: store)
    tier.attach(random_host(make_layout()))
    return tier


def wait_batches(store, n):
    for _ in range(n):
        assert store.entered.acquire(timeout=WAIT)


def test_best_effort_terminates_at_once_with_what_has_arrived():
    store = GatedStore()
    tier = gated_tier(store, prefetch_policy="best_effort")
    h = tier.batch_get(keys_for(6, 4), pages(0, 6))
    assert h.can_terminate()
    wait_batches(store, 1)
    store.release()
    wait_batches(store, 1)                    # batch 2 is in flight now
    assert h.completed_pages == 2 and h.can_terminate()
    assert h.terminate() == 2, "terminate returns at once, without the batch in flight"
    assert h.poll() is None, "the batch in flight still writes into the host pages"
    store.release()
    assert h.wait(WAIT) and h.poll() == [True] * 2 + [False] * 4
    assert [op for op, _ in store.calls] == ["get", "get"], "no batch may start after terminate"
    assert h.terminate() == 2 and tier.stats()["prefetch_loaded_pages"] == 2
    tier.detach()


def test_wait_complete_waits_for_every_page():
    store = GatedStore()
    tier = gated_tier(store, prefetch_policy="wait_complete")
    h = tier.batch_get(keys_for(5, 4), pages(0, 5))
    for _ in range(3):
        wait_batches(store, 1)
        assert not h.can_terminate() and h.poll() is None
        store.release()
    assert h.wait(WAIT) and h.can_terminate() and h.terminate() == 5 and h.poll() == [True] * 5
    tier.detach()


def test_timeout_policy_gives_up_after_the_linear_timeout():
    store = GatedStore()
    tier = gated_tier(store, prefetch_policy="timeout", prefetch_timeout_base=0.3,
                      prefetch_timeout_per_ki_token=0.0)
    h = tier.batch_get(keys_for(4, 4), pages(0, 4))
    assert h.timeout_s == pytest.approx(0.3)
    wait_batches(store, 1)
    assert not h.can_terminate()
    store.release()
    wait_batches(store, 1)
    deadline = time.monotonic() + WAIT
    while not h.can_terminate():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert h.poll() is None and time.monotonic() - h.start_time >= 0.3
    assert h.terminate() == 2
    store.release()
    assert h.wait(WAIT) and h.poll() == [True, True, False, False]
    tier.detach()


def test_timeout_grows_with_the_tokens():
    store = GatedStore()
    tier = gated_tier(store, prefetch_policy="timeout", prefetch_timeout_base=1.0,
                      prefetch_timeout_per_ki_token=2.0, prefetch_timeout_max=1.5)
    h = tier.batch_get(keys_for(16, 4), pages(0, 16))        # 64 tokens
    assert h.timeout_s == pytest.approx(1.0 + 2.0 * 64 / 1024)
    h.terminate()
    store.release(1)
    assert h.wait(WAIT)
    tier.detach()


def test_prefetch_stops_at_the_first_miss():
    keys = keys_for(6, 4)
    store = GatedStore(misses={keys[3]})
    tier = gated_tier(store)
    store.release(6)
    h = tier.batch_get(keys, pages(0, 6))
    assert h.wait(WAIT) and h.terminate() == 3 and h.poll() == [True] * 3 + [False] * 3
    assert [len(k) for _, k in store.calls] == [2, 2]
    assert tier.stats()["prefetch_loaded_pages"] == 3
    tier.detach()


def test_terminate_before_start_touches_nothing():
    store = GatedStore()
    tier = gated_tier(store)
    blocker = tier.batch_get(keys_for(2, 4, seed=1), pages(0, 2))
    wait_batches(store, 1)                     # the prefetch thread is busy
    queued = tier.batch_get(keys_for(2, 4, seed=2), pages(2, 2))
    assert queued.terminate() == 0
    store.release()
    assert blocker.wait(WAIT) and queued.wait(WAIT) and queued.poll() == [False, False]
    assert len(store.calls) == 1
    tier.detach()


def test_storage_errors_never_reach_the_caller(caplog):
    store = GatedStore(fail=True)
    tier = gated_tier(store)
    keys = keys_for(4, 4)
    store.release(10)
    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        assert tier.batch_exists(keys) == 0
        w = tier.batch_set(keys, pages(0, 4))
        f = tier.batch_get(keys, pages(0, 4))
        assert w.wait(WAIT) and f.wait(WAIT)
    assert w.poll() == [False] * 4 and f.terminate() == 0
    assert "lookup failed" in caplog.text and "write failed" in caplog.text
    stats = tier.stats()
    assert stats["store_failed_pages"] == 4 and stats["prefetch_loaded_pages"] == 0
    tier.detach()


def test_write_queue_is_bounded():
    store = GatedStore(misses=set(keys_for(8, 4)))    # nothing stored yet
    tier = gated_tier(store, max_pending_writes=4)
    first = tier.batch_set(keys_for(4, 4), pages(0, 4))
    dropped = tier.batch_set(keys_for(2, 4, seed=3), pages(4, 2))
    assert dropped.poll() == [False, False]
    assert tier.stats()["store_dropped_pages"] == 2
    assert first.poll() is None
    store.release(2)
    assert tier.flush(WAIT) and first.poll() == [True] * 4
    assert tier.stats()["store_pending_pages"] == 0
    tier.detach()
    assert store.closed


def test_a_batch_larger_than_the_write_queue_writes_what_fits():
    """The bound drops the overflow, not the whole batch: the leading pages (the
    ones a prefix lookup finds first) are written, the rest are dropped."""
    keys = keys_for(5, 4)
    store = GatedStore(misses=set(keys))              # nothing stored yet
    tier = gated_tier(store, max_pending_writes=3)
    op = tier.batch_set(keys, pages(0, 5))
    assert tier.stats()["store_dropped_pages"] == 2
    assert tier.stats()["store_pending_pages"] == 3
    store.release(2)                                  # batches of 2 pages: [0, 2), [2, 3)
    assert tier.flush(WAIT) and op.poll() == [True, True, True, False, False]
    assert [keys_ for kind, keys_ in store.calls if kind == "set"] == [keys[:2], keys[2:3]]
    stats = tier.stats()
    assert stats["store_written_pages"] == 3 and stats["store_failed_pages"] == 0
    assert stats["store_pending_pages"] == 0
    tier.detach()


def test_a_store_that_cannot_start_gives_a_disabled_tier(caplog):
    def unavailable(host, cfg):
        raise StorageUnavailable("no disk today")

    tier = StorageTier(open_store=unavailable)
    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        tier.attach(random_host(make_layout()))
    assert not tier.enabled and "no disk today" in tier.status() and "no disk today" in caplog.text
    keys = keys_for(2, 4)
    assert tier.batch_exists(keys) == 0
    assert tier.batch_set(keys, pages(0, 2)).poll() == [False, False]
    fetch = tier.batch_get(keys, pages(2, 2))
    assert fetch.can_terminate() and fetch.poll() == [False, False]
    tier.detach()


def test_bad_input_raises_in_the_callers_thread(tmp_path):
    layout = make_layout()
    tier = nixl_tier(random_host(layout), tmp_path)
    with pytest.raises(ValueError, match="host_indices: expected 2 pages"):
        tier.batch_set(keys_for(2, 4), pages(0, 1))
    with pytest.raises(ValueError, match="slots must lie in"):
        tier.batch_get(keys_for(2, 4), pages(5, 2))
    with pytest.raises(ValueError, match="host_pages: expected a 1-D"):
        tier.batch_get(keys_for(2, 4), np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="keys"):
        tier.batch_exists(["not-a-hash"])
    with pytest.raises(RuntimeError, match="attached"):
        tier.attach(random_host(layout))
    tier.detach()
