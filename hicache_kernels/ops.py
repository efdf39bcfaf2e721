"""The public transfer API: typed, checked at the boundary, backend chosen here.

Every operation is a copy of items (token slots) between two
:class:`~hicache_kernels.buffers.KVBuffer` s of any layouts, over one layer or
a range of layers, K and V together (or MLA's single plane):

=============================================  ================================================
what                                           call
=============================================  ================================================
load one layer host -> device                  ``load_layer(host, dev, h_idx, d_idx, layer)``
back up every layer device -> host             ``backup_all_layers(dev, host, d_idx, h_idx)``
any per-layer copy, either way, any layouts    ``transfer(src, dst, s_idx, d_idx, layers=i)``
any all-layer copy, either way, any layouts    ``transfer(src, dst, s_idx, d_idx)``
the same, prepared once and called often       ``Transfer(src, dst, layers=...)(s_idx, d_idx)``
per-layer transfers launched in one call       ``prepare_layers([Transfer(..., layers=i), ...])``
=============================================  ================================================

Bad input raises before anything is written, naming the argument.

A prepared call with indices already where the kernel reads them (int64, 1-D,
contiguous, on the GPU) goes straight to the CUDA library's prepared launch: one
C call, no Python per plane or per layer. Anything else (CPU indices, a bounds
check asked for, another backend, NVTX ranges on) takes the checked path, which
moves the same bytes.
"""

from __future__ import annotations

import contextlib
from types import ModuleType

import torch

from . import backends
from . import nvtx_ranges as _nvtx
from .backends import cuda as _cuda
from .buffers import KVBuffer
from .nvtx_ranges import enabled as nvtx_enabled, nvtx_range
from .plan import PlaneSet, TransferPlan, indices_to

__all__ = ["Transfer", "transfer", "load_layer", "backup_all_layers", "execute", "launch_prepared",
           "prepare_layers", "PreparedLayers", "run_on_host"]


class Transfer:
    """A transfer between two buffers over fixed layers, prepared once.

    Resolves the backend, base-address tables and checks up front, so each
    call only validates indices and launches.

    Args:
        src, dst: the buffers; same heads, head dim, dtype, layers and MHA/MLA.
        layers: one layer (int), a ``range``, or None for every layer.
        backend: ``"auto"`` (logged reason), ``"cuda"``, ``"triton"``,
            ``"copy_engine"`` or ``"reference"``.
        sm_budget: most blocks/programs a kernel backend may occupy. Transfers
            share SMs with the forward pass; a small budget keeps the model fast.
        num_warps: warps per block/program for kernel backends.

    Example:
        >>> lay = KVLayout("layer_first", num_layers=2, num_slots=16, head_num=2,
        ...                head_dim=4, dtype=torch.bfloat16)
        >>> host = KVBuffer.allocate(lay)
        >>> dev = KVBuffer.allocate(lay)
        >>> load = Transfer(host, dev, layers=1, backend="reference")
        >>> load(torch.tensor([3, 4]), torch.tensor([0, 1]))
    """

    def __init__(self, src: KVBuffer, dst: KVBuffer, *, layers: int | range | None = None,
                 backend: str = "auto", sm_budget: int | None = None,
                 num_warps: int | None = None):
        _check_buffers(src, dst)
        self.layers = _layer_range(layers, src.layout.num_layers)
        lay = src.layout
        what = f"L{self.layers.start}" if len(self.layers) == 1 else f"L{self.layers.start}-{self.layers.stop - 1}"
        self.plan = TransferPlan(
            src=src.plane_set(self.layers, "src"),
            dst=dst.plane_set(self.layers, "dst"),
            head_num=lay.head_num,
            head_bytes=lay.head_bytes,
            label=f"{src.layout.kind.value}->{dst.layout.kind.value} {what}",
        )
        check_launch_options(sm_budget, num_warps)
        self.backend, self.reason = backends.choose(self.plan, backend)
        check_devices(self.plan, self.backend)
        self.sm_budget = sm_budget
        self.num_warps = num_warps
        self.src, self.dst = src, dst
        self._launcher = None   # the backend's prepared launch, made on first use; False: none

    @property
    def bytes_per_item(self) -> int:
        """Bytes moved for each (non-padding) index, over all layers and K/V."""
        return self.plan.bytes_per_item

    def __call__(self, src_indices: torch.Tensor, dst_indices: torch.Tensor, *,
                 stream: "torch.cuda.Stream | None" = None, check: bool | None = None) -> None:
        """Copy ``src_indices[i] -> dst_indices[i]`` (int64; negative = skip).

        Source and destination slots must not overlap: within one buffer, a slot
        that is copied from must not also be copied to (the result is undefined).
        While a CUDA graph is being captured, kernel backends take device indices
        only (CPU ones would be read from a temporary buffer at every replay).

        Args:
            stream: CUDA stream to run on; None means the current stream.
            check: bounds-check the indices. None checks when it is free
                (CPU indices); True also checks device indices (one sync).
        """
        launcher = self._launcher
        if launcher is None:
            launcher = self.launcher()
        if launcher and (launcher.compiled(src_indices, dst_indices, stream, check)
                         if _compiled is not None else
                         launch_prepared(launcher, src_indices, dst_indices, stream, check)):
            return
        execute(self.plan, src_indices, dst_indices, backend_module=self.backend,
                sm_budget=self.sm_budget, num_warps=self.num_warps, stream=stream, check=check)

    def launcher(self):
        """The backend's prepared launch for this transfer (made once: its base tables
        are copied to the device, so not during CUDA graph capture), or None when the
        backend has none (Triton, the copy engines, the reference)."""
        if self._launcher is None:
            prepare = getattr(self.backend, "prepare", None)
            self._launcher = prepare(self.plan, sm_budget=self.sm_budget, num_warps=self.num_warps) \
                if prepare is not None else False
        return self._launcher or None


