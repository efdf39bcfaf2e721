"""Randomized sequences of manager operations, checked after every step.

The machine allocates pages and writes their KV on the compute stream (under
write_back sometimes on a side stream, named as the producer on the hit that
follows, as a caller with a separate KV-writing stream would), hits,
backs up, evicts (both tiers), loads, waits on single layers and reads them on
the compute stream, pins, polls and frees, while the emulated device runs the
streams in whatever order their waits allow (``step``). After every step:

- every page's bytes are where the table says and equal what was written
  (device and host copies that nothing is still filling);
- no slot is owned twice, and no owned slot is on a free list;
- no slot is reused while a transfer that reads or writes it is in flight;
- every read that ran on the compute stream saw the bytes it expected.

The tests at the bottom switch off one ordering rule at a time and require the
machine to find the damage.

On a GPU the same machine runs with real streams: the model's reads and
writes are real kernels on a compute stream, random ``stall`` rules delay a
stream so transfers really race, and data is checked at random sync points.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from conftest import poison_
from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import CudaDevice, EmulatedDevice, HiCacheManager, OutOfPages

P = 2                   # tokens per page
DEVICE_PAGES = 4
GEOM = dict(num_layers=2, head_num=2, head_dim=4, dtype=torch.bfloat16)
KINDS = ("layer_first", "page_first", "page_first_direct", "page_head")
pick = st.integers(0, 2**16)


def LOADABLE(e) -> bool:
    return e.on_host and not e.on_device and e.fill is None


def gather(buf: KVBuffer, slots: torch.Tensor, layers: range) -> torch.Tensor:
    """uint8 ``[planes * len(layers), n, H, head_bytes]`` of ``slots`` (torch indexing only)."""
    out = []
    for view in buf.layer_views(layers):
        p = view.shape[1]
        s = slots.to(view.device)
        out.append(view[s // p, s % p])
    return torch.stack(out)


def scatter(buf: KVBuffer, slots: torch.Tensor, data: torch.Tensor) -> None:
    for view, rows in zip(buf.layer_views(range(buf.layout.num_layers)), data):
        p = view.shape[1]
        s = slots.to(view.device)
        view[s // p, s % p] = rows.to(view.device)


class ManagerMachine(RuleBasedStateMachine):
    policy = "write_through"
    host_layout = "layer_first"
    ratio = 2.0
    on_gpu = False
    rules_off: tuple[str, ...] = ()
    structural_checks = True
    compiled = True   # False: loads take the numpy path only (no csrc/manager/fastload.c)

    def __init__(self):
        super().__init__()
        lay = KVLayout("layer_first", num_slots=DEVICE_PAGES * P, page_size=P, **GEOM)
        self.L = lay.num_layers
        if self.on_gpu:
            self.pool = KVBuffer.allocate(lay, device="cuda")
            self.dev = CudaDevice()
            self.cs = torch.cuda.Stream()
            backend = "auto"
        else:
            self.pool = KVBuffer.allocate(lay)
            self.dev = EmulatedDevice(defer=True)
            self.cs = None
            backend = "reference"
        for t in self.pool.tensors():
            poison_(t)
        self.mgr = HiCacheManager(
            self.pool, device=self.dev, compute_stream=self.cs, write_policy=self.policy,
            host_layout=self.host_layout, hicache_ratio=self.ratio, backend=backend,
            host_reserve_gb=0, on_evict=self._on_evict)
        if not self.compiled:
            self.mgr._claimer = None
        for name in self.rules_off:
            assert hasattr(self.mgr._rules, name), name
            setattr(self.mgr._rules, name, False)
        for t in self.mgr.host.tensors():
            poison_(t)
        self.compute = self.mgr.compute_stream
        # a second stream writing KV (write_back: the backup at eviction must wait for it)
        self.side = self.dev.stream(0, name="side") if not self.on_gpu else None
        self.expected: dict[int, torch.Tensor] = {}   # page id -> bytes [planes*L, P, H, hb]
        self.writing: set[int] = set()                 # ids whose KV write has not run
        self.side_writing: set[int] = set()            # ... of those, the side stream's
        self.handles = []
        self.reads: list[tuple] = []                   # (holder, expected, what)
        self.keepalive: list = []
        self.next_id = 0

    # -- helpers -------------------------------------------------------------------
    def _on_evict(self, ev) -> None:
        for page_id in ev.removed:
            self.expected.pop(page_id, None)

    def _ids(self, cond) -> list[int]:
        table = self.mgr.table.entries
        return sorted(i for i, e in table.items() if cond(e))

    def _choose(self, k: int, cond):
        ids = self._ids(cond)
        return ids[k % len(ids)] if ids else None

    def _settled(self, e) -> bool:
        """Not being written by the side stream: the compute stream does not wait for
        it, so reading or freeing the page now would race with that write."""
        return e.page_id not in self.side_writing

    def _compute_ctx(self):
        return torch.cuda.stream(self.cs) if self.on_gpu else contextlib.nullcontext()

    def _on_compute(self, fn, tag) -> None:
        if self.on_gpu:
            with torch.cuda.stream(self.cs):
                fn(self.cs)
        else:
            self.dev.launch(self.compute, fn, tag)

    # -- rules: the caller's side --------------------------------------------------------
    @initialize(seeds=st.lists(pick, min_size=1, max_size=3), evict=st.booleans(), order=pick)
    def some_pages_on_host(self, seeds, evict, order=0):
        """Start with pages written, backed up and (maybe) evicted, so loads come early."""
        if not self.on_gpu:
            self.dev._rng = random.Random(order)   # run_all interleaves streams at random
        for seed in seeds:
            self.new_page(seed, hit=False)
        ids = sorted(self.expected)
        self.mgr.backup(ids)
        if evict:
            self.mgr.evict_device(ids)

    @rule(seed=pick, hit=st.booleans(), side=st.booleans())
    def new_page(self, seed, hit, side=False):
        side = side and self.side is not None and self.policy == "write_back"
        page_id = self.next_id
        self.next_id += 1
        try:
            slots = self.mgr.alloc_device([page_id])
        except OutOfPages:
            assert page_id not in self.mgr.table
            return
        g = torch.Generator().manual_seed(seed)
        shape = (2 * self.L, P, GEOM["head_num"], GEOM["head_dim"] * 2)
        data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        self.expected[page_id] = data
        self.writing.add(page_id)
        if self.on_gpu:
            with torch.cuda.stream(self.cs):
                payload = data.to("cuda", non_blocking=False)
            self.keepalive += [payload, slots]
        else:
            payload = data

        def write(stream, slots=slots, payload=payload, page_id=page_id):
            scatter(self.pool, slots, payload)
            self.writing.discard(page_id)
            self.side_writing.discard(page_id)

        if side:
            self.side_writing.add(page_id)
            # the slot's previous page may still be read on the compute stream: a caller
            # writing on another stream orders it after that work first
            slot_free = self.dev.event()
            self.dev.record(slot_free, self.compute)
            self.dev.wait(self.side, slot_free)
            self.dev.launch(self.side, write, ("write", page_id))
            self.mgr.hit([page_id], producer=self.side)   # names the stream that writes it
            return
        self._on_compute(write, ("write", page_id))
        if self.on_gpu:
            self.writing.discard(page_id)   # ordered on the stream; checked after a sync
        if hit:   # the caller inserts the page in its tree: a hit
            self.mgr.hit([page_id])

    @rule(seed=pick)
    def aborted_page(self, seed):
        """A request aborted at once: its page is freed while its KV write is still queued."""
        page_id = self.next_id
        self.new_page(seed, hit=False)
        if page_id in self.mgr.table:
            self.mgr.free([page_id])
            del self.expected[page_id]

    @precondition(lambda self: self._ids(lambda e: e.on_device and e.load is None and not e.pins))
    @rule(k=pick, layer=st.integers(0, GEOM["num_layers"] - 1))
    def read_then_evict(self, k, layer):
        """The scheduler evicts a page right after queueing the forward that reads it."""
        page_id = self._choose(k, lambda e: e.on_device and e.load is None and not e.pins
                               and self._settled(e))
        if page_id is None:
            return
        self._read((page_id,), self.mgr.device_indices([page_id]), layer,
                   f"page {page_id} layer {layer}, evicted after the read was queued")
        self.mgr.evict_device([page_id])

    @precondition(lambda self: self.mgr.table.entries)
    @rule(k=pick)
    def hit(self, k):
        page_id = self._choose(k, lambda e: True)
        if page_id is not None:
            self.mgr.hit([page_id])

    @precondition(lambda self: self._ids(lambda e: e.on_device and not e.on_host))
    @rule(k=pick)
    def backup(self, k):
        page_id = self._choose(k, lambda e: e.on_device and not e.on_host)
        if page_id is not None:
            try:
                self.mgr.backup([page_id])
            except OutOfPages:
                pass

    @precondition(lambda self: self._ids(lambda e: e.on_device and e.load is None and not e.pins))
    @rule(k=pick)
    def evict_device(self, k):
        page_id = self._choose(k, lambda e: e.on_device and e.load is None and not e.pins)
        if page_id is not None:
            self.mgr.evict_device([page_id])

    @precondition(lambda self: self.mgr.table.device_lru)
    @rule(n=st.integers(1, 3))
    def evict_device_lru(self, n):
        self.mgr.evict_device(num_pages=n)

    @precondition(lambda self: self.mgr.table.host_lru)
    @rule(n=st.integers(1, 8))
    def evict_host(self, n):
        self.mgr.evict_host(n)

    @precondition(lambda self: self._ids(LOADABLE))
    @rule(k=pick, two=st.booleans())
    def load(self, k, two):
        ids = self._ids(LOADABLE)
        if not ids:
            return
        chosen = sorted({ids[k % len(ids)], ids[(k // 7) % len(ids)] if two else ids[k % len(ids)]})
        try:
            handle = self.mgr.load(chosen)
        except OutOfPages:
            return
        self.handles.append(handle)
        self.keepalive.append(handle.device_indices)

    @precondition(lambda self: any(not h.done for h in self.handles))
    @rule(k=pick, layer=st.integers(0, GEOM["num_layers"] - 1))
    def wait_and_read(self, k, layer):
        """The model's attention on one layer of a load: wait for that layer only, read it."""
        live = [h for h in self.handles if not h.done]
        if not live:
            return
        h = live[k % len(live)]
        keep = [n for n, i in enumerate(h.page_ids) if i in self.expected]   # not freed since
        if not keep:
            return
        h.wait(layer, stream=self.compute)
        with self._compute_ctx():   # on a GPU the slice runs after the wait, on the compute stream
            slots = torch.cat([h.device_indices[n * P:(n + 1) * P] for n in keep])
        self._read([h.page_ids[n] for n in keep], slots, layer,
                   f"layer {layer} of load op {h.op_id}")

    @precondition(lambda self: self.mgr.table.device_lru)
    @rule(k=pick, layer=st.integers(0, GEOM["num_layers"] - 1))
    def read_resident(self, k, layer):
        """Attention over a page that is on the device (its reads stay queued a while)."""
        page_id = self._choose(k, lambda e: e.on_device and e.load is None and self._settled(e))
        if page_id is not None:
            self._read((page_id,), self.mgr.device_indices([page_id]), layer,
                       f"resident page {page_id} layer {layer}")

    def _read(self, page_ids, slots, layer, what) -> None:
        expected = torch.cat([self.expected[i][[layer, self.L + layer]] for i in page_ids], dim=1)
        holder: list = []
        self.keepalive.append(slots)

        def read(stream):
            holder.append(gather(self.pool, slots, range(layer, layer + 1)))

        self._on_compute(read, ("read", tuple(page_ids)))
        self.reads.append((holder, expected, what))

    @precondition(lambda self: self.mgr.table.device_lru)
    @rule(k=pick)
    def pin(self, k):
        page_id = self._choose(k, lambda e: e.on_device and e.pins < 2)
        if page_id is not None:
            self.mgr.pin([page_id])

    @precondition(lambda self: self._ids(lambda e: e.pins > 0))
    @rule(k=pick)
    def unpin(self, k):
        page_id = self._choose(k, lambda e: e.pins > 0)
        if page_id is not None:
            self.mgr.unpin([page_id])

    @precondition(lambda self: self.mgr.table.entries)
    @rule(k=pick)
    def free(self, k):
        page_id = self._choose(k, lambda e: not e.pins and self._settled(e))
        if page_id is not None:
            self.mgr.free([page_id])
            del self.expected[page_id]

    @precondition(lambda self: self.mgr.in_flight)
    @rule()
    def poll(self):
        for ack in self.mgr.poll():
            assert ack.kind in ("load", "backup")

    # -- rules: the device's side ---------------------------------------------------------
    @precondition(lambda self: not self.on_gpu and any(s.ops for s in self.dev.streams))
    @rule(which=st.integers(0, 3), times=st.integers(1, 3), then_poll=st.booleans())
    def step(self, which, times, then_poll):
        stream = (self.compute, self.mgr.load_stream, self.mgr.backup_stream, self.side)[which]
        for _ in range(times):
            self.dev.step(stream)
        if then_poll:   # a scheduler polls every iteration
            self.poll()

    @precondition(lambda self: not self.on_gpu and any(s.ops for s in self.dev.streams))
    @rule(then_poll=st.booleans())
    def run_all(self, then_poll):
        self.dev.run_all()
        if then_poll:
            self.poll()

    @precondition(lambda self: self.on_gpu)
    @rule(which=st.integers(0, 2), cycles=st.integers(10_000, 2_000_000))
    def stall(self, which, cycles):
        stream = (self.cs, self.mgr.load_stream, self.mgr.backup_stream)[which]
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)

    @precondition(lambda self: self.on_gpu)
    @rule()
    def sync_and_check(self):
        torch.cuda.synchronize()
        self.mgr.poll()
        self._check_data()

    # -- checks -------------------------------------------------------------------------------
    @invariant()
    def table_matches_model(self):
        assert set(self.mgr.table.entries) == set(self.expected), "pages appeared or vanished"

    @invariant()
    def slots_owned_once(self):
        for tier, alloc in (("device", self.mgr.device_pages), ("host", self.mgr.host_pages)):
            attr = f"{tier}_page"
            owned = [getattr(e, attr) for e in self.mgr.table.entries.values() if getattr(e, attr) >= 0]
            assert len(owned) == len(set(owned)), f"a {tier} slot is owned twice: {sorted(owned)}"
            free = set(alloc.free_pages().tolist())
            assert not free & set(owned), f"{tier} slots {sorted(free & set(owned))} owned and free"
            for page in owned:
                assert alloc.state(page) == "used", f"{tier} page {page} owned but {alloc.state(page)}"

    @invariant()
    def no_slot_reused_under_a_transfer(self):
        """Every transfer the device has not finished (the device's truth, not the
        manager's bookkeeping) still owns its slots: none is free or someone else's."""
        if not self.structural_checks:
            return
        mgr = self.mgr
        if self.on_gpu:
            running = [op for op in mgr._loads if not op.query()]
            running += [op for op in mgr._backups if not self.dev.query(op.event)]
        else:
            running = list({id(tag): tag for _, tag in self.dev.pending()
                            if not isinstance(tag, tuple)}.values())
        owner = {tier: {getattr(e, f"{tier}_page"): e for e in mgr.table.entries.values()}
                 for tier in ("device", "host")}
        for op in running:
            kind = type(op).__name__
            for tier, pages, alloc in (("host", op.host_pages, mgr.host_pages),
                                       ("device", op.device_pages, mgr.device_pages)):
                # the machine never reuses a page id: the same id is the same page
                for page_id, page in zip(op.page_ids, pages.tolist()):
                    assert alloc.state(page) != "free", (
                        f"{tier} page {page} is free while {kind} op {op.op_id} still uses it")
                    holder = owner[tier].get(page)
                    assert holder is None or holder.page_id == page_id, (
                        f"{tier} page {page} was reused by page {holder.page_id} while {kind} op "
                        f"{op.op_id} of page {page_id} still uses it")

    @invariant()
    def bytes_where_the_table_says(self):
        if not self.on_gpu:
            self._check_data()

    def _check_data(self) -> None:
        with self._compute_ctx():   # GPU: index copies are made on the compute stream
            self._check_bytes()

    def _check_bytes(self) -> None:
        for page_id, e in self.mgr.table.entries.items():
            want = self.expected[page_id]
            if e.on_device and e.load is None and page_id not in self.writing:
                got = gather(self.pool, self.mgr.device_indices([page_id]), range(self.L)).cpu()
                assert torch.equal(got, want), f"page {page_id}: device copy differs ({e})"
            if e.on_host and e.backup is None and e.fill is None:
                got = gather(self.mgr.host, self.mgr.host_indices([page_id]), range(self.L))
                assert torch.equal(got, want), f"page {page_id}: host copy differs ({e})"
        for holder, want, what in self.reads:
            if holder:
                assert torch.equal(holder[0].cpu(), want), f"the model read wrong bytes: {what}"
        self.reads = [r for r in self.reads if not r[0]]

    def teardown(self):
        try:
            if self.on_gpu:
                torch.cuda.synchronize()
            else:
                self.dev.run_all()
            self.mgr.poll()
            self._check_data()
            assert not self.reads, "reads never ran"
        finally:
            self.mgr.close()


