"""Tier-aware KV events: a real ZMQ subscriber receives the manager's page moves and
decodes them with SGLang's own msgspec classes (sglang.srt.disaggregation.kv_events),
in order, over device, host and the NIXL storage tier."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import msgspec
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, run_state_machine_as_test
from sglang.srt.disaggregation.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                                 KVEventBatch)
from sglang.srt.mem_cache.utils import hash_str_to_int64

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import HiCacheManager, InMemoryStorage, ManagerObserver, PageState
from hicache_kernels.observers import KVEventPublisher, block_hash
from hicache_kernels.observers.kv_events import END_OF_REPLAY
from hicache_kernels.storage import StorageTier, page_keys
from test_manager_stateful import ManagerMachine
from test_manager_storage_stateful import StorageMachine

P = 4
WAIT_MS = 10_000   # only reached when something is broken
MEDIUM = {PageState.DEVICE: "GPU", PageState.HOST: "CPU_TIER1"}


def pool(pages: int = 4) -> KVBuffer:
    lay = KVLayout("layer_first", num_layers=2, num_slots=pages * P, head_num=2, head_dim=8,
                   dtype=torch.bfloat16, page_size=P)
    return KVBuffer.allocate(lay)


class Subscriber:
    """A ZMQ SUB socket on a publisher, decoding with SGLang's KVEventBatch."""

    def __init__(self, pub: KVEventPublisher, topic: str):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(pub.endpoint)
        self.socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        assert pub.wait_for_subscribers(1, timeout_s=10)
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.topic = topic.encode()
        self.next_seq = 0
        self.batches: list[KVEventBatch] = []

    def recv(self, n: int) -> list:
        """The events of the next ``n`` batches, checking topic and sequence numbers."""
        events = []
        for _ in range(n):
            assert self.socket.poll(WAIT_MS), f"batch {self.next_seq} never arrived"
            topic, seq, payload = self.socket.recv_multipart()
            assert topic == self.topic
            assert int.from_bytes(seq, "big") == self.next_seq   # no gap, no reordering
            self.next_seq += 1
            batch = self.decoder.decode(payload)
            assert batch.attn_dp_rank == 0 and abs(batch.ts - time.time()) < 60
            self.batches.append(batch)
            events.extend(batch.events)
        return events

    def assert_quiet(self, ms: int = 200) -> None:
        assert not self.socket.poll(ms), "an unexpected batch was published"

    def close(self) -> None:
        self.socket.close()


def summary(events) -> list[tuple]:
    out = []
    for e in events:
        if isinstance(e, BlockStored):
            out.append(("stored", e.medium, e.block_hashes, e.parent_block_hash, e.token_ids,
                        e.block_size, e.lora_id))
        elif isinstance(e, BlockRemoved):
            out.append(("removed", e.medium, sorted(e.block_hashes)))
        else:
            assert isinstance(e, AllBlocksCleared)
            out.append(("cleared",))
    return out


def apply(view: dict, events) -> None:
    """What a router knows: block hash -> the mediums holding it."""
    for e in events:
        if isinstance(e, BlockStored):
            for h in e.block_hashes:
                assert e.medium not in view.setdefault(h, set()), "stored twice on one tier"
                view[h].add(e.medium)
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                view[h].remove(e.medium)      # KeyError: removed what was never stored
        else:
            view.clear()


def truth(mgr, tier, ids) -> dict:
    """The manager's own answer: device and host from lookup(), storage from the files."""
    out = {}
    stored = set(ids[:tier.batch_exists(ids)]) if tier is not None else set()
    for page_id, state in zip(ids, mgr.lookup(ids)):
        mediums = {m for bit, m in MEDIUM.items() if state & bit}
        if page_id in stored:
            mediums.add("CPU_TIER2")
        if mediums:
            out[block_hash(page_id)] = mediums
    return out


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 2**31, (3 * P,), generator=gen).tolist()


