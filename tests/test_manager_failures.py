"""Calls that cannot succeed change nothing; misuse is a clear error naming the argument.

The property test at the bottom drives a manager (every write policy, a deferred
storage tier, transfers held in flight) with random calls, many of them
impossible or malformed, and compares a snapshot of everything a call could
change (page table, allocators, pool bytes, streams, on_evict calls, storage)
before and after each call that raised. The tests above it pin down each case
once: a failed allocation or load evicts nothing, a write_back eviction waits for
the stream that produced the page, op ids are unique, a closed manager says so,
and each bad argument is named.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import (EmulatedDevice, HiCacheManager, HostPool, InMemoryStorage,
                                     OutOfPages, PageState)
from test_manager import P, make, slots_bytes, write_pages
from test_manager_fastload import CountingClaimer

DEVICE, HOST = PageState.DEVICE, PageState.HOST


def _fill(pool, slots, data) -> None:
    for view, rows in zip(pool.layer_views(range(pool.layout.num_layers)), data):
        p = view.shape[1]
        view[slots // p, slots % p] = rows


def _random_kv(pool, slots, gen) -> torch.Tensor:
    return torch.randint(0, 256, slots_bytes(pool, slots).shape, dtype=torch.uint8, generator=gen)


def _write_on(dev, stream, pool, slots, gen) -> torch.Tensor:
    """Queue a write of random KV into ``slots`` on ``stream``; returns the bytes."""
    data = _random_kv(pool, slots, gen)
    dev.launch(stream, lambda _stream: _fill(pool, slots, data), "write")
    return data


# -- a backup waits for the stream that produced the page, whenever it happens -------------------

@pytest.mark.parametrize("policy, backed_up_by", [
    ("write_back", "evict_device"), ("write_back", "alloc_device"),
    ("write_through_selective", "second hit"),
])
def test_a_later_backup_waits_for_the_producer_named_at_the_hit(policy, backed_up_by, gen):
    mgr, dev = make(write_policy=policy, defer=True, pages=2)
    side = dev.stream(0, name="side")
    slots = mgr.alloc_device(["a"])
    data = _write_on(dev, side, mgr.device_pool, slots, gen)
    assert mgr.hit(["a"], producer=side) is None           # no backup yet under either policy
    if backed_up_by == "evict_device":
        mgr.evict_device(["a"])
    elif backed_up_by == "alloc_device":
        mgr.alloc_device(["b"])
        mgr.alloc_device(["c"])                           # full: evicts a (LRU), backing it up
    else:
        assert mgr.hit(["a"]) is not None                 # producer not named again
    if backed_up_by != "alloc_device":   # (that one blocks until the copy is done: bytes only)
        # the backup stream may not copy a's page before the side stream has written it
        while dev.step(mgr.backup_stream):
            pass
        assert side.ops, "the side stream's write already ran: the test proves nothing"
        assert mgr.lookup(["a"])[0] & PageState.BACKING_UP and mgr.backup_stream.ops, \
            "the backup ran before the stream that produced the page"
    dev.run_all()
    mgr.poll()
    assert torch.equal(slots_bytes(mgr.host, mgr.host_indices(["a"])), data)
    mgr.close()


# -- a call that cannot succeed evicts nothing -------------------------------------------------------

def test_a_failing_alloc_device_evicts_nothing(gen):
    evictions = []
    mgr, _ = make(pages=4, on_evict=evictions.append)
    write_pages(mgr, ["a", "b"], gen)                       # no host copy yet
    with pytest.raises(OutOfPages, match="device pool: need 5 pages"):
        mgr.alloc_device(["c", "d", "e", "f", "g"])
    assert mgr.lookup(["a", "b"]) == [DEVICE, DEVICE] and evictions == []
    mgr.pin(["a"])
    with pytest.raises(OutOfPages, match="device pool: need 4 pages"):
        mgr.alloc_device(["c", "d", "e", "f"])             # b is evictable, a is pinned
    assert mgr.lookup(["b"]) == [DEVICE] and evictions == []
    mgr.alloc_device(["c", "d", "e"])                      # this one fits: b goes
    assert [e.page_ids for e in evictions] == [("b",)]
    mgr.close()


def test_a_failing_load_evicts_nothing(gen):
    evictions = []
    mgr, dev = make(pages=4, on_evict=evictions.append)
    write_pages(mgr, ["a", "b", "c"], gen)
    mgr.backup(["a", "b", "c"])
    mgr.poll()
    mgr.evict_device(["a", "b", "c"])
    write_pages(mgr, ["x", "y", "z"], gen)
    mgr.pin(["x", "y"])
    evictions.clear()
    with pytest.raises(OutOfPages, match="device pool: need 3 pages"):
        mgr.load(["a", "b", "c"])                          # 1 free + z evictable < 3
    assert mgr.lookup(["z", "a"]) == [DEVICE, HOST] and evictions == []
    assert mgr.device_pages.free_count == 1
    mgr.load(["a", "b"])                                   # fits: z goes
    assert [e.page_ids for e in evictions] == [("z",)]
    mgr.close()


def test_a_failing_alloc_host_evicts_nothing(gen):
    evictions = []
    mgr, dev = make(pages=4, hicache_ratio=1.0, defer=True, on_evict=evictions.append)
    mgr.alloc_host(["h1", "h2", "h3"])
    mgr.load(["h1"])                                       # h1's host page is locked by the load
    with pytest.raises(OutOfPages, match="host pool"):
        mgr.alloc_host(["n1", "n2", "n3", "n4"])           # 1 free + h2, h3 < 4
    assert evictions == [] and mgr.lookup(["h2", "h3"]) == [HOST, HOST]
    mgr.alloc_host(["n1", "n2", "n3"])
    assert [e.page_ids for e in evictions] == [("h2", "h3")]
    dev.run_all()
    mgr.close()


def test_a_write_back_eviction_keeps_the_host_copies_of_the_pages_it_evicts(gen):
    """Room for backing up b must not come from a's host copy when a leaves the
    device in the same eviction: a would be lost."""
    evictions = []
    mgr, dev = make(write_policy="write_back", pages=6, hicache_ratio=0.5, defer=True,
                    on_evict=evictions.append)
    data = write_pages(mgr, ["a", "b", "c", "d"], gen)
    dev.run_all()
    mgr.backup(["a", "c", "d"])                            # the host pool (3 pages) is full
    dev.run_all()
    mgr.poll()
    mgr.evict_device(["c", "d"])
    mgr.load(["c", "d"])                                   # in flight: c's, d's host pages locked
    assert mgr.evict_device(["a", "b"]) == ["a"]           # no host room for b: it stays
    assert evictions[-1].removed == ()
    assert mgr.lookup(["a", "b"]) == [HOST, DEVICE]
    dev.run_all()
    mgr.poll()
    h = mgr.load(["a"])
    dev.run_all()
    mgr.poll()
    assert torch.equal(slots_bytes(mgr.device_pool, h.device_indices), data[:, :P])
    mgr.close()


def test_prefetch_of_a_prefix_longer_than_the_host_pool_fetches_the_part_that_fits(gen):
    store = InMemoryStorage()
    mgr, _ = make(storage=store, pages=4, hicache_ratio=1.0)    # host pool: 4 pages
    ids = [f"p{i}" for i in range(6)]
    for chunk in (ids[:3], ids[3:]):
        write_pages(mgr, chunk, gen)
        mgr.hit(chunk)
        mgr.poll()
        mgr.poll()
        mgr.free(chunk)
    assert set(store.pages) == set(ids)
    mgr.alloc_host(["held"])
    h = mgr.load(["held"])                                 # (done at once: not holding anything)
    mgr.poll()
    assert h.done
    assert mgr.prefetch(ids) == tuple(ids[:4])             # 3 free + held's redundant copy
    mgr.poll()
    assert mgr.lookup(ids) == [HOST] * 4 + [PageState.ABSENT] * 2
    mgr.close()


# -- op ids --------------------------------------------------------------------------------------------

def test_a_load_and_the_write_back_eviction_it_triggers_have_distinct_op_ids(gen):
    mgr, dev = make(write_policy="write_back", pages=2, defer=True)
    write_pages(mgr, ["a", "b"], gen)
    mgr.alloc_host(["h"])
    dev.run_all()
    h = mgr.load(["h"])                                    # full: evicts a, backing it up first
    dev.run_all()
    acks = mgr.poll()
    assert sorted(a.kind for a in acks) == ["backup", "load"]
    assert len({a.op_id for a in acks}) == 2
    assert h.op_id == [a.op_id for a in acks if a.kind == "load"][0]
    # a load the compiled path takes (a free page, no eviction) gets a fresh id too
    mgr.evict_device(["h"])
    dev.run_all()
    mgr.poll()
    mgr.free(["b"])
    if mgr._claimer is not None:
        mgr._claimer = CountingClaimer(mgr._claimer)
    h2 = mgr.load(["h"])
    if mgr._claimer is not None:                           # (built here: test_manager_fastload)
        assert mgr._claimer.outcomes == {True: 1}, "the compiled path did not take the load"
    dev.run_all()
    seen = {a.op_id for a in acks} | {a.op_id for a in mgr.poll()}
    assert h2.op_id in seen and h2.op_id > max(a.op_id for a in acks) and len(seen) == 3
    mgr.close()


# -- a closed manager ----------------------------------------------------------------------------------

CALLS = {
    "alloc_device": lambda m: m.alloc_device(["n"]),
    "alloc_host": lambda m: m.alloc_host(["n"]),
    "free": lambda m: m.free(["a"]),
    "pin": lambda m: m.pin(["a"]),
    "unpin": lambda m: m.unpin(["a"]),
    "lookup": lambda m: m.lookup(["a"]),
    "device_indices": lambda m: m.device_indices(["a"]),
    "host_indices": lambda m: m.host_indices(["a"]),
    "hit": lambda m: m.hit(["a"]),
    "backup": lambda m: m.backup(["a"]),
    "evict_device": lambda m: m.evict_device(["a"]),
    "evict_device_lru": lambda m: m.evict_device(num_pages=1),
    "evict_host": lambda m: m.evict_host(1),
    "load": lambda m: m.load(["a"]),
    "prefetch": lambda m: m.prefetch(["a"]),
    "check_prefetch": lambda m: m.check_prefetch(["a"]),
    "poll": lambda m: m.poll(),
    "synchronize": lambda m: m.synchronize(),
    "stats": lambda m: m.stats(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_call_after_close_says_the_manager_is_closed(call, gen):
    mgr, _ = make(storage=InMemoryStorage())
    write_pages(mgr, ["a"], gen)
    mgr.close()
    mgr.close()                                            # idempotent
    with pytest.raises(RuntimeError, match="HiCacheManager: closed"):
        CALLS[call](mgr)


# -- page_ids ----------------------------------------------------------------------------------------

PAGE_ID_CALLS = {name: fn for name, fn in {
    "alloc_device": lambda m, ids: m.alloc_device(ids),
    "alloc_host": lambda m, ids: m.alloc_host(ids),
    "free": lambda m, ids: m.free(ids),
    "pin": lambda m, ids: m.pin(ids),
    "unpin": lambda m, ids: m.unpin(ids),
    "lookup": lambda m, ids: m.lookup(ids),
    "device_indices": lambda m, ids: m.device_indices(ids),
    "host_indices": lambda m, ids: m.host_indices(ids),
    "hit": lambda m, ids: m.hit(ids),
    "backup": lambda m, ids: m.backup(ids),
    "evict_device": lambda m, ids: m.evict_device(ids),
    "load": lambda m, ids: m.load(ids),
    "prefetch": lambda m, ids: m.prefetch(ids),
    "check_prefetch": lambda m, ids: m.check_prefetch(ids),
}.items()}

BAD_PAGE_IDS = [
    ("turn", "page_ids: expected a sequence of page ids, got a str"),
    (b"turn", "page_ids: expected a sequence of page ids, got a bytes"),
    (None, "page_ids: expected a sequence of page ids, got NoneType"),
    (5, "page_ids: expected a sequence of page ids, got int"),
    (3.5, "page_ids: expected a sequence of page ids, got float"),
    (torch.arange(3), "page_ids: expected a sequence of page ids, got a Tensor"),
    ({"a", "b"}, "page_ids: expected a sequence of page ids, got a set"),
    (["a", ["x"]], "page_ids: expected hashable ids, got list at position 1"),
]


def _state(mgr) -> tuple:
    t = mgr.table
    return (dict(t.index), t.state[:t.hw].tobytes(), t.pins[:t.hw].tobytes(),
            t.hits[:t.hw].tobytes(), t.device_used[:t.hw].tobytes(), t.host_used[:t.hw].tobytes(),
            mgr.device_pages.free_count, mgr.host_pages.free_count, mgr._next_op)


@pytest.mark.parametrize("call", sorted(PAGE_ID_CALLS))
def test_page_ids_must_be_a_sequence_of_distinct_hashable_ids(call, gen):
    mgr, _ = make(storage=InMemoryStorage())
    write_pages(mgr, ["a", "b"], gen)
    if call == "unpin":
        mgr.pin(["a", "b"])
    before = _state(mgr)
    for bad, message in BAD_PAGE_IDS:
        if call == "evict_device" and bad is None:      # evict_device(None): no pages named
            message = "evict_device: pass page_ids or num_pages"
        with pytest.raises(TypeError, match=re.escape(message)):
            PAGE_ID_CALLS[call](mgr, bad)
        assert _state(mgr) == before, (call, bad)
    # one rule for a repeated id: every call refuses it, naming it
    repeated = ["n", "m", "n"] if call.startswith("alloc") else ["a", "b", "zz", "b"]
    with pytest.raises(ValueError, match=r"page_ids: '(n|b)' appears more than once"):
        PAGE_ID_CALLS[call](mgr, repeated)
    assert _state(mgr) == before, call
    mgr.close()


# -- other arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error, message", [
    (-1, ValueError, "num_pages: expected an int >= 0, got -1"),
    ("2", TypeError, "num_pages: expected an int >= 0, got '2'"),
    (1.5, TypeError, "num_pages: expected an int >= 0, got 1.5"),
    (True, TypeError, "num_pages: expected an int >= 0, got True"),
    (None, TypeError, "num_pages: expected an int >= 0, got None"),
])
def test_num_pages_is_a_non_negative_int(bad, error, message, gen):
    mgr, _ = make()
    write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    before = _state(mgr)
    with pytest.raises(error, match=re.escape(message) if bad is not None else
                       "evict_device: pass page_ids or num_pages"):
        mgr.evict_device(num_pages=bad)                    # None: not passed
    with pytest.raises(error, match=re.escape(message)):
        mgr.evict_host(bad)
    assert _state(mgr) == before
    assert mgr.evict_device(num_pages=np.int64(1)) == ["a"]
    with pytest.raises(TypeError, match="evict_device: pass page_ids or num_pages, not both"):
        mgr.evict_device(["a"], num_pages=1)
    mgr.close()


@pytest.mark.parametrize("done", [False, True])
def test_layer_arguments_are_checked_the_same_way_everywhere(done, gen):
    mgr, dev = make(defer=True, layers=3)
    write_pages(mgr, ["a"], gen)
    mgr.backup(["a"])
    mgr.evict_device(["a"])
    h = mgr.load(["a"])
    if done:
        dev.run_all()
        mgr.poll()
        assert h.done
    for call in (h.wait, h.query):
        for bad in (-1, 3):
            with pytest.raises(IndexError, match=re.escape(f"layer: expected 0 <= layer < 3, got {bad}")):
                call(bad)
        for bad in ("0", 1.0, None if call is h.wait else "x", True):
            with pytest.raises(TypeError, match=re.escape(f"layer: expected an int, got {bad!r}")):
                call(bad)
    assert h.query(None) is done and h.query(np.int64(2)) is done
    h.wait(np.int64(2))
    dev.run_all()
    mgr.close()


def test_manager_options_are_checked_by_their_own_names():
    with pytest.raises(ValueError, match="host_layout: expected one of layer_first, page_first, "
                                         "page_first_direct, page_head, got 'pages'"):
        make(host_layout="pages")
    for bad in (-1, float("nan"), float("inf"), "4"):
        with pytest.raises((ValueError, TypeError), match="host_reserve_gb: expected a number of "
                                                          "GiB >= 0"):
            make(host_reserve_gb=bad)
        lay = KVLayout("page_first", num_layers=1, num_slots=16, head_num=1, head_dim=8,
                       dtype=torch.bfloat16, page_size=16)
        with pytest.raises(ValueError, match="reserve_gb: expected a number of GiB >= 0"):
            HostPool(lay, pin=False, reserve_gb=bad)       # the host pool on its own
    with pytest.raises(MemoryError, match=r"lower hicache_ratio / hicache_size, or host_reserve_gb"):
        make(host_reserve_gb=1e9)


# -- the host pool is not copied into forked children -------------------------------------------

def test_the_host_pool_is_not_inherited_by_fork():
    lay = KVLayout("page_first", num_layers=2, num_slots=64, head_num=2, head_dim=8,
                   dtype=torch.bfloat16, page_size=16)
    with HostPool(lay, pin=False, reserve_gb=0) as pool:
        start = pool.base_address
        flags = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= start < hi
                elif inside and line.startswith("VmFlags:"):
                    flags = line.split()[1:]
                    break
        assert flags is not None, "the host pool's mapping is not in /proc/self/smaps"
        assert "dc" in flags, f"no MADV_DONTFORK on the host pool (VmFlags: {flags})"
        pid = os.fork()
        if pid == 0:   # the child: the pool is not mapped here, so reading it faults
            ctypes.string_at(start, 1)
            os._exit(3)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGSEGV, signal.SIGBUS), \
            f"a forked child could read the host pool (status {status})"


# -- the property: a call that raises changes nothing --------------------------------------------------

def snapshot(m) -> dict:
    """Everything a manager call could change, as comparable values."""
    mgr = m.mgr
    t = mgr.table
    hw = t.hw
    out = {"index": dict(t.index), "hw": hw, "clock": t.clock, "removals": t.removals,
           "recycled": t._recycled[:t._n_recycled].tolist(),
           "ops": sorted(t.ops), "next_op": mgr._next_op, "acks": list(mgr._acks),
           "in_flight": (len(mgr._loads), len(mgr._backups), len(mgr._storage_ops)),
           "evictions": len(m.evictions), "storage": {k: v.clone() for k, v in m.store.pages.items()},
           "storage_ops": len(m.store._ops),
           "streams": [(s.issued, s.completed, len(s.ops)) for s in m.dev.streams]}
    for name in ("page_ids", "fill_op", "store_op"):
        out[name] = [id(x) if name != "page_ids" else x for x in getattr(t, name)[:hw].tolist()]
    for name in ("device_page", "host_page", "state", "hits", "pins", "device_used", "host_used",
                 "load_id", "backup_id"):
        out[name] = getattr(t, name)[:hw].tobytes()
    for tier, alloc in (("device", mgr.device_pages), ("host", mgr.host_pages)):
        out[tier] = (alloc._top, alloc._stack[:alloc._top].tobytes(), alloc._state.tobytes(),
                     alloc._locks.tobytes(), alloc.deferred_count)
    out["bytes"] = [t_.view(torch.uint8).clone() for t_ in (*mgr.device_pool.tensors(),
                                                            *mgr.host.tensors())]
    return out


def assert_same(before: dict, after: dict, what: str) -> None:
    for key in before:
        a, b = before[key], after[key]
        if key == "bytes":
            same = all(torch.equal(x, y) for x, y in zip(a, b))
        elif key == "storage":
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            same = a == b
        assert same, f"{what} raised but changed {key}"


# an argument named at the start of the message ("page_ids: ...") or a pool that ran out
NAMED = re.compile(r"^(page_ids|num_pages|layer|producer|evict_device|prefetch): |"
                   r"^(device|host) pool: ")

UNIVERSE = list(range(12))
GARBAGE = ["ab", None, 5, [["x"]], b"xy", (1, [2]), []]
# page ids chosen when the rule runs: from the table (most calls name known pages),
# new ones (allocations), any, a list with a repeat, or not a list of ids at all


def _ids_strategy(*kinds):
    return st.tuples(st.sampled_from([*kinds, "any", "repeat", "garbage"]),
                     st.lists(st.integers(0, 99), min_size=1, max_size=6), st.sampled_from(GARBAGE))


ids_strategy = _ids_strategy("known", "known", "known", "new")
new_ids_strategy = _ids_strategy("new", "new", "new", "known")
device_ids_strategy = _ids_strategy("device", "device", "known")
host_ids_strategy = _ids_strategy("host_only", "host_only", "known")
num_strategy = st.one_of(st.integers(-1, 6), st.sampled_from(["2", 1.5, None]))


class FailureMachine(RuleBasedStateMachine):
    """Random calls, some impossible or malformed; a call that raises changes nothing."""

    policy = "write_through"

    def __init__(self):
        super().__init__()
        lay = KVLayout("layer_first", num_layers=2, num_slots=4 * 2, head_num=1, head_dim=4,
                       dtype=torch.float16, page_size=2)
        self.store = InMemoryStorage(defer=True)
        self.dev = EmulatedDevice(defer=True)
        self.evictions = []
        self.mgr = HiCacheManager(KVBuffer.allocate(lay), device=self.dev, write_policy=self.policy,
                                  backend="reference", host_reserve_gb=0, hicache_ratio=1.0,
                                  storage=self.store, on_evict=self.evictions.append)
        self.side = self.dev.stream(0, name="side")
        self.handles = []
        self.gen = torch.Generator().manual_seed(0)
        self.failures = 0

    def _ids(self, spec):
        kind, picks, garbage = spec
        if kind == "garbage":
            return garbage
        table = self.mgr.table
        state = {i: table.state[row] for i, row in table.index.items()}
        pool = {"known": sorted(state),
                "device": sorted(i for i, s in state.items() if s & DEVICE),
                "host_only": sorted(i for i, s in state.items() if s & (DEVICE | HOST) == HOST),
                "new": [i for i in UNIVERSE if i not in state]}.get(kind) or UNIVERSE
        ids = list(dict.fromkeys(pool[p % len(pool)] for p in picks))
        return ids + ids[:1] if kind == "repeat" else ids

    def _call(self, what, fn, *args, **kwargs):
        before = snapshot(self)
        try:
            result = fn(*args, **kwargs)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            self.failures += 1
            message = exc.args[0] if exc.args else ""
            assert NAMED.match(str(message)), f"{what}: unclear error {type(exc).__name__}: {message}"
            assert_same(before, snapshot(self), f"{what}{args}{kwargs}")
            return None
        return result

    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed):
        self.gen.manual_seed(seed)

    @rule(ids=new_ids_strategy)
    def alloc_device(self, ids):
        slots = self._call("alloc_device", self.mgr.alloc_device, self._ids(ids))
        if slots is not None:   # the model writes the KV
            pool = self.mgr.device_pool
            _fill(pool, slots, _random_kv(pool, slots, self.gen))

    @rule(ids=new_ids_strategy)
    def alloc_host(self, ids):
        self._call("alloc_host", self.mgr.alloc_host, self._ids(ids))

    @rule(ids=device_ids_strategy, side=st.booleans())
    def hit(self, ids, side):
        self._call("hit", self.mgr.hit, self._ids(ids), producer=self.side if side else None)

    @rule(ids=device_ids_strategy)
    def backup(self, ids):
        self._call("backup", self.mgr.backup, self._ids(ids))

    @rule(ids=device_ids_strategy)
    def evict_device(self, ids):
        self._call("evict_device", self.mgr.evict_device, self._ids(ids))

    @rule(n=num_strategy)
    def evict_device_lru(self, n):
        self._call("evict_device", self.mgr.evict_device, num_pages=n)

    @rule(n=num_strategy)
    def evict_host(self, n):
        self._call("evict_host", self.mgr.evict_host, n)

    @rule(ids=host_ids_strategy)
    def load(self, ids):
        h = self._call("load", self.mgr.load, self._ids(ids))
        if h is not None:
            self.handles.append(h)

    @rule(ids=ids_strategy)
    def free(self, ids):
        self._call("free", self.mgr.free, self._ids(ids))

    @rule(ids=device_ids_strategy)
    def pin(self, ids):
        self._call("pin", self.mgr.pin, self._ids(ids))

    @rule(ids=ids_strategy)
    def unpin(self, ids):
        self._call("unpin", self.mgr.unpin, self._ids(ids))

    @rule(ids=ids_strategy, which=st.integers(0, 3))
    def query(self, ids, which):
        call = (self.mgr.lookup, self.mgr.device_indices, self.mgr.host_indices,
                self.mgr.check_prefetch)[which]
        self._call(call.__name__, call, self._ids(ids))

    @rule(ids=new_ids_strategy)
    def prefetch(self, ids):
        self._call("prefetch", self.mgr.prefetch, self._ids(ids))

    @precondition(lambda self: self.handles)
    @rule(k=st.integers(0, 100), layer=st.one_of(st.integers(-1, 2), st.sampled_from(["0", 0.5])))
    def wait(self, k, layer):
        h = self.handles[k % len(self.handles)]
        self._call("wait", h.wait, layer)

    @rule(which=st.integers(0, 3), times=st.integers(1, 4))
    def step(self, which, times):
        stream = (self.dev.current_stream(), self.mgr.load_stream, self.mgr.backup_stream,
                  self.side)[which]
        for _ in range(times):
            self.dev.step(stream)

    @rule()
    def finish_storage(self):
        self.store.complete()

    @rule()
    def poll(self):
        self._call("poll", self.mgr.poll)

    @invariant()
    def slots_owned_once(self):
        t = self.mgr.table
        for tier, alloc in (("device", self.mgr.device_pages), ("host", self.mgr.host_pages)):
            owned = [p for p in getattr(t, f"{tier}_page")[:t.hw].tolist() if p >= 0]
            assert len(owned) == len(set(owned)), f"a {tier} page is owned twice"
            assert not set(owned) & set(alloc.free_pages().tolist()), f"a {tier} page owned and free"

    def teardown(self):
        self.mgr.close()


FAILURE_SETTINGS = settings(max_examples=50, stateful_step_count=60, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_a_call_that_raises_changes_nothing(policy):
    run_state_machine_as_test(type("Machine", (FailureMachine,), {"policy": policy}),
                              settings=FAILURE_SETTINGS)
