"""The compiled half of a load (csrc/manager/fastload.c) against the numpy path.

Two managers get the same random calls, one with the compiled claim and one
without; after every call their page tables, allocators and outcomes (results
and error messages) must be identical. The sequences include every case the
compiled path declines (unknown and repeated ids, pages on the device or still
being backed up, a full device pool, the LRU clock's rebase) and a table that
grows under a claimer that already holds its columns; the test checks that both
branches ran.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from hicache_kernels import KVBuffer, KVLayout
from hicache_kernels.manager import EmulatedDevice, HiCacheManager, OutOfPages, PageState
from hicache_kernels.manager import manager as manager_module

P = 4
DEVICE_PAGES = 48
TABLE_COLUMNS = ("state", "device_page", "host_page", "hits", "pins", "load_id", "backup_id",
                 "device_used", "host_used")
ALLOC_FIELDS = ("_stack", "_state", "_locks")


def test_the_compiled_load_path_is_built():
    """setup.py builds it on this machine; without it load() misses its cost target."""
    assert manager_module._fastload is not None, "csrc/manager/fastload.c was not built"


class CountingClaimer:
    def __init__(self, claimer):
        self.claimer = claimer
        self.outcomes = Counter()

    def claim(self, *args):
        done = self.claimer.claim(*args)
        self.outcomes[done] += 1
        return done


def _manager(policy: str, compiled: bool):
    lay = KVLayout("layer_first", num_layers=2, num_slots=DEVICE_PAGES * P, head_num=2,
                   head_dim=4, dtype=torch.float16, page_size=P)
    # copies are never executed: the test compares bookkeeping, byte checks are elsewhere
    mgr = HiCacheManager(KVBuffer.allocate(lay), device=EmulatedDevice(defer=True, execute=False),
                         write_policy=policy, backend="reference", host_reserve_gb=0,
                         hicache_ratio=2.0)
    # a short LRU ramp, so the clock's rebase (declined by the compiled path) happens
    mgr.table._ramp = np.arange(400, dtype=np.int64)
    mgr.table._ramp.flags.writeable = False
    mgr._claimer = CountingClaimer(mgr._claimer) if compiled else None
    return mgr


def _snapshot(mgr) -> dict:
    t = mgr.table
    out = {name: getattr(t, name)[:t.hw].copy() for name in TABLE_COLUMNS}
    out["index"] = dict(t.index)
    out["clock"] = t.clock
    for alloc in (mgr.device_pages, mgr.host_pages):
        for name in ALLOC_FIELDS:
            out[f"{alloc.name}.{name}"] = getattr(alloc, name).copy()
        out[f"{alloc.name}.top"] = alloc._top
        out[f"{alloc.name}.deferred"] = alloc.deferred_count
    return out


def _random_call(rng: random.Random, mgr, known: list, next_id: list):
    """A random manager call, as (method, args, kwargs); ``mgr`` only guides the choice."""
    r = rng.random()
    if r < 0.45 and known:   # a load: usually of host-only pages, sometimes a bad list
        # on host only (perhaps still being backed up there): loadable
        host_only = [i for i, s in zip(known, mgr.lookup(known))
                     if s & (PageState.DEVICE | PageState.HOST) == PageState.HOST]
        pool = host_only if host_only and rng.random() < 0.8 else known
        ids = rng.sample(pool, min(len(pool), rng.randint(1, 10)))
        twist = rng.random()
        if twist < 0.06:
            ids = ids + [ids[0]]                      # a repeat
        elif twist < 0.09:
            ids = ids + [("never", 1)]                # unknown
        elif twist < 0.11:
            ids = ids + [[1, 2]]                      # unhashable
        return "load", (ids if rng.random() < 0.5 else tuple(ids),), {}
    if r < 0.60:
        n = rng.randint(1, 8)
        ids = [("p", next_id[0] + i) for i in range(n)]
        next_id[0] += n
        known.extend(ids)
        return rng.choice(["alloc_host", "alloc_device"]), (ids,), {}
    if r < 0.68:
        return "evict_device", (), {"num_pages": rng.randint(1, 6)}
    if r < 0.74 and known:
        return "hit", (rng.sample(known, min(len(known), 6)),), {}
    if r < 0.80 and known:
        return "evict_device", (rng.sample(known, min(len(known), 3)),), {}
    if r < 0.85 and known:
        return "free", (rng.sample(known, min(len(known), 3)),), {}
    if r < 0.90:
        return "evict_host", (rng.randint(1, 6),), {}
    return "poll", (), {}


def _call(mgr, what, args, kwargs):
    try:
        result = getattr(mgr, what)(*args, **kwargs)
    except (ValueError, KeyError, TypeError, OutOfPages) as exc:
        return type(exc).__name__, str(exc)
    if what == "load":
        return ("handle", result.page_ids, result.rows.tolist(), result.host_pages.tolist(),
                result.device_pages.tolist())
    if isinstance(result, torch.Tensor):
        return result.tolist()
    if what == "poll":
        return [(a.kind, a.op_id, a.page_ids) for a in result]
    return result


@pytest.mark.parametrize("policy", ["write_through", "write_back", "write_through_selective"])
@pytest.mark.parametrize("seed", range(4))
def test_compiled_claim_matches_numpy(policy, seed):
    compiled, numpy_only = _manager(policy, True), _manager(policy, False)
    rng = random.Random(seed)
    # first a claim, then a table that grows past its 64 rows, then claims on the new columns
    prelude = [("alloc_host", ([("p", i) for i in range(8)],)), ("load", ([("p", 1), ("p", 5)],)),
               ("alloc_host", ([("p", i) for i in range(8, 80)],)),
               ("load", ([("p", 70), ("p", 2), ("p", 79)],))]
    for what, args in prelude:
        outcomes = [_call(m, what, args, {}) for m in (compiled, numpy_only)]
        assert outcomes[0] == outcomes[1] and outcomes[0][0] != "ValueError", outcomes
    assert compiled.table.capacity > 64 and compiled._claimer.outcomes[True] == 2
    known = [("p", i) for i in range(80)]
    next_id = [80]
    for step in range(400):
        what, args, kwargs = _random_call(rng, compiled, known, next_id)
        outcomes = [_call(m, what, args, kwargs) for m in (compiled, numpy_only)]
        assert outcomes[0] == outcomes[1], f"step {step}: {what}{args}{kwargs}"
        if rng.random() < 0.3:     # let the device run some of what is queued
            for m in (compiled, numpy_only):
                for _ in range(3):
                    m.device._step_any()
        state, other = _snapshot(compiled), _snapshot(numpy_only)
        for key, a in state.items():
            b = other[key]
            same = np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            assert same, f"step {step} after {what}: {key} differs"
        known[:] = [i for i in known if i in compiled.table.index]
    counts = compiled._claimer.outcomes
    assert counts[True] >= 10 and counts[False] >= 10, counts   # both branches ran
    for m in (compiled, numpy_only):
        m.device.run_all()
        m.poll()
        m.close()


def test_ids_with_python_hash_and_equality():
    """Ids whose hash and equality are Python code (a frozen dataclass, a radix node)
    take the compiled path like built-in ones."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Node:
        prefix: tuple

    mgrs = [_manager("write_through", True), _manager("write_through", False)]
    ids = [Node((i, i + 1)) for i in range(6)]
    for m in mgrs:
        m.alloc_host(ids)
    outcomes = [_call(m, "load", ([Node((4, 5)), Node((0, 1))],), {}) for m in mgrs]
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == "handle"
    assert mgrs[0]._claimer.outcomes[True] == 1
    for m in mgrs:
        m.close()