def test_promotion_and_demotion_across_three_tiers(tmp_path, tokens):
    ids = page_keys(tokens, P)
    info = {k: (tokens[i * P:(i + 1) * P], ids[i - 1] if i else None) for i, k in enumerate(ids)}
    h = [hash_str_to_int64(k) for k in ids]     # SGLang's own block hash of each page key
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv", page_tokens=info.get)
    sub = Subscriber(pub, "kv")
    tier = StorageTier({"directory": str(tmp_path), "prefetch_policy": "wait_complete"})
    mgr = HiCacheManager(pool(), storage=tier, observers=[pub], backend="reference",
                         host_reserve_gb=0, host_layout="page_first")
    view: dict = {}

    def step(n_batches, expected):
        events = sub.recv(n_batches)
        assert summary(events) == expected
        apply(view, events)
        assert {k: v for k, v in view.items() if v} == truth(mgr, tier, ids)

    def stored(medium, hashes, parent=None, toks=tokens):
        return ("stored", medium, hashes, parent, toks, P, None)

    mgr.alloc_device(ids)                                   # prefill: one chain on the GPU
    step(1, [stored("GPU", h)])
    mgr.hit(ids)                                            # write-through: demoted copy on host
    step(1, [stored("CPU_TIER1", h)])
    mgr.synchronize(storage=True)
    assert [a.kind for a in mgr.poll()] == ["backup", "store"]
    step(1, [stored("CPU_TIER2", h)])                       # ... and in files once written
    mgr.evict_device(ids[1:])                               # demotion: device copies go
    step(1, [("removed", "GPU", sorted(h[1:]))])
    assert sorted(mgr.evict_host(3)) == sorted(ids)         # every host copy goes
    step(1, [("removed", "CPU_TIER1", sorted(h))])
    mgr.free(ids[:1])                                       # the first page leaves device too
    step(1, [("removed", "GPU", [h[0]])])
    fetching = mgr.prefetch(ids)                            # promotion storage -> host
    assert fetching == tuple(ids)
    step(1, [stored("CPU_TIER1", h)])
    deadline = time.monotonic() + 30
    while not mgr.check_prefetch(fetching):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("prefetch", ())]
    sub.assert_quiet(50)                                    # settling changes no tier
    mgr.load(ids[1:])                                       # promotion host -> device: a chain
    step(1, [stored("GPU", h[1:], parent=h[0], toks=tokens[P:])])
    mgr.close()                                             # AllBlocksCleared
    events = sub.recv(1)
    assert summary(events) == [("cleared",)]
    sub.assert_quiet(50)
    sub.close()


def test_a_page_a_prefetch_cannot_read_is_removed_from_storage(tmp_path, tokens):
    """A stored page damaged on disk (right size, wrong bytes): the prefetch reads the
    prefix up to it, storage deletes it, and the router hears that storage lost it; the
    page after it was not read and stays advertised, as its file is still there."""
    ids = page_keys(tokens, P)
    h = [hash_str_to_int64(k) for k in ids]
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv")
    sub = Subscriber(pub, "kv")
    tier = StorageTier({"directory": str(tmp_path), "prefetch_policy": "wait_complete"})
    mgr = HiCacheManager(pool(), storage=tier, observers=[pub], backend="reference",
                         host_reserve_gb=0, host_layout="page_first")
    view: dict = {}
    mgr.alloc_device(ids)
    mgr.hit(ids)
    mgr.synchronize(storage=True)
    assert [(a.kind, a.failed) for a in mgr.poll()] == [("backup", ()), ("store", ())]
    mgr.free(ids)
    apply(view, sub.recv(5))   # stored on GPU, CPU_TIER1, CPU_TIER2; freed from GPU, CPU_TIER1
    sub.assert_quiet(50)
    assert view == {x: {"CPU_TIER2"} for x in h}
    path = tier.store.page_path(ids[1])
    with open(path, "r+b") as f:                 # flip the last payload byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert tier.batch_exists(ids) == 3, "the damage is only seen by reading the page"
    assert mgr.prefetch(ids) == tuple(ids)
    apply(view, sub.recv(1))
    mgr.synchronize(storage=True)
    [ack] = mgr.poll()
    assert (ack.kind, ack.failed) == ("prefetch", tuple(ids[1:]))
    events = sub.recv(3)   # each page not fetched leaves host, then storage's loss
    assert summary(events) == [("removed", "CPU_TIER1", [h[1]]), ("removed", "CPU_TIER1", [h[2]]),
                               ("removed", "CPU_TIER2", [h[1]])]
    sub.assert_quiet(50)
    apply(view, events)
    assert view == {h[0]: {"CPU_TIER1", "CPU_TIER2"}, h[1]: set(), h[2]: {"CPU_TIER2"}}
    assert not os.path.exists(path) and os.path.exists(tier.store.page_path(ids[2]))
    mgr.close()
    assert summary(sub.recv(1)) == [("cleared",)]
    sub.close()