def transfer(src: KVBuffer, dst: KVBuffer, src_indices: torch.Tensor, dst_indices: torch.Tensor,
             *, layers: int | range | None = None, backend: str = "auto",
             sm_budget: int | None = None, num_warps: int | None = None,
             stream: "torch.cuda.Stream | None" = None, check: bool | None = None) -> None:
    """Copy slots ``src_indices -> dst_indices`` of ``layers`` (default all) from
    ``src`` to ``dst``, K and V. See :class:`Transfer` for the arguments."""
    Transfer(src, dst, layers=layers, backend=backend, sm_budget=sm_budget,
             num_warps=num_warps)(src_indices, dst_indices, stream=stream, check=check)


def load_layer(host: KVBuffer, device: KVBuffer, host_indices: torch.Tensor,
               device_indices: torch.Tensor, layer: int, **options) -> None:
    """Load one layer host -> device so attention on it can start while later
    layers are still in flight. Options as :func:`transfer`."""
    transfer(host, device, host_indices, device_indices, layers=layer, **options)


def backup_all_layers(device: KVBuffer, host: KVBuffer, device_indices: torch.Tensor,
                      host_indices: torch.Tensor, **options) -> None:
    """Back up every layer device -> host. Options as :func:`transfer`."""
    transfer(device, host, device_indices, host_indices, layers=None, **options)


def execute(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor, *,
            backend: str = "auto", backend_module: ModuleType | None = None,
            sm_budget: int | None = None, num_warps: int | None = None,
            stream: "torch.cuda.Stream | None" = None, check: bool | None = None,
            index_names: tuple[str, str] = ("src_indices", "dst_indices")) -> str:
    """Check indices and run ``plan`` on a backend; return the backend's name.

    The shared tail of :class:`Transfer` and :mod:`hicache_kernels.sglang`.
    """
    if backend_module is None:
        check_launch_options(sm_budget, num_warps)
        backend_module, _ = backends.choose(plan, backend)
        check_devices(plan, backend_module)
    # Kernels read indices on their device; the reference and backends that build
    # descriptors on the host (copy_engine) take them where they are.
    on_host = backend_module.name == "reference" or getattr(backend_module, "host_indices", False)
    kernel_device = None if on_host else plan.device
    # Moved on the stream the transfer runs on, so the copy is ordered before it.
    on_stream = stream is not None and plan.device.type == "cuda"
    with torch.cuda.stream(stream) if on_stream else contextlib.nullcontext():
        src_idx, dst_idx = _check_indices(plan, src_indices, dst_indices, kernel_device, check,
                                          index_names)
    if on_stream:
        # the caller may drop its index tensors right away: keep the allocator from
        # handing their memory out again before the side stream has read them
        for idx in (src_idx, dst_idx):
            if idx.is_cuda:
                idx.record_stream(stream)
    label = f"{plan.label} n={src_idx.numel()} {backend_module.name}" if nvtx_enabled() else ""
    with nvtx_range(label) if label else contextlib.nullcontext():
        backend_module.run(plan, src_idx, dst_idx, sm_budget=sm_budget, num_warps=num_warps,
                           stream=stream)
    return backend_module.name


