"""torch.ops.hicache.transfer: a custom op that declares its destinations
written, checked with torch.library.opcheck and traced by torch.compile."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bytes_equal, poison_, random_bytes_
from test_transfer import make_device_pool, make_host

from hicache_kernels import KVBuffer, transfer as eager_transfer, torch_ops


def _args(src, dst, s, d, layers, backend="reference"):
    return (src.tensors(), dst.tensors(), s, d, torch_ops.describe_layout(src),
            torch_ops.describe_layout(dst), layers.start, layers.stop, backend, 0, 0)


@pytest.mark.parametrize("kind, mla", [("page_first", False), ("page_head", False),
                                       ("page_first_direct", True), ("layer_first", False)])
def test_opcheck(kind, mla, gen):
    host = make_host(kind, mla=mla, dtype=torch.bfloat16, page_size=4, head_dim=8, gen=gen,
                     num_layers=2, head_num=2, slots=32)
    dev = make_device_pool(host, slots=16)
    s, d = torch.tensor([5, 6, 7, -1, 9]), torch.tensor([0, 1, 2, 3, -1])
    torch.library.opcheck(torch.ops.hicache.transfer, _args(host, dev, s, d, range(1, 2)))
    torch.library.opcheck(torch.ops.hicache.transfer, _args(dev, host, d, s, range(0, 2)))


def test_op_matches_the_ops_api(gen):
    host = make_host("page_head", mla=False, dtype=torch.float8_e4m3fn, page_size=8, head_dim=5,
                     gen=gen, slots=64)
    s, d = torch.randperm(64, generator=gen)[:40], torch.randperm(96, generator=gen)[:40]
    got, want = make_device_pool(host), make_device_pool(host)
    torch_ops.transfer(host, got, s, d, layers=1, backend="reference")
    eager_transfer(host, want, s, d, layers=1, backend="reference")
    for a, b in zip(got.tensors(), want.tensors()):
        assert_bytes_equal(a, b, "op vs ops.transfer")


def test_compiled_graph_keeps_the_write_before_the_read(gen):
    """The op mutates dst: a compiled function must read dst after the copy."""
    host = make_host("layer_first", mla=True, dtype=torch.float32, page_size=1, head_dim=8, gen=gen)
    host.k.copy_(torch.randn(host.k.shape, generator=gen))  # finite values to sum
    dev = make_device_pool(host)
    for t in dev.tensors():
        t.zero_()

    def load_and_sum(s, d):
        before = dev.k[1].sum()
        torch_ops.transfer(host, dev, s, d, layers=1, backend="reference")
        return dev.k[1].sum() - before

    s, d = torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2])
    got = torch.compile(load_and_sum, backend="aot_eager", fullgraph=True)(s, d)
    torch.testing.assert_close(got, host.k[1, 3:6].sum())


def test_layout_text_round_trips(gen):
    host = make_host("page_first_direct", mla=False, dtype=torch.float16, page_size=4, head_dim=8,
                     gen=gen, slots=32)
    text = torch_ops.describe_layout(host)
    again = torch_ops._buffer(text, host.tensors())
    assert again.layout == host.layout and not again.per_layer
    with pytest.raises(ValueError, match="layout: expected 'kind=...;num_layers=...;...'"):
        torch_ops._buffer("kind=page_first", host.tensors())
    with pytest.raises(TypeError, match="layers: expected an int, a range or None"):
        torch_ops.transfer(host, host, torch.arange(2), torch.arange(2), layers=[0])
