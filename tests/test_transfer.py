"""Every operation of the ops API, every layout pair we serve, by raw bytes.

Triton runs on CPU tensors through its interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU). Each case: random source bytes, poisoned
destinations, padding indices on both sides, then

    triton == reference == oracle (byte_offset, one head at a time)

for a per-layer load host -> device and an all-layer backup device -> host.
"""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DTYPES, HAS_GPU, assert_bytes_equal, poison_, random_bytes_
from oracle import oracle_copy

from hicache_kernels import KVBuffer, KVLayout, LayoutKind, Transfer, backup_all_layers, load_layer, transfer
from hicache_kernels.plan import indices_to

HOST_SLOTS, DEVICE_SLOTS = 128, 96


def make_host(kind, *, mla, dtype, page_size, head_dim, num_layers=3, head_num=3, gen=None,
              slots=HOST_SLOTS, device="cpu", pin=False):
    lay = KVLayout(kind, num_layers=num_layers, num_slots=slots, head_num=1 if mla else head_num,
                   head_dim=head_dim, dtype=dtype, page_size=page_size, mla=mla)
    buf = KVBuffer.allocate(lay, device=device, pin_memory=pin)
    for t in buf.tensors():
        random_bytes_(t, gen)
    return buf


def make_device_pool(host: KVBuffer, *, slots=DEVICE_SLOTS, device="cpu", fill="poison", gen=None):
    lay = host.layout
    shape = (slots, lay.head_num, lay.head_dim)
    k = [torch.empty(shape, dtype=lay.dtype, device=device) for _ in range(lay.num_layers)]
    v = None if lay.mla else [torch.empty(shape, dtype=lay.dtype, device=device)
                              for _ in range(lay.num_layers)]
    buf = KVBuffer.from_layers(k, v, page_size=lay.page_size)
    for t in buf.tensors():
        poison_(t) if fill == "poison" else random_bytes_(t, gen)
    return buf


def like(buf: KVBuffer) -> KVBuffer:
    """A poisoned buffer of the same layout and form."""
    if buf.per_layer:
        return make_device_pool(buf, slots=buf.layout.num_slots, device=buf.device)
    out = KVBuffer.allocate(buf.layout, device=buf.device)
    for t in out.tensors():
        poison_(t)
    return out


