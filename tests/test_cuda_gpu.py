"""The CUDA backends on a GPU: every operation against the reference by raw
bytes (destinations poisoned first), on a non-default stream and inside
captured CUDA graphs, through the ops API, torch.ops and the SGLang surface.

Run on an H100/H200: ``pytest -m gpu tests/test_cuda_gpu.py``. A backend the
machine should have (the library built, a GPU present) fails here when it is
missing; only cuda_bulk skips, on GPUs older than sm_90.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from conftest import DTYPES, assert_bytes_equal, poison_, random_bytes_
from test_transfer import (KINDS_ATTN, assert_buffers_equal, make_device_pool, make_host,
                           paged_indices)

import hicache_kernels.sglang as kvio
from hicache_kernels import KVBuffer, KVLayout, Transfer, backup_all_layers, load_layer, torch_ops
from hicache_kernels import backends
from hicache_kernels.backends import _native, auto, copy_engine, cuda, thresholds

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "cuda_bulk", "copy_engine"]


def require(name: str) -> None:
    ok, why = backends.get(name).available()
    if not ok and name == "cuda_bulk" and "sm_90" in why:
        pytest.skip(why)
    assert ok, f"{name} should be available on this GPU machine: {why}"


def indices_for(name: str, idx: torch.Tensor) -> torch.Tensor:
    """The copy engines take host indices; kernels take device ones."""
    return idx if name == "copy_engine" else idx.cuda()


def pinned_like(buf: KVBuffer) -> KVBuffer:
    out = KVBuffer.allocate(buf.layout, pin_memory=True)
    for t in out.tensors():
        poison_(t)
    return out


def load_and_backup(name, host, h_idx, d_idx, *, layer=1, stream=None, dev_slots=384, **opts):
    """Load ``layer`` host -> device, then back up every layer device -> host."""
    dev = make_device_pool(host, slots=dev_slots, device="cuda")
    back = pinned_like(host)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        load_layer(host, dev, indices_for(name, h_idx), indices_for(name, d_idx), layer, backend=name,
                   stream=stream, **opts)
        backup_all_layers(dev, back, indices_for(name, d_idx), indices_for(name, h_idx), backend=name,
                          stream=stream, **opts)
    (stream or torch.cuda.current_stream()).synchronize()
    return dev, back


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, mla", KINDS_ATTN, ids=lambda v: getattr(v, "value", "mla" if v else "mha"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("head_dim", [5, 128])
def test_every_layout_on_a_side_stream(backend, kind, mla, dtype, page_size, head_dim, gen):
    require(backend)
    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size, head_dim=head_dim, gen=gen,
                     pin=True, slots=512)
    h_idx, d_idx = paged_indices(512, 384, 300, page_size, gen)
    stream = torch.cuda.Stream()
    want = load_and_backup("reference", host, h_idx, d_idx, stream=stream)
    got = load_and_backup(backend, host, h_idx, d_idx, stream=stream)
    assert_buffers_equal(got[0], want[0], f"{backend} load")
    assert_buffers_equal(got[1], want[1], f"{backend} backup")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_dtype(backend, dtype, gen):
    require(backend)
    host = make_host("page_first", mla=False, dtype=dtype, page_size=16, head_dim=40, gen=gen,
                     pin=True, slots=512)
    h_idx, d_idx = paged_indices(512, 384, 200, 16, gen)
    want = load_and_backup("reference", host, h_idx, d_idx)
    got = load_and_backup(backend, host, h_idx, d_idx)
    assert_buffers_equal(got[0], want[0], "load")
    assert_buffers_equal(got[1], want[1], "backup")


@pytest.mark.parametrize("backend, sm_budget, num_warps", [
    ("cuda", 1, 1), ("cuda", 1, 32), ("cuda", 2, 32), ("cuda", 3, 4), ("cuda", 7, 8), ("cuda", 200, 32),
    ("cuda_bulk", 1, 1), ("cuda_bulk", 2, 2), ("cuda_bulk", 3, 4), ("cuda_bulk", 4, 8)])
def test_any_grid_moves_everything(backend, sm_budget, num_warps, gen):
    require(backend)
    host = make_host("page_first_direct", mla=False, dtype=torch.bfloat16, page_size=64, head_dim=128,
                     gen=gen, pin=True, slots=2048, head_num=8)
    h_idx, d_idx = paged_indices(2048, 1536, 1500, 64, gen)
    want = load_and_backup("reference", host, h_idx, d_idx, dev_slots=1536)
    got = load_and_backup(backend, host, h_idx, d_idx, dev_slots=1536, sm_budget=sm_budget,
                          num_warps=num_warps)
    assert_buffers_equal(got[0], want[0], "load")
    assert_buffers_equal(got[1], want[1], "backup")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_llama_load_geometry(backend, gen):
    """8192 tokens of 2 KiB per layer in random 64-token pages, many tiles per block."""
    if backend != "auto":
        require(backend)
    host = make_host("page_first_direct", mla=False, dtype=torch.bfloat16, page_size=64, head_dim=128,
                     gen=gen, pin=True, slots=16384, head_num=8, num_layers=2)
    h_idx, d_idx = paged_indices(16384, 8192, 8192, 64, gen)
    want = load_and_backup("reference", host, h_idx, d_idx, layer=0, dev_slots=8192)
    got = load_and_backup(backend, host, h_idx, d_idx, layer=0, dev_slots=8192)
    assert_buffers_equal(got[0], want[0], "load")
    assert_buffers_equal(got[1], want[1], "backup")


# -- CUDA graphs ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_graph_replays_the_transfer(backend, gen):
    """Capture a load once, then change the source bytes and the (device)
    indices in place and replay: the replay moves the new bytes."""
    require(backend)
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=64, gen=gen,
                     pin=True, slots=512)
    dev = make_device_pool(host, slots=384, device="cuda")
    h_idx, d_idx = paged_indices(512, 384, 256, 1, gen)
    s, d = indices_for(backend, h_idx).clone(), indices_for(backend, d_idx).clone()
    load = Transfer(host, dev, layers=2, backend=backend)
    load(s, d)  # warm-up: address tables, kernel attributes, helper streams
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        load(s, d)
    for t in host.tensors():
        random_bytes_(t, gen)  # new data after capture
    for t in dev.tensors():
        poison_(t)
    if backend != "copy_engine":  # device indices are graph inputs; the copy engines' are baked in
        h2, d2 = paged_indices(512, 384, 256, 1, gen)
        s.copy_(h2), d.copy_(d2)
        h_idx, d_idx = h2, d2
    graph.replay()
    torch.cuda.synchronize()
    want = make_device_pool(host, slots=384, device="cuda")
    Transfer(host, want, layers=2, backend="reference")(h_idx.cuda(), d_idx.cuda())
    torch.cuda.synchronize()
    assert_buffers_equal(dev, want, f"{backend} replay")


def test_torch_op_inside_a_captured_graph(gen):
    require("cuda")
    host = make_host("page_head", mla=False, dtype=torch.float16, page_size=16, head_dim=64, gen=gen,
                     pin=True, slots=512)
    dev = make_device_pool(host, slots=384, device="cuda")
    h_idx, d_idx = paged_indices(512, 384, 200, 16, gen)
    s, d = h_idx.cuda(), d_idx.cuda()
    torch_ops.transfer(host, dev, s, d, layers=1, backend="cuda")  # warm-up
    torch.cuda.synchronize()
    for t in dev.tensors():
        poison_(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch_ops.transfer(host, dev, s, d, layers=1, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    want = make_device_pool(host, slots=384, device="cuda")
    load_layer(host, want, s, d, 1, backend="reference")
    torch.cuda.synchronize()
    assert_buffers_equal(dev, want, "op replay")


def test_copy_engine_refuses_device_indices_during_capture(gen):
    require("copy_engine")
    host = make_host("layer_first", mla=True, dtype=torch.bfloat16, page_size=1, head_dim=64, gen=gen,
                     pin=True, slots=64)
    dev = make_device_pool(host, slots=64, device="cuda")
    load = Transfer(host, dev, layers=0, backend="copy_engine")
    s = torch.arange(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="during CUDA graph capture pass CPU indices"):
        with torch.cuda.graph(graph):
            load(s, s)


@pytest.mark.parametrize("backend", ["cuda", "cuda_bulk", "triton"])
def test_kernels_refuse_cpu_indices_during_capture(backend, gen):
    """A captured copy of CPU indices would read a staging buffer that is reused
    after capture: refused, naming the argument, before anything is captured."""
    if backend != "triton":
        require(backend)
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=64, gen=gen,
                     pin=True, slots=64)
    dev = make_device_pool(host, slots=64, device="cuda")
    load = Transfer(host, dev, layers=0, backend=backend)
    load(torch.arange(8).cuda(), torch.arange(8).cuda())  # warm: address tables, kernels
    torch.cuda.synchronize()
    for t in dev.tensors():
        poison_(t)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="src_indices: CPU indices cannot be used while a CUDA graph"):
        with torch.cuda.graph(graph):
            load(torch.arange(8), torch.arange(8))
    torch.cuda.synchronize()
    for t in dev.tensors():
        assert bool((t.view(torch.uint8) == 0xA5).all()), "nothing may be written"


def test_a_new_address_table_does_not_wait_for_the_callers_stream():
    """A table cache miss copies from pinned memory on a stream of its own, so a
    busy caller's stream is not waited for, and the table is ready for any stream."""
    from hicache_kernels import plan as plan_module
    bases = [1 << 40, (1 << 40) + 4096, (1 << 40) + 8192 + int(torch.randint(1, 1 << 20, ()).item()) * 16]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)                 # about a second of earlier work
        start = time.perf_counter()
        table = plan_module.address_table(bases, torch.device("cuda", torch.cuda.current_device()))
        took = time.perf_counter() - start
    busy = not stream.query()
    assert table.tolist() == bases
    stream.synchronize()
    assert busy, "the sleep finished before the call returned: the test proves nothing"
    assert took < 0.2, f"the table copy waited {took * 1e3:.0f} ms for the caller's stream"


