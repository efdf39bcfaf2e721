"""Least-recently-used order: the page table's use stamps against a simple model.

The model is the order the manager promises (and kept, before the table became numpy
rows, in one ``OrderedDict`` per tier): a page joins the end of a tier's order when it
arrives there, moves to the end when it is used (a hit, a load reading its host copy),
and leaves when it leaves the tier. Eviction takes the front: on the device the pages
nobody pinned and nothing is loading; on host the pages no transfer holds, those with
no device copy first. Random operation sequences must give exactly the model's order.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from conftest import poison_
from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import EmulatedDevice, HiCacheManager, OutOfPages, PageTable
from hicache_kernels.manager.pages import BACKING_UP, DEVICE, FETCHING, HOST, LOADING, PINNED
from hicache_kernels.manager.policy import device_victims, host_victims

IDS = st.lists(st.integers(0, 11), max_size=6)


class Model:
    """The promised order, kept the obvious way."""

    def __init__(self):
        self.device: OrderedDict = OrderedDict()
        self.host: OrderedDict = OrderedDict()

    def arrive(self, tier: OrderedDict, ids) -> None:
        for i in ids:
            tier[i] = None

    def use(self, ids) -> None:
        for i in ids:
            for tier in (self.device, self.host):
                if i in tier:
                    tier.move_to_end(i)

    def leave(self, tier: OrderedDict, ids) -> None:
        for i in ids:
            tier.pop(i, None)

    def device_victims(self, excluded) -> list:
        return [i for i in self.device if i not in excluded]

    def host_victims(self, excluded) -> list:
        free = [i for i in self.host if i not in excluded]
        return [i for i in free if i not in self.device] + [i for i in free if i in self.device]


# -- the table on its own ------------------------------------------------------------------------

OPS = st.sampled_from(["add", "to_device", "to_host", "off_device", "off_host", "touch", "remove",
                       "flag", "unflag", "lock", "unlock"])
FLAGS = st.sampled_from([PINNED, LOADING, BACKING_UP, FETCHING])


@settings(max_examples=300)
@given(st.lists(st.tuples(OPS, IDS, FLAGS), min_size=20, max_size=60))
def test_table_victims_follow_the_model(steps):
    table, model = PageTable(capacity=4, ramp=8), Model()   # small: growing and rebasing too
    flags: dict[int, int] = {}                         # page id -> extra state bits
    locked: set[int] = set()                           # page ids whose host page is locked
    next_page = iter(range(10**6))

    def rows(ids):
        return table.resolve(ids)

    for op, ids, flag in steps:
        ids = list(dict.fromkeys(ids))                 # the table's vector calls take unique rows
        present = [i for i in ids if i in table]
        if op == "add":
            new = [i for i in ids if i not in table]
            table.add_many(new)
        elif op == "to_device":
            new = [i for i in present if i not in model.device]
            table.place_device(rows(new), np.array([next(next_page) for _ in new], dtype=np.int64))
            model.arrive(model.device, new)
        elif op == "to_host":
            new = [i for i in present if i not in model.host]
            table.place_host(rows(new), np.array([next(next_page) for _ in new], dtype=np.int64))
            model.arrive(model.host, new)
        elif op == "off_device":
            table.clear_device(rows(present))
            model.leave(model.device, present)
        elif op == "off_host":
            table.clear_host(rows(present))
            model.leave(model.host, present)
            locked.difference_update(present)
        elif op == "touch":
            table.touch_rows(rows(present))
            model.use(present)
        elif op == "remove":
            table.remove_many(rows(present))
            model.leave(model.device, present)
            model.leave(model.host, present)
            for i in present:
                flags.pop(i, None)
                locked.discard(i)
        elif op in ("flag", "unflag"):
            for i in present:
                flags[i] = flags.get(i, 0) | flag if op == "flag" else flags.get(i, 0) & ~flag
            r = rows(present)
            if op == "flag":
                table.state[r] |= flag
            else:
                table.state[r] &= np.uint8(~flag & 0xFF)
        elif op == "lock":
            locked.update(i for i in present if i in model.host)
        else:
            locked.difference_update(present)

        names = lambda r: table.ids_of(r)               # noqa: E731
        assert names(table.lru_rows(DEVICE)) == list(model.device)
        assert names(table.lru_rows(HOST)) == list(model.host)
        pinned_or_loading = {i for i, f in flags.items() if f & (PINNED | LOADING)}
        busy = {i for i, f in flags.items() if f & (BACKING_UP | FETCHING)} | locked
        host_locked = {table.host_page[table.index[i]] for i in locked}
        is_locked = lambda pages: np.isin(pages, list(host_locked))   # noqa: E731
        for k in (0, 1, 3, 100):
            assert names(device_victims(table, k)) == model.device_victims(pinned_or_loading)[:k]
            assert names(host_victims(table, is_locked, k)) == model.host_victims(busy)[:k]


def test_table_grows_and_reuses_rows():
    table = PageTable(capacity=2)
    rows = table.add_many(list("abcde"))
    assert sorted(rows.tolist()) == [0, 1, 2, 3, 4] and table.capacity >= 5
    table.place_host(rows, np.arange(5, dtype=np.int64))
    entry = table.get("b")
    table.remove_many(table.resolve(["b", "d"]))
    assert "b" not in table and entry.host_page == -1 and entry.fill is None   # detached
    again = table.add_many(["x", "y"])
    assert sorted(again.tolist()) == sorted(rows[[1, 3]].tolist())            # rows reused
    assert table.state[again].tolist() == [0, 0] and table.get("x").host_page == -1
    assert table.get("x") is table.get("x") and table.get("x") is not entry


# -- through the manager -------------------------------------------------------------------------

P = 2


def _manager():
    lay = KVLayout("layer_first", num_layers=1, num_slots=8 * P, head_num=1, head_dim=8,
                   dtype=torch.bfloat16, page_size=P)
    pool = KVBuffer.allocate(lay)
    poison_(pool.k)
    return HiCacheManager(pool, device=EmulatedDevice(), backend="reference", host_reserve_gb=0,
                          hicache_ratio=1.5)


PICK = st.lists(st.integers(0, 2**16), min_size=1, max_size=4)


class LruMachine(RuleBasedStateMachine):
    """alloc, hit (with its write-through backup), backup, load, evictions, pins and
    free keep the model's order; LRU evictions take the model's victims. A device of
    8 pages and a host of 12, so evictions to make room happen often."""

    def __init__(self):
        super().__init__()
        self.mgr, self.model = _manager(), Model()
        self.evictions: list = []
        self.mgr.on_evict = self.evictions.append
        self.pins: dict = {}
        self.next_id = 0

    def _evicted(self) -> None:
        """Room made by the last call: apply it before what the call added."""
        model = self.model
        for ev in self.evictions:
            model.leave(model.device if ev.tier == "device" else model.host, ev.page_ids)
            model.leave(model.device, ev.removed)
            model.leave(model.host, ev.removed)
            for i in ev.removed:
                self.pins.pop(i, None)
        self.evictions.clear()

    def _pick(self, picks, cond) -> list:
        """Distinct pages that meet ``cond``, chosen by ``picks``, in pick order."""
        pool = sorted(i for i in self.mgr.table.index if cond(i))
        return list(dict.fromkeys(pool[k % len(pool)] for k in picks)) if pool else []

    def _unpinned(self, i) -> bool:
        return not self.pins.get(i)

    @initialize(n=st.integers(2, 8), backed=st.integers(1, 8), evicted=st.integers(1, 8))
    def some_pages(self, n, backed, evicted):
        """Start with pages on the device, some backed up, some of those evicted (rules
        are switched on and off per example: this keeps every rule busy)."""
        self.new(n)
        self.backup(list(range(backed)))
        self.evict_device(list(range(min(evicted, backed))))

    @rule(n=st.integers(1, 3))
    def new(self, n):
        new = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        try:
            self.mgr.alloc_device(new)
        except OutOfPages:       # everything left on the device is pinned
            self._evicted()
            return
        self._evicted()
        self.model.arrive(self.model.device, new)

    @rule(picks=PICK, repeat=st.booleans())
    def hit(self, picks, repeat):
        ids = self._pick(picks, lambda i: True)
        if repeat and ids:     # refused, and nothing moves (the invariant checks the order)
            with pytest.raises(ValueError, match="appears more than once"):
                self.mgr.hit(ids + ids[:1])
        self.mgr.hit(ids)
        self.model.use(ids)
        self._evicted()
        due = [i for i in ids if i in self.model.device and i not in self.model.host]
        self.model.arrive(self.model.host, due)

    @rule(picks=PICK)
    def backup(self, picks):
        due = self._pick(picks, lambda i: i in self.model.device and i not in self.model.host)
        self.mgr.backup(due)
        self._evicted()
        self.model.arrive(self.model.host, due)

    @rule(picks=PICK)
    def evict_device(self, picks):
        self.mgr.evict_device(self._pick(picks, lambda i: i in self.model.device and
                                         self._unpinned(i)))
        self._evicted()

    @rule(k=st.integers(1, 4))
    def evict_device_lru(self, k):
        want = self.model.device_victims({i for i, n in self.pins.items() if n})[:k]
        assert self.mgr.evict_device(num_pages=k) == want
        self._evicted()

    @rule(picks=PICK)
    def load(self, picks):
        ids = self._pick(picks, lambda i: i in self.model.host and i not in self.model.device)
        if not ids:
            return
        try:
            self.mgr.load(ids)
        except OutOfPages:
            self._evicted()
            return
        self._evicted()
        self.model.arrive(self.model.device, ids)
        self.model.use(ids)

    @rule(k=st.integers(1, 4))
    def evict_host(self, k):
        want = self.model.host_victims(set())[:k]
        assert self.mgr.evict_host(k) == want
        self._evicted()

    @rule(picks=PICK)
    def pin(self, picks):
        ids = self._pick(picks, lambda i: True)
        self.mgr.pin(ids)
        for i in ids:
            self.pins[i] = self.pins.get(i, 0) + 1

    @rule(picks=PICK)
    def unpin(self, picks):
        ids = self._pick(picks, lambda i: self.pins.get(i))
        self.mgr.unpin(ids)
        for i in ids:
            self.pins[i] -= 1

    @rule(picks=PICK)
    def free(self, picks):
        ids = self._pick(picks, self._unpinned)
        self.mgr.free(ids)
        self.model.leave(self.model.device, ids)
        self.model.leave(self.model.host, ids)

    @invariant()
    def order_matches_the_model(self):
        mgr, model = self.mgr, self.model
        mgr.poll()                   # the synchronous device has finished every copy
        assert [e.page_id for e in mgr.table.device_lru] == list(model.device)
        assert [e.page_id for e in mgr.table.host_lru] == list(model.host)
        assert set(mgr.table.index) == set(model.device) | set(model.host)

    def teardown(self):
        self.mgr.close()


def test_manager_keeps_lru_order():
    run_state_machine_as_test(LruMachine, settings=settings(max_examples=100,
                                                            stateful_step_count=30))


@pytest.mark.parametrize("ids", [["a", "b", "a", "c"], ["c", "c", "b"]])
def test_a_hit_naming_a_page_twice_is_refused_and_moves_nothing(ids):
    mgr = _manager()
    mgr.alloc_device(["a", "b", "c"])
    mgr.poll()
    with pytest.raises(ValueError, match=f"page_ids: {ids[2 if ids[0] == 'a' else 1]!r} "
                                         f"appears more than once"):
        mgr.hit(ids)
    assert [e.page_id for e in mgr.table.device_lru] == ["a", "b", "c"]
    assert all(mgr.table.get(i).hits == 0 for i in "abc") and mgr.in_flight == 0
    mgr.close()