def run_on_host(plan: TransferPlan, backend_module: ModuleType, src_indices: torch.Tensor,
                dst_indices: torch.Tensor, largest: tuple[int | None, int | None]) -> bool:
    """:func:`execute` for indices the caller has checked and measured: int64, 1-D,
    contiguous CPU tensors of one length, whose largest values are ``largest`` (None:
    no index). Runs ``plan`` on a backend that reads indices on the host (the copy
    engines) when every index is in range, on the current stream. Returns False,
    having done nothing, otherwise (another backend, an index out of range, NVTX
    ranges on): :func:`execute` then takes the call (and raises, naming the index).
    """
    if not getattr(backend_module, "host_indices", False) or _nvtx._enabled:
        return False
    src_top, dst_top = largest
    src_slots, dst_slots = plan.src.num_slots, plan.dst.num_slots
    if (src_top is not None and src_slots is not None and src_top >= src_slots) or \
            (dst_top is not None and dst_slots is not None and dst_top >= dst_slots):
        return False
    backend_module.run(plan, src_indices, dst_indices, sm_budget=None, num_warps=None, stream=None)
    return True


# -- prepared launches -------------------------------------------------------------

_Tensor = torch.Tensor
_INT64 = torch.int64
_compiled = _cuda._prepared   # the compiled half of launch_prepared (csrc/ops/prepared.c); None: Python


def launch_prepared(launcher, src_indices, dst_indices, stream=None, check: bool | None = None,
                    events=None) -> bool:
    """Run a prepared launch (``Transfer.launcher()``) when the indices can go
    straight to its kernel: exactly ``torch.Tensor`` s of int64, 1-D and contiguous,
    of one length, on the kernel's device, and no bounds check asked for (``check``
    True), no NVTX ranges on. Returns False, having done nothing, otherwise: the
    checked path (:func:`execute`) then takes the call and moves the same bytes (or
    raises). The checks and the library call are one compiled call where
    ``hicache_kernels._prepared`` is built (``csrc/ops/prepared.c``), else Python.

    As on the checked path, indices used on a ``stream`` passed explicitly are
    recorded on it (``record_stream``), so that their memory is not reused before
    the stream has read them, however soon the caller drops them.
    """
    if _compiled is not None:
        return launcher.compiled(src_indices, dst_indices, stream, check, events)
    if check or _nvtx._enabled:
        return False
    if not _launch_in_python(launcher, src_indices, dst_indices, stream, events):
        return False
    if stream is not None and launcher.index >= 0:
        src_indices.record_stream(stream)
        dst_indices.record_stream(stream)
    if launcher.on_launch is not None:
        launcher.on_launch()
    return True


def _launch_in_python(launcher, src_indices, dst_indices, stream, events) -> bool:
    """``launch_prepared``'s checks and call without its compiled half: the same answers."""
    device = launcher.device
    try:
        if (type(src_indices) is not _Tensor or type(dst_indices) is not _Tensor
                or src_indices.dtype is not _INT64 or dst_indices.dtype is not _INT64
                or src_indices.dim() != 1 or dst_indices.dim() != 1
                or not src_indices.is_contiguous() or not dst_indices.is_contiguous()
                or src_indices.device != device or dst_indices.device != device):
            return False
        n_items = src_indices.numel()
        if dst_indices.numel() != n_items:
            return False
        src, dst = src_indices.data_ptr(), dst_indices.data_ptr()
    except (RuntimeError, TypeError):   # a sparse or nested tensor: the checked path names it
        return False
    launcher(src, dst, n_items, stream, events)
    return True


class PreparedLayers:
    """Transfers of one layer each, with the same indices, launched together: one
    compiled call launches every layer in order on one stream and records
    ``events[i]`` there once layer ``i``'s copy is queued (a manager's layer-wise load).

    Made by :func:`prepare_layers`. ``events`` is a ``ctypes`` array of raw
    ``cudaEvent_t`` handles (``torch.cuda.Event.cuda_event``, of events recorded
    at least once so that they exist), one per layer, or None.
    """

    def __init__(self, launcher, num_layers: int):
        self.launcher = launcher
        self.num_layers = num_layers

    def __call__(self, src_indices, dst_indices, *, stream=None, events=None,
                 check: bool | None = None) -> bool:
        """Launch every layer; False (nothing done) when the indices cannot go
        straight to the kernels (see :func:`launch_prepared`): run the layers'
        Transfers one by one instead."""
        if events is not None and len(events) != self.num_layers:
            raise ValueError(f"events: expected {self.num_layers} events, one per layer, "
                             f"got {len(events)}")
        return launch_prepared(self.launcher, src_indices, dst_indices, stream, check, events)


