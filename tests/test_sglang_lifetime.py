"""hicache_kernels.sglang's plan cache against pools that are freed and rebuilt.

A cached plan must never serve memory other than the call's own (a new pool often
lands at a freed pool's address), and must never keep a freed pool alive.

Plans run here on ``HostCopyEngine``: the copy-engine backend's own descriptors
(the real addresses a cached plan resolves to) executed with memmove on the host.
That is what a GPU backend does with a plan, so a stale plan writes to the wrong
memory here too; the reference backend would not notice, since it indexes the
call's own tensors.
"""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import hicache_kernels.sglang as kvio
import test_sglang as forms
from hicache_kernels import backends
from hicache_kernels.backends.copy_engine import descriptors, merge_runs
from hicache_kernels.plan import address_table

DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float32]
REBUILDS = 300

# every form with a cached plan: (the test in test_sglang.py that checks its bytes, extra args)
FORMS = {
    "transfer_kv_per_layer": (forms.test_transfer_kv_per_layer, {}),
    "transfer_kv_per_layer_pf_lf": (forms.test_transfer_kv_per_layer_pf_lf, {}),
    "transfer_kv_per_layer_ph_lf": (forms.test_transfer_kv_per_layer_ph_lf, {}),
    "transfer_kv_all_layer": (forms.test_transfer_kv_all_layer, {}),
    "transfer_kv_all_layer_lf_pf": (forms.test_transfer_kv_all_layer_lf_pf, {}),
    "transfer_kv_all_layer_lf_ph": (forms.test_transfer_kv_all_layer_lf_ph, {}),
    "transfer_kv_per_layer_mla": (forms.test_transfer_kv_per_layer_mla, {}),
    "transfer_kv_per_layer_mla_pf_lf": (forms.test_transfer_kv_per_layer_mla_pf_lf, {}),
    "transfer_kv_all_layer_mla": (forms.test_transfer_kv_all_layer_mla, {}),
    "transfer_kv_all_layer_mla_lf_pf": (forms.test_transfer_kv_all_layer_mla_lf_pf, {}),
    "transfer_kv_direct": (forms.test_transfer_kv_direct, {}),
    "transfer_kv_per_layer_direct_pf_lf": (forms.test_transfer_kv_per_layer_direct_pf_lf,
                                           {"mla": False}),
    "transfer_kv_all_layer_direct_lf_pf": (forms.test_transfer_kv_all_layer_direct_lf_pf,
                                           {"mla": True}),
}


class HostCopyEngine:
    """The copy-engine backend's descriptors for a plan, copied with memmove."""

    name = "host_copy_engine"
    host_indices = True

    def __init__(self):
        self.bases: list[tuple] = []   # each run's plane base addresses, both sides

    def available(self):
        return True, "test double: copy-engine descriptors run with memmove"

    def run(self, plan, src_indices, dst_indices, *, sm_budget=None, num_warps=None, stream=None):
        self.bases.append((plan.label, *(tuple(address_table(side.bases, torch.device("cpu")).tolist())
                                         for side in (plan.src, plan.dst))))
        dsts, srcs, sizes = descriptors(plan, merge_runs(plan, src_indices, dst_indices))
        for dst, src, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            ctypes.memmove(dst, src, n)


@pytest.fixture
def empty_cache():
    kvio.clear_plan_cache()
    yield
    kvio.clear_plan_cache()


