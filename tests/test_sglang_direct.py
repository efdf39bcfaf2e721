"""hicache_kernels.sglang's direct forms on the tensors SGLang really passes, and the
two other names it imports from sgl_kernel.kvcacheio.

sgl-kernel copies each run of slots with a slice copy, so its direct functions take
any strides and any row size: SGLang's unified-memory pools pass per-layer views
``e[:, layer, kv]`` of one ``[slots, layers, 2, heads, dim]`` tensor. Each case runs
on the reference backend, on Triton's interpreter and on ``HostCopyEngine`` (the
copy-engine backend's descriptors, real addresses, run with memmove), and the
expected bytes come from plain torch slicing here.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bytes_equal

import hicache_kernels.sglang as kvio
from hicache_kernels import backends
from test_sglang import page_indices, poisoned, rnd
from test_sglang_lifetime import HostCopyEngine

N, L, P = 32, 3, 4
# one slot's row is 588 bytes (147 for fp8): not a multiple of 8, as in the field
ROWS = {torch.bfloat16: (1, 294), torch.float8_e4m3fn: (1, 147), torch.float32: (3, 49)}


@pytest.fixture(params=["reference", "triton", "host_copy_engine"])
def backend(request, monkeypatch):
    kvio.clear_plan_cache()
    if request.param == "host_copy_engine":
        engine = HostCopyEngine()
        monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
        monkeypatch.setenv("HICACHE_BACKEND", "auto")
    else:
        monkeypatch.setenv("HICACHE_BACKEND", request.param)
    yield request.param
    kvio.clear_plan_cache()


@pytest.fixture(params=list(ROWS), ids=str)
def dtype(request):
    return request.param


def unified(dtype, gen=None):
    """SGLang's unified-memory pool: ``[slots, layers, 2, heads, dim]``, one tensor
    (random bytes, or poisoned without ``gen``)."""
    shape = (N, L, 2, *ROWS[dtype])
    return poisoned(shape, dtype) if gen is None else rnd(shape, dtype, gen)


def one_plan(expected: bool) -> None:
    """Whether the call was one plan (rows contiguous and evenly spaced) or torch copies."""
    (entry,) = kvio._PLANS.values()
    assert (entry.plan is not None) == expected


def views(pool):
    """Its per-layer views, K layers then V layers: strided rows, each row contiguous."""
    return [pool[:, l, kv] for kv in range(2) for l in range(L)]


def padded_pages(gen, pages=3):
    s, t = page_indices(N, N, pages, gen)
    s[P:2 * P] = -1        # the second page is padding on the source side
    return s, t


def copied(src, dst_before, s, t):
    """``dst_before`` with ``src`` rows ``s`` written to rows ``t`` (padding skipped)."""
    out = dst_before.clone()
    keep = (s >= 0) & (t >= 0)
    out[t[keep]] = src[s[keep]]
    return out


# -- transfer_kv_direct -----------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["load", "backup"])
def test_unified_memory_views(backend, dtype, gen, direction):
    """The strided per-layer views of one unified pool, both ways."""
    pool = unified(dtype, gen) if direction == "backup" else unified(dtype)
    flat = [rnd((N, *ROWS[dtype]), dtype, gen) if direction == "load"
            else poisoned((N, *ROWS[dtype]), dtype) for _ in range(2 * L)]
    src, dst = (flat, views(pool)) if direction == "load" else (views(pool), flat)
    before = [d.clone() for d in dst]
    s, t = padded_pages(gen)
    kvio.transfer_kv_direct(src, dst, s, t, P)
    for j in range(2 * L):
        assert_bytes_equal(dst[j], copied(src[j], before[j], s, t), f"tensor {j}")
    one_plan(True)


def test_rows_that_are_not_contiguous_take_slice_copies(backend, dtype, gen):
    """``[slots, heads, layers, dim]`` views: a row's heads are apart (torch copies)."""
    heads, dim = 2, ROWS[dtype][1]
    pool = rnd((N, heads, L, dim), dtype, gen)
    src = [pool[:, :, l] for l in range(L)]
    dst = [poisoned((N, heads, dim), dtype) for _ in range(L)]
    s, t = padded_pages(gen)
    kvio.transfer_kv_direct(src, dst, s, t, P)
    for j in range(L):
        assert_bytes_equal(dst[j], copied(src[j], poisoned(dst[j].shape, dtype), s, t), f"{j}")
    one_plan(False)