def prepare_layers(transfers) -> PreparedLayers | None:
    """One :class:`PreparedLayers` for ``transfers`` (a Transfer per layer, in
    order), or None when one of them has no prepared launch (its backend is not
    a CUDA kernel) or they do not share one device."""
    launchers = [t.launcher() for t in transfers]
    if not launchers or not all(launchers):
        return None
    try:
        joined = _cuda.join(launchers, f"{launchers[0].what} and the {len(launchers) - 1} "
                                       "layers after it (descs[i]: the i-th)")
    except ValueError:
        return None
    return PreparedLayers(joined, len(launchers))


# -- checks ------------------------------------------------------------------------

def _check_buffers(src: KVBuffer, dst: KVBuffer) -> None:
    for name, buf in (("src", src), ("dst", dst)):
        if not isinstance(buf, KVBuffer):
            raise TypeError(f"{name}: expected a KVBuffer, got {type(buf).__name__}")
    a, b = src.layout, dst.layout
    for field in ("num_layers", "head_num", "head_dim", "dtype", "mla"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(
                f"dst: expected {field}={getattr(a, field)} like src, got {getattr(b, field)}"
            )


def _layer_range(layers: int | range | None, num_layers: int) -> range:
    if layers is None:
        return range(num_layers)
    if isinstance(layers, bool) or not isinstance(layers, (int, range)):
        raise TypeError(f"layers: expected an int, a range or None, got {type(layers).__name__}")
    if isinstance(layers, int):
        layers = range(layers, layers + 1)
    if layers.step != 1 or len(layers) == 0 or layers.start < 0 or layers.stop > num_layers:
        raise ValueError(
            f"layers: expected a non-empty step-1 range within [0, {num_layers}), got {layers}"
        )
    return layers


def check_launch_options(sm_budget, num_warps) -> None:
    if sm_budget is not None and (not isinstance(sm_budget, int) or isinstance(sm_budget, bool)
                                  or sm_budget < 1):
        raise ValueError(f"sm_budget: expected a positive int or None, got {sm_budget!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps: expected one of 1, 2, 4, 8, 16, 32 or None, got {num_warps!r}")


def check_devices(plan: TransferPlan, backend_module: ModuleType) -> None:
    cuda_sides = [s for s in (plan.src, plan.dst) if s.device.type == "cuda"]
    if len(cuda_sides) == 2 and cuda_sides[0].device != cuda_sides[1].device:
        raise ValueError(
            f"{plan.dst.name}: expected memory on {plan.src.device} like {plan.src.name}, "
            f"got {plan.dst.device} (transfers between GPUs are not supported)"
        )
    if backend_module.name == "reference" or plan.device.type != "cuda":
        return
    for side in (plan.src, plan.dst):
        if side.device.type == "cpu" and not side.pinned:
            raise ValueError(
                f"{side.name}: expected pinned host memory, since the {backend_module.name} "
                f"kernel on {plan.device} reads and writes it directly; allocate it with "
                f"pin_memory=True (or use backend='reference')"
            )


def _check_indices(plan: TransferPlan, src_indices, dst_indices, kernel_device,
                   check: bool | None, names: tuple[str, str]):
    out = []
    for name, idx, side in ((names[0], src_indices, plan.src), (names[1], dst_indices, plan.dst)):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name}: expected an int64 tensor, got {type(idx).__name__}")
        if idx.dtype != torch.int64:
            raise TypeError(f"{name}: expected dtype torch.int64, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(idx.shape)}")
        if idx.device.type == "cuda" and kernel_device is not None and idx.device != kernel_device:
            raise ValueError(f"{name}: expected indices on {kernel_device} or cpu, got {idx.device}")
        if (check or (check is None and idx.device.type == "cpu")) and side.num_slots is not None \
                and idx.numel():
            largest = int(idx.max())
            if largest >= side.num_slots:
                raise IndexError(
                    f"{name}: largest index {largest} is out of range for {side.name} with "
                    f"{side.num_slots} slots"
                )
        out.append(idx)
    if out[0].numel() != out[1].numel():
        raise ValueError(
            f"{names[1]}: expected {out[0].numel()} indices like {names[0]}, got {out[1].numel()}"
        )
    if kernel_device is not None:
        out = [indices_to(i, kernel_device, name).contiguous() for i, name in zip(out, names)]
    return out
