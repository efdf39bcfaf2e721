"""Prometheus metrics of the manager: scraped over HTTP from the served endpoint (and
from a registry the caller mounts) after known workloads, every value checked."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import HiCacheManager, InMemoryStorage
from hicache_kernels.observers import ManagerMetrics
from hicache_kernels.storage import StorageTier, page_keys
from hicache_kernels.storage.pages import HEADER_BYTES

P = 4
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
PAGE_BYTES = P * LAYERS * 2 * HEADS * HEAD_DIM * 2     # K and V, bf16


def pool(pages: int = 8) -> KVBuffer:
    lay = KVLayout("layer_first", num_layers=LAYERS, num_slots=pages * P, head_num=HEADS,
                   head_dim=HEAD_DIM, dtype=torch.bfloat16, page_size=P)
    return KVBuffer.allocate(lay)


def samples(text: str) -> dict:
    """Exposition text -> {(sample name, ((label, value), ...)): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def by_label(values: dict, name: str, label: str, **const) -> dict:
    """The samples of ``name``, keyed by ``label``'s value."""
    out = {}
    for (sample, labels), value in values.items():
        labels = dict(labels)
        if sample == name and all(labels.get(k) == v for k, v in const.items()):
            out[labels.get(label)] = value
    return out


def test_metrics_served_over_http_after_a_known_workload():
    metrics = ManagerMetrics(labels={"tp_rank": "0"})
    port = metrics.serve(0, addr="127.0.0.1")
    mgr = HiCacheManager(pool(), storage=InMemoryStorage(), observers=[metrics],
                         backend="reference", host_reserve_gb=0)
    ids = [("page", i) for i in range(4)]
    mgr.alloc_device(ids)
    mgr.hit(ids)                                    # 4 device hits; write-through backup of 4
    mgr.synchronize(storage=True)                   # backup done -> store of 4, done
    assert [a.kind for a in mgr.poll()] == ["backup", "store"]
    mgr.evict_device(ids[:2])                       # 2 evicted from the device
    mgr.load(ids[:2])                               # 2 host hits
    assert [a.kind for a in mgr.poll()] == ["load"]
    mgr.free(ids[3:])                               # gone from device and host (not evicted)
    assert mgr.prefetch([ids[3], ("page", 9)]) == (ids[3],)   # 1 storage hit; page 9 not stored
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("prefetch", ())]
    assert mgr.evict_host(1) == [ids[3]]            # host-only pages go first

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        values = samples(r.read().decode())
    rank = dict(tp_rank="0")
    assert by_label(values, "hicache_pages", "tier", **rank) == {"device": 3, "host": 3}
    assert by_label(values, "hicache_capacity_pages", "tier", **rank) == {"device": 8, "host": 16}
    assert by_label(values, "hicache_bytes", "tier", **rank) == {"device": 3 * PAGE_BYTES,
                                                                "host": 3 * PAGE_BYTES}
    assert by_label(values, "hicache_in_flight", "kind", **rank) == {"load": 0, "backup": 0,
                                                                    "storage": 0}
    assert by_label(values, "hicache_hit_pages_total", "tier", **rank) == {
        "device": 4, "host": 2, "storage": 1}
    assert by_label(values, "hicache_stored_pages_total", "tier", **rank) == {
        "device": 4 + 2, "host": 4 + 1, "storage": 4}
    assert by_label(values, "hicache_evicted_pages_total", "tier", **rank) == {"device": 2, "host": 1}
    once = {"load": 1, "backup": 1, "prefetch": 1, "store": 1}
    assert by_label(values, "hicache_ops_started_total", "kind", **rank) == once
    assert by_label(values, "hicache_ops_finished_total", "kind", **rank) == once
    moved = {"host_to_device": 2, "device_to_host": 4, "storage_to_host": 1, "host_to_storage": 4}
    assert by_label(values, "hicache_moved_pages_total", "direction", **rank) == moved
    assert by_label(values, "hicache_moved_bytes_total", "direction", **rank) == {
        k: v * PAGE_BYTES for k, v in moved.items()}
    seconds = by_label(values, "hicache_transfer_seconds_total", "direction", **rank)
    assert set(seconds) == set(moved) and all(0 < s < 60 for s in seconds.values())
    assert by_label(values, "hicache_storage_failed_pages_total", "kind", **rank) == {
        "prefetch": 0, "store": 0}
    # the in-memory storage keeps no corrupt/lookup counts: those series are absent
    assert not by_label(values, "hicache_storage_corrupt_pages_total", None)
    mgr.close()
    metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_storage_corrupt_and_missing_pages_in_a_mounted_registry(tmp_path):
    registry = CollectorRegistry()
    metrics = ManagerMetrics(registry)
    tier = StorageTier({"directory": str(tmp_path), "prefetch_policy": "wait_complete"})
    mgr = HiCacheManager(pool(), storage=tier, observers=[metrics], backend="reference",
                         host_reserve_gb=0, host_layout="page_first")
    keys = page_keys(list(range(3 * P)), P)
    mgr.alloc_device(keys[:2])
    mgr.hit(keys[:2])
    mgr.synchronize(storage=True)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("backup", ()), ("store", ())]
    mgr.free(keys[:2])
    with open(tier.store.page_path(keys[1]), "r+b") as f:     # one flipped payload byte
        f.seek(HEADER_BYTES + 5)
        byte = f.read(1)
        f.seek(HEADER_BYTES + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    fetching = mgr.prefetch(keys)                    # 3 looked up, 2 stored: 1 missing
    assert fetching == tuple(keys[:2])
    deadline = time.monotonic() + 30
    while not mgr.check_prefetch(fetching):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("prefetch", (keys[1],))]

    values = samples(generate_latest(registry).decode())
    assert values[("hicache_storage_corrupt_pages_total", ())] == 1
    assert values[("hicache_storage_missing_pages_total", ())] == 1
    assert by_label(values, "hicache_storage_failed_pages_total", "kind") == {"prefetch": 1, "store": 0}
    assert by_label(values, "hicache_moved_pages_total", "direction")["storage_to_host"] == 1
    assert by_label(values, "hicache_hit_pages_total", "tier")["storage"] == 2
    mgr.close()


def test_one_manager_per_metrics_and_bad_arguments_named():
    metrics = ManagerMetrics()
    mgr = HiCacheManager(pool(), observers=[metrics], backend="reference", host_reserve_gb=0)
    with pytest.raises(RuntimeError, match="already observing a manager"):
        HiCacheManager(pool(), observers=[metrics], backend="reference", host_reserve_gb=0)
    with pytest.raises(ValueError, match="port: expected an int"):
        metrics.serve(70000)
    with pytest.raises(ValueError, match="labels: expected str label names"):
        ManagerMetrics(labels={"tp rank": "0"})
    mgr.close()
