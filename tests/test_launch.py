"""Prepared launches: a Transfer's call, the SGLang drop-in's calls and a manager's
layer-wise load reach the CUDA library in one C call each, and move exactly the
bytes the checked path moves.

Without a GPU these run through the library's host twin (tests/host_twin.py):
the package's own Python path and the library's own host logic (checks, launch
splitting, the prepared loop, event records), with the register kernel's code
run on the CPU, so every case compares raw bytes with the reference on poisoned
destinations and reads the order of launches and event records from the twin's
log. The ``gpu`` tests at the end do the same through the real library.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import host_twin
from conftest import poison_, random_bytes_
from test_transfer import assert_buffers_equal, like, make_device_pool, make_host, paged_indices

import hicache_kernels.sglang as kvio
from hicache_kernels import KVBuffer, KVLayout, Transfer, nvtx_ranges, ops
from hicache_kernels.backends import cuda
from hicache_kernels.manager import EmulatedDevice, HiCacheManager
from hicache_kernels.manager import manager as manager_module

LAUNCH, RECORD = host_twin.LAUNCH, host_twin.RECORD


@pytest.fixture(scope="session")
def twin_library(tmp_path_factory):
    return host_twin.Twin(host_twin.build(tmp_path_factory.mktemp("twin")))


@pytest.fixture(params=["compiled", "compiled methods", "python"])
def twin(request, twin_library, monkeypatch):
    """The ``cuda`` backend on CPU tensors, launching into the twin; the prepared
    launches' per-call half compiled (csrc/ops/prepared.c, reading tensors through
    DLPack's exchange table, or through their methods) or in Python."""
    if request.param == "python":
        monkeypatch.setattr(ops, "_compiled", None)
    else:
        assert ops._compiled is not None, "csrc/ops/prepared.c was not built"
    if request.param == "compiled methods":
        request.getfixturevalue("read_by_methods")
    return host_twin.install(monkeypatch, twin_library)


@pytest.fixture
def checked(monkeypatch):
    """The kernel-backend calls that take the checked path (ops.execute)."""
    calls = []
    real = ops.execute

    def spy(*args, **kwargs):
        module = kwargs.get("backend_module")
        if module is None or module.name != "reference":
            calls.append(args[0].label)
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "execute", spy)
    monkeypatch.setattr(kvio, "execute", spy)
    return calls


def reference(host: KVBuffer, dst: KVBuffer, h_idx, d_idx, layers) -> KVBuffer:
    want = like(dst)
    Transfer(host, want, layers=layers, backend="reference")(h_idx, d_idx)
    return want


CASES = [  # (host layout, MLA, dtype, page size, head_dim): widths 16, 8, 4, 2 and 1 bytes
    ("layer_first", False, torch.bfloat16, 1, 128),
    ("page_first", False, torch.float8_e4m3fn, 4, 5),
    ("page_first_direct", False, torch.float32, 4, 2),
    ("page_head", False, torch.bfloat16, 8, 3),
    ("page_first", True, torch.bfloat16, 4, 36),
    ("layer_first", True, torch.float16, 1, 4),
]


@pytest.mark.parametrize("kind, mla, dtype, page_size, head_dim", CASES)
@pytest.mark.parametrize("layers", [1, None], ids=["layer1", "all"])
def test_a_prepared_call_moves_the_references_bytes(twin, checked, kind, mla, dtype, page_size,
                                                    head_dim, layers, gen):
    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size, head_dim=head_dim, gen=gen)
    h_idx, d_idx = paged_indices(host.layout.num_slots, 64, 40, page_size, gen)
    for src, dst, s_idx, t_idx in ((host, make_device_pool(host, slots=64), h_idx, d_idx),
                                   (make_device_pool(host, slots=64, fill="random", gen=gen),
                                    like(host), d_idx, h_idx)):
        want = reference(src, dst, s_idx, t_idx, layers)
        t = Transfer(src, dst, layers=layers, backend="cuda")
        t(s_idx, t_idx)
        t(s_idx, t_idx)   # and again, prepared
        assert_buffers_equal(dst, want, f"{kind} {'mla' if mla else 'mha'} {dtype}")
        launches = [e for e in twin.log() if e[0] == LAUNCH]
        planes = t.plan.num_planes
        assert [e[2] for e in launches] == [planes, planes], "one launch per call, every plane"
    assert checked == [], "every call went straight to the library"