class ReadEndingAt:
    """A storage read (the manager's protocol) whose answer is ``ok`` once it has
    ended: while the policy is asked (``ends_when_asked``: a read finishing between
    the manager's own poll and its check), or when the test sets ``ended``."""

    def __init__(self, ok: list, ends_when_asked: bool):
        self.ok, self.ends_when_asked, self.ended = ok, ends_when_asked, False

    def poll(self):
        return self.ok if self.ended else None

    def can_terminate(self):
        self.ended = self.ended or self.ends_when_asked
        return True

    def terminate(self):
        return self.ok.index(False) if False in self.ok else len(self.ok)


class Recorder(ManagerObserver):
    def __init__(self):
        self.removals, self.stores = [], []

    def stored(self, tier, page_ids):
        self.stores.append((tier, list(page_ids)))

    def removed(self, tier, page_ids):
        self.removals.append((tier, list(page_ids)))


@pytest.mark.parametrize("first_write_lands_first", [True, False])
def test_a_page_written_twice_while_it_left_and_came_back_is_announced_once(first_write_lands_first):
    """Page 0 is written to storage, freed while the write is in flight, computed again
    and written again: storage holds it once, and says so once."""
    storage, rec = InMemoryStorage(defer=True), Recorder()
    mgr = HiCacheManager(pool(), storage=storage, observers=[rec], backend="reference",
                         host_reserve_gb=0)
    for writes_in_flight in (1, 2):
        mgr.alloc_device([0])
        mgr.hit([0])                 # write-through: a backup, then a storage write
        mgr.synchronize()
        mgr.poll()
        assert len(storage._ops) == writes_in_flight
        if writes_in_flight == 1:
            mgr.free([0])            # the page goes while it is written
    writes = storage._ops if first_write_lands_first else storage._ops[::-1]
    for write in writes:
        write.finish()
        mgr.poll()
    assert [ids for tier, ids in rec.stores if tier == "storage"] == [[0]]
    assert mgr.table.get(0).in_storage
    mgr.close()


@pytest.mark.parametrize("ends_when_asked, lost", [(True, ["b"]), (False, [])])
def test_check_prefetch_announces_the_page_a_finished_read_stopped_at(ends_when_asked, lost):
    """check_prefetch settles a read: one that had ended by itself (after the manager's
    own poll, before the policy stopped it) stopped at a page storage could not serve;
    one that the policy cut off says nothing of storage."""
    reads = []

    class Storage(InMemoryStorage):
        def batch_get(self, keys, host_pages):
            ok = super().batch_get(keys[:1], host_pages[:1]) + [False] * (len(keys) - 1)
            reads.append(ReadEndingAt(ok, ends_when_asked))
            return reads[-1]

    storage, rec = Storage(), Recorder()
    mgr = HiCacheManager(pool(), storage=storage, observers=[rec], backend="reference",
                         host_reserve_gb=0)
    page = mgr.host_pool.read_pages(np.array([0]))[0]
    storage.pages.update({k: page.clone() for k in "abc"})
    assert mgr.prefetch(list("abc")) == tuple("abc")
    assert mgr.check_prefetch(list("abc"))
    assert rec.removals == [("host", ["b"]), ("host", ["c"])] + ([("storage", lost)] if lost else [])
    reads[0].ended = True
    [ack] = mgr.poll()
    assert ack.failed == ("b", "c") and len(rec.removals) == 2 + bool(lost), "announced once"
    mgr.close()


