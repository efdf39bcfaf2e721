"""Randomized sequences around the storage seam of the manager, checked after every step.

The storage is a stepped double of the manager's storage protocol: every op moves
its pages one at a time, and a page moves in two steps (the transfer starts, then
lands), only when the machine says so. Bytes are read from the host pool (writes)
or written into it (reads) when a page *lands*, as a real transfer may touch the
slots at any time until it ends. Meanwhile the machine writes pages, backs them
up (write-through to storage), evicts, frees, allocates host pages and fills
them, prefetches stored pages and lets the prefetch policy end reads early.

After every step:

- every settled host copy (not filling) and every device copy holds its page's bytes;
- storage never holds a page with the wrong bytes;
- no host slot that an unfinished storage op still reads or writes is free or
  owned by another page.

The tests at the bottom switch off the host lock of storage ops and require
the machine to find the damage, with and without the slot check.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import EmulatedDevice, HiCacheManager, OutOfPages, PageState
from storage_helpers import POISON, pool_bytes, write_pool

P = 2
GEOM = dict(num_layers=2, head_num=2, head_dim=4, dtype=torch.bfloat16)
KEYS = 10            # page ids 0..9; a page's bytes depend on its id only
pick = st.integers(0, 2**16)


def page_content(key: int, shape) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(key))


class _Op:
    """One batch op of the stepped storage: pages move one at a time, each
    ``start``-ed then ``land``-ed by :meth:`SteppedStorage.step`."""

    def __init__(self, kind, keys, host_pages, policy):
        self.kind, self.keys, self.host_pages = kind, list(keys), list(map(int, host_pages))
        self.policy = policy
        self.moved = 0            # pages landed
        self.in_flight = False    # page `moved` has started and not landed
        self.stopped = False
        self.result: int | None = None
        self.ok: list[bool] = []  # write results, per landed page

    @property
    def done(self) -> bool:
        return not self.in_flight and (self.stopped or self.moved == len(self.keys))

    def poll(self):
        if not self.done:
            return None
        if self.kind == "set":
            return self.ok + [False] * (len(self.keys) - len(self.ok))
        valid = self.moved if self.result is None else self.result
        return [i < valid for i in range(len(self.keys))]

    # the prefetch policy (reads only)
    def can_terminate(self) -> bool:
        return self.policy == "best_effort" or self.done

    def terminate(self) -> int:
        self.stopped = True
        if self.result is None:
            self.result = self.moved
        return self.result


class SteppedStorage:
    """The manager's storage protocol, moving bytes only in :meth:`step`."""

    def __init__(self, policy: str):
        self.policy = policy
        self.missing: set = set()  # keys whose stored copy is lost (a corrupt file): reads fail
        self.pages: dict[int, torch.Tensor] = {}
        self.ops: list[_Op] = []

    def attach(self, host_pool):
        self.host = host_pool

    def batch_exists(self, keys):
        n = 0
        while n < len(keys) and keys[n] in self.pages:
            n += 1
        return n

    def batch_get(self, keys, host_pages):
        op = _Op("get", keys, host_pages, self.policy)
        self.ops.append(op)
        return op

    def batch_set(self, keys, host_pages):
        op = _Op("set", keys, host_pages, self.policy)
        self.ops.append(op)
        return op

    def live(self) -> list[_Op]:
        self.ops = [op for op in self.ops if not op.done]
        return self.ops

    def step(self, op: _Op) -> None:
        if op.done:
            return
        if not op.in_flight:
            op.in_flight = True
            return
        op.in_flight = False
        i = op.moved
        key, page = op.keys[i], op.host_pages[i]
        slots = torch.arange(page * P, (page + 1) * P)
        if op.kind == "set":
            self.pages[key] = pool_bytes(self.host.buffer, slots)
            op.ok.append(True)
        elif key in self.missing or key not in self.pages:
            op.stopped = True     # a failed read ends the prefix; nothing more is written
            return
        else:
            write_pool(self.host.buffer, slots, self.pages[key])
        op.moved += 1