@pytest.mark.parametrize("smem", [0, 65536, 24 * 1024])
def test_bulk_kernel_under_each_shared_memory_cap(smem, gen, monkeypatch):
    require("cuda_bulk")
    from hicache_kernels.backends import cuda_bulk
    monkeypatch.setattr(cuda_bulk, "SMEM_PER_BLOCK", smem)
    host = make_host("page_first_direct", mla=False, dtype=torch.bfloat16, page_size=64, head_dim=128,
                     gen=gen, pin=True, slots=2048, head_num=8)
    h_idx, d_idx = paged_indices(2048, 1536, 1500, 64, gen)
    want = load_and_backup("reference", host, h_idx, d_idx, dev_slots=1536)
    got = load_and_backup("cuda_bulk", host, h_idx, d_idx, dev_slots=1536)
    assert_buffers_equal(got[0], want[0], "load")
    assert_buffers_equal(got[1], want[1], "backup")


def test_bulk_kernel_refuses_a_cap_too_small_and_writes_nothing(gen, monkeypatch):
    require("cuda_bulk")
    from hicache_kernels.backends import cuda_bulk
    monkeypatch.setattr(cuda_bulk, "SMEM_PER_BLOCK", 1024)
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=64, gen=gen,
                     pin=True, slots=64)
    dev = make_device_pool(host, slots=64, device="cuda")
    for t in dev.tensors():
        poison_(t)
    with pytest.raises(RuntimeError, match="do not fit the 1024 bytes of shared memory a block may have "
                                           r"here \(smem_cap"):
        load_layer(host, dev, torch.arange(8).cuda(), torch.arange(8).cuda(), 0, backend="cuda_bulk")
    torch.cuda.synchronize()
    for t in dev.tensors():
        assert bool((t.view(torch.uint8) == 0xA5).all())