def test_block_hashes_are_sglangs_for_page_keys_and_stable_otherwise():
    key = page_keys(list(range(P)), P)[0]
    assert block_hash(key) == hash_str_to_int64(key)
    assert block_hash("ff" * 32) == hash_str_to_int64("ff" * 32) == -1   # signed int64
    assert block_hash(5) == 5 and block_hash(-(1 << 63)) == -(1 << 63)
    # no key: the first 8 bytes of SHA-256 of repr(), the same in every process
    for page_id in [("page", 3), "not-a-key", 1 << 70, True]:
        digest = hashlib.sha256(repr(page_id).encode()).digest()
        assert block_hash(page_id) == int.from_bytes(digest[:8], "big", signed=True)
    assert block_hash(("page", 3)) != block_hash(("page", 4))


class BrokenStorage(InMemoryStorage):
    broken = False

    def batch_get(self, keys, host_pages):
        if self.broken:
            raise OSError("storage is down")
        return super().batch_get(keys, host_pages)


def test_failing_calls_publish_nothing_and_ids_without_tokens_stand_alone():
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="")
    sub = Subscriber(pub, "")
    storage = BrokenStorage()
    mgr = HiCacheManager(pool(), storage=storage, observers=[pub], backend="reference",
                         host_reserve_gb=0)
    ids = [("page", i) for i in range(3)]
    storage.pages[ids[2]] = torch.zeros(1)                  # storage claims to hold the third
    mgr.alloc_device(ids[:2])
    # no page_tokens: each page is its own event, no parent, no tokens
    assert summary(sub.recv(1)) == [("stored", "GPU", [block_hash(i)], None, [], P, None)
                                    for i in ids[:2]]
    mgr.pin(ids[1:2])
    storage.broken = True
    with pytest.raises(OSError, match="storage is down"):
        mgr.prefetch([ids[2]])                              # its host page is given back, quietly
    with pytest.raises(ValueError, match="already in the page table"):
        mgr.alloc_device([ids[2], ids[0]])
    with pytest.raises(ValueError, match="cannot be loaded"):
        mgr.load(ids[:1])                                   # on the device already
    with pytest.raises(KeyError, match="not in the page table"):
        mgr.free([ids[0], ids[2]])
    with pytest.raises(ValueError, match="pinned"):
        mgr.evict_device(ids[:2])
    with pytest.raises(ValueError, match="pinned"):
        mgr.free(ids[:2])
    sub.assert_quiet()
    mgr.free(ids[:1])                                       # the next batch has the next number
    assert summary(sub.recv(1)) == [("removed", "GPU", [block_hash(ids[0])])]
    mgr.close()
    assert summary(sub.recv(1)) == [("cleared",)]
    sub.close()


