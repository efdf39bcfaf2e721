"""The storage tier a manager drives: write-back and prefetch on worker threads,
prefetch policies, counters, and storage trouble that never reaches the caller.

Round trips and the concurrency test use the real NIXL store; the policy
tests use a gated store double so that "a batch is in flight" is exact, not
a matter of timing."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from hicache_kernels.storage import StorageTier
from hicache_kernels.storage.nixl_store import NixlFileStore
from storage_helpers import keys_for, make_layout, page_slots, poisoned_host, random_host, slot_bytes

WAIT = 30  # seconds; only reached when something is broken


def nixl_tier(host, directory, **config) -> StorageTier:
    tier = StorageTier.open(host, {"directory": str(directory), **config})
    assert tier.enabled, tier.status()
    return tier


def same_pages(src, src_page, dst, dst_page, n):
    p = src.layout.page_size
    return all(torch.equal(slot_bytes(src, src_page * p + i), slot_bytes(dst, dst_page * p + i))
               for i in range(n * p))


def test_write_back_lookup_prefetch_round_trip(tmp_path):
    layout = make_layout("page_first_direct", dtype=torch.float8_e4m3fn, pages=8)
    src, dst = random_host(layout, seed=5), poisoned_host(layout)
    keys = keys_for(5, 4)
    done = []
    writer = nixl_tier(src, tmp_path, batch_pages=2)
    handle = writer.write_back(keys, page_slots(1, 5, 4), on_done=done.append)
    assert handle.wait(WAIT) and handle.stored == [True] * 5 and done == [handle]
    again = writer.write_back(keys[:3], page_slots(1, 3, 4))
    assert again.wait(WAIT) and again.stored == [True] * 3

    reader = nixl_tier(dst, tmp_path, batch_pages=2)
    assert reader.lookup(keys + keys_for(1, 4, seed=99)) == 5
    fetch = reader.prefetch(keys, page_slots(3, 5, 4), policy="wait_complete")
    assert fetch.wait(WAIT) and fetch.can_terminate() and fetch.terminate() == 5
    assert same_pages(src, 1, dst, 3, 5)

    w, r = writer.stats(), reader.stats()
    assert w["write_stored_pages"] == 5 and w["write_existing_pages"] == 3
    assert w["bytes_written"] == 5 * writer.store.page_bytes and w["write_seconds"] > 0
    assert w["write_back_seconds"] >= w["write_seconds"]
    assert r["lookup_hit_pages"] == 5 and r["lookup_pages"] == 6
    assert r["prefetch_loaded_pages"] == 5 and r["bytes_read"] == 5 * reader.store.page_bytes
    writer.close()
    reader.close()


def test_prefetch_and_write_back_at_once(tmp_path):
    """Two threads of callers, the writer and prefetch workers, one NIXL agent:
    every byte lands where it should."""
    layout = make_layout("layer_first", pages=48, layers=4)
    stored_keys = keys_for(16, 4, seed=1)
    seed_host = random_host(layout, seed=10)
    seeder = nixl_tier(seed_host, tmp_path)
    assert seeder.write_back(stored_keys, page_slots(0, 16, 4)).wait(WAIT)
    seeder.close()

    # Pages 24.. hold other random bytes: equal bytes afterwards mean they arrived.
    host = random_host(layout, seed=11)
    tier = nixl_tier(host, tmp_path, batch_pages=2)
    new_keys = keys_for(16, 4, seed=2)
    results = {}

    def write():
        results["write"] = tier.write_back(new_keys, page_slots(0, 16, 4))

    def fetch():
        results["fetch"] = [tier.prefetch(stored_keys[:8], page_slots(24, 8, 4), policy="wait_complete"),
                            tier.prefetch(stored_keys[8:], page_slots(40, 8, 4), policy="wait_complete")]

    threads = [threading.Thread(target=write), threading.Thread(target=fetch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["write"].wait(WAIT) and results["write"].stored == [True] * 16
    first, second = results["fetch"]
    assert first.wait(WAIT) and second.wait(WAIT)
    assert first.terminate() == 8 and second.terminate() == 8
    assert same_pages(seed_host, 0, host, 24, 8) and same_pages(seed_host, 8, host, 40, 8)

    check = poisoned_host(layout)
    reader = NixlFileStore(check, {"directory": str(tmp_path)})
    assert reader.batch_get(new_keys, page_slots(0, 16, 4)) == [True] * 16
    assert same_pages(host, 0, check, 0, 16)
    tier.close()


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
    return StorageTier(store, {"batch_pages": 2, **config})


def slots(n):
    return torch.arange(n * 4)


def wait_batches(store, n):
    for _ in range(n):
        assert store.entered.acquire(timeout=WAIT)


def test_best_effort_terminates_at_once_with_what_has_arrived():
    store = GatedStore()
    tier = gated_tier(store)
    h = tier.prefetch(keys_for(6, 4), slots(6), policy="best_effort")
    assert h.can_terminate()
    wait_batches(store, 1)
    store.release()
    wait_batches(store, 1)                    # batch 2 is in flight now
    assert h.completed_pages == 2 and h.can_terminate()
    result = []
    stopper = threading.Thread(target=lambda: result.append(h.terminate()))
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive(), "terminate must wait for the batch writing into the slots"
    store.release()
    stopper.join(WAIT)
    assert result == [4] and h.wait(WAIT)
    assert [op for op, _ in store.calls] == ["get", "get"], "no batch may start after terminate"
    assert h.terminate() == 4
    tier.close()


def test_wait_complete_waits_for_every_page():
    store = GatedStore()
    tier = gated_tier(store)
    done = []
    h = tier.prefetch(keys_for(5, 4), slots(5), policy="wait_complete", on_done=done.append)
    for _ in range(2):
        wait_batches(store, 1)
        assert not h.can_terminate()
        store.release()
    wait_batches(store, 1)
    assert not h.can_terminate()
    store.release()
    assert h.wait(WAIT) and h.can_terminate() and h.terminate() == 5 and done == [h]
    tier.close()


def test_timeout_policy_gives_up_after_the_linear_timeout():
    store = GatedStore()
    tier = gated_tier(store, prefetch_timeout_base=0.3, prefetch_timeout_per_ki_token=0.0)
    h = tier.prefetch(keys_for(4, 4), slots(4), policy="timeout")
    assert h.timeout_s == pytest.approx(0.3)
    wait_batches(store, 1)
    assert not h.can_terminate()
    store.release()
    wait_batches(store, 1)
    deadline = time.monotonic() + WAIT
    while not h.can_terminate():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not h.finished() and time.monotonic() - h.start_time >= 0.3
    threading.Timer(0.05, store.release).start()
    assert h.terminate() == 4
    tier.close()


def test_prefetch_stops_at_the_first_miss():
    keys = keys_for(6, 4)
    store = GatedStore(misses={keys[3]})
    tier = gated_tier(store)
    store.release(6)
    h = tier.prefetch(keys, slots(6), policy="wait_complete")
    assert h.wait(WAIT) and h.terminate() == 3
    assert [len(k) for _, k in store.calls] == [2, 2]
    assert tier.stats()["prefetch_loaded_pages"] == 3
    tier.close()


def test_terminate_before_start_touches_nothing():
    store = GatedStore()
    tier = gated_tier(store)
    blocker = tier.prefetch(keys_for(2, 4, seed=1), slots(2))
    wait_batches(store, 1)                     # the prefetch thread is busy
    queued = tier.prefetch(keys_for(2, 4, seed=2), slots(2))
    assert queued.terminate() == 0
    store.release()
    assert blocker.wait(WAIT) and queued.wait(WAIT)
    assert len(store.calls) == 1
    tier.close()


def test_storage_errors_never_reach_the_caller(caplog):
    store = GatedStore(fail=True)
    tier = gated_tier(store)
    keys = keys_for(4, 4)
    store.release(10)
    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        assert tier.lookup(keys) == 0
        w = tier.write_back(keys, slots(4))
        f = tier.prefetch(keys, slots(4))
        assert w.wait(WAIT) and f.wait(WAIT)
    assert w.stored == [False] * 4 and f.terminate() == 0
    assert "lookup failed" in caplog.text and "write-back failed" in caplog.text
    stats = tier.stats()
    assert stats["write_failed_pages"] == 4 and stats["prefetch_loaded_pages"] == 0
    tier.close()


def test_callback_errors_are_logged_not_raised(caplog):
    store = GatedStore()
    tier = gated_tier(store)
    store.release(10)

    def bad(_):
        raise RuntimeError("manager bug")

    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        h = tier.write_back(keys_for(1, 4), slots(1), on_done=bad)
        assert h.wait(WAIT)
        tier.flush(WAIT)
    assert "callback" in caplog.text
    later = tier.write_back(keys_for(1, 4, seed=3), slots(1))
    assert later.wait(WAIT), "the writer thread must survive a bad callback"
    tier.close()


def test_write_back_queue_is_bounded():
    store = GatedStore(misses=set(keys_for(8, 4)))    # nothing stored yet
    tier = gated_tier(store, max_pending_writes=4)
    first = tier.write_back(keys_for(4, 4), slots(4))
    dropped = tier.write_back(keys_for(2, 4, seed=3), slots(2))
    assert dropped.done() and dropped.stored == [False, False]
    assert tier.stats()["write_dropped_pages"] == 2
    assert not first.done()
    store.release(2)
    assert tier.flush(WAIT) and first.stored == [True] * 4
    assert tier.stats()["pending_write_pages"] == 0
    tier.close()
    assert store.closed


def test_bad_input_raises_in_the_callers_thread(tmp_path):
    layout = make_layout()
    tier = nixl_tier(random_host(layout), tmp_path)
    with pytest.raises(ValueError, match="host_indices"):
        tier.write_back(keys_for(2, 4), page_slots(0, 1, 4))
    with pytest.raises(ValueError, match="host_indices"):
        tier.prefetch(keys_for(2, 4), torch.arange(1, 9))
    with pytest.raises(ValueError, match="keys"):
        tier.lookup(["not-a-hash"])
    with pytest.raises(ValueError, match="policy"):
        tier.prefetch(keys_for(1, 4), page_slots(0, 1, 4), policy="eager")
    tier.close()