class StorageMachine(RuleBasedStateMachine):
    policy = "wait_complete"
    lock_rule = True
    structural_checks = True

    def __init__(self):
        super().__init__()
        lay = KVLayout("layer_first", num_slots=3 * P, page_size=P, **GEOM)
        self.pool = KVBuffer.allocate(lay)
        for t in self.pool.tensors():
            t.view(torch.uint8).fill_(POISON)
        self.storage = SteppedStorage(self.policy)
        self.mgr = HiCacheManager(self.pool, device=EmulatedDevice(), storage=self.storage,
                                  host_layout="page_first", hicache_ratio=4 / 3, backend="reference",
                                  host_reserve_gb=0)
        self.mgr._rules.host_locked_during_storage = self.lock_rule
        for t in self.mgr.host.tensors():
            t.view(torch.uint8).fill_(POISON)
        shape = pool_bytes(self.pool, torch.arange(P)).shape
        self.content = {k: page_content(k, shape) for k in range(KEYS)}
        self.fetching: set = set()          # ids a prefetch started for (the caller's request)

    # -- the caller ----------------------------------------------------------------------
    @rule(key=st.integers(0, KEYS - 1), hit=st.booleans())
    def new_page(self, key, hit):
        """A prefill computes page ``key`` (again, if it was lost) on the device."""
        if key in self.mgr.table:
            return
        try:
            slots = self.mgr.alloc_device([key])
        except OutOfPages:
            return
        write_pool(self.pool, slots, self.content[key])
        if hit:
            self.mgr.hit([key])      # write_through: backup, then (at poll) write to storage

    @rule(key=st.integers(0, KEYS - 1))
    def new_host_page(self, key):
        """Another source fills host pages directly (they may take freed slots)."""
        if key in self.mgr.table:
            return
        try:
            slots = self.mgr.alloc_host([key])
        except OutOfPages:
            return
        write_pool(self.mgr.host, slots, self.content[key])

    @precondition(lambda self: self.mgr.table.entries)
    @rule(k=pick)
    def hit(self, k):
        ids = sorted(self.mgr.table.entries)
        self.mgr.hit([ids[k % len(ids)]])

    @precondition(lambda self: self.mgr.table.device_lru)
    @rule(n=st.integers(1, 2))
    def evict_device(self, n):
        self.mgr.evict_device(num_pages=n)

    @precondition(lambda self: self.mgr.table.host_lru)
    @rule(n=st.integers(1, 3))
    def evict_host(self, n):
        self.mgr.evict_host(n)

    @precondition(lambda self: self._stored_in_table())
    @rule(k=pick)
    def request_done(self, k):
        """A stored page leaves the cache (its request ended, the tree dropped it)."""
        ids = self._stored_in_table()
        self.mgr.free([ids[k % len(ids)]])

    @precondition(lambda self: self.mgr.table.entries)
    @rule(k=pick)
    def free(self, k):
        ids = sorted(i for i, e in self.mgr.table.entries.items() if not e.pins)
        if ids:
            self.mgr.free([ids[k % len(ids)]])

    @precondition(lambda self: self._fetchable())
    @rule(k=pick, n=st.integers(1, 3), lost=st.booleans(), advance=st.integers(0, 3))
    def prefetch(self, k, n, lost, advance):
        """A request whose pages storage holds (and, with ``lost``, one it lost since);
        the read then moves ``advance`` steps (odd: a page in flight)."""
        ids = self._fetchable()
        ids = ids[k % len(ids):][:n]
        if lost and len(ids) > 1:
            self.storage.missing.add(ids[-1])
        got = self.mgr.prefetch(ids)
        assert got == tuple(ids[:len(got)]), "the stored prefix is fetched, or what fits of it"
        self.fetching.update(got)
        if got:
            for _ in range(advance):
                self.storage.step(self.storage.ops[-1])

    @precondition(lambda self: self.fetching)
    @rule(advance=st.integers(0, 3))
    def check_prefetch(self, advance):
        """The scheduler asks whether the request may go, after the reads moved a bit
        (an odd ``advance`` leaves a page in flight)."""
        for op in [op for op in self.storage.live() if op.kind == "get"][:1]:
            for _ in range(advance):
                self.storage.step(op)
        if self.mgr.check_prefetch(sorted(self.fetching)):
            self.fetching.clear()
            self._check_bytes()

    @precondition(lambda self: self._loadable())
    @rule(k=pick)
    def load(self, k):
        ids = self._loadable()
        key = ids[k % len(ids)]
        try:
            handle = self.mgr.load([key])
        except OutOfPages:
            return
        handle.synchronize()
        got = pool_bytes(self.pool, handle.device_indices)
        assert torch.equal(got, self.content[key]), f"page {key} loaded with the wrong bytes"

    @rule()
    def poll(self):
        self.mgr.poll()

    # -- the storage's side ----------------------------------------------------------------
    @precondition(lambda self: self.storage.live())
    @rule(k=pick, times=st.integers(1, 8), then_poll=st.booleans())
    def storage_step(self, k, times, then_poll):
        ops = self.storage.live()
        op = ops[k % len(ops)]
        for _ in range(times):
            self.storage.step(op)
        if then_poll:
            self.mgr.poll()

    # -- checks -----------------------------------------------------------------------------
    def _stored_in_table(self):
        return sorted(k for k in self.storage.pages
                      if k in self.mgr.table and not self.mgr.table.get(k).pins)

    def _fetchable(self):
        return sorted(k for k in self.storage.pages
                      if k not in self.mgr.table and k not in self.storage.missing)

    def _loadable(self):
        return sorted(i for i, e in self.mgr.table.entries.items()
                      if e.on_host and not e.on_device and e.fill is None)

    @invariant()
    def bytes_where_the_table_says(self):
        self._check_bytes()

    def _check_bytes(self):
        mgr = self.mgr
        for key, e in mgr.table.entries.items():
            if e.on_host and e.fill is None and e.backup is None:
                got = pool_bytes(mgr.host, mgr.host_indices([key]))
                assert torch.equal(got, self.content[key]), f"page {key}: host copy differs ({e})"
            if e.on_device and e.load is None:
                got = pool_bytes(self.pool, mgr.device_indices([key]))
                assert torch.equal(got, self.content[key]), f"page {key}: device copy differs ({e})"

    @invariant()
    def storage_holds_only_right_bytes(self):
        for key, data in self.storage.pages.items():
            assert torch.equal(data, self.content[key]), \
                f"storage holds page {key} with another page's bytes"

    @invariant()
    def no_host_slot_reused_under_a_storage_op(self):
        if not self.structural_checks:
            return
        mgr = self.mgr
        owner = {e.host_page: e for e in mgr.table.entries.values() if e.host_page >= 0}
        for op in self.storage.live():
            for key, page in zip(op.keys, op.host_pages):
                assert mgr.host_pages.state(page) != "free", (
                    f"host page {page} is free while a storage {op.kind} of page {key} uses it")
                holder = owner.get(page)
                assert holder is None or holder.page_id == key, (
                    f"host page {page} was reused by page {holder.page_id} while a storage "
                    f"{op.kind} of page {key} still uses it")

    @invariant()
    def fetched_pages_are_settled_or_fetching(self):
        for key, state in zip(range(KEYS), self.mgr.lookup(range(KEYS))):
            if state & PageState.FETCHING:
                assert key in self.mgr.table and self.mgr.table.get(key).fill is not None

    def teardown(self):
        try:
            while self.storage.live() or self.mgr.in_flight:   # a poll may start new writes
                for op in self.storage.live():
                    while not op.done:
                        self.storage.step(op)
                self.mgr.poll()
            self._check_bytes()
        finally:
            self.mgr.close()


def _machine(**attrs):
    return type("Machine", (StorageMachine,), attrs)


SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", ["wait_complete", "best_effort"])
def test_storage_machine(policy):
    run_state_machine_as_test(_machine(policy=policy), settings=SETTINGS)


HUNT = settings(max_examples=300, stateful_step_count=40, deadline=None, database=None,
                derandomize=True, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow])


def test_machine_finds_missing_host_lock_of_storage_ops():
    with pytest.raises(AssertionError, match="still uses it|is free while"):
        run_state_machine_as_test(_machine(lock_rule=False), settings=HUNT)


def test_missing_host_lock_of_storage_ops_damages_bytes():
    """Without the slot check, the byte checks alone see the damage: a file with
    another page's bytes, or a host page overwritten by a late read."""
    machine = _machine(lock_rule=False, structural_checks=False)
    with pytest.raises(AssertionError, match="differs|another page's bytes|wrong bytes"):
        run_state_machine_as_test(machine, settings=HUNT)