# -- the copy engines' paths ------------------------------------------------------------------

def _ce_case(gen, slots=4096, page=64):
    """Every 64-token page of a host pool, in random order, to random device pages:
    one 128 KiB run per page and plane."""
    host = make_host("page_first_direct", mla=False, dtype=torch.bfloat16, page_size=page, head_dim=128,
                     gen=gen, pin=True, slots=slots, head_num=8, num_layers=2)
    dev = make_device_pool(host, slots=slots, device="cuda")
    offsets = torch.arange(page)
    h_idx = (torch.randperm(slots // page, generator=gen)[:, None] * page + offsets).reshape(-1)
    d_idx = (torch.randperm(slots // page, generator=gen)[:, None] * page + offsets).reshape(-1)
    plan = Transfer(host, dev, layers=0, backend="reference").plan
    want = make_device_pool(host, slots=slots, device="cuda")
    load_layer(host, want, h_idx, d_idx, 0, backend="reference")
    torch.cuda.synchronize()
    return host, dev, plan, h_idx, d_idx, want


@pytest.mark.parametrize("streams, bytes_per_stream, force_per_run, on_default_stream", [
    (1, 1 << 40, False, False),  # one batch on the caller's stream
    (4, 1 << 20, False, False),  # spread over helper streams
    (4, 1 << 20, True, False),   # one cudaMemcpyAsync per run
    (1, 1 << 40, False, True),   # the legacy default stream: forked onto a helper
])
def test_copy_engine_paths(streams, bytes_per_stream, force_per_run, on_default_stream, gen,
                           monkeypatch):
    require("copy_engine")
    host, dev, plan, h_idx, d_idx, want = _ce_case(gen)
    th = thresholds.current().replace(copy_engine_streams=streams, bytes_per_stream=bytes_per_stream,
                                      max_descriptors_per_call=16)
    monkeypatch.setattr(thresholds, "current", lambda device=None: th)
    runs = copy_engine.merge_runs(plan, h_idx, d_idx)
    assert len(runs) == 4096 // 64
    stream = None if on_default_stream else torch.cuda.Stream()
    desc = copy_engine.issue(plan, runs, stream=stream, force_per_run=force_per_run)
    torch.cuda.synchronize()
    assert_buffers_equal(dev, want, "copy engine")
    info, _ = _native.device_info(torch.cuda.current_device())
    assert desc.used_batch == (info.batch_api != 0 and not force_per_run)
    if streams > 1:
        assert desc.used_streams == streams
    elif on_default_stream and info.batch_api:
        assert desc.used_streams == 1
    else:
        assert desc.used_streams == 0


def test_auto_sends_long_host_runs_to_the_copy_engines(gen, tmp_path, monkeypatch):
    require("copy_engine")
    require("cuda")
    monkeypatch.setenv("HICACHE_CACHE_DIR", str(tmp_path))  # the built-in thresholds, not a calibration
    monkeypatch.setattr(thresholds, "_CURRENT", {})
    host, dev, plan, h_idx, d_idx, want = _ce_case(gen)
    chosen, why = backends.choose(plan, "auto")
    assert isinstance(chosen, auto.AutoDispatch), why
    load = Transfer(host, dev, layers=0)
    load(h_idx, d_idx)
    assert load.backend.last_choice == "copy_engine"
    torch.cuda.synchronize()
    assert_buffers_equal(dev, want, "auto, host indices")
    for t in dev.tensors():
        poison_(t)
    load(h_idx.cuda(), d_idx.cuda())
    assert load.backend.last_choice == "cuda"
    torch.cuda.synchronize()
    assert_buffers_equal(dev, want, "auto, device indices")


def test_calibration_runs_and_is_stored(tmp_path, monkeypatch):
    require("copy_engine")
    monkeypatch.setenv("HICACHE_CACHE_DIR", str(tmp_path))
    thresholds._CURRENT.clear()
    try:
        result = thresholds.calibrate(run_sizes=(16 * 1024, 512 * 1024))
        assert (tmp_path / "thresholds.json").is_file()
        assert thresholds.current() == result
        assert result.copy_engine_min_run_bytes in (16 * 1024, 512 * 1024, 1 << 62)
    finally:
        thresholds._CURRENT.clear()


# -- the SGLang surface ------------------------------------------------------------------------

L, N_HOST, N_DEV, H, P, D = 3, 256, 192, 4, 16, 64


def _rnd(shape, dtype, gen, device="cuda", pin=False):
    t = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    return random_bytes_(t, gen)


def _poisoned(shape, dtype, device="cuda", pin=False):
    return poison_(torch.empty(shape, dtype=dtype, device=device, pin_memory=pin))


def _table(tensors, offset=0):
    return torch.tensor([t.data_ptr() + offset for t in tensors], dtype=torch.uint64, device="cuda")


def _idx(n_src, n_dst, n, gen):
    s = torch.randperm(n_src, generator=gen)[:n]
    d = torch.randperm(n_dst, generator=gen)[:n]
    s[3], d[7] = -1, -1
    return s.cuda(), d.cuda()


def _sglang_cases(gen, dtype):
    """name -> (call(args), destination tensors) for every kernel-form function."""
    item = H * D * torch.empty((), dtype=dtype).element_size()
    cases = {}

    def per_layer():
        host = _rnd((2, L, N_HOST, H, D), dtype, gen, "cpu", True)
        dk, dv = _poisoned((N_DEV, H, D), dtype), _poisoned((N_DEV, H, D), dtype)
        s, t = _idx(N_HOST, N_DEV, 100, gen)
        return lambda: kvio.transfer_kv_per_layer(host[0, 1], dk, host[1, 1], dv, s, t, item), [dk, dv]

    def pf_lf():
        host = _rnd((2, N_HOST, L, H, D), dtype, gen, "cpu", True)
        dk, dv = _poisoned((N_DEV, H, D), dtype), _poisoned((N_DEV, H, D), dtype)
        s, t = _idx(N_HOST, N_DEV, 100, gen)
        return (lambda: kvio.transfer_kv_per_layer_pf_lf(host[0], dk, host[1], dv, s, t, 2, item, item * L),
                [dk, dv])

    def ph_lf():
        host = _rnd((2, N_HOST // P, H, P, L, D), dtype, gen, "cpu", True)
        dk, dv = _poisoned((N_DEV, H, D), dtype), _poisoned((N_DEV, H, D), dtype)
        s, t = _idx(N_HOST, N_DEV, 100, gen)
        return (lambda: kvio.transfer_kv_per_layer_ph_lf(host[0], dk, host[1], dv, s, t, 1, item, item * L,
                                                         P, H), [dk, dv])

    def all_layer():
        sk = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        sv = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        host = _poisoned((2, L, N_HOST, H, D), dtype, "cpu", True)
        s, t = _idx(N_DEV, N_HOST, 100, gen)
        return (lambda: kvio.transfer_kv_all_layer(_table(sk), _table(list(host[0])), _table(sv),
                                                   _table(list(host[1])), s, t, item, L), [host])

    def lf_pf():
        sk = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        sv = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        host = _poisoned((2, N_HOST, L, H, D), dtype, "cpu", True)
        s, t = _idx(N_DEV, N_HOST, 100, gen)
        return (lambda: kvio.transfer_kv_all_layer_lf_pf(_table(sk), host[0], _table(sv), host[1], s, t,
                                                         item, item * L, L), [host])

    def lf_ph():
        sk = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        sv = [_rnd((N_DEV, H, D), dtype, gen) for _ in range(L)]
        host = _poisoned((2, N_HOST // P, H, P, L, D), dtype, "cpu", True)
        s, t = _idx(N_DEV, N_HOST, 100, gen)
        return (lambda: kvio.transfer_kv_all_layer_lf_ph(_table(sk), host[0], _table(sv), host[1], s, t,
                                                         item, item * L, L, P, H), [host])

    def mla_pf_lf():
        host = _rnd((N_HOST, L, 1, 72), dtype, gen, "cpu", True)
        dst = _poisoned((N_DEV, 1, 72), dtype)
        s, t = _idx(N_HOST, N_DEV, 100, gen)
        mla_item = 72 * torch.empty((), dtype=dtype).element_size()
        return (lambda: kvio.transfer_kv_per_layer_mla_pf_lf(host, dst, s, t, 1, mla_item, mla_item * L),
                [dst])

    for fn in (per_layer, pf_lf, ph_lf, all_layer, lf_pf, lf_ph, mla_pf_lf):
        cases[fn.__name__] = fn
    return cases


SGLANG_CASES = ["per_layer", "pf_lf", "ph_lf", "all_layer", "lf_pf", "lf_ph", "mla_pf_lf"]


@pytest.mark.parametrize("case", SGLANG_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "cuda_bulk"])
def test_sglang_kernel_functions(backend, case, dtype, monkeypatch):
    require(backend)
    results = []
    for name in ("reference", backend):
        monkeypatch.setenv("HICACHE_BACKEND", name)
        call, outputs = _sglang_cases(torch.Generator().manual_seed(7), dtype)[case]()
        call()
        torch.cuda.synchronize()
        results.append(outputs)
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        assert_bytes_equal(got, want, f"{case} output {i}")


@pytest.mark.parametrize("src_offset, dst_offset", [(8, 4), (2, 0), (1, 3), (0, 0)])
def test_address_tables_with_misaligned_bases(src_offset, dst_offset, monkeypatch):
    """Address tables are read on the GPU, so the kernel checks each access's
    alignment and splits it where a base is less aligned than the strides."""
    require("cuda")
    monkeypatch.setenv("HICACHE_BACKEND", "cuda")
    gen = torch.Generator().manual_seed(5)
    item = 2 * D  # bytes, a multiple of 16: only the bases are misaligned
    raw = [_rnd((N_DEV * item + 64,), torch.uint8, gen) for _ in range(L)]
    host = _poisoned((L, (N_HOST + 1) * item), torch.uint8, "cpu", True)
    s, t = _idx(N_DEV, N_HOST, 100, gen)
    src = _table(raw, offset=src_offset)
    dst = torch.tensor([host[l].data_ptr() + dst_offset for l in range(L)], dtype=torch.uint64,
                       device="cuda")
    kvio.transfer_kv_all_layer_mla(src, dst, s, t, item, L)
    torch.cuda.synchronize()
    want = _poisoned(host.shape, torch.uint8, "cpu")
    for l in range(L):
        data = raw[l].cpu()
        for a, b in zip(s.tolist(), t.tolist()):
            if a >= 0 and b >= 0:
                at, frm = dst_offset + b * item, src_offset + a * item
                want[l, at:at + item] = data[frm:frm + item]
    assert_bytes_equal(host, want, f"offsets {src_offset}/{dst_offset}")


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_sglang_direct_functions_use_the_copy_engines(mla, monkeypatch):
    require("copy_engine")
    outputs = {}
    for name in ("reference", "auto"):  # auto: the direct functions pick the copy engines
        monkeypatch.setenv("HICACHE_BACKEND", name)
        gen = torch.Generator().manual_seed(3)
        planes = 1 if mla else 2
        pools = [_rnd((N_HOST // P, L, P, H, D), torch.bfloat16, gen, "cpu", True) for _ in range(planes)]
        dst = [_poisoned((N_DEV, H, D), torch.bfloat16) for _ in range(planes * 2)]
        sp = torch.randperm(N_HOST // P, generator=gen)[:6]
        dp = torch.randperm(N_DEV // P, generator=gen)[:6]
        s = (sp[:, None] * P + torch.arange(P)).reshape(-1)
        t = (dp[:, None] * P + torch.arange(P)).reshape(-1)
        kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 1, P)
        back = [_poisoned(p.shape, torch.bfloat16, "cpu", True) for p in pools]
        src_layers = [_rnd((N_DEV, H, D), torch.bfloat16, gen) for _ in range(planes * L)]
        kvio.transfer_kv_all_layer_direct_lf_pf(src_layers, back, t, s, P)
        lf_src = [_rnd((N_HOST, H, D), torch.bfloat16, gen, "cpu", True) for _ in range(2)]
        lf_dst = [_poisoned((N_DEV, H, D), torch.bfloat16) for _ in range(2)]
        kvio.transfer_kv_direct(lf_src, lf_dst, s, t, P)
        torch.cuda.synchronize()
        outputs[name] = dst + back + lf_dst
    for i, (got, want) in enumerate(zip(outputs["auto"], outputs["reference"])):
        assert_bytes_equal(got, want, f"direct output {i}")


# -- errors ---------------------------------------------------------------------------------

def test_unpinned_host_is_refused():
    require("cuda")
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=8)
    dev = make_device_pool(host, device="cuda")
    for name in [n for n in BACKENDS if backends.get(n).available()[0]]:
        with pytest.raises(ValueError, match="src: expected pinned host memory"):
            Transfer(host, dev, layers=0, backend=name)


def test_library_errors_become_python_errors(gen):
    require("cuda_bulk")
    host = make_host("page_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=64, gen=gen,
                     pin=True, slots=64)
    dev = make_device_pool(host, slots=64, device="cuda")
    plan = Transfer(host, dev, layers=0, backend="reference").plan
    s = torch.arange(16, device="cuda")
    with pytest.raises(RuntimeError, match="stage_bytes: expected a positive multiple of 16"):
        cuda.launch(plan, s, s, kernel=1, sm_budget=2, num_warps=2, stream=None, backend="cuda_bulk",
                    stage_bytes=24)
    with pytest.raises(RuntimeError, match="do not fit"):
        cuda.launch(plan, s, s, kernel=1, sm_budget=2, num_warps=32, stream=None, backend="cuda_bulk",
                    stage_bytes=65536, stages=8)