@pytest.fixture
def one_thread():
    """Hundreds of tiny tensors: torch's thread pool only adds wake-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def host_copy_engine(monkeypatch, empty_cache):
    engine = HostCopyEngine()
    monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "test double"))
    monkeypatch.setenv("HICACHE_BACKEND", "auto")
    return engine


@pytest.mark.parametrize("name", sorted(FORMS))
def test_rebuilt_pools_never_hit_a_freed_pools_plan(host_copy_engine, one_thread, name):
    """Build pools, transfer, check every byte, free them; a few hundred times.
    Allocations come back at freed addresses (asserted: else this could not fail)."""
    check, extra = FORMS[name]
    for i in range(REBUILDS):
        check("host_copy_engine", DTYPES[i % len(DTYPES)], torch.Generator().manual_seed(i),
              **extra)
    assert len(host_copy_engine.bases) == REBUILDS
    seen, reused = set(), 0
    for _label, src, dst in host_copy_engine.bases:
        reused += bool(seen.intersection(src + dst))
        seen.update(src + dst)
    assert reused > REBUILDS / 2, f"only {reused} rebuilt pools came back at a freed address"


@pytest.mark.parametrize("backend", ["reference", "host_copy_engine"])
def test_the_issue_repro(monkeypatch, empty_cache, one_thread, backend):
    """Tables over pools freed and rebuilt each iteration (the form SGLang calls with
    address tables), on CPU: every byte right, every time."""
    if backend == "host_copy_engine":
        engine = HostCopyEngine()
        monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
    else:
        monkeypatch.setenv("HICACHE_BACKEND", "reference")
    for it in range(REBUILDS):
        value = it % 250 + 1
        src = [torch.full((64, 64), value, dtype=torch.uint8) for _ in range(4)]
        dst = [torch.zeros(64, 64, dtype=torch.uint8) for _ in range(4)]
        sk, dk, sv, dv = (torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)
                          for ts in (src[:2], dst[:2], src[2:], dst[2:]))
        kvio.transfer_kv_all_layer(sk, dk, sv, dv, torch.arange(8), torch.arange(8), 64, 2)
        for d in dst:
            assert (d[:8] == value).all() and (d[8:] == 0).all(), it
        del sk, dk, sv, dv, dst, src


def _arguments(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("backend", ["reference", "host_copy_engine"])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_a_cached_plan_keeps_no_pool_alive(monkeypatch, empty_cache, backend, name):
    """Every tensor a call was given is freed once the caller drops it."""
    if backend == "host_copy_engine":
        engine = HostCopyEngine()
        monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
    else:
        monkeypatch.setenv("HICACHE_BACKEND", "reference")
    given = []
    call = getattr(kvio, name)

    def spy(*args, **kwargs):
        given.extend(StorageWeakRef(t.untyped_storage()) for t in _arguments(args, kwargs))
        return call(*args, **kwargs)

    monkeypatch.setattr(kvio, name, spy)
    check, extra = FORMS[name]
    check(backend, torch.bfloat16, torch.Generator().manual_seed(0), **extra)
    gc.collect()
    assert given and all(ref.expired() for ref in given)
    assert len(kvio._PLANS) == 1


def test_new_views_of_the_same_pool_hit_the_cache(host_copy_engine, gen):
    """SGLang passes ``k_buffer[layer]``, a new view each call: the same memory, one plan."""
    host = forms.rnd((2, 3, 16, 2, 8), torch.bfloat16, gen)
    dk, dv = forms.poisoned((16, 2, 8), torch.bfloat16), forms.poisoned((16, 2, 8), torch.bfloat16)
    for _ in range(3):
        kvio.transfer_kv_per_layer(host[0, 1], dk, host[1, 1], dv, torch.arange(4),
                                   torch.arange(4), 32)
    assert len(kvio._PLANS) == 1
    # another layer's view is other memory: another plan
    kvio.transfer_kv_per_layer(host[0, 2], dk, host[1, 2], dv, torch.arange(4), torch.arange(4), 32)
    assert len(kvio._PLANS) == 2
    assert torch.equal(dk[:4].view(torch.uint8), host[0, 2, :4].view(torch.uint8))


def test_a_rewritten_table_is_a_new_plan(host_copy_engine, gen):
    """An address table written in place names other memory: its plan is rebuilt."""
    src = [forms.rnd((8, 16), torch.uint8, gen) for _ in range(4)]
    dst = [forms.poisoned((8, 16), torch.uint8) for _ in range(4)]
    other = [forms.poisoned((8, 16), torch.uint8) for _ in range(2)]
    sk, dk, sv, dv = (forms.table(ts) for ts in (src[:2], dst[:2], src[2:], dst[2:]))
    idx = torch.arange(8)
    kvio.transfer_kv_all_layer(sk, dk, sv, dv, idx, idx, 16, 2)
    dk.copy_(forms.table(other))
    kvio.transfer_kv_all_layer(sk, dk, sv, dv, idx, idx, 16, 2)
    for s, d in zip(src[:2], other):
        assert torch.equal(s, d)


def test_entries_of_freed_pools_are_dropped_and_clear_empties(host_copy_engine, gen):
    host = forms.rnd((2, 16, 2, 8), torch.bfloat16, gen)
    dk, dv = forms.poisoned((16, 2, 8), torch.bfloat16), forms.poisoned((16, 2, 8), torch.bfloat16)
    kvio.transfer_kv_per_layer(host[0], dk, host[1], dv, torch.arange(4), torch.arange(4), 32)
    assert len(kvio._PLANS) == 1
    del host
    gc.collect()
    assert all(e.freed() for e in kvio._PLANS.values())
    other = forms.rnd((2, 16, 2, 8), torch.bfloat16, gen)
    kvio.transfer_kv_per_layer(other[0], dk, other[1], dv, torch.arange(4), torch.arange(4), 32)
    assert len(kvio._PLANS) == 1 and not any(e.freed() for e in kvio._PLANS.values())
    kvio.clear_plan_cache()
    assert not kvio._PLANS


def test_scalars_are_keyed_with_their_types(host_copy_engine, gen):
    """``True == 1``: a cached plan must not make an argument valid that a fresh one refuses."""
    host = forms.rnd((16, 3, 2, 8), torch.bfloat16, gen)
    dk = forms.poisoned((16, 2, 8), torch.bfloat16)
    args = (host, dk, torch.arange(4), torch.arange(4))
    kvio.transfer_kv_per_layer_mla_pf_lf(*args, 1, 32, 96)
    with pytest.raises(TypeError, match="layer_id: expected an int"):
        kvio.transfer_kv_per_layer_mla_pf_lf(*args, True, 32, 96)


def test_a_table_made_in_inference_mode_is_named_by_its_values(host_copy_engine, gen):
    """No version counter under ``torch.inference_mode()``: a CPU table's values name it."""
    src = [forms.rnd((8, 16), torch.uint8, gen) for _ in range(4)]
    dst = [forms.poisoned((8, 16), torch.uint8) for _ in range(4)]
    other = [forms.poisoned((8, 16), torch.uint8) for _ in range(2)]
    with torch.inference_mode():
        sk, dk, sv, dv = (forms.table(ts) for ts in (src[:2], dst[:2], src[2:], dst[2:]))
    idx = torch.arange(8)
    kvio.transfer_kv_all_layer(sk, dk, sv, dv, idx, idx, 16, 2)
    with torch.inference_mode():
        dk.copy_(forms.table(other))
    kvio.transfer_kv_all_layer(sk, dk, sv, dv, idx, idx, 16, 2)
    for s, d in zip(src[:2], other):
        assert torch.equal(s, d)
    assert len(kvio._PLANS) == 2