def test_mixed_strides_and_row_sizes_in_one_list(backend, gen):
    """K and V of other widths, one strided and one not, in one call."""
    k_pool = rnd((N, 2, 4, 8), torch.bfloat16, gen)
    src = [k_pool[:, 1], rnd((N, 24), torch.bfloat16, gen)]
    dst = [poisoned((N, 4, 8), torch.bfloat16), poisoned((N, 24), torch.bfloat16)]
    s, t = padded_pages(gen)
    kvio.transfer_kv_direct(src, dst, s, t, P)
    for j in range(2):
        assert_bytes_equal(dst[j], copied(src[j], poisoned(dst[j].shape, torch.bfloat16), s, t))
    one_plan(False)


@pytest.mark.parametrize("case, error, match", [
    ("dtype", ValueError, r"dst_layers\[1\]: expected rows \[2, 8\] of torch.bfloat16"),
    ("row", ValueError, r"dst_layers\[0\]: expected rows of 32 bytes like src_layers\[0\]"),
    ("oob", IndexError, r"dst_indices: largest index 35 is out of range for dst_layers\[0\]"),
])
def test_bad_strided_input_writes_nothing(backend, gen, case, error, match):
    pool = rnd((N, 2, L, 8), torch.bfloat16, gen)
    src = [pool[:, :, 0], pool[:, :, 1]]
    dst = [poisoned((N, 2, 8), torch.bfloat16), poisoned((N, 2, 8), torch.bfloat16)]
    s, t = page_indices(N, N, 2, gen)
    if case == "dtype":
        dst[1] = poisoned((N, 2, 8), torch.float16)
    elif case == "row":
        dst[0] = poisoned((N, 2, 9), torch.bfloat16)
    else:
        t[-P:] = torch.arange(N, N + P)
    with pytest.raises(error, match=match):
        kvio.transfer_kv_direct(src, dst, s, t, P)
    for d in dst:
        assert (d.view(torch.uint8) == 0xA5).all()


# -- the page_first_direct forms ------------------------------------------------------------