def _machine(**attrs):
    return type("Machine", (ManagerMachine,), attrs)


CPU_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy, host_layout, compiled", [
    ("write_through", "layer_first", True),
    ("write_through_selective", "page_first", True),
    ("write_back", "page_first_direct", True),
    ("write_back", "page_head", True),
    ("write_back", "layer_first", False),
    ("write_through", "page_first", False),
])
def test_manager_machine(policy, host_layout, compiled):
    run_state_machine_as_test(_machine(policy=policy, host_layout=host_layout, compiled=compiled),
                              settings=CPU_SETTINGS)


# -- the machine must notice when a rule is missing ---------------------------------------------

RULES = {
    # rule switched off -> a policy under which the damage is reachable
    "backup_waits_producer": "write_through",
    "load_waits_compute": "write_through",
    "host_locked_during_load": "write_through",
    "device_locked_during_backup": "write_back",
}

HUNT = settings(max_examples=400, stateful_step_count=40, deadline=None, database=None,
                derandomize=True, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_machine_finds_a_missing_rule(rule_name):
    machine = _machine(policy=RULES[rule_name], rules_off=(rule_name,))
    with pytest.raises(AssertionError) as info:
        run_state_machine_as_test(machine, settings=HUNT)
    message = str(info.value)
    if rule_name in ("backup_waits_producer", "load_waits_compute"):
        assert "differs" in message or "read wrong bytes" in message, message
    else:
        assert "still uses it" in message or "differs" in message, message


def test_machine_finds_a_later_backup_that_ignores_the_producer(monkeypatch):
    """Under write_back a page written on a side stream is backed up at its eviction,
    long after the hit that named the producer: that backup must wait for it too."""
    monkeypatch.setattr(HiCacheManager, "_backups_wait_for", lambda self, producer: None)
    with pytest.raises(AssertionError, match="host copy differs|read wrong bytes"):
        run_state_machine_as_test(_machine(policy="write_back"), settings=HUNT)


@pytest.mark.parametrize("rule_name", ["device_locked_during_backup", "load_waits_compute"])
def test_missing_rule_corrupts_data(rule_name):
    """Without the slot checks, the byte checks alone see the damage."""
    machine = _machine(policy=RULES[rule_name], rules_off=(rule_name,), structural_checks=False)
    with pytest.raises(AssertionError, match="differs|read wrong bytes"):
        run_state_machine_as_test(machine, settings=HUNT)


# -- on a GPU: real streams, a compute stream writing the pool ----------------------------------

GPU_SETTINGS = settings(max_examples=30, stateful_step_count=50, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.gpu
@pytest.mark.parametrize("policy, host_layout", [
    ("write_through", "layer_first"), ("write_back", "page_first"),
])
def test_manager_machine_gpu(policy, host_layout):
    run_state_machine_as_test(_machine(policy=policy, host_layout=host_layout, on_gpu=True),
                              settings=GPU_SETTINGS)


@pytest.mark.gpu
@pytest.mark.parametrize("rule_name", ["backup_waits_producer", "load_waits_compute"])
def test_machine_finds_a_missing_rule_gpu(rule_name):
    machine = _machine(policy=RULES[rule_name], rules_off=(rule_name,), on_gpu=True,
                       structural_checks=False)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=settings(HUNT, max_examples=200))