def test_tiers_mediums_and_a_failing_page_tokens_never_reach_the_manager(caplog):
    calls = []

    def page_tokens(page_id):
        calls.append(page_id)
        raise RuntimeError("tree lookup failed")

    pub = KVEventPublisher("tcp://127.0.0.1:*", tiers=["host"], mediums={"host": "CPU_PINNED"},
                           page_tokens=page_tokens)
    sub = Subscriber(pub, "")
    mgr = HiCacheManager(pool(), observers=[pub], backend="reference", host_reserve_gb=0)
    mgr.alloc_device(["a"])                                 # device: not published
    mgr.alloc_host(["b"])                                   # page_tokens raises: dropped, counted
    assert mgr.lookup(["b"]) == [PageState.HOST]            # the manager's call did its work
    assert calls == ["b"] and pub.dropped == 1 and "could not be published" in caplog.text
    mgr.free(["a", "b"])
    sub.next_seq = 1                                        # the dropped batch took number 0
    assert summary(sub.recv(1)) == [("removed", "CPU_PINNED", [block_hash("b")])]
    sub.assert_quiet()
    mgr.close()
    assert summary(sub.recv(1)) == [("cleared",)]
    sub.close()


def test_two_subscribers_and_tokens_as_a_tensor(tokens):
    ids = page_keys(tokens, P)
    t = torch.tensor(tokens)
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv",
                           page_tokens=lambda k: (t[ids.index(k) * P:(ids.index(k) + 1) * P],
                                                  ids[ids.index(k) - 1] if ids.index(k) else None))
    first = Subscriber(pub, "kv")
    second = Subscriber(pub, "kv")        # the same topic: still seen (wait_for_subscribers)
    mgr = HiCacheManager(pool(), observers=[pub], backend="reference", host_reserve_gb=0)
    mgr.alloc_device(ids[1:])             # its parent is not stored: linked to it anyway
    want = [("stored", "GPU", [block_hash(k) for k in ids[1:]], block_hash(ids[0]), tokens[P:],
             P, None)]
    assert summary(first.recv(1)) == want and summary(second.recv(1)) == want
    mgr.close()
    for sub in (first, second):
        assert summary(sub.recv(1)) == [("cleared",)]
        sub.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(endpoint="localhost:5557"), "endpoint: expected a ZMQ endpoint"),
    (dict(tiers=["gpu"]), r"tiers: expected some of \['device', 'host', 'storage'\]"),
    (dict(mediums={"disk": "DISK"}), "mediums: expected tier"),
    (dict(mediums={"host": ""}), "mediums: expected tier"),
    (dict(dp_rank=-1), "dp_rank: expected an int"),
    (dict(topic=b"kv"), "topic: expected a str"),
    (dict(page_tokens={}), "page_tokens: expected a callable"),
    (dict(hwm=-1), "hwm: expected an int >= 0"),
    (dict(replay_endpoint="localhost:5558"), "replay_endpoint: expected None or a ZMQ endpoint"),
    (dict(buffer_steps=0), "buffer_steps: expected an int >= 1"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    kwargs.setdefault("endpoint", "tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match=match):
        KVEventPublisher(**kwargs)


class Replayer:
    """A DEALER on a publisher's replay socket, as a subscriber that saw a gap uses it."""

    def __init__(self, pub: KVEventPublisher):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(pub.replay_endpoint)
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def replay(self, start: int, topic: bytes = b"kv") -> list[tuple[int, KVEventBatch]]:
        self.socket.send_multipart((b"", start.to_bytes(8, "big")))
        out = []
        while True:
            assert self.socket.poll(WAIT_MS), "the replay never ended"
            frames = self.socket.recv_multipart()
            if frames[1:] == [b"", END_OF_REPLAY, b""]:
                assert frames[0] == b""
                return out
            empty, got_topic, seq, payload = frames
            assert empty == b"" and got_topic == topic
            out.append((int.from_bytes(seq, "big"), self.decoder.decode(payload)))

    def close(self):
        self.socket.close()


def test_a_subscriber_that_missed_batches_gets_them_replayed(caplog):
    """SGLang's replay protocol: what a live subscriber saw, byte for byte, from any
    sequence number on; only the last ``buffer_steps`` batches; batches the PUB socket
    dropped (no subscriber yet) too; a malformed request is ignored, not fatal."""
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv", replay_endpoint="tcp://127.0.0.1:*",
                           buffer_steps=4)
    assert pub.replay_endpoint.startswith("tcp://127.0.0.1:") and pub.replay_endpoint != pub.endpoint
    pub.block_size = P
    pub.stored("device", [1])                  # sent before anyone subscribed: lost live
    sub = Subscriber(pub, "kv")
    sub.next_seq = 1
    pub.stored("host", [1, 2])
    pub.removed("device", [1])
    pub.stored("storage", [2])
    pub.publish_cleared()
    sub.recv(4)
    replayer = Replayer(pub)
    got = replayer.replay(2)
    assert [seq for seq, _ in got] == [2, 3, 4]
    assert [batch for _, batch in got] == sub.batches[1:]
    assert [seq for seq, _ in replayer.replay(0)] == [1, 2, 3, 4], "the last 4 batches are kept"
    assert replayer.replay(5) == []
    first = replayer.replay(1)[0][1]
    assert summary(first.events) == summary(sub.batches[0].events)
    lost = KVEventPublisher("tcp://127.0.0.1:*", topic="kv",
                                       replay_endpoint="tcp://127.0.0.1:*")
    lost.block_size = P
    lost.stored("device", [7])                 # nobody subscribed: dropped by PUB, kept here
    again = Replayer(lost)
    [(seq, batch)] = again.replay(0)
    assert seq == 0 and summary(batch.events) == [("stored", "GPU", [7], None, [], P, None)]
    with caplog.at_level("WARNING", logger="hicache_kernels.observers"):
        again.socket.send_multipart((b"", b"\0" * 8, b"extra"))
        assert [s for s, _ in again.replay(0)] == [0], "a bad request does not stop replay"
    assert "ignored a replay request of 4 frames" in caplog.text
    for closing in (pub, lost):
        thread = closing._replay_thread
        closing.close()
        assert not thread.is_alive()
        closing.close()
    replayer.close()
    again.close()
    sub.close()


def test_a_replay_endpoint_in_use_is_refused_by_name():
    first = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="replay_endpoint: cannot bind 'tcp://127.0.0.1:[0-9]+'"):
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint=first.replay_endpoint)
    first.close()


