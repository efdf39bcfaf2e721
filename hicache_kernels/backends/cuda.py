"""The CUDA backend: the register-staged transfer kernel from ``csrc/``.

Each thread loads the source and destination slots of its 8 units, then issues
8 loads of up to 16 bytes (the widest access the plan's alignment allows,
narrower where it must) back to back, then stores them; the grid never exceeds
the SM budget. Plane bases come from int64 address tables on the GPU; pinned
host memory is read and written directly (unified addressing). The library is
called through ctypes (:mod:`._native`), so this backend works with any
PyTorch build.

Launch shape: ``sm_budget`` blocks of ``num_warps`` warps. A block has at most
8 warps (256 threads, at most 80 registers each: a third of an SM's register
file), so it can share an SM with the forward pass's blocks; a request for
larger blocks runs as more 8-warp blocks holding the same threads
(``sm_budget=2, num_warps=32`` is 8 blocks of 8 warps).

Source and destination slots must not overlap: a copy within one buffer whose
source and destination items share bytes is undefined.

Example:
    >>> t = Transfer(host, dev, layers=3, backend="cuda", sm_budget=8, num_warps=8)
    >>> t(host_idx, dev_idx)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Callable, NamedTuple, Sequence

import torch

from .. import nvtx_ranges
from ..plan import TransferPlan, address_table
from . import _native

try:   # a prepared launch's per-call half, compiled (csrc/ops/prepared.c); None: Python does it
    from .. import _prepared
except ImportError:
    _prepared = None


def setup_compiled(exchange=getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)) -> bool:
    """Point ``_prepared`` at torch; returns whether it reads tensors through torch's
    DLPack exchange table (one C call per tensor; a torch without it: their methods,
    and the C keys and index helpers decline). ``exchange=None`` forces the methods."""
    # the address of a tensor's storage (what untyped_storage()._cdata gives), in one call
    storage_id = getattr(torch._C, "_storage_address", None) or getattr(torch._C, "_storage_id", None)
    return _prepared.setup(torch.Tensor, torch.int64, vars(nvtx_ranges), exchange, storage_id,
                           torch.empty)


if _prepared is not None:
    setup_compiled()

name = "cuda"

# Blocks when no SM budget is given: transfers share the GPU with the forward
# pass. 8 blocks of 8 warps hold what 2 blocks of 32 warps did (256 KiB of
# loads in flight, enough to carry the host link), each block small enough to
# share an SM. What 2, 4 or 8 of them cost a GEMM next to them is what
# ``hicache-bench kernels --under-load --backend cuda --sm-budget 2 4 8`` measures.
DEFAULT_SM_BUDGET = 8
# 8 warps x 8 x 16-byte loads per thread = 32 KiB in flight per block.
DEFAULT_NUM_WARPS = 8


def available() -> tuple[bool, str]:
    return _available(_native.KERNEL_REGISTERS)


def _available(kernel: int) -> tuple[bool, str]:
    index, info, why = _native.current_device_info()
    if info is None:
        return False, why
    archs = _native.build_info().get("archs", "?")
    major, minor = info.capability
    if not info.has_register_kernel:
        return False, f"the CUDA library has no code for sm_{major}{minor} (built for {archs})"
    if kernel == _native.KERNEL_BULK and not info.has_bulk_kernel:
        return False, (f"the bulk kernel needs sm_90+ code; cuda:{index} is sm_{major}{minor} "
                       f"and the library was built for {archs}")
    return True, f"libhicache_cuda ({archs}) on {torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    """Copy ``src_indices[i] -> dst_indices[i]`` (int64 on the plan's device) in every plane."""
    launch(plan, src_indices, dst_indices, kernel=_native.KERNEL_REGISTERS,
           sm_budget=sm_budget or DEFAULT_SM_BUDGET, num_warps=num_warps or DEFAULT_NUM_WARPS,
           stream=stream, backend=name)


def prepare(plan: TransferPlan, *, sm_budget: int | None = None,
            num_warps: int | None = None) -> "Launcher | None":
    """:func:`run`'s launch for ``plan``, prepared once (see :class:`Launcher`), or
    None where ``plan``'s address tables would have to be converted for the kernel."""
    return Launcher.of(plan, kernel=_native.KERNEL_REGISTERS, sm_budget=sm_budget or DEFAULT_SM_BUDGET,
                       num_warps=num_warps or DEFAULT_NUM_WARPS, backend=name)


# -- where a launch goes -----------------------------------------------------------------

class Target(NamedTuple):
    """Where a launch goes: the library, the device whose memory the kernel reads
    indices and plane-base tables from (``index``: the device the library selects),
    and ``raw_stream(stream)``, the ``cudaStream_t`` of a torch stream (None: the
    current stream); ``current(index)``, where given, is ``raw_stream(None)`` asked
    of torch in one C call."""

    lib: ctypes.CDLL
    device: torch.device
    index: int
    raw_stream: Callable[[object], int]
    current: Callable[[int], int] | None = None


def target(plan: TransferPlan, kernel: int, backend: str) -> Target:
    """The CUDA library and device for ``plan``'s kernel; raises a RuntimeError when
    the kernel cannot run here. (Tests on machines without a GPU replace this with
    the library's host twin.)"""
    device = plan.device
    if device.type != "cuda":
        ok, why = _available(kernel)
        raise RuntimeError(f"backend: {backend!r} is not available here: {why}" if not ok else
                           f"backend: {backend!r} needs a CUDA side; {plan.src.name} and "
                           f"{plan.dst.name} are both on {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    info, why = _native.device_info(index)  # cached: nothing to ask the driver per call
    if info is None or not info.has_register_kernel or (kernel == _native.KERNEL_BULK
                                                        and not info.has_bulk_kernel):
        raise RuntimeError(f"backend: {backend!r} is not available here: {_available(kernel)[1]}")
    return Target(_native.library()[0], torch.device("cuda", index), index, _raw_streams(index),
                  getattr(torch._C, "_cuda_getCurrentRawStream", None))


@functools.lru_cache(maxsize=None)
def _raw_streams(index: int) -> Callable[[object], int]:
    current = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object made

    def raw_stream(stream) -> int:
        if stream is not None:
            return stream.cuda_stream
        return current(index) if current is not None else torch.cuda.current_stream(index).cuda_stream
    return raw_stream


def _descriptor(plan: TransferPlan, tgt: Target, src_bases: torch.Tensor, dst_bases: torch.Tensor,
                *, kernel: int, sm_budget: int, num_warps: int, backend: str, stage_bytes: int = 0,
                stages: int = 0, smem_cap: int = 0) -> _native.CopyDesc:
    """The C description of ``plan`` (indices, their count and the stream left empty)."""
    if kernel == _native.KERNEL_BULK and not bulk_eligible(plan):
        raise ValueError(f"backend {backend!r}: {plan.label} is not 16-byte aligned throughout "
                         "or takes its bases from address tables; the bulk kernel needs both")
    n_chunks, chunk_bytes, src_cs, dst_cs = plan.chunks()
    return _native.CopyDesc(
        src=_side(plan.src.addressing, src_bases, src_cs),
        dst=_side(plan.dst.addressing, dst_bases, dst_cs),
        n_items=0, n_planes=plan.num_planes, n_chunks=n_chunks, chunk_bytes=chunk_bytes,
        alignment=plan.alignment(table_bases=None), bases_known=int(plan.bases_known),
        kernel=kernel, max_blocks=sm_budget, warps_per_block=num_warps, device=tgt.index,
        stage_bytes=stage_bytes, stages=stages, smem_cap=smem_cap, stream=None,
    )


def _tables(plan: TransferPlan, device: torch.device, stream) -> tuple[torch.Tensor, torch.Tensor]:
    # a table copied for this call is copied in ``stream``'s order (None: the current stream)
    with torch.cuda.stream(stream) if device.type == "cuda" else contextlib.nullcontext():
        return address_table(plan.src.bases, device), address_table(plan.dst.bases, device)


def launch(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor, *, kernel: int,
           sm_budget: int, num_warps: int, stream: "torch.cuda.Stream | None", backend: str,
           stage_bytes: int = 0, stages: int = 0, smem_cap: int = 0) -> None:
    """Fill the C descriptor for ``plan`` and launch ``kernel`` on ``stream``
    (``stage_bytes``, ``stages``, ``smem_cap``: the bulk kernel's, 0 = default)."""
    tgt = target(plan, kernel, backend)
    n_items = src_indices.numel()
    if n_items == 0 or plan.num_planes == 0:
        return
    for what, idx in (("src_indices", src_indices), ("dst_indices", dst_indices)):
        if idx.device != tgt.device or idx.dtype != torch.int64 or not idx.is_contiguous():
            raise ValueError(f"{what}: expected a contiguous int64 tensor on {tgt.device}, got "
                             f"{idx.dtype} on {idx.device}")
    src_bases, dst_bases = _tables(plan, tgt.device, stream)
    desc = _descriptor(plan, tgt, src_bases, dst_bases, kernel=kernel, sm_budget=sm_budget,
                       num_warps=num_warps, backend=backend, stage_bytes=stage_bytes, stages=stages,
                       smem_cap=smem_cap)
    desc.src.indices, desc.dst.indices = src_indices.data_ptr(), dst_indices.data_ptr()
    desc.n_items, desc.stream = n_items, tgt.raw_stream(stream)
    _native.check(tgt.lib.hck_copy_items(ctypes.byref(desc)), f"backend {backend!r}: {plan.label}",
                  tgt.lib)


class Launcher:
    """A plan's kernel launch, prepared once: its C description filled (plane-base
    tables on the device, alignment, chunks, grid), so a call passes only the two
    index pointers, their count and the stream to the library, in one C call.

    ``launcher(src_ptr, dst_ptr, n_items, stream, events)`` launches on ``stream``
    (a torch stream; None: the current one) with index arrays at ``src_ptr`` and
    ``dst_ptr`` (int64, ``n_items`` each, on :attr:`device`); the caller has checked
    them (:func:`hicache_kernels.ops.launch_prepared`). Where ``_prepared`` is built,
    :attr:`compiled` does the checks and the library call in one C call (see
    ``csrc/ops/prepared.c``). :func:`join` makes one launcher of several (one per
    layer): a call launches each in order, recording ``events[i]`` (a ``cudaEvent_t``
    array, or None) on the stream after launcher i.

    Made (by :meth:`of`) on first use, as the tables are: before any CUDA graph capture.
    """

    @classmethod
    def of(cls, plan: TransferPlan, *, kernel: int, sm_budget: int, num_warps: int, backend: str,
           stage_bytes: int = 0, stages: int = 0, smem_cap: int = 0) -> "Launcher | None":
        """The launcher, or None where an address table given as a tensor is not usable
        as it is (int64, contiguous, on the kernel's device): converted once, it would
        be read later on streams it was not made on, so such plans keep the checked
        path, which converts it on the launch's own stream each call."""
        tgt = target(plan, kernel, backend)
        for side in (plan.src, plan.dst):
            table = side.bases
            if isinstance(table, torch.Tensor) and (
                    table.device != tgt.device or table.dtype not in (torch.int64, torch.uint64)
                    or not table.is_contiguous()):
                return None
        return cls(plan, tgt, kernel=kernel, sm_budget=sm_budget, num_warps=num_warps,
                   backend=backend, stage_bytes=stage_bytes, stages=stages, smem_cap=smem_cap)

    def __init__(self, plan: TransferPlan, tgt: Target, *, kernel: int, sm_budget: int,
                 num_warps: int, backend: str, stage_bytes: int = 0, stages: int = 0,
                 smem_cap: int = 0):
        src_bases, dst_bases = _tables(plan, tgt.device, None)
        desc = _descriptor(plan, tgt, src_bases, dst_bases, kernel=kernel, sm_budget=sm_budget,
                           num_warps=num_warps, backend=backend, stage_bytes=stage_bytes,
                           stages=stages, smem_cap=smem_cap)
        self._set(tgt, (_native.CopyDesc * 1)(desc), f"backend {backend!r}: {plan.label}",
                  (src_bases, dst_bases))

    def _set(self, tgt: Target, descs, what: str, keep: tuple) -> None:
        self.device, self.index, self.n, self.what = tgt.device, tgt.index, len(descs), what
        self.target = tgt
        self.raw_stream = tgt.raw_stream
        self._descs, self.descs_address = descs, ctypes.addressof(descs)
        self._fn, self._lib = tgt.lib.hck_copy_prepared, tgt.lib
        self.fn_address = ctypes.cast(self._fn, ctypes.c_void_p).value
        self._keep = keep     # the base tables the descriptions point to
        # the per-call half in C (None: not built): ``compiled(src, dst, stream, check, events)``
        self.compiled = None if _prepared is None else _prepared.Launch(
            self.fn_address, self.descs_address, self.n, tgt.index, dlpack_device(tgt.device),
            tgt.raw_stream, tgt.current, functools.partial(_native.check, what=what, lib=tgt.lib),
            (descs, keep))
        self.on_launch = None

    @property
    def on_launch(self):
        """None, or called after each launch (auto's dispatch notes its choice)."""
        return self._on_launch

    @on_launch.setter
    def on_launch(self, fn) -> None:
        self._on_launch = fn
        if self.compiled is not None:
            self.compiled.on_launch = fn

    def __call__(self, src_ptr: int, dst_ptr: int, n_items: int, stream=None, events=None) -> None:
        self.check(self._fn(self.descs_address, self.n, src_ptr, dst_ptr, n_items,
                            self.raw_stream(stream), events))

    def check(self, rc: int) -> None:
        """Raise a RuntimeError naming the transfer when the library returned ``rc`` != 0."""
        if rc:
            _native.check(rc, self.what, self._lib)


def join(launchers: Sequence[Launcher], what: str) -> Launcher:
    """One launcher running ``launchers`` in order (one library and device)."""
    first = launchers[0]
    for other in launchers[1:]:
        if other._lib is not first._lib or other.index != first.index:
            raise ValueError(f"{what}: expected launchers of one library and device")
    descs = (_native.CopyDesc * sum(l.n for l in launchers))(*[d for l in launchers for d in l._descs])
    joined = Launcher.__new__(Launcher)
    joined._set(first.target, descs, what, tuple(l._keep for l in launchers))
    return joined


def dlpack_device(device: torch.device) -> tuple[int, int]:
    """``device`` as DLPack names it, ``(device type, id)``: how torch's DLPack export
    reports a tensor there (a CPU tensor, pinned or not, as ``(kDLCPU, 0)``)."""
    if device.type == "cpu":
        return (1, 0)                                 # kDLCPU
    if device.type == "cuda":
        return (10 if torch.version.hip else 2, device.index)   # kDLROCM, kDLCUDA
    raise ValueError(f"device: expected cpu or cuda, got {device}")


def bulk_eligible(plan: TransferPlan) -> bool:
    """Whether the bulk kernel can take ``plan``: every address and size 16-byte
    aligned, and every base known on the host."""
    return plan.bases_known and plan.alignment(table_bases=None) == 16


def _side(addressing, bases: torch.Tensor, chunk_stride: int) -> _native.Side:
    return _native.Side(bases=bases.data_ptr(), indices=None, page_size=addressing.page_size,
                        page_stride=addressing.page_stride, slot_stride=addressing.slot_stride,
                        chunk_stride=chunk_stride)
