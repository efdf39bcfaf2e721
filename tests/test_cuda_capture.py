"""Index staging and address tables under CUDA graph capture, checked on the CPU
with fakes for the capture flag and for torch's pinned staging.

The rule: CPU indices reach a kernel through a pinned staging buffer and one
non-blocking copy. Outside capture, torch's pinned cache keeps that buffer
until the copy has run. While a graph is being captured nothing would keep it:
the captured copy would read it again on every replay, after the buffer went
back to the cache and was handed out for other indices. So CPU indices are
refused during capture (naming the argument, before anything is staged or
copied), as the copy engines refuse device indices; a new address table is
refused too (tables are made once, before capture).
"""

from __future__ import annotations

import pytest
import torch

from hicache_kernels import KVBuffer, KVLayout, plan as plan_module
from hicache_kernels.ops import Transfer, _check_indices
from hicache_kernels.plan import address_table, indices_to

CUDA0 = torch.device("cuda", 0)


class FakeStaging:
    """Stands in for torch's pinned host cache and the host->device copy: records
    every staging buffer handed out and every copy queued from one."""

    def __init__(self, monkeypatch):
        self.buffers: list[torch.Tensor] = []
        self.copies: list[tuple[torch.Tensor, torch.device, bool]] = []
        fake = self

        def pin_memory(t):
            buf = t.clone()
            fake.buffers.append(buf)
            return buf

        def is_pinned(t):
            return any(t is b for b in fake.buffers)

        real_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            device = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) \
                else kwargs.get("device")
            if device is None or device.type != "cuda":
                return real_to(t, *args, **kwargs)
            fake.copies.append((t, device, bool(kwargs.get("non_blocking", False))))
            return t.clone()  # what arrived on the "device"

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
        monkeypatch.setattr(torch.Tensor, "to", to)


def capturing(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: value)


def test_cpu_indices_are_staged_and_copied_without_blocking(monkeypatch):
    staging = FakeStaging(monkeypatch)
    capturing(monkeypatch, False)
    idx = torch.tensor([3, 1, -1, 7])
    out = indices_to(idx, CUDA0, "host_indices")
    assert len(staging.buffers) == 1 and torch.equal(staging.buffers[0], idx)
    (source, device, non_blocking), = staging.copies
    assert source is staging.buffers[0], "the copy reads the pinned staging buffer"
    assert device == CUDA0 and non_blocking, "queued on the stream, never a blocking copy"
    assert torch.equal(out, idx)


def test_cpu_indices_are_refused_while_capturing(monkeypatch):
    staging = FakeStaging(monkeypatch)
    capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match=r"^host_indices: CPU indices cannot be used while a CUDA "
                                           r"graph is being captured.*on cuda:0"):
        indices_to(torch.tensor([3, 1, -1, 7]), CUDA0, "host_indices")
    assert staging.buffers == [] and staging.copies == [], "nothing staged, nothing copied"


def test_device_indices_pass_through_while_capturing(monkeypatch):
    capturing(monkeypatch, True)
    idx = torch.tensor([1, 2])
    assert indices_to(idx, idx.device, "src_indices") is idx  # already where the kernel reads them


def test_the_ops_layer_names_the_argument(monkeypatch):
    """Through the ops layer's index checks, as a kernel backend on cuda:0 gets them."""
    staging = FakeStaging(monkeypatch)
    lay = KVLayout("page_first", num_layers=2, num_slots=16, head_num=2, head_dim=8, dtype=torch.float16)
    src, dst = KVBuffer.allocate(lay), KVBuffer.allocate(lay)
    plan = Transfer(src, dst, layers=1, backend="reference").plan
    capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match=r"^host_indices: CPU indices cannot be used while"):
        _check_indices(plan, torch.arange(4), torch.arange(4), CUDA0, None, ("host_indices", "device_indices"))
    assert staging.copies == []
    capturing(monkeypatch, False)
    s, d = _check_indices(plan, torch.arange(4), torch.arange(4), CUDA0, None, ("host_indices", "device_indices"))
    assert [c[2] for c in staging.copies] == [True, True]


def test_a_new_address_table_is_refused_while_capturing_and_a_cached_one_is_used(monkeypatch):
    monkeypatch.setattr(plan_module, "_TABLE_CACHE", type(plan_module._TABLE_CACHE)())
    capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match=r"address tables: a new table of 3 plane bases cannot be "
                                           r"copied to cuda:0 while a CUDA graph is being captured; "
                                           r"run the transfer once before capturing"):
        address_table([4096, 8192, 12288], CUDA0)
    assert len(plan_module._TABLE_CACHE) == 0
    cached = torch.tensor([4096, 8192, 12288])
    plan_module._TABLE_CACHE[(CUDA0, (4096, 8192, 12288))] = cached
    assert address_table([4096, 8192, 12288], CUDA0) is cached


def test_host_tables_are_plain_tensors():
    table = address_table([16, 32], torch.device("cpu"))
    assert table.dtype == torch.int64 and table.tolist() == [16, 32]
    assert address_table([16, 32], torch.device("cpu")) is table
