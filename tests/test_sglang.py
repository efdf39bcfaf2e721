"""hicache_kernels.sglang against SGLang's meaning, on CPU tensors.

The expected results are written here with plain torch indexing on tensors of
the shapes SGLang allocates (shared/SGLANG_API.md), independent of our layouts
module. Each function runs on the reference backend and on Triton (through its
interpreter), positionally and by keyword.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import assert_bytes_equal, poison_, random_bytes_

import hicache_kernels.sglang as kvio

L, N_HOST, N_DEV, H, P = 3, 64, 48, 2, 8
BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("HICACHE_BACKEND", request.param)
    return request.param


@pytest.fixture(params=[torch.bfloat16, torch.float8_e4m3fn, torch.float32], ids=str)
def dtype(request):
    return request.param


def rnd(shape, dtype, gen):
    return random_bytes_(torch.empty(shape, dtype=dtype), gen)


def poisoned(shape, dtype):
    return poison_(torch.empty(shape, dtype=dtype))


def head_dim_for(dtype):
    return 8 if torch.empty((), dtype=dtype).element_size() == 1 else 12


def indices(n_src, n_dst, n, gen, pad=True):
    s = torch.randperm(n_src, generator=gen)[:n]
    d = torch.randperm(n_dst, generator=gen)[:n]
    if pad:
        s[2] = -1
        d[5] = -1
    return s, d


def valid(s, d):
    """The pairs that are not padding, as index tensors (every expectation below indexes
    with them, one torch assignment per layer)."""
    keep = (s >= 0) & (d >= 0)
    return s[keep], d[keep]


def page_indices(n_src, n_dst, pages, gen):
    sp = torch.randperm(n_src // P, generator=gen)[:pages]
    dp = torch.randperm(n_dst // P, generator=gen)[:pages]
    o = torch.arange(P)
    return (sp[:, None] * P + o).reshape(-1), (dp[:, None] * P + o).reshape(-1)


def device_layers(dtype, d, fill):
    return [fill((N_DEV, H, d), dtype) for _ in range(L)]


def table(tensors):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


# -- kernel forms -----------------------------------------------------------------------

def test_transfer_kv_per_layer(backend, dtype, gen):
    d = head_dim_for(dtype)
    host = rnd((2, L, N_HOST, H, d), dtype, gen)
    dk, dv = poisoned((N_DEV, H, d), dtype), poisoned((N_DEV, H, d), dtype)
    s, t = indices(N_HOST, N_DEV, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_per_layer(host[0, 1], dk, host[1, 1], dv, s, t, item)
    ek, ev = poisoned(dk.shape, dtype), poisoned(dv.shape, dtype)
    a, b = valid(s, t)
    ek[b], ev[b] = host[0, 1, a], host[1, 1, a]
    assert_bytes_equal(dk, ek, "k")
    assert_bytes_equal(dv, ev, "v")


def test_transfer_kv_per_layer_pf_lf(backend, dtype, gen):
    d = head_dim_for(dtype)
    host = rnd((2, N_HOST, L, H, d), dtype, gen)
    dk, dv = poisoned((N_DEV, H, d), dtype), poisoned((N_DEV, H, d), dtype)
    s, t = indices(N_HOST, N_DEV, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_per_layer_pf_lf(src_k=host[0], dst_k=dk, src_v=host[1], dst_v=dv,
                                     src_indices=s, dst_indices=t, layer_id=2, item_size=item,
                                     src_layout_dim=item * L)
    ek, ev = poisoned(dk.shape, dtype), poisoned(dv.shape, dtype)
    a, b = valid(s, t)
    ek[b], ev[b] = host[0, a, 2], host[1, a, 2]
    assert_bytes_equal(dk, ek, "k")
    assert_bytes_equal(dv, ev, "v")


def test_transfer_kv_per_layer_ph_lf(backend, dtype, gen):
    d = head_dim_for(dtype)
    host = rnd((2, N_HOST // P, H, P, L, d), dtype, gen)
    dk, dv = poisoned((N_DEV, H, d), dtype), poisoned((N_DEV, H, d), dtype)
    s, t = indices(N_HOST, N_DEV, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_per_layer_ph_lf(host[0], dk, host[1], dv, s, t, 1, item, item * L, P, H)
    ek, ev = poisoned(dk.shape, dtype), poisoned(dv.shape, dtype)
    a, b = valid(s, t)
    ek[b], ev[b] = host[0, a // P, :, a % P, 1], host[1, a // P, :, a % P, 1]
    assert_bytes_equal(dk, ek, "k")
    assert_bytes_equal(dv, ev, "v")


def test_transfer_kv_all_layer(backend, dtype, gen):
    d = head_dim_for(dtype)
    sk, sv = device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen)), \
        device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen))
    host = poisoned((2, L, N_HOST, H, d), dtype)
    s, t = indices(N_DEV, N_HOST, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_all_layer(table(sk), table(list(host[0])), table(sv), table(list(host[1])),
                               s, t, item, L)
    want = poisoned(host.shape, dtype)
    a, b = valid(s, t)
    for l in range(L):
        want[0, l, b], want[1, l, b] = sk[l][a], sv[l][a]
    assert_bytes_equal(host, want, "host")


def test_transfer_kv_all_layer_lf_pf(backend, dtype, gen):
    d = head_dim_for(dtype)
    sk = device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen))
    sv = device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen))
    host = poisoned((2, N_HOST, L, H, d), dtype)
    s, t = indices(N_DEV, N_HOST, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_all_layer_lf_pf(src_k_layers=table(sk), dst_k=host[0], src_v_layers=table(sv),
                                     dst_v=host[1], src_indices=s, dst_indices=t, item_size=item,
                                     dst_layout_dim=item * L, num_layers=L)
    want = poisoned(host.shape, dtype)
    a, b = valid(s, t)
    for l in range(L):
        want[0, b, l], want[1, b, l] = sk[l][a], sv[l][a]
    assert_bytes_equal(host, want, "host")


def test_transfer_kv_all_layer_lf_ph(backend, dtype, gen):
    d = head_dim_for(dtype)
    sk = device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen))
    sv = device_layers(dtype, d, lambda sh, dt: rnd(sh, dt, gen))
    host = poisoned((2, N_HOST // P, H, P, L, d), dtype)
    s, t = indices(N_DEV, N_HOST, 30, gen)
    item = H * d * host.element_size()
    kvio.transfer_kv_all_layer_lf_ph(table(sk), host[0], table(sv), host[1], s, t, item, item * L,
                                     L, P, H)
    want = poisoned(host.shape, dtype)
    a, b = valid(s, t)
    for l in range(L):
        want[0, b // P, :, b % P, l] = sk[l][a]
        want[1, b // P, :, b % P, l] = sv[l][a]
    assert_bytes_equal(host, want, "host")


KV_DIM = 36  # odd-sized MLA latent (real models: 576)


def test_transfer_kv_per_layer_mla(backend, dtype, gen):
    host = rnd((L, N_HOST, 1, KV_DIM * 2), dtype, gen)
    dst = poisoned((N_DEV, 1, KV_DIM * 2), dtype)
    s, t = indices(N_HOST, N_DEV, 30, gen)
    item = KV_DIM * 2 * host.element_size()
    kvio.transfer_kv_per_layer_mla(host[2], dst, s, t, item)
    want = poisoned(dst.shape, dtype)
    a, b = valid(s, t)
    want[b] = host[2, a]
    assert_bytes_equal(dst, want, "dst")


def test_transfer_kv_per_layer_mla_pf_lf(backend, dtype, gen):
    host = rnd((N_HOST, L, 1, KV_DIM * 2), dtype, gen)
    dst = poisoned((N_DEV, 1, KV_DIM * 2), dtype)
    s, t = indices(N_HOST, N_DEV, 30, gen)
    item = KV_DIM * 2 * host.element_size()
    kvio.transfer_kv_per_layer_mla_pf_lf(host, dst, s, t, 0, item, item * L)
    want = poisoned(dst.shape, dtype)
    a, b = valid(s, t)
    want[b] = host[a, 0]
    assert_bytes_equal(dst, want, "dst")


def test_transfer_kv_all_layer_mla(backend, dtype, gen):
    src = [rnd((N_DEV, 1, KV_DIM * 2), dtype, gen) for _ in range(L)]
    host = poisoned((L, N_HOST, 1, KV_DIM * 2), dtype)
    s, t = indices(N_DEV, N_HOST, 30, gen)
    item = KV_DIM * 2 * host.element_size()
    kvio.transfer_kv_all_layer_mla(table(src), table(list(host)), s, t, item, L)
    want = poisoned(host.shape, dtype)
    a, b = valid(s, t)
    for l in range(L):
        want[l, b] = src[l][a]
    assert_bytes_equal(host, want, "host")


def test_transfer_kv_all_layer_mla_lf_pf(backend, dtype, gen):
    src = [rnd((N_DEV, 1, KV_DIM * 2), dtype, gen) for _ in range(L)]
    host = poisoned((N_HOST, L, 1, KV_DIM * 2), dtype)
    s, t = indices(N_DEV, N_HOST, 30, gen)
    item = KV_DIM * 2 * host.element_size()
    kvio.transfer_kv_all_layer_mla_lf_pf(table(src), host, s, t, item, item * L, L)
    want = poisoned(host.shape, dtype)
    a, b = valid(s, t)
    for l in range(L):
        want[b, l] = src[l][a]
    assert_bytes_equal(host, want, "host")


# -- direct (copy-engine) forms ---------------------------------------------------------

def test_transfer_kv_direct(backend, dtype, gen):
    d = head_dim_for(dtype)
    src = [rnd((N_HOST, H, d), dtype, gen) for _ in range(2 * L)]  # K layers, then V layers
    dst = [poisoned((N_DEV, H, d), dtype) for _ in range(2 * L)]
    s, t = page_indices(N_HOST, N_DEV, 3, gen)
    kvio.transfer_kv_direct(src, dst, s, t, P)
    for j in range(2 * L):
        want = poisoned(dst[j].shape, dtype)
        want[t] = src[j][s]
        assert_bytes_equal(dst[j], want, f"layer tensor {j}")


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_transfer_kv_per_layer_direct_pf_lf(backend, dtype, gen, mla):
    d = head_dim_for(dtype)
    planes = 1 if mla else 2
    pools = [rnd((N_HOST // P, L, P, H, d), dtype, gen) for _ in range(planes)]
    nl = 2  # load layers 1 and 2
    dst = [poisoned((N_DEV, H, d), dtype) for _ in range(planes * nl)]
    s, t = page_indices(N_HOST, N_DEV, 3, gen)
    kvio.transfer_kv_per_layer_direct_pf_lf(pools, dst, s, t, 1, P)
    for p in range(planes):
        for j in range(nl):
            want = poisoned(dst[0].shape, dtype)
            for i in range(0, len(s), P):
                want[t[i]:t[i] + P] = pools[p][s[i] // P, 1 + j]
            assert_bytes_equal(dst[p * nl + j], want, f"plane {p} layer {j}")


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_transfer_kv_all_layer_direct_lf_pf(backend, dtype, gen, mla):
    d = head_dim_for(dtype)
    planes = 1 if mla else 2
    src = [rnd((N_DEV, H, d), dtype, gen) for _ in range(planes * L)]
    pools = [poisoned((N_HOST // P, L, P, H, d), dtype) for _ in range(planes)]
    s, t = page_indices(N_DEV, N_HOST, 3, gen)
    kvio.transfer_kv_all_layer_direct_lf_pf(src, pools, s, t, P)
    for p in range(planes):
        want = poisoned(pools[p].shape, dtype)
        for i in range(0, len(s), P):
            for j in range(L):
                want[t[i] // P, j] = src[p * L + j][s[i]:s[i] + P]
        assert_bytes_equal(pools[p], want, f"pool {p}")


# -- the call surface itself --------------------------------------------------------------

SIGNATURES = {
    "transfer_kv_per_layer": "src_k dst_k src_v dst_v src_indices dst_indices item_size block_quota=2 num_warps_per_block=32",
    "transfer_kv_per_layer_pf_lf": "src_k dst_k src_v dst_v src_indices dst_indices layer_id item_size src_layout_dim block_quota=2 num_warps_per_block=32",
    "transfer_kv_per_layer_ph_lf": "src_k dst_k src_v dst_v src_indices dst_indices layer_id item_size src_layout_dim page_size head_num block_quota=2 num_warps_per_block=32",
    "transfer_kv_all_layer": "src_k_layers dst_k_layers src_v_layers dst_v_layers src_indices dst_indices item_size num_layers block_quota=2 num_warps_per_block=32",
    "transfer_kv_all_layer_lf_pf": "src_k_layers dst_k src_v_layers dst_v src_indices dst_indices item_size dst_layout_dim num_layers block_quota=2 num_warps_per_block=32",
    "transfer_kv_all_layer_lf_ph": "src_k_layers dst_k src_v_layers dst_v src_indices dst_indices item_size dst_layout_dim num_layers page_size head_num block_quota=2 num_warps_per_block=32",
    "transfer_kv_per_layer_mla": "src dst src_indices dst_indices item_size block_quota=2 num_warps_per_block=32",
    "transfer_kv_per_layer_mla_pf_lf": "src dst src_indices dst_indices layer_id item_size src_layout_dim block_quota=2 num_warps_per_block=32",
    "transfer_kv_all_layer_mla": "src_layers dst_layers src_indices dst_indices item_size num_layers block_quota=2 num_warps_per_block=32",
    "transfer_kv_all_layer_mla_lf_pf": "src_layers dst src_indices dst_indices item_size dst_layout_dim num_layers block_quota=2 num_warps_per_block=32",
    "transfer_kv_direct": "src_layers dst_layers src_indices dst_indices page_size",
    "transfer_kv_per_layer_direct_pf_lf": "src_ptrs dst_ptrs src_indices dst_indices layer_id page_size",
    "transfer_kv_all_layer_direct_lf_pf": "src_ptrs dst_ptrs src_indices dst_indices page_size",
    "transfer_embedding_ranges_direct": "src dst src_starts dst_starts lengths",
    "get_device_accessible_ptr": "tensor device_index",
}
EXTRAS = {"clear_plan_cache"}  # ours, beyond sgl-kernel's names


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_match_sgl_kernel(name):
    params = inspect.signature(getattr(kvio, name)).parameters.values()
    got = " ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default}"
                   for p in params)
    assert got == SIGNATURES[name]


def test_every_function_is_exported():
    assert sorted(kvio.__all__) == sorted(set(SIGNATURES) | EXTRAS)


# -- bad input: refused before anything is written -----------------------------------------

def _pf_case(gen, dtype=torch.bfloat16):
    host = rnd((2, N_HOST, L, H, 12), dtype, gen)
    dk, dv = poisoned((N_DEV, H, 12), dtype), poisoned((N_DEV, H, 12), dtype)
    s, t = indices(N_HOST, N_DEV, 20, gen, pad=False)
    item = H * 12 * host.element_size()
    args = dict(src_k=host[0], dst_k=dk, src_v=host[1], dst_v=dv, src_indices=s, dst_indices=t,
                layer_id=1, item_size=item, src_layout_dim=item * L)
    return args, (dk, dv)


@pytest.mark.parametrize("change, error, match", [
    (dict(item_size=44), ValueError, "item_size: expected a positive multiple of 8"),
    (dict(src_indices="s32"), TypeError, "src_indices: expected dtype torch.int64"),
    (dict(dst_indices="short"), ValueError, "dst_indices: expected 20 indices"),
    (dict(dst_indices="oob"), IndexError, "dst_indices: largest index 48 is out of range"),
    (dict(src_indices="2d"), ValueError, "src_indices: expected a 1-D tensor"),
    (dict(layer_id=3), ValueError, "layer_id"),
    (dict(src_layout_dim=50), ValueError, "src_layout_dim"),
    (dict(dst_v="small"), ValueError, "dst_v"),
    (dict(dst_k="strided"), ValueError, "dst_k: expected a contiguous tensor"),
])
def test_bad_input_is_refused_and_nothing_written(backend, gen, change, error, match):
    args, dsts = _pf_case(gen)
    key, how = next(iter(change.items()))
    if how == "s32":
        args[key] = args[key].to(torch.int32)
    elif how == "short":
        args[key] = args[key][:-1]
    elif how == "oob":
        args[key] = args[key].clone()
        args[key][-1] = N_DEV
    elif how == "2d":
        args[key] = args[key].view(4, 5)
    elif how == "small":
        args[key] = poisoned((N_DEV, H, 10), torch.bfloat16)
    elif how == "strided":
        args[key] = poisoned((H, N_DEV, 12), torch.bfloat16).transpose(0, 1)
    else:
        args[key] = how
    with pytest.raises(error, match=match):
        kvio.transfer_kv_per_layer_pf_lf(**args)
    for t in dsts:
        assert (t.view(torch.uint8) == 0xA5).all()


def test_bad_address_table_is_refused(gen):
    sk = device_layers(torch.bfloat16, 12, lambda sh, dt: rnd(sh, dt, gen))
    host = poisoned((2, N_HOST, L, H, 12), torch.bfloat16)
    s, t = indices(N_DEV, N_HOST, 10, gen)
    with pytest.raises(ValueError, match="src_v_layers: expected a uint64 tensor of 3"):
        kvio.transfer_kv_all_layer_lf_pf(table(sk), host[0], table(sk[:2]), host[1], s, t, 48,
                                         48 * L, L)
    with pytest.raises(ValueError, match="head_num"):
        kvio.transfer_kv_all_layer_lf_ph(table(sk), host[0], table(sk), host[1], s, t, 48, 48 * L,
                                         L, P, 4)
    assert (host.view(torch.uint8) == 0xA5).all()


def test_direct_needs_whole_pages(gen):
    src = [rnd((N_HOST, H, 12), torch.bfloat16, gen)]
    dst = [poisoned((N_DEV, H, 12), torch.bfloat16)]
    s, t = page_indices(N_HOST, N_DEV, 2, gen)
    with pytest.raises(ValueError, match="src_indices: expected a length that is a multiple of page_size"):
        kvio.transfer_kv_direct(src, dst, s[:-1], t[:-1], P)
    with pytest.raises(ValueError, match="dst_layers: expected 1 tensors"):
        kvio.transfer_kv_direct(src, dst + dst, s, t, P)
    assert (dst[0].view(torch.uint8) == 0xA5).all()
