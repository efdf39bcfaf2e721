"""The peer-host tier over NIXL's UCX plugin: a page server and two clients, three
agents on loopback in this process (UCX needs no GPU or NIC for that)."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from hicache_kernels.storage import StorageTier, StorageUnavailable
from hicache_kernels.storage.peer import PeerPageServer, PeerPageStore
from storage_helpers import keys_for, make_layout, page_slots, poisoned_host, random_host, slot_bytes

LAYOUT = make_layout("layer_first", dtype=torch.float8_e4m3fn, pages=8)


@pytest.fixture
def server():
    srv = PeerPageServer(LAYOUT, capacity_pages=6)
    yield srv
    srv.close()


def same_pages(src, src_page, dst, dst_page, n):
    p = src.layout.page_size
    return all(torch.equal(slot_bytes(src, src_page * p + i), slot_bytes(dst, dst_page * p + i))
               for i in range(n * p))


def test_pages_written_by_one_host_are_read_by_another(server):
    src, dst = random_host(LAYOUT, seed=1), poisoned_host(LAYOUT)
    writer = PeerPageStore(src, server.metadata())
    reader = PeerPageStore(dst, server.metadata())
    keys = keys_for(4, 4)
    assert writer.batch_set(keys, page_slots(2, 4, 4)) == [True] * 4
    assert reader.batch_exists(keys + keys_for(1, 4, seed=3)) == 4
    assert reader.batch_get(keys, page_slots(4, 4, 4)) == [True] * 4
    assert same_pages(src, 2, dst, 4, 4)
    assert reader.io_stats()["bytes_read"] == 4 * reader.page_bytes
    # the same through the tier a manager drives
    third = poisoned_host(LAYOUT)
    tier = StorageTier({"batch_pages": 3, "prefetch_policy": "wait_complete"},
                       open_store=lambda host, cfg: PeerPageStore(host, server.metadata()))
    tier.attach(third)
    assert tier.batch_exists(keys) == 4
    h = tier.batch_get(keys, [0, 1, 2, 3])
    assert h.wait(30) and h.terminate() == 4
    assert same_pages(src, 2, third, 0, 4)
    tier.detach()
    writer.close()
    reader.close()


def test_full_server_evicts_least_recently_used_pages(server):
    src = random_host(LAYOUT, seed=2)
    store = PeerPageStore(src, server.metadata())
    old, new = keys_for(4, 4, seed=1), keys_for(4, 4, seed=2)
    assert store.batch_set(old, page_slots(0, 4, 4)) == [True] * 4
    assert store.batch_exists(old[2:]) == 2            # touch nothing: exists is not a use
    assert store.batch_get(old[2:], page_slots(4, 2, 4)) == [True, True]   # a use
    assert store.batch_set(new, page_slots(0, 4, 4)) == [True] * 4       # capacity 6
    assert server.stored_pages() == 6
    assert store.batch_exists(old[:2]) == 0 and store.batch_exists(old[2:]) == 2
    assert store.batch_exists(new) == 4
    store.close()


def test_corrupted_page_on_the_server_is_a_logged_miss(server, caplog):
    src = random_host(LAYOUT, seed=3)
    store = PeerPageStore(src, server.metadata())
    keys = keys_for(3, 4)
    assert store.batch_set(keys, page_slots(0, 3, 4)) == [True] * 3
    slot = server._index[keys[1]][0]
    server.pool[slot * server.page_bytes + 5] ^= 0x10
    with caplog.at_level(logging.WARNING, logger="hicache_kernels.storage"):
        assert store.batch_get(keys, page_slots(3, 3, 4)) == [True, False, False]
    assert "corrupt" in caplog.text and store.io_stats()["corrupt_pages"] == 1
    assert store.batch_exists(keys) == 1, "the damaged page is forgotten"
    assert not server._pins, "every read released its pins"
    store.close()


def test_a_silent_server_makes_misses_not_errors(server):
    store = PeerPageStore(random_host(LAYOUT), server.metadata(), timeout_s=0.3)
    keys = keys_for(2, 4)
    assert store.batch_set(keys, page_slots(0, 2, 4)) == [True, True]
    server.close()
    assert store.batch_exists(keys) == 0
    assert store.batch_get(keys, page_slots(2, 2, 4)) == [False, False]
    assert store.batch_set(keys_for(1, 4, seed=9), page_slots(0, 1, 4)) == [False]


def test_a_server_of_another_layout_is_refused(server):
    other = make_layout("page_first", pages=8)
    with pytest.raises(StorageUnavailable, match="keeps layer_first"):
        PeerPageStore(random_host(other), server.metadata())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_client_finds_the_server_through_its_metadata_listener():
    """How hosts meet without sharing bytes out of band: NIXL's listener."""
    port = _free_port()
    server = PeerPageServer(LAYOUT, capacity_pages=4, listen_port=port)
    try:
        src, dst = random_host(LAYOUT, seed=4), poisoned_host(LAYOUT)
        a = PeerPageStore(src, (server.name, "127.0.0.1", port))
        b = PeerPageStore(dst, (server.name, "127.0.0.1", port))
        keys = keys_for(2, 4)
        assert a.batch_set(keys, page_slots(0, 2, 4)) == [True, True]
        assert b.batch_get(keys, page_slots(6, 2, 4)) == [True, True]
        assert same_pages(src, 0, dst, 6, 2)
        a.close()
        b.close()
        assert a.batch_exists(keys) == 0, "a closed store answers misses"
    finally:
        server.close()