def test_an_endpoint_in_use_is_refused_by_name():
    first = KVEventPublisher("tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="endpoint: cannot bind 'tcp://127.0.0.1:[0-9]+': Address"):
        KVEventPublisher(first.endpoint, bind=True)
    first.close()


def test_manager_refuses_an_object_that_is_not_an_observer():
    with pytest.raises(TypeError, match=r"observers: dict lacks \['attach'"):
        HiCacheManager(pool(), observers=[{}], backend="reference", host_reserve_gb=0)


# -- the observer calls follow the page table through random work --------------------------------

class TierView(ManagerObserver):
    """What an observer learns: the pages on each tier (a page stored twice on a tier,
    or removed from device or host where it was not, is a wrong call). Storage removals
    are pages a read could not find, whoever wrote them (``storage_removed``, checked
    against the storage by the machine). The manager forgets a page that leaves both
    device and host: a page written to storage again after that may be announced again,
    no other."""

    def __init__(self):
        self.tiers = {"device": set(), "host": set(), "storage": set()}
        self.forgotten = set()     # in storage, and left the page table since announced
        self.storage_removed = []

    def stored(self, tier, page_ids):
        for i in page_ids:
            again = tier == "storage" and i in self.forgotten
            assert again or i not in self.tiers[tier], f"{i!r} stored on {tier} twice"
            self.tiers[tier].add(i)
            if tier == "storage":   # written after it left device and host: forgotten already
                if i in self.tiers["device"] or i in self.tiers["host"]:
                    self.forgotten.discard(i)
                else:
                    self.forgotten.add(i)

    def removed(self, tier, page_ids):
        if tier == "storage":
            self.storage_removed.extend(page_ids)
            self.tiers["storage"].difference_update(page_ids)
            self.forgotten.difference_update(page_ids)
            return
        for i in page_ids:
            assert i in self.tiers[tier], f"{i!r} removed from {tier}, where it was not"
            self.tiers[tier].remove(i)
            if i in self.tiers["storage"] and not (i in self.tiers["device"]
                                                    or i in self.tiers["host"]):
                self.forgotten.add(i)

    def closed(self):
        for pages in self.tiers.values():
            pages.clear()


def watched(machine):
    """The manager's stateful test machine, its manager observed by a TierView checked
    against ``lookup()`` after every step (failing calls included: they raise, the
    machine expects it, and the view must not have moved)."""

    class Watched(machine):
        def __init__(self):
            super().__init__()
            self.view = TierView()
            self.view.attach(self.mgr)
            self.mgr._observer = self.view    # the machines build their own manager

        @invariant()
        def observer_sees_the_page_table(self):
            ids = list(self.mgr.table.index)
            for tier, bit in (("device", PageState.DEVICE), ("host", PageState.HOST)):
                here = {i for i, s in zip(ids, self.mgr.lookup(ids)) if s & bit}
                assert self.view.tiers[tier] == here, tier
            storage = getattr(self, "storage", None)
            for i in self.view.storage_removed:   # a read failed on it: lost, or never there
                assert i in storage.missing or i not in storage.pages, i
            self.view.storage_removed.clear()

    return Watched


WATCH = settings(max_examples=20, stateful_step_count=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy, host_layout", [("write_through", "page_first"),
                                                 ("write_back", "layer_first")])