def paged_indices(n_src_slots, n_dst_slots, n, page_size, gen):
    """Random pages on each side, as SGLang hands them out: whole pages, in random
    order; then a few padding entries (-1) on either side."""
    pages = min(n_src_slots, n_dst_slots) // page_size
    sp = torch.randperm(n_src_slots // page_size, generator=gen)[:pages]
    dp = torch.randperm(n_dst_slots // page_size, generator=gen)[:pages]
    offs = torch.arange(page_size)
    src = (sp[:, None] * page_size + offs).reshape(-1)[:n]
    dst = (dp[:, None] * page_size + offs).reshape(-1)[:n]
    if len(src) > 4:
        src[1] = -1
        dst[len(dst) // 2] = -1
    return src.clone(), dst.clone()


def assert_buffers_equal(a: KVBuffer, b: KVBuffer, what: str):
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert_bytes_equal(x, y, f"{what} tensor {i}")


def run_all_ways(host, n_items, layer, gen, backends=("triton",)):
    """Load one layer, back up all layers; compare each backend with the reference
    and the reference with the oracle."""
    lay = host.layout
    h_idx, d_idx = paged_indices(lay.num_slots, DEVICE_SLOTS, n_items, lay.page_size, gen)
    results = {}
    for backend in ("reference", *backends):
        dev = make_device_pool(host)
        load_layer(host, dev, h_idx, d_idx, layer, backend=backend)
        back = like(host)
        backup_all_layers(dev, back, d_idx, h_idx, backend=backend)
        results[backend] = (dev, back)
    dev_o = make_device_pool(host)
    oracle_copy(host, dev_o, h_idx, d_idx, range(layer, layer + 1))
    back_o = like(host)
    oracle_copy(dev_o, back_o, d_idx, h_idx, range(lay.num_layers))
    assert_buffers_equal(results["reference"][0], dev_o, "reference load vs oracle")
    assert_buffers_equal(results["reference"][1], back_o, "reference backup vs oracle")
    for backend in backends:
        assert_buffers_equal(results[backend][0], dev_o, f"{backend} load")
        assert_buffers_equal(results[backend][1], back_o, f"{backend} backup")
    # the load really wrote something and left the rest poisoned
    written = results["reference"][0].k[layer].view(torch.uint8)
    assert (written != 0xA5).any() and (results["reference"][0].k[(layer + 1) % lay.num_layers]
                                        .view(torch.uint8) == 0xA5).all()


KINDS_ATTN = [(k, False) for k in LayoutKind] + [(k, True) for k in LayoutKind
                                                  if k is not LayoutKind.PAGE_HEAD]
PAGE_SIZES = [1, 16, 64]
HEAD_DIMS = [5, 64]  # 5: items aligned to nothing wider than an element


@pytest.mark.parametrize("kind, mla", KINDS_ATTN, ids=lambda v: getattr(v, "value", "mla" if v else "mha"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_load_and_backup_every_layout(kind, mla, dtype, page_size, head_dim, gen):
    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size, head_dim=head_dim, gen=gen)
    run_all_ways(host, n_items=70, layer=1, gen=gen)


@pytest.mark.parametrize("kind", list(LayoutKind))
@pytest.mark.parametrize("direction", ["host_to_host", "device_to_device"])
def test_same_layout_copies(kind, direction, gen):
    """Same-layout per-layer and all-layer copies, both ways."""
    host = make_host(kind, mla=False, dtype=torch.bfloat16, page_size=16, head_dim=24, gen=gen)
    src = host if direction == "host_to_host" else make_device_pool(host, fill="random", gen=gen)
    n_slots = src.layout.num_slots
    s_idx, d_idx = paged_indices(n_slots, n_slots, 50, 16, gen)
    for layers in (2, None):
        out = {}
        for backend in ("reference", "triton"):
            dst = like(src)
            transfer(src, dst, s_idx, d_idx, layers=layers, backend=backend)
            back = like(src)
            transfer(dst, back, d_idx, s_idx, layers=layers, backend=backend)
            out[backend] = (dst, back)
        want = like(src)
        oracle_copy(src, want, s_idx, d_idx, range(3) if layers is None else range(2, 3))
        for backend, (dst, back) in out.items():
            assert_buffers_equal(dst, want, f"{backend} {kind.value} layers={layers}")


def test_page_head_to_page_first_all_layers(gen):
    """Any pair of layouts works, not only host<->device pairs."""
    src = make_host("page_head", mla=False, dtype=torch.float8_e5m2, page_size=8, head_dim=16,
                    gen=gen, head_num=4)
    dst_lay = src.layout.with_(kind="page_first", num_slots=64)
    s_idx, d_idx = paged_indices(HOST_SLOTS, 64, 40, 8, gen)
    out = []
    for backend in ("reference", "triton"):
        dst = KVBuffer.allocate(dst_lay)
        [poison_(t) for t in dst.tensors()]
        transfer(src, dst, s_idx, d_idx, backend=backend)
        out.append(dst)
    want = KVBuffer.allocate(dst_lay)
    [poison_(t) for t in want.tensors()]
    oracle_copy(src, want, s_idx, d_idx, range(3))
    assert_buffers_equal(out[0], want, "reference")
    assert_buffers_equal(out[1], want, "triton")


def test_prepared_transfer_is_reusable(gen):
    host = make_host("page_first", mla=False, dtype=torch.float16, page_size=16, head_dim=32, gen=gen)
    dev = make_device_pool(host)
    load = Transfer(host, dev, layers=0, backend="triton")
    want = make_device_pool(host)
    for _ in range(3):
        h_idx, d_idx = paged_indices(HOST_SLOTS, DEVICE_SLOTS, 40, 16, gen)
        load(h_idx, d_idx)
        oracle_copy(host, want, h_idx, d_idx, range(1))
    assert_buffers_equal(dev, want, "three loads")
    assert load.bytes_per_item == 2 * host.layout.item_bytes


def test_empty_and_all_padding_write_nothing(gen):
    host = make_host("page_head", mla=False, dtype=torch.bfloat16, page_size=16, head_dim=8, gen=gen)
    for backend in ("reference", "triton"):
        dev = make_device_pool(host)
        empty = torch.empty(0, dtype=torch.int64)
        load_layer(host, dev, empty, empty, 0, backend=backend)
        pad = torch.full((20,), -1, dtype=torch.int64)
        load_layer(host, dev, pad, torch.arange(20), 0, backend=backend)
        load_layer(host, dev, torch.arange(20), pad, 0, backend=backend)
        for t in dev.tensors():
            assert (t.view(torch.uint8) == 0xA5).all(), backend


@pytest.mark.parametrize("sm_budget", [1, 3, 7])
def test_any_sm_budget_moves_everything(sm_budget, gen):
    """The persistent loop must cover every tile whatever the grid."""
    host = make_host("layer_first", mla=False, dtype=torch.int8, page_size=1, head_dim=40,
                     gen=gen, head_num=8)
    dev = make_device_pool(host)
    want = make_device_pool(host)
    h_idx, d_idx = paged_indices(HOST_SLOTS, DEVICE_SLOTS, 90, 1, gen)
    transfer(host, dev, h_idx, d_idx, backend="triton", sm_budget=sm_budget, num_warps=4)
    oracle_copy(host, want, h_idx, d_idx, range(3))
    assert_buffers_equal(dev, want, f"sm_budget={sm_budget}")


@st.composite
def transfer_cases(draw):
    kind_src = draw(st.sampled_from(list(LayoutKind)))
    kind_dst = draw(st.sampled_from(list(LayoutKind)))
    mla = draw(st.booleans()) and LayoutKind.PAGE_HEAD not in (kind_src, kind_dst)
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    geometry = dict(
        num_layers=draw(st.integers(1, 4)),
        head_num=1 if mla else draw(st.integers(1, 4)),
        head_dim=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from(DTYPES)),
        mla=mla,
    )
    src_slots = page_size * draw(st.integers(1, 6))
    dst_slots = page_size * draw(st.integers(1, 6))
    n = draw(st.integers(0, min(src_slots, dst_slots)))
    src_idx = draw(st.permutations(range(src_slots)))[:n]
    dst_idx = draw(st.permutations(range(dst_slots)))[:n]
    pad = draw(st.lists(st.integers(0, max(0, n - 1)), max_size=3)) if n else []
    src_idx = [(-1 if i in pad[:1] else s) for i, s in enumerate(src_idx)]
    dst_idx = [(-7 if i in pad[1:] else d) for i, d in enumerate(dst_idx)]
    first = draw(st.integers(0, geometry["num_layers"] - 1))
    last = draw(st.integers(first, geometry["num_layers"] - 1))
    return (KVLayout(kind_src, num_slots=src_slots, page_size=page_size, **geometry),
            KVLayout(kind_dst, num_slots=dst_slots, page_size=page_size, **geometry),
            torch.tensor(src_idx, dtype=torch.int64), torch.tensor(dst_idx, dtype=torch.int64),
            range(first, last + 1), draw(st.integers(1, 5)))


@given(case=transfer_cases())
def test_random_transfers_match_the_oracle(case):
    src_lay, dst_lay, s_idx, d_idx, layers, sm_budget = case
    gen = torch.Generator().manual_seed(len(s_idx))
    src = KVBuffer.allocate(src_lay)
    for t in src.tensors():
        random_bytes_(t, gen)
    want = like(KVBuffer.allocate(dst_lay))
    oracle_copy(src, want, s_idx, d_idx, layers)
    for backend in ("reference", "triton"):
        got = like(want)
        transfer(src, got, s_idx, d_idx, layers=layers, backend=backend, sm_budget=sm_budget)
        assert_buffers_equal(got, want, backend)


# -- on a GPU: pinned host memory read and written directly by the kernels --------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind, mla", KINDS_ATTN, ids=lambda v: getattr(v, "value", "mla" if v else "mha"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("head_dim", [5, 128])
def test_gpu_load_and_backup_on_a_side_stream(kind, mla, dtype, page_size, head_dim, gen):
    host = make_host(kind, mla=mla, dtype=dtype, page_size=page_size, head_dim=head_dim, gen=gen,
                     pin=True, slots=512)
    h_idx, d_idx = paged_indices(512, 384, 300, page_size, gen)
    stream = torch.cuda.Stream()
    results = {}
    for backend in ("reference", "triton"):
        dev = make_device_pool(host, slots=384, device="cuda")
        back = KVBuffer.allocate(host.layout, pin_memory=True)
        [poison_(t) for t in back.tensors()]
        with torch.cuda.stream(stream):
            load_layer(host, dev, h_idx.cuda(), d_idx.cuda(), 1, backend=backend, stream=stream)
            backup_all_layers(dev, back, d_idx.cuda(), h_idx.cuda(), backend=backend, stream=stream)
        stream.synchronize()
        results[backend] = (dev, back)
    assert_buffers_equal(results["triton"][0], results["reference"][0], "load")
    assert_buffers_equal(results["triton"][1], results["reference"][1], "backup")


@pytest.mark.gpu
def test_gpu_unpinned_host_is_refused():
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=1, head_dim=8)
    dev = make_device_pool(host, device="cuda")
    with pytest.raises(ValueError, match="src: expected pinned host memory"):
        Transfer(host, dev, layers=0, backend="triton")


@pytest.mark.gpu
def test_gpu_host_indices_do_not_block_on_a_busy_stream(gen):
    """Indices given on the host are copied from pinned memory, so the call returns
    while its stream is still busy (from pageable memory CUDA waits for the stream)."""
    host = make_host("layer_first", mla=False, dtype=torch.bfloat16, page_size=16, head_dim=128,
                     gen=gen, pin=True, slots=512)
    dev = make_device_pool(host, slots=384, device="cuda")
    h_idx, d_idx = paged_indices(512, 384, 300, 16, gen)
    load = Transfer(host, dev, layers=1, backend="triton")
    stream = torch.cuda.Stream()
    load(h_idx, d_idx, stream=stream)      # warm: compile, address tables, pinned staging
    stream.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)                 # about a second of earlier work
    start = time.perf_counter()
    load(h_idx, d_idx, stream=stream)
    took = time.perf_counter() - start
    busy = not stream.query()
    stream.synchronize()
    assert busy, "the sleep finished before the call returned: the test proves nothing"
    assert took < 0.1, f"the call blocked for {took * 1e3:.0f} ms on the busy stream"


def test_indices_to_keeps_tensors_already_in_place():
    idx = torch.arange(5)
    assert indices_to(idx, torch.device("cpu")) is idx


def test_gpu_tests_exist_and_are_skipped_without_gpu(request):
    """Guard: the GPU tests above are collected (and skipped, not silently absent)."""
    if HAS_GPU:
        pytest.skip("GPU present: the GPU tests run for real")
    names = [i.name for i in request.session.items if "gpu" in i.keywords]
    assert names, "no GPU-marked tests collected"