def direct_pools(dtype, planes, gen=None, contiguous=True):
    """``[pages, layers, page_size, heads, dim]`` pools (random, or poisoned without
    ``gen``); non-contiguous ones are a slice of wider rows."""
    heads, dim = ROWS[dtype]
    shape = (N // P, L, P, heads, dim if contiguous else dim + 3)
    pools = [poisoned(shape, dtype) if gen is None else rnd(shape, dtype, gen)
             for _ in range(planes)]
    return pools if contiguous else [p[..., :dim] for p in pools]


@pytest.mark.parametrize("contiguous", [True, False], ids=["pool", "sliced pool"])
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_load_page_first_direct_into_unified_views(backend, dtype, gen, mla, contiguous):
    planes = 1 if mla else 2
    pools = direct_pools(dtype, planes, gen, contiguous=contiguous)
    dev = unified(dtype)
    layer = 1
    dst = [dev[:, layer, kv] for kv in range(planes)]     # one layer, K then V
    before = [d.clone() for d in dst]
    s, t = padded_pages(gen)
    kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, layer, P)
    for p in range(planes):
        want = before[p].clone()
        for i in range(0, len(s), P):
            if s[i] >= 0:
                want[t[i]:t[i] + P] = pools[p][s[i] // P, layer]
        assert_bytes_equal(dst[p], want, f"plane {p}")
    one_plan(contiguous)


@pytest.mark.parametrize("contiguous", [True, False], ids=["pool", "sliced pool"])
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_backup_unified_views_into_page_first_direct(backend, dtype, gen, mla, contiguous):
    planes = 1 if mla else 2
    dev = unified(dtype, gen)
    src = [dev[:, l, kv] for kv in range(planes) for l in range(L)]
    pools = direct_pools(dtype, planes, contiguous=contiguous)
    before = [p.clone() for p in pools]
    s, t = padded_pages(gen)
    t[2 * P:3 * P] = -1    # and the third on the destination side
    kvio.transfer_kv_all_layer_direct_lf_pf(src, pools, s, t, P)
    for p in range(planes):
        want = before[p].clone()
        for i in range(0, len(s), P):
            if s[i] >= 0 and t[i] >= 0:
                for l in range(L):
                    want[t[i] // P, l] = src[p * L + l][s[i]:s[i] + P]
        assert_bytes_equal(pools[p], want, f"pool {p}")
    one_plan(contiguous)


def test_bad_page_input_writes_nothing(backend, gen):
    pools = direct_pools(torch.bfloat16, 2, gen, contiguous=False)
    dst = [poisoned((N, 1, 294), torch.float16), poisoned((N, 1, 294), torch.float16)]
    s, t = page_indices(N, N, 2, gen)
    with pytest.raises(ValueError, match=r"dst_ptrs\[0\]: expected rows \[1, 294\] of torch.bfloat16"):
        kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 0, P)
    dst = [poisoned((N - P, 1, 294), torch.bfloat16) for _ in range(2)]
    t[-P:] = torch.arange(N - P, N)
    with pytest.raises(IndexError, match=r"dst_indices: largest index 31 is out of range"):
        kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 0, P)
    for d in dst:
        assert (d.view(torch.uint8) == 0xA5).all()


# -- the indices, checked and expanded in C or in Python -------------------------------------

@pytest.fixture(params=["compiled", "python"])
def index_path(request, monkeypatch):
    """The direct forms' indices checked, expanded and bounded in C (csrc/ops/prepared.c,
    one call) or in Python (torch ops, then the checked path's bounds check)."""
    if request.param == "python":
        monkeypatch.setattr(kvio._ops, "_compiled", None)
    elif kvio._ops._compiled is None:
        pytest.skip("hicache_kernels._prepared is not built")
    return request.param


