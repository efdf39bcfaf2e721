"""The layout description: shapes, and the one address formula checked against torch."""

import pytest
import torch

from conftest import assert_bytes_equal, poison_, random_bytes_
from hicache_kernels import KVBuffer, KVLayout, LayoutKind, transfer
from hicache_kernels.layouts import layer_view

L, N, H, D, P = 3, 32, 2, 5, 8


def _layout(kind, **kw):
    args = dict(num_layers=L, num_slots=N, head_num=H, head_dim=D, dtype=torch.float16, page_size=P)
    args.update(kw)
    return KVLayout(kind, **args)


@pytest.mark.parametrize("kind, shape", [
    ("layer_first", (L, N, H, D)),
    ("page_first", (N, L, H, D)),
    ("page_first_direct", (N // P, L, P, H, D)),
    ("page_head", (N // P, H, P, L, D)),
])
def test_shapes_match_sglang_host_pool(kind, shape):
    lay = _layout(kind)
    assert lay.shape == shape
    buf = KVBuffer.allocate(lay)
    # SGLang allocates K and V together as one [2, ...] tensor
    assert buf.k.data_ptr() + lay.plane_bytes == buf.v.data_ptr()


@pytest.mark.parametrize("kind", list(LayoutKind))
def test_byte_offset_matches_torch_indexing(kind):
    """byte_offset (our formula) must land on the element torch's own indexing finds."""
    lay = _layout(kind)
    plane = torch.empty(lay.shape, dtype=lay.dtype)
    base = plane.data_ptr()
    order = {
        "layer_first": lambda s, l, h: plane[l, s, h],
        "page_first": lambda s, l, h: plane[s, l, h],
        "page_first_direct": lambda s, l, h: plane[s // P, l, s % P, h],
        "page_head": lambda s, l, h: plane[s // P, h, s % P, l],
    }[kind.value]
    for s in range(N):
        for l in range(L):
            for h in range(H):
                assert lay.byte_offset(s, l, h) == order(s, l, h).data_ptr() - base


@pytest.mark.parametrize("kind", list(LayoutKind))
def test_layer_view_agrees_with_plane_addressing(kind):
    """The reference's views and the kernels' strides describe the same bytes."""
    lay = _layout(kind)
    plane = torch.empty(lay.shape, dtype=lay.dtype)
    addr = lay.plane_addressing()
    for layer in range(L):
        view = layer_view(plane, lay, layer)  # [pages, P', H, head_bytes]
        p = view.shape[1]
        assert p == addr.page_size
        for s in range(N):
            for h in range(H):
                got = view[s // p, s % p, h].data_ptr() - plane.data_ptr()
                assert got == lay.byte_offset(s, layer, h)
        assert view.shape[-1] == lay.head_bytes


def test_unpaged_layouts_ignore_page_size_in_addressing():
    a = _layout("page_first", page_size=1).plane_addressing()
    b = _layout("page_first", page_size=16).plane_addressing()
    assert a == b and a.page_size == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="page_head", num_slots=30), "num_slots"),
    (dict(kind="nonsense"), "layout"),
    (dict(kind="layer_first", head_num=0), "head_num"),
    (dict(kind="layer_first", mla=True), "head_num"),
    (dict(kind="page_head", mla=True, head_num=1), "page_head"),
    (dict(kind="layer_first", dtype="bf16"), "dtype"),
])
def test_invalid_layouts_name_the_argument(kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises((ValueError, TypeError), match=message):
        _layout(kind, **kwargs)


def test_byte_offset_rejects_out_of_range():
    lay = _layout("layer_first")
    with pytest.raises(IndexError, match="slot"):
        lay.byte_offset(N, 0)
    with pytest.raises(IndexError, match="layer"):
        lay.byte_offset(0, L)


def test_kvbuffer_checks_tensors():
    lay = _layout("page_first")
    good = torch.empty(lay.shape, dtype=lay.dtype)
    with pytest.raises(ValueError, match="v: expected shape"):
        KVBuffer(lay, good, torch.empty(1, dtype=lay.dtype))
    with pytest.raises(ValueError, match="k: expected shape"):
        KVBuffer(lay, good.to(torch.float32), good)
    with pytest.raises(ValueError, match="contiguous"):
        KVBuffer(lay, good.transpose(0, 1).contiguous().transpose(0, 1), good)
    with pytest.raises(ValueError, match="v: MHA"):
        KVBuffer(lay, good)


def test_device_pool_from_layers():
    k = [torch.empty(N, H, D, dtype=torch.bfloat16) for _ in range(L)]
    v = [torch.empty(N, H, D, dtype=torch.bfloat16) for _ in range(L)]
    buf = KVBuffer.from_layers(k, v)
    assert buf.per_layer and buf.layout.kind is LayoutKind.LAYER_FIRST
    assert buf.plane_bases(range(1, 3)) == [k[1].data_ptr(), k[2].data_ptr(),
                                             v[1].data_ptr(), v[2].data_ptr()]
    with pytest.raises(ValueError, match=r"v\[2\]"):
        KVBuffer.from_layers(k, v[:2] + [torch.empty(N, H, D + 1, dtype=torch.bfloat16)])


@pytest.mark.parametrize("kind, mla", [(k, m) for k in LayoutKind for m in (False, True)
                                       if not (k is LayoutKind.PAGE_HEAD and m)])
def test_page_items_describe_the_same_bytes(kind, mla):
    """Item p of the page view starts where slot p*P starts and spans the page's
    P slots; layouts whose pages are not contiguous runs have no such view."""
    lay = _layout(kind, mla=mla, head_num=1 if mla else H)
    pages = lay.page_items()
    if kind in (LayoutKind.PAGE_FIRST, LayoutKind.PAGE_HEAD):
        assert pages is None
        return
    assert (pages.num_slots, pages.head_num, pages.page_size) == (N // P, 1, 1)
    assert pages.plane_bytes == lay.plane_bytes
    for layer in range(L):
        for p in range(N // P):
            start = lay.byte_offset(p * P, layer)
            assert pages.byte_offset(p, layer) == start
            ends = [lay.byte_offset(s, layer, h) + lay.head_bytes
                    for s in range(p * P, p * P + P) for h in range(lay.head_num)]
            assert max(ends) - start == pages.item_bytes == P * lay.item_bytes


def test_page_items_of_other_page_sizes():
    assert _layout("layer_first", num_slots=N + 3).page_items() is None
    assert _layout("layer_first", page_size=1).page_items(P).num_slots == N // P
    assert _layout("page_first_direct").page_items(2 * P) is None


@pytest.mark.parametrize("per_layer", [False, True])
def test_page_items_buffer_shares_memory(per_layer, gen):
    """A page-granular transfer moves exactly the bytes of the token transfer it stands
    for, padding (a negative page) included."""
    lay = _layout("layer_first")
    host = KVBuffer.allocate(lay.with_(kind="page_first_direct"))
    if per_layer:
        dev = KVBuffer.from_layers([torch.empty(N, H, D, dtype=lay.dtype) for _ in range(L)],
                                   [torch.empty(N, H, D, dtype=lay.dtype) for _ in range(L)],
                                   page_size=P)
    else:
        dev = KVBuffer.allocate(lay)
    for t in host.tensors():
        random_bytes_(t, gen)
    host_pages, dev_pages = torch.tensor([3, -1, 0, 2]), torch.tensor([1, 3, 2, 0])
    # the token transfer, on a poisoned copy of the device pool
    ref = KVBuffer.allocate(lay)
    for t in ref.tensors():
        poison_(t)
    tokens = lambda pages: (pages[:, None] * P + torch.arange(P)).ravel()
    transfer(host, ref, tokens(host_pages), tokens(dev_pages), backend="reference")
    # the page transfer through the views, on the poisoned device pool itself
    for t in dev.tensors():
        poison_(t)
    transfer(host.page_items(), dev.page_items(), host_pages, dev_pages, backend="reference")
    got_k = torch.stack(dev.k) if per_layer else dev.k
    got_v = torch.stack(dev.v) if per_layer else dev.v
    assert_bytes_equal(got_k, ref.k, "k")
    assert_bytes_equal(got_v, ref.v, "v")
