"""The Triton launcher's own rules: address-table alignment, the transfer's stream,
tile shapes. The kernel itself is checked by raw bytes in test_transfer.py and
test_sglang.py, and compiled under every supported Triton in test_triton_compile.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import DTYPES, assert_bytes_equal, poison_, random_bytes_
from test_transfer import make_device_pool, make_host, paged_indices

import hicache_kernels.sglang as kvio
from hicache_kernels import LayoutKind, Transfer
from hicache_kernels.ops import execute
from hicache_kernels.plan import TransferPlan
from hicache_kernels.backends import triton_kernels as tk

L, N, H = 3, 32, 2


def _layers_at(offset: int, dtype, head_dim: int, gen, fill):
    """L layer tensors [N, H, head_dim] placed ``offset`` bytes into a larger buffer, and
    their uint64 address table."""
    row = H * head_dim * torch.empty((), dtype=dtype).element_size()
    raw = [torch.empty(N * row + 16, dtype=torch.uint8) for _ in range(L)]
    layers = [r[offset:offset + N * row].view(dtype).view(N, H, head_dim) for r in raw]
    for t in layers:
        fill(t)
    table = torch.tensor([t.data_ptr() for t in layers], dtype=torch.uint64)
    return layers, table, raw


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("HICACHE_BACKEND", "triton")


def test_an_address_table_base_narrower_than_the_word_is_refused(triton_backend, gen):
    """32-byte items are moved in 8-byte words; a base 4 bytes off would be truncated."""
    dtype, d = torch.bfloat16, 8
    _, src_table, _ = _layers_at(4, dtype, d, gen, lambda t: random_bytes_(t, gen))
    dst, dst_table, _ = _layers_at(0, dtype, d, gen, poison_)
    s, t = torch.randperm(N, generator=gen)[:10], torch.randperm(N, generator=gen)[:10]
    item = H * d * 2
    with pytest.raises(ValueError, match=r"src_layers: base address 0x[0-9a-f]+ of plane 0 is "
                                         r"not a multiple of 8 bytes"):
        kvio.transfer_kv_all_layer_mla(src_table, dst_table, s, t, item, L)
    for t in dst:
        assert (t.view(torch.uint8) == 0xA5).all(), "nothing may be written"


def test_an_address_table_base_as_aligned_as_the_word_is_taken(triton_backend, gen):
    """32-byte items, bases 8 bytes off: 8-byte words (not 16-byte vectors) move them."""
    dtype, d = torch.bfloat16, 8
    src, src_table, _ = _layers_at(8, dtype, d, gen, lambda t: random_bytes_(t, gen))
    dst, dst_table, _ = _layers_at(8, dtype, d, gen, poison_)
    s, t = torch.randperm(N, generator=gen)[:10], torch.randperm(N, generator=gen)[:10]
    t[3] = -1
    kvio.transfer_kv_all_layer_mla(src_table, dst_table, s, t, H * d * 2, L)
    keep = t >= 0
    for a, b in zip(src, dst):
        want = poison_(torch.empty_like(b))
        want[t[keep]] = a[s[keep]]
        assert_bytes_equal(b, want, "dst layer")


def _pools(dtype, head_dim):
    host = make_host(LayoutKind.LAYER_FIRST, mla=False, dtype=dtype, page_size=1,
                     head_dim=head_dim, head_num=H)
    return host, make_device_pool(host)


def test_tables_are_built_and_the_kernel_launched_on_the_transfer_stream(monkeypatch, gen):
    """A table converted or copied for a call must be made on the transfer's stream, so
    that the kernel on that stream is ordered after it and its memory is not reused
    before the kernel has read it."""
    host, dev = _pools(torch.bfloat16, 8)
    plan = Transfer(host, dev, layers=1, backend="reference").plan
    inside, events = [], []

    @contextlib.contextmanager
    def stream_ctx(stream):
        events.append(("enter", stream))
        inside.append(stream)
        try:
            yield
        finally:
            inside.pop()

    def table(bases, device):
        events.append(("table", inside[-1] if inside else None))
        return torch.tensor(list(bases), dtype=torch.int64)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: events.append(("launch", inside[-1] if inside else None))

    side = object()
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(tk, "address_table", table)
    monkeypatch.setattr(tk, "_copy_items_kernel", Kernel())
    h, d = paged_indices(host.layout.num_slots, dev.layout.num_slots, 20, 1, gen)
    tk.run(plan, h, d, stream=side)
    assert events == [("enter", side), ("table", side), ("table", side), ("launch", side)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [5, 64, 1000])
@pytest.mark.parametrize("num_warps", [1, 4, 16, 32])
def test_tiles_stay_small_and_whole(dtype, head_dim, num_warps):
    """Tiles never exceed MAX_ROWS rows nor 128 bytes per thread (fp8 with odd head dims
    once made 4096-row tiles), and are powers of two as Triton needs."""
    host, dev = _pools(dtype, head_dim)
    for src, dst in ((host, dev), (dev, host)):
        cfg = tk.launch_config(Transfer(src, dst, layers=0, backend="reference").plan, num_warps)
        rows, cols, wb = cfg["rows"], cfg["cols"], cfg["word_bytes"]
        assert rows & (rows - 1) == 0 and cols & (cols - 1) == 0, cfg
        assert 1 <= rows <= tk.MAX_ROWS and cols <= tk.MAX_COLS, cfg
        assert rows * cols * wb <= max(num_warps * 32 * tk.BYTES_PER_THREAD, cols * wb), cfg


@pytest.mark.gpu
def test_a_table_converted_for_a_side_stream_transfer_is_made_on_it(gen):
    """A strided address table is made contiguous for the kernel; with the current
    stream busy, a copy made there would reach the side stream's kernel late."""
    dtype, d = torch.bfloat16, 8
    item = H * d * 2
    src = [random_bytes_(torch.empty(N, H, d, dtype=dtype, device="cuda"), gen) for _ in range(L)]
    dst = [poison_(torch.empty(N, H, d, dtype=dtype, device="cuda")) for _ in range(L)]

    def strided(layers):
        table = torch.zeros(2 * L, dtype=torch.uint64, device="cuda")
        table[::2] = torch.tensor([t.data_ptr() for t in layers], dtype=torch.uint64, device="cuda")
        return table[::2]

    plan = TransferPlan(kvio._address_tables(("src_layers",), (strided(src),), L, item),
                        kvio._address_tables(("dst_layers",), (strided(dst),), L, item),
                        head_num=1, head_bytes=item)
    s, t = torch.randperm(N, generator=gen)[:20], torch.randperm(N, generator=gen)[:20]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda._sleep(200_000_000)                          # the current stream: busy
    execute(plan, s, t, backend="triton", stream=side)
    side.synchronize()
    torch.cuda.synchronize()
    for a, b in zip(src, dst):
        want = poison_(torch.empty_like(b))
        want[t.cuda()] = a[s.cuda()]
        assert_bytes_equal(b, want, "dst layer")