def _oob_call(form, side, gen):
    """A direct form on contiguous tensors (one plan) with one page out of range on
    ``side``; returns (the call, what it must write nothing to, the error)."""
    s, t = page_indices(N, N, 3, gen)
    idx = s if side == "src" else t
    if form == "transfer_kv_direct":
        src = [rnd((N, 2, 8), torch.bfloat16, gen) for _ in range(2)]
        dst = [poisoned((N, 2, 8), torch.bfloat16) for _ in range(2)]
        idx[-1] = N + 1                                   # any index, not only a page's first
        return (lambda: kvio.transfer_kv_direct(src, dst, s, t, P)), dst, \
            rf"{side}_indices: largest index {N + 1} is out of range for {side}_layers with {N} slots"
    per_layer = [rnd((N, 2, 8), torch.bfloat16, gen) for _ in range(2 * L)]
    pools = [rnd((N // P, L, P, 2, 8), torch.bfloat16, gen) for _ in range(2)]
    if form == "transfer_kv_per_layer_direct_pf_lf":
        dst = [poisoned((N, 2, 8), torch.bfloat16) for _ in range(2)]
        call = lambda: kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 1, P)   # noqa: E731
        pooled = side == "src"
    else:
        dst = [poisoned((N // P, L, P, 2, 8), torch.bfloat16) for _ in range(2)]
        call = lambda: kvio.transfer_kv_all_layer_direct_lf_pf(per_layer, dst, s, t, P)  # noqa: E731
        pooled = side == "dst"
    idx[-P:] = -7                          # only a page's first index counts
    idx[-P] = N + 1 if pooled else N - 1   # the page past the pool's end; a run past the end
    largest = N + P - 1 if pooled else N + P - 2
    name = ("src_ptrs" if side == "src" else "dst_ptrs")
    return call, dst, rf"{side}_indices: largest index {largest} is out of range for {name} with {N} slots"


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("form", ["transfer_kv_direct", "transfer_kv_per_layer_direct_pf_lf",
                                  "transfer_kv_all_layer_direct_lf_pf"])
def test_an_index_out_of_range_raises_and_writes_nothing(backend, index_path, gen, form, side):
    call, dst, match = _oob_call(form, side, gen)
    with pytest.raises(IndexError, match=f"^{match}$"):
        call()
    for d in dst:
        assert (d.view(torch.uint8) == 0xA5).all()
    one_plan(True)


@pytest.mark.parametrize("page_size", [1, 3, 4, 64])
def test_indices_expanded_in_c_match_python(gen, page_size):
    compiled = kvio._ops._compiled
    if compiled is None:
        pytest.skip("hicache_kernels._prepared is not built")
    pages = 9
    first = torch.randint(-3 * page_size, 50 * page_size, (pages,), generator=gen)
    first[::4] = -1                                           # padding pages
    idx = (first[:, None] + torch.randint(-5, 5, (pages, page_size), generator=gen)).reshape(-1)
    idx[::page_size] = first
    other = torch.randint(0, 1000, (pages * page_size,), generator=gen)
    for src_mode in (kvio.AS_GIVEN, kvio.WHOLE_PAGE, kvio.RUN_FROM):
        for dst_mode in (kvio.AS_GIVEN, kvio.WHOLE_PAGE, kvio.RUN_FROM):
            src, dst, src_top, dst_top = compiled.direct_indices(idx, other, page_size, src_mode,
                                                                 dst_mode, None)
            outs = (torch.full_like(idx, 7), torch.full_like(idx, 7))
            into = compiled.direct_indices(idx, other, page_size, src_mode, dst_mode, outs)
            assert into[2:] == (src_top, dst_top)
            for got, out, mode in ((into[0], outs[0], src_mode), (into[1], outs[1], dst_mode)):
                assert (got is out) == (mode != kvio.AS_GIVEN)
            assert torch.equal(into[0], src) and torch.equal(into[1], dst)
            for got, top, given, mode in ((src, src_top, idx, src_mode), (dst, dst_top, other, dst_mode)):
                want = given if mode == kvio.AS_GIVEN else \
                    kvio._expand_pages(given, page_size, mode == kvio.WHOLE_PAGE)
                assert torch.equal(got, want), (mode, page_size)
                assert top == int(want.max())
                if mode == kvio.AS_GIVEN:
                    assert got is given
    empty = torch.empty(0, dtype=torch.int64)
    assert compiled.direct_indices(empty, empty, page_size, 1, 2, None)[2:] == (None, None)
    n = pages * page_size
    good = torch.arange(n)
    declined = [(good.int(), good, page_size), (good, good[:-page_size], page_size),
                (good.view(1, -1), good, page_size), (torch.arange(2 * n)[::2], good, page_size),
                (torch.nn.Parameter(good, requires_grad=False), good, page_size), ([0] * n, good, page_size),
                (good, good, 0), (good, good, True), (good.to(torch.uint64), good, page_size)]
    if page_size > 1:   # not whole pages; a page that would run past the largest int64
        declined += [(good[:-1], good[:-1], page_size), (torch.full((n,), 2 ** 63 - 2), good, page_size)]
    for args in declined:
        assert compiled.direct_indices(*args, kvio.RUN_FROM, kvio.WHOLE_PAGE, None) is None, args
    scratch = torch.empty(3 * n, dtype=torch.int64)
    for outs in ((scratch[:n], scratch[:n]), (good, scratch[:n]), (scratch[:n], scratch[1:n + 1]),
                 (scratch[:n], scratch[:n - 1]), (scratch[:n].int(), scratch[n:2 * n])):
        with pytest.raises(ValueError, match="^direct_indices: "):
            compiled.direct_indices(good, good.clone(), page_size, 1, 2, outs)


def test_page_loads_of_changing_sizes_on_the_copy_engines(index_path, gen):
    """Loads of other page counts one after the other, as SGLang makes them (the
    expanded indices are written over in place between calls): every byte right."""
    engine = HostCopyEngine()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
        kvio.clear_plan_cache()
        pools = direct_pools(torch.bfloat16, 2, gen)
        dst = [poisoned((N, *ROWS[torch.bfloat16]), torch.bfloat16) for _ in range(2)]
        for pages in (3, 1, 3, 8, 2, 2):
            before = [d.clone() for d in dst]
            s, t = page_indices(N, N, pages, gen)
            kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 2, P)
            for p in range(2):
                want = before[p].clone()
                for i in range(0, len(s), P):
                    want[t[i]:t[i] + P] = pools[p][s[i] // P, 2]
                assert_bytes_equal(dst[p], want, f"{pages} pages, plane {p}")
        assert len(engine.bases) == 6
        kvio.clear_plan_cache()


# -- transfer_embedding_ranges_direct -------------------------------------------------------

@pytest.mark.parametrize("width", [37, 64])
def test_embedding_ranges(backend, dtype, gen, width):
    src = rnd((28, width), dtype, gen)
    dst = poisoned((16, width), dtype)
    want = dst.clone()
    # fragmented source, packed destination, a zero-length range whose start is out of range
    src_starts, dst_starts, lengths = [1, 11, 23, 99], [2, 6, 10, 99], [4, 4, 2, 0]
    kvio.transfer_embedding_ranges_direct(src, dst, src_starts, dst_starts, lengths)
    for a, b, n in zip(src_starts, dst_starts, lengths):
        want[b:b + n] = src[a:a + n]
    assert_bytes_equal(dst, want)


def test_embedding_ranges_that_touch_merge_into_one(monkeypatch, gen):
    engine = HostCopyEngine()
    monkeypatch.setattr(backends, "choose", lambda plan, requested="auto": (engine, "double"))
    src, dst = rnd((16, 8), torch.float32, gen), poisoned((16, 8), torch.float32)
    kvio.transfer_embedding_ranges_direct(src, dst, [0, 3], [5, 8], [3, 2])
    assert_bytes_equal(dst[5:10], src[0:5])
    assert (dst[:5].view(torch.uint8) == 0xA5).all() and (dst[10:].view(torch.uint8) == 0xA5).all()


@pytest.mark.parametrize("change, error, match", [
    (dict(src="1d"), ValueError, "src: expected a contiguous 2-D tensor"),
    (dict(dst="strided"), ValueError, r"dst: expected a contiguous 2-D tensor .* \(not contiguous\)"),
    (dict(dst="meta"), ValueError, "dst: expected a contiguous 2-D tensor on cpu or cuda"),
    (dict(dst="fp16"), ValueError, "dst: expected rows of 8 torch.bfloat16 like src"),
    (dict(dst="wide"), ValueError, "dst: expected rows of 8 torch.bfloat16 like src, got 9"),
    (dict(src_starts=[0]), ValueError, "src_starts: expected 2 starts like lengths, got 1"),
    (dict(dst_starts=[0, "1"]), TypeError, r"dst_starts\[1\]: expected an int, got str"),
    (dict(lengths=3), TypeError, "lengths: expected a list of ints, got int"),
    (dict(lengths=[2, -1]), ValueError, r"lengths\[1\]: expected a non-negative length, got -1"),
    (dict(src_starts=[0, -1]), IndexError, r"src_starts\[1\]: rows \[-1, 1\) are out of range"),
    (dict(dst_starts=[0, 15]), IndexError, r"dst_starts\[1\]: rows \[15, 17\) are out of range "
                                           r"for dst with 16 rows"),
    (dict(src=3), TypeError, "src: expected a torch.Tensor, got int"),
])
def test_bad_embedding_ranges_write_nothing(backend, gen, change, error, match):
    args = dict(src=rnd((16, 8), torch.bfloat16, gen), dst=poisoned((16, 8), torch.bfloat16),
                src_starts=[0, 4], dst_starts=[8, 0], lengths=[2, 2])
    shapes = {"1d": lambda: rnd((16,), torch.bfloat16, gen),
              "strided": lambda: poisoned((8, 16), torch.bfloat16).t(),
              "meta": lambda: torch.empty((16, 8), dtype=torch.bfloat16, device="meta"),
              "fp16": lambda: poisoned((16, 8), torch.float16),
              "wide": lambda: poisoned((16, 9), torch.bfloat16)}
    key, value = next(iter(change.items()))
    args[key] = shapes[value]() if isinstance(value, str) and value in shapes else value
    written = args["dst"]
    with pytest.raises(error, match=match):
        kvio.transfer_embedding_ranges_direct(**args)
    if isinstance(written, torch.Tensor) and written.device.type == "cpu":
        assert (written.contiguous().view(torch.uint8) == 0xA5).all()


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_embedding_ranges_on_a_gpu(gen, direction, pinned):
    host = rnd((28, 37), torch.bfloat16, gen)
    host = host.pin_memory() if pinned else host
    dev = torch.full((16, 37), -1.0, dtype=torch.bfloat16, device="cuda")
    src, dst = (host, dev) if direction == "h2d" else (dev, host)
    if direction == "d2h":
        dev.copy_(rnd((16, 37), torch.bfloat16, gen))
        host.view(torch.uint8).fill_(0xA5)
    want = dst.cpu().clone()
    starts = ([1, 11, 23], [2, 6, 10]) if direction == "h2d" else ([2, 6, 10], [1, 11, 23])
    kvio.transfer_embedding_ranges_direct(src, dst, *starts, [4, 4, 2])
    torch.cuda.synchronize()
    for a, b, n in zip(*starts, [4, 4, 2]):
        want[b:b + n] = src[a:a + n].cpu()
    assert_bytes_equal(dst, want)


# -- get_device_accessible_ptr -------------------------------------------------------------

def test_device_pointer_refuses_what_no_device_can_reach(monkeypatch):
    t = torch.empty(4)
    with pytest.raises(TypeError, match="tensor: expected a torch.Tensor"):
        kvio.get_device_accessible_ptr([t], 0)
    with pytest.raises(TypeError, match="device_index: expected an int, got str"):
        kvio.get_device_accessible_ptr(t, "0")
    with pytest.raises(ValueError, match="device_index: expected a non-negative CUDA device index"):
        kvio.get_device_accessible_ptr(t, -1)
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device_index: expected a CUDA device below {count}"):
        kvio.get_device_accessible_ptr(t, count)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tensor: expected pinned .* got pageable memory"):
            kvio.get_device_accessible_ptr(t, 1)
    with pytest.raises(ValueError, match="tensor: expected a tensor on cuda:1 or in host memory, "
                                         "got meta"):
        kvio.get_device_accessible_ptr(torch.empty(4, device="meta"), 1)


def test_device_pointer_of_pinned_host_memory_is_its_address(monkeypatch):
    """With unified addressing a pinned buffer's device alias is its host address."""
    t = torch.empty(4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    assert kvio.get_device_accessible_ptr(t[1:], 0) == t.data_ptr() + 4


@pytest.mark.gpu
def test_device_pointer_on_a_gpu():
    t = torch.empty(4, device="cuda:0")
    assert kvio.get_device_accessible_ptr(t, 0) == t.data_ptr()
    pinned = torch.empty(4, pin_memory=True)
    assert kvio.get_device_accessible_ptr(pinned, 0) == pinned.data_ptr()
    with pytest.raises(ValueError, match="pinned"):
        kvio.get_device_accessible_ptr(torch.empty(4), 0)