def test_the_premise_a_weak_reference_reserves_an_allocations_identity():
    """The cache's soundness rests on this torch behaviour: a storage's identity is
    reused at once after it is freed, but not while a weak reference to it lives, and
    the weak reference does not keep its memory."""
    def reused(hold: bool) -> int:
        t = torch.empty(64, 64)
        identity = t.untyped_storage()._cdata
        ref = StorageWeakRef(t.untyped_storage()) if hold else None
        del t
        gc.collect()
        assert ref is None or ref.expired()
        return sum(torch.empty(64, 64).untyped_storage()._cdata == identity for _ in range(50))

    # else this test could not tell (the allocator's state decides; a few tries find it)
    assert any(reused(hold=False) > 0 for _ in range(20))
    assert reused(hold=True) == 0


def test_keys_in_c_name_the_allocation_the_weak_references_reserve():
    """The key read in C names a tensor's allocation by the same identity that
    ``untyped_storage()._cdata`` gives, the one an entry's weak references reserve."""
    storage_id = (getattr(torch._C, "_storage_address", None)
                  or getattr(torch._C, "_storage_id", None))
    if storage_id is None or kvio._ops._compiled is None:
        pytest.skip("this torch (or build) names allocations in Python only")
    pool = torch.empty(16, 8)
    for t in (pool, pool[3:], pool.t(), pool.view(torch.uint8)):
        assert storage_id(t) == t.untyped_storage()._cdata


def test_keys_in_c_and_python_tell_the_same_tensors_apart(monkeypatch):
    """Whether two calls share a plan: the same answer with the tensors named in C
    (one call for the list) and in Python, over views that differ in one way each."""
    pool = torch.empty(16, 4, 8, dtype=torch.bfloat16)
    twin = torch.empty(16, 4, 8, dtype=torch.bfloat16)   # the same geometry, other memory
    variants = [
        [pool], [pool[:]], [pool[0:8]], [pool[0:8]], [pool[8:16]], [pool[1:9]],
        [pool.view(torch.float16)], [pool.view(torch.uint8)], [pool.view(16, 32)],
        [pool.transpose(1, 2)], [pool[:, :2]], [pool[::2]], [pool[0:1]], [pool[0:1, :, :]],
        [twin], [pool, twin], [twin, pool], [pool, pool], [pool.unsqueeze(0)], [pool.flatten()],
        [pool.int()],
    ]

    def keys():
        return [kvio._key("form", v) for v in variants]
    in_c = keys()
    assert all(isinstance(k[-1], type(in_c[0][-1])) for k in in_c)
    monkeypatch.setattr(kvio._ops, "_compiled", None)
    in_python = keys()
    if in_c == in_python:
        pytest.skip("_prepared is not built: both are Python's keys")
    def pairs(keys):
        return {(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if keys[i] == keys[j]}
    # new views of the same memory and geometry, and only those, share a plan
    assert pairs(in_c) == pairs(in_python) == {(0, 1), (2, 3), (12, 13)}
    assert len({hash(k) for k in in_c}) == len(variants) - 3