def test_empty_and_all_padding_calls_launch_nothing_and_write_nothing(twin, checked, gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    before = like(dev)
    t = Transfer(host, dev, layers=0, backend="cuda")
    t(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    t(torch.tensor([-1, 3, -1]), torch.tensor([4, -1, -1]))
    assert_buffers_equal(dev, before, "nothing written")
    assert [e[0] for e in twin.log()] == [LAUNCH], "an empty call launches nothing"
    assert checked == []


def test_an_explicit_stream_is_the_one_launched_on(twin, gen):
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    Transfer(host, dev, layers=2, backend="cuda")(torch.arange(4), torch.arange(4),
                                                 stream=host_twin.FakeStream(77))
    assert [e[:2] for e in twin.log()] == [(LAUNCH, 77)]


@pytest.mark.parametrize("why, src, dst, error", [
    ("int32 indices", torch.arange(4, dtype=torch.int32), torch.arange(4),
     (TypeError, r"^src_indices: expected dtype torch\.int64, got torch\.int32$")),
    ("2-D indices", torch.arange(4), torch.arange(4).view(2, 2),
     (ValueError, r"^dst_indices: expected a 1-D tensor, got shape \[2, 2\]$")),
    ("lengths differ", torch.arange(4), torch.arange(3),
     (ValueError, r"^dst_indices: expected 4 indices like src_indices, got 3$")),
    ("not tensors", [0, 1], torch.arange(2),
     (TypeError, r"^src_indices: expected an int64 tensor, got list$")),
])
def test_bad_indices_take_the_checked_path_and_write_nothing(twin, checked, why, src, dst, error, gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    before = like(dev)
    t = Transfer(host, dev, layers=1, backend="cuda")
    with pytest.raises(error[0], match=error[1]):
        t(src, dst)
    assert_buffers_equal(dev, before, why)
    assert twin.log() == [] and len(checked) == 1


def test_a_bounds_check_asked_for_takes_the_checked_path(twin, checked, gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    before = like(dev)
    t = Transfer(host, dev, layers=1, backend="cuda")
    with pytest.raises(IndexError, match=r"^dst_indices: largest index 32 is out of range for dst "
                                         r"with 32 slots$"):
        t(torch.arange(2), torch.tensor([0, 32]), check=True)
    assert_buffers_equal(dev, before, "nothing written")
    assert twin.log() == [] and len(checked) == 1
    t(torch.arange(2), torch.tensor([0, 31]), check=True)   # in range: the checked path copies
    assert len(checked) == 2 and [e[0] for e in twin.log()] == [LAUNCH]


def test_strided_indices_and_nvtx_ranges_take_the_checked_path(twin, checked, monkeypatch, gen):
    host = make_host("page_head", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    h_idx, d_idx = paged_indices(host.layout.num_slots, 32, 24, 4, gen)
    strided = torch.stack([h_idx, h_idx], 1)[:, 0]        # stride 2
    dev = make_device_pool(host, slots=32)
    t = Transfer(host, dev, layers=2, backend="cuda")
    t(strided, d_idx)
    assert_buffers_equal(dev, reference(host, dev, h_idx, d_idx, 2), "strided")
    assert len(checked) == 1
    monkeypatch.setattr(nvtx_ranges, "_enabled", True)
    t(h_idx, d_idx)
    assert len(checked) == 2, "with NVTX ranges on, each transfer is a range: the checked path"


def _on_device(launcher, index: int):
    """``launcher``'s descriptions prepared as if for CUDA device ``index``."""
    other = cuda.Launcher.__new__(cuda.Launcher)
    tgt = launcher.target
    other._set(cuda.Target(tgt.lib, torch.device("cuda", index), index, tgt.raw_stream), launcher._descs,
               launcher.what, launcher._keep)
    return other


@pytest.fixture
def read_by_methods():
    """The compiled half reading tensors through their Python methods (a torch without
    DLPack's exchange table), restored afterwards."""
    assert cuda.setup_compiled(None) is False
    yield
    cuda.setup_compiled()


def test_compiled_and_python_checks_give_the_same_answers(twin_library, monkeypatch, gen):
    """Which index tensors go straight to the kernel: the same in C (tensors read through
    DLPack's exchange table, or through their methods) and in Python."""
    host_twin.install(monkeypatch, twin_library)
    twin_library.mode(execute=False)
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    launcher = Transfer(host, make_device_pool(host, slots=32), layers=0, backend="cuda").launcher()
    elsewhere = _on_device(launcher, 3)
    good = torch.arange(6)
    cases = [(good, good), (good, torch.arange(5)), (torch.arange(6, dtype=torch.int32), good),
             (good, torch.arange(12)[::2]), (good.view(2, 3), good.view(2, 3)), (good[:1], good[3:4]),
             (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)),
             (torch.tensor(3), torch.tensor(3)), (torch.nn.Parameter(good.float(), False), good),
             (good.to_sparse(), good), ([0, 1], good), (good, None), (good.expand(6), good),
             (torch.arange(6).as_strided((6,), (0,)), good),
             (torch.arange(12)[::5][:1], good[:1]),           # one index, stride 5: read as is
             (good.view(6, 1), good), (good.to(torch.uint64), good)]

    def decisions():
        return ([ops.launch_prepared(launcher, src, dst) for src, dst in cases]
                + [ops.launch_prepared(elsewhere, good, good)])
    by_dlpack = decisions()
    assert cuda.setup_compiled(None) is False
    try:
        by_methods = decisions()
    finally:
        cuda.setup_compiled()
    monkeypatch.setattr(ops, "_compiled", None)
    python = decisions()
    assert by_dlpack == by_methods == python
    assert python == [True, False, False, False, False, True, True, False, False, False, False,
                      False, True, False, True, False, False, False]
    assert [e[0] for e in twin_library.log()] == [LAUNCH] * 12, "four non-empty launches per path"


def test_tables_that_need_converting_keep_the_checked_path(twin, checked, gen):
    """A plane-base table given as a tensor the kernel cannot read as it is (here
    strided) is converted per call on the launch's stream by the checked path; it is
    never converted once for a prepared launch that other streams would read."""
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    h_idx, d_idx = paged_indices(host.layout.num_slots, 32, 20, 4, gen)
    dev = make_device_pool(host, slots=32)
    t = Transfer(host, dev, layers=1, backend="cuda")
    bases = torch.tensor(list(t.plan.src.bases), dtype=torch.int64)
    t.plan.src.bases = torch.stack([bases, bases], 1)[:, 0]       # the same addresses, strided
    assert t.launcher() is None
    t(h_idx, d_idx)
    assert_buffers_equal(dev, reference(host, dev, h_idx, d_idx, 1), "strided table")
    assert len(checked) == 1 and [e[0] for e in twin.log()] == [LAUNCH]


def test_other_backends_have_no_prepared_launch(gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    transfers = [Transfer(host, dev, layers=i, backend="reference") for i in range(3)]
    assert transfers[0].launcher() is None
    assert ops.prepare_layers(transfers) is None


# -- every layer in one call ------------------------------------------------------------------

def _layer_set(host, dev):
    transfers = [Transfer(host, dev, layers=i, backend="cuda") for i in range(host.layout.num_layers)]
    return transfers, ops.prepare_layers(transfers)


@pytest.mark.parametrize("kind", ["layer_first", "page_first", "page_head"])
def test_layers_launch_in_one_call_each_followed_by_its_event(twin, checked, kind, gen):
    host = make_host(kind, mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, num_layers=5,
                     gen=gen)
    h_idx, d_idx = paged_indices(host.layout.num_slots, 64, 48, 4, gen)
    dev = make_device_pool(host, slots=64)
    _, layers = _layer_set(host, dev)
    events = (ctypes.c_void_p * 5)(*range(901, 906))
    assert layers(h_idx, d_idx, stream=host_twin.FakeStream(5), events=events) is True
    assert_buffers_equal(dev, reference(host, dev, h_idx, d_idx, None), kind)
    log = twin.log()
    assert [e[:2] for e in log] == [(LAUNCH, 5), (RECORD, 5)] * 5
    assert [e[2] for e in log if e[0] == RECORD] == list(range(901, 906)), "events[i] after layer i"
    assert all(e[2] == 2 for e in log if e[0] == LAUNCH), "each layer's K and V"
    assert checked == []


def test_layers_without_events_and_declined_indices(twin, checked, gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    _, layers = _layer_set(host, dev)
    assert layers(torch.arange(4), torch.arange(4)) is True
    assert [e[0] for e in twin.log()] == [LAUNCH] * 3
    assert layers(torch.arange(4, dtype=torch.int32), torch.arange(4)) is False
    assert layers(torch.arange(4), torch.arange(4), check=True) is False
    with pytest.raises(ValueError, match=r"^events: expected 3 events, one per layer, got 2$"):
        layers(torch.arange(4), torch.arange(4), events=(ctypes.c_void_p * 2)(1, 2))
    assert twin.log() == [] and checked == []


def test_a_bad_description_launches_no_layer(twin, gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen)
    dev = make_device_pool(host, slots=32)
    before = like(dev)
    _, layers = _layer_set(host, dev)
    layers.launcher._descs[2].max_blocks = 0
    with pytest.raises(RuntimeError, match=r"^backend 'cuda': page_first->layer_first L0 and the 2 "
                                           r"layers after it \(descs\[i\]: the i-th\): descs\[2\]: "
                                           r"max_blocks: expected >= 1$"):
        layers(torch.arange(4), torch.arange(4), events=(ctypes.c_void_p * 3)(1, 2, 3))
    assert twin.log() == [], "checked before the first launch"
    assert_buffers_equal(dev, before, "nothing written")
    layers.launcher._descs[2].max_blocks = 1
    with pytest.raises(RuntimeError, match=r"\): events\[1\]: expected an event, got NULL$"):
        layers(torch.arange(4), torch.arange(4), events=(ctypes.c_void_p * 3)(1, None, 3))
    assert twin.log() == []


# -- the SGLang drop-in -------------------------------------------------------------------------

def _sglang_pools(gen):
    L, H, D, P = 3, 2, 8, 4
    dev_k = [random_bytes_(torch.empty(32, H, D, dtype=torch.bfloat16), gen) for _ in range(L)]
    dev_v = [random_bytes_(torch.empty(32, H, D, dtype=torch.bfloat16), gen) for _ in range(L)]
    host = [poison_(torch.empty(64, L, H, D, dtype=torch.bfloat16)) for _ in range(2)]
    return dev_k, dev_v, host, H * D * 2, L


@pytest.fixture
def drop_in(monkeypatch):
    kvio.clear_plan_cache()
    yield monkeypatch
    kvio.clear_plan_cache()


def test_the_drop_in_goes_straight_to_the_library(twin, checked, drop_in, gen):
    dev_k, dev_v, host, item, L = _sglang_pools(gen)
    want = [t.clone() for t in host]
    d_idx, h_idx = torch.tensor([3, 4, 5, -1, 9]), torch.tensor([40, 41, 42, 43, -1])
    k_ptrs = torch.tensor([t.data_ptr() for t in dev_k], dtype=torch.uint64)
    v_ptrs = torch.tensor([t.data_ptr() for t in dev_v], dtype=torch.uint64)
    drop_in.setenv("HICACHE_BACKEND", "reference")
    kvio.transfer_kv_all_layer_lf_pf(k_ptrs, want[0], v_ptrs, want[1], d_idx, h_idx, item,
                                     item * L, L)
    kvio.clear_plan_cache()
    drop_in.setenv("HICACHE_BACKEND", "cuda")
    for _ in range(2):
        kvio.transfer_kv_all_layer_lf_pf(k_ptrs, host[0], v_ptrs, host[1], d_idx, h_idx, item,
                                         item * L, L)
    for got, expected in zip(host, want):
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    # and back, one layer per call
    back = [poison_(torch.empty_like(t)) for t in dev_k + dev_v]
    for layer in range(L):
        kvio.transfer_kv_per_layer_pf_lf(host[0], back[layer], host[1], back[L + layer], h_idx,
                                         d_idx, layer, item, item * L)
    for got, expected in zip(back, dev_k + dev_v):
        rows = d_idx[d_idx >= 0][:-1]    # (the last item's host side is padding)
        assert torch.equal(got[rows].view(torch.uint8), expected[rows].view(torch.uint8))
    assert checked == [] and len([e for e in twin.log() if e[0] == LAUNCH]) == 2 + L


def test_the_drop_in_checks_launch_options_before_its_prepared_launch(twin, drop_in, gen):
    dev_k, dev_v, host, item, L = _sglang_pools(gen)
    drop_in.setenv("HICACHE_BACKEND", "cuda")
    call = (host[0], dev_k[0], host[1], dev_v[0], torch.arange(2), torch.arange(2), 0, item, item * L)
    kvio.transfer_kv_per_layer_pf_lf(*call, block_quota=1, num_warps_per_block=4)
    before = dev_k[0].clone()
    with pytest.raises(ValueError, match=r"^sm_budget: expected a positive int or None, got True$"):
        kvio.transfer_kv_per_layer_pf_lf(*call, block_quota=True, num_warps_per_block=4)
    with pytest.raises(ValueError, match=r"^num_warps: expected one of 1, 2, 4, 8, 16, 32 or None, "
                                         r"got 3$"):
        kvio.transfer_kv_per_layer_pf_lf(*call, block_quota=1, num_warps_per_block=3)
    assert torch.equal(dev_k[0].view(torch.uint8), before.view(torch.uint8))
    assert len(twin.log()) == 1


# -- the manager ----------------------------------------------------------------------------------

def _manager(device, kind="layer_first", page_size=4):
    """A manager of SGLang-style per-layer device tensors ``[slots, heads, head_dim]``."""
    k = [torch.zeros(16 * page_size, 2, 8, dtype=torch.bfloat16) for _ in range(4)]
    pool = KVBuffer.from_layers(k, [torch.zeros_like(t) for t in k], page_size=page_size)
    return HiCacheManager(pool, device=device, backend="cuda", host_layout=kind, host_reserve_gb=0,
                          hicache_ratio=2.0)


def _round_trip(mgr, gen, ids):
    """Fill pages on the device, back them up, evict them, load them back: the bytes
    that come back are the ones that left."""
    slots = mgr.alloc_device(ids)
    for t in mgr.device_pool.tensors():
        random_bytes_(t, gen)
    sent = [t[slots].clone() for t in mgr.device_pool.tensors()]
    mgr.backup(ids)
    mgr.synchronize()
    mgr.poll()
    mgr.evict_device(ids)
    for t in mgr.device_pool.tensors():
        poison_(t)
    handle = mgr.load(ids)
    for layer in range(mgr.num_layers):
        handle.wait(layer)
    mgr.synchronize()
    back = [t[handle.device_indices].clone() for t in mgr.device_pool.tensors()]
    for a, b in zip(back, sent):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return handle


@pytest.mark.parametrize("kind", ["layer_first", "page_first", "page_head"])
def test_the_managers_load_is_one_compiled_call(twin, monkeypatch, kind, gen):
    """CudaDevice's layer-wise launch: every layer's kernel, then its event, in one call."""
    def one_by_one(*args):
        raise AssertionError("the layers should not be launched one by one")
    mgr = _manager(host_twin.TwinDevice(), kind)
    twin.log()
    monkeypatch.setattr(manager_module._LoadLayers, "__call__", one_by_one)
    ids = [("p", i) for i in range(5)]
    handle = _round_trip(mgr, gen, ids)
    log = twin.log()
    load = log[log.index(next(e for e in log if e[0] == RECORD)) - 1:]
    assert [e[0] for e in load] == [LAUNCH, RECORD] * mgr.num_layers
    assert [e[2] for e in load if e[0] == RECORD] == [ev.cuda_event for ev in handle._events]
    mgr.close()


def test_the_emulated_device_runs_the_same_launches_layer_by_layer(twin, gen):
    mgr = _manager(EmulatedDevice(defer=True), "page_first")
    ids = [("p", i) for i in range(6)]
    _round_trip(mgr, gen, ids)
    assert mgr._load_transfers[0].launcher() is not None
    mgr.close()


# -- on a GPU -------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("kind, mla, dtype, page_size, head_dim", CASES)
def test_gpu_prepared_calls_match_the_reference(checked, kind, mla, dtype, page_size, head_dim, gen):
    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size, head_dim=head_dim, gen=gen,
                     pin=True)
    h_idx, d_idx = paged_indices(host.layout.num_slots, 64, 40, page_size, gen)
    dev = make_device_pool(host, slots=64, device="cuda")
    want = make_device_pool(host, slots=64)
    Transfer(host, want, layers=None, backend="reference")(h_idx, d_idx)
    stream = torch.cuda.Stream()
    t = Transfer(host, dev, layers=None, backend="cuda")
    t(h_idx.cuda(), d_idx.cuda(), stream=stream)         # dropped at once: record_stream keeps them
    stream.synchronize()
    assert_buffers_equal(dev, want, f"{kind} load")
    back = KVBuffer.allocate(host.layout, pin_memory=True)
    for x in back.tensors():
        poison_(x)
    want_back = like(host)
    Transfer(want, want_back, backend="reference")(d_idx, h_idx)
    Transfer(dev, back, backend="cuda")(d_idx.cuda(), h_idx.cuda())
    torch.cuda.synchronize()
    assert_buffers_equal(back, want_back, f"{kind} backup")
    assert checked == [], "device indices went straight to the library"


@gpu
def test_gpu_a_prepared_call_replays_from_a_captured_graph(gen):
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=16, head_dim=128,
                     gen=gen, pin=True, slots=512)
    dev = make_device_pool(host, slots=256, device="cuda")
    t = Transfer(host, dev, layers=1, backend="cuda")
    h_idx = torch.zeros(64, dtype=torch.int64, device="cuda")
    d_idx = torch.zeros(64, dtype=torch.int64, device="cuda")
    t(h_idx, d_idx)                                   # prepared before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t(h_idx, d_idx)
    for _ in range(2):
        hs, ds = paged_indices(512, 256, 64, 16, gen)
        h_idx.copy_(hs)
        d_idx.copy_(ds)
        for x in dev.tensors():
            poison_(x)
        want = make_device_pool(host, slots=256)
        Transfer(host, want, layers=1, backend="reference")(hs, ds)
        graph.replay()
        torch.cuda.synchronize()
        assert_buffers_equal(dev, want, "replay")


@gpu
def test_gpu_layers_record_their_events(gen):
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=128,
                     num_layers=6, gen=gen, pin=True, slots=4096)
    dev = make_device_pool(host, slots=4096, device="cuda")
    transfers = [Transfer(host, dev, layers=i, backend="cuda") for i in range(6)]
    layers = ops.prepare_layers(transfers)
    assert layers is not None
    events = [torch.cuda.Event() for _ in range(6)]
    stream = torch.cuda.Stream()
    for e in events:
        e.record(stream)
    handles = (ctypes.c_void_p * 6)(*[e.cuda_event for e in events])
    h_idx, d_idx = paged_indices(4096, 4096, 4000, 1, gen)
    torch.cuda.synchronize()
    # the indices are dropped at once: recorded on the stream, they outlive the launch
    assert layers(h_idx.cuda(), d_idx.cuda(), stream=stream, events=handles)
    stream.synchronize()
    assert all(e.query() for e in events)
    want = make_device_pool(host, slots=4096)
    Transfer(host, want, backend="reference")(h_idx, d_idx)
    assert_buffers_equal(dev, want, "every layer")


@gpu
def test_gpu_the_managers_load_is_one_compiled_call(monkeypatch, gen):
    def one_by_one(*args):
        raise AssertionError("the layers should not be launched one by one")
    lay = KVLayout("layer_first", num_layers=4, num_slots=64 * 16, head_num=2, head_dim=64,
                   dtype=torch.bfloat16, page_size=16)
    k = [torch.zeros(lay.num_slots, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    pool = KVBuffer.from_layers(k, [torch.zeros_like(t) for t in k], page_size=16)
    mgr = HiCacheManager(pool, host_reserve_gb=0, host_layout="page_first")
    monkeypatch.setattr(manager_module._LoadLayers, "__call__", one_by_one)
    ids = [("p", i) for i in range(7)]
    _round_trip(mgr, gen, ids)
    mgr.close()
