"""KVBuffer: a :class:`~hicache_kernels.layouts.KVLayout` and the tensors that hold it."""

from __future__ import annotations

from typing import Sequence

import torch

from .layouts import KVLayout, LayoutKind, layer_view, slot_rows_view
from .plan import PlaneSet

__all__ = ["KVBuffer"]

TensorOrLayers = "torch.Tensor | Sequence[torch.Tensor]"


class KVBuffer:
    """K and V tensors of one layout: a pinned host pool or a device pool.

    ``k`` (and ``v``, absent for MLA) is either one tensor of ``layout.shape``
    or, for ``layer_first`` only, a list of ``num_layers`` tensors
    ``[num_slots, head_num, head_dim]`` (SGLang's device pool keeps one
    tensor per layer).

    Example:
        >>> lay = KVLayout("page_first", num_layers=2, num_slots=8, head_num=1,
        ...                head_dim=4, dtype=torch.float16)
        >>> host = KVBuffer.allocate(lay)          # one [2, 8, 2, 1, 4] tensor
        >>> host.k.shape
        torch.Size([8, 2, 1, 4])
    """

    def __init__(self, layout: KVLayout, k: TensorOrLayers, v: TensorOrLayers | None = None):
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout: expected a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        if layout.mla and v is not None:
            raise ValueError("v: MLA buffers hold one latent tensor per layer; pass v=None")
        if not layout.mla and v is None:
            raise ValueError("v: MHA buffers need a V tensor (or list of per-layer tensors)")
        self.per_layer = not isinstance(k, torch.Tensor)
        self.k = self._check_plane("k", k)
        self.v = None if v is None else self._check_plane("v", v)
        devices = {t.device for t in self.tensors()}
        if len(devices) != 1:
            raise ValueError(f"k, v: expected all tensors on one device, got {sorted(map(str, devices))}")
        self.device: torch.device = devices.pop()

    # -- construction ----------------------------------------------------------
    def _check_plane(self, name: str, plane: TensorOrLayers):
        lay = self.layout
        if isinstance(plane, torch.Tensor):
            if self.per_layer:
                raise TypeError(f"{name}: expected a list of per-layer tensors like k, got one tensor")
            _check_tensor(name, plane, lay.shape, lay.dtype)
            return plane
        if self.per_layer is False:
            raise TypeError(f"{name}: expected one tensor like k, got a list")
        if lay.kind is not LayoutKind.LAYER_FIRST:
            raise ValueError(f"{name}: per-layer tensors are layer_first only, layout is {lay.kind.value}")
        layers = list(plane)
        if len(layers) != lay.num_layers:
            raise ValueError(f"{name}: expected {lay.num_layers} per-layer tensors, got {len(layers)}")
        row_shape = (lay.num_slots, lay.head_num, lay.head_dim)
        for i, t in enumerate(layers):
            _check_tensor(f"{name}[{i}]", t, row_shape, lay.dtype)
        return layers

    @classmethod
    def allocate(
        cls,
        layout: KVLayout,
        *,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> "KVBuffer":
        """Allocate uninitialised storage the way SGLang's host pool does:
        one tensor ``[2, *layout.shape]`` (``layout.shape`` for MLA)."""
        shape = layout.shape if layout.mla else (2, *layout.shape)
        data = torch.empty(shape, dtype=layout.dtype, device=device, pin_memory=pin_memory)
        if layout.mla:
            return cls(layout, data)
        return cls(layout, data[0], data[1])

    @classmethod
    def from_layers(
        cls,
        k_layers: Sequence[torch.Tensor],
        v_layers: Sequence[torch.Tensor] | None = None,
        *,
        page_size: int = 1,
    ) -> "KVBuffer":
        """Wrap a device pool: per-layer tensors ``[num_slots, head_num, head_dim]``
        (``v_layers=None`` for MLA's ``[num_slots, 1, kv_dim]``)."""
        k_layers = list(k_layers)
        if not k_layers:
            raise ValueError("k_layers: expected at least one per-layer tensor")
        first = k_layers[0]
        if first.dim() != 3:
            raise ValueError(f"k_layers[0]: expected [num_slots, head_num, head_dim], got shape {tuple(first.shape)}")
        n, h, d = first.shape
        layout = KVLayout(
            LayoutKind.LAYER_FIRST, num_layers=len(k_layers), num_slots=n, head_num=h,
            head_dim=d, dtype=first.dtype, page_size=page_size, mla=v_layers is None,
        )
        return cls(layout, k_layers, None if v_layers is None else list(v_layers))

    def page_items(self, page_size: int | None = None) -> "KVBuffer | None":
        """This buffer's memory with one item per page (:meth:`KVLayout.page_items`),
        or None where the layout has no such view. Shares storage: writes through
        one show in the other."""
        lay = self.layout.page_items(page_size)
        if lay is None:
            return None
        row_shape = (lay.num_slots, lay.head_num, lay.head_dim)
        planes = []
        for plane in self.planes():
            if self.per_layer:
                planes.append([t.view(row_shape) for t in plane])
            else:
                planes.append(plane.view(lay.shape))
        return KVBuffer(lay, *planes)

    # -- what backends read ----------------------------------------------------
    def planes(self) -> list:
        return [self.k] if self.v is None else [self.k, self.v]

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for plane in self.planes():
            out.extend(plane if self.per_layer else [plane])
        return out

    def is_pinned(self) -> bool:
        return self.device.type == "cpu" and all(t.is_pinned() for t in self.tensors())

    def plane_bases(self, layers: range) -> list[int]:
        """Base address of each (plane, layer): K's layers first, then V's."""
        stride = self.layout.layer_stride()
        out: list[int] = []
        for plane in self.planes():
            if self.per_layer:
                out.extend(plane[l].data_ptr() for l in layers)
            else:
                base = plane.data_ptr()
                out.extend(base + l * stride for l in layers)
        return out

    def layer_views(self, layers: range) -> list[torch.Tensor]:
        """uint8 views ``[pages, P, H, head_bytes]`` in :meth:`plane_bases` order."""
        lay = self.layout
        out: list[torch.Tensor] = []
        for plane in self.planes():
            for l in layers:
                if self.per_layer:
                    out.append(slot_rows_view(plane[l], lay.head_num))
                else:
                    out.append(layer_view(plane, lay, l))
        return out

    def plane_set(self, layers: range, name: str) -> PlaneSet:
        """The planes of ``layers`` (K's, then V's) as one side of a transfer."""
        return PlaneSet(
            name=name,
            addressing=self.layout.plane_addressing(),
            bases=self.plane_bases(layers),
            device=self.device,
            views=lambda _min_slots: self.layer_views(layers),
            num_slots=self.layout.num_slots,
            pinned=self.is_pinned(),
        )

    def __repr__(self) -> str:
        where = f"{self.device}{' pinned' if self.is_pinned() else ''}"
        form = "per-layer tensors" if self.per_layer else "one tensor per plane"
        return f"KVBuffer({self.layout.describe()}, {where}, {form})"


def _check_tensor(name: str, t, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(
            f"{name}: expected shape {list(shape)} of {dtype}, got {list(t.shape)} of {t.dtype}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (strides {t.stride()})")