def test_observer_follows_the_manager_machine(policy, host_layout):
    machine = type("Machine", (ManagerMachine,), dict(policy=policy, host_layout=host_layout))
    run_state_machine_as_test(watched(machine), settings=WATCH)


@pytest.mark.parametrize("policy", ["wait_complete", "best_effort"])
def test_observer_follows_the_storage_machine(policy):
    machine = type("Machine", (StorageMachine,), dict(policy=policy))
    run_state_machine_as_test(watched(machine), settings=WATCH)


# -- the e2e bench publishes them too --------------------------------------------------------------

def test_e2e_bench_publishes_kv_events(tmp_path, capsys, monkeypatch):
    from hicache_kernels import observers
    from hicache_kernels.bench import cli

    class Publisher(KVEventPublisher):
        """The bench's publisher, first waiting for this test's subscription (the tier's
        first event may come within milliseconds of the bind, before ZMQ reconnects)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            assert self.wait_for_subscribers(1, timeout_s=10)

    monkeypatch.setattr(observers, "KVEventPublisher", Publisher)
    with socket.socket() as s:                      # a free port for the bench to bind
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv-events")
    sub.connect(f"tcp://127.0.0.1:{port}")
    assert cli.main(["e2e", "--quick", "--clients", "4", "--rounds", "3", "--no-progress",
                     "--kv-events", f"tcp://*:{port}", "--out", str(tmp_path)]) == 0
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    events, seqs = [], []
    while sub.poll(2000):
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv-events"
        seqs.append(int.from_bytes(seq, "big"))
        events.extend(decoder.decode(payload).events)
    sub.close()
    assert seqs == list(range(len(seqs))) and len(seqs) > 3      # every batch, in order
    kinds = {(type(e).__name__, getattr(e, "medium", None)) for e in events}
    assert {("BlockStored", "GPU"), ("BlockStored", "CPU_TIER1"), ("BlockRemoved", "GPU")} <= kinds
    assert kinds <= {("BlockStored", "GPU"), ("BlockStored", "CPU_TIER1"), ("BlockRemoved", "GPU"),
                     ("BlockRemoved", "CPU_TIER1"), ("AllBlocksCleared", None)}
    assert isinstance(events[-1], AllBlocksCleared)                # the tier closed
