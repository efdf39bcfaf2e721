"""The one description of a KV buffer's layout, and the one place where
(slot, layer, head) becomes a byte offset.

A KV buffer holds, for every layer, the keys and values of ``num_slots`` token
slots, each ``head_num x head_dim`` elements (MLA: one latent vector of
``kv_dim`` elements, described here as ``head_num=1, head_dim=kv_dim`` and no
separate V). K and V live in two tensors of the same shape ("planes" of the
same layout); a layout says how the layer, slot and head dimensions of one such
tensor are ordered:

==================  =====================================  ============================
kind                one K (or V) tensor                    SGLang host pool (K and V)
==================  =====================================  ============================
layer_first         ``[L, N, H, D]``                       ``[2, L, N, H, D]``
page_first          ``[N, L, H, D]``                       ``[2, N, L, H, D]``
page_first_direct   ``[N/P, L, P, H, D]``                  ``[2, N/P, L, P, H, D]``
page_head           ``[N/P, H, P, L, D]``                  ``[2, N/P, H, P, L, D]``
==================  =====================================  ============================

(``L`` layers, ``N`` slots, ``P`` page size, ``H`` heads, ``D`` head dim.) The
device pool is ``layer_first`` split into one ``[N, H, D]`` tensor per layer.

Every backend reads its strides from :meth:`KVLayout.plane_addressing` and
:meth:`KVLayout.layer_stride`; nothing else in the package writes an address
formula.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["LayoutKind", "KVLayout", "PlaneAddressing", "layer_view"]


class LayoutKind(str, enum.Enum):
    LAYER_FIRST = "layer_first"
    PAGE_FIRST = "page_first"
    PAGE_FIRST_DIRECT = "page_first_direct"
    PAGE_HEAD = "page_head"

    @classmethod
    def parse(cls, value: "LayoutKind | str") -> "LayoutKind":
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise ValueError(f"layout: expected one of {names}, got {value!r}") from None


# Order of the dimensions of one K (or V) tensor, outermost first. A slot is
# either one dimension ("slot") or split into ("page", "in_page").
_DIM_ORDER: dict[LayoutKind, tuple[str, ...]] = {
    LayoutKind.LAYER_FIRST: ("layer", "slot", "head", "dim"),
    LayoutKind.PAGE_FIRST: ("slot", "layer", "head", "dim"),
    LayoutKind.PAGE_FIRST_DIRECT: ("page", "layer", "in_page", "head", "dim"),
    LayoutKind.PAGE_HEAD: ("page", "head", "in_page", "layer", "dim"),
}


@dataclass(frozen=True)
class PlaneAddressing:
    """Byte addressing of the items of one plane (one layer of K or of V).

    The item of ``slot`` starts at
    ``(slot // page_size) * page_stride + (slot % page_size) * slot_stride``
    bytes from the plane's base, and its head ``h`` at ``h * head_stride``
    further. Layouts whose slot is a single dimension use ``page_size=1``.
    """

    page_size: int
    page_stride: int
    slot_stride: int
    head_stride: int

    def item_offset(self, slot: int, head: int = 0) -> int:
        page, in_page = divmod(slot, self.page_size)
        return page * self.page_stride + in_page * self.slot_stride + head * self.head_stride

    def item_offsets(self, slots: torch.Tensor) -> torch.Tensor:
        """:meth:`item_offset` of head 0 for a tensor of slots (int64, any shape)."""
        if self.page_size == 1:
            return slots * self.page_stride
        return (slots // self.page_size) * self.page_stride + (slots % self.page_size) * self.slot_stride


def _pow2_alignment(*values: int, cap: int = 16) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    if g == 0:
        return cap
    return min(cap, g & -g)


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one KV buffer.

    Args:
        kind: one of :class:`LayoutKind` (or its string value).
        num_layers: ``L``.
        num_slots: ``N``, token slots; a multiple of ``page_size`` for paged kinds.
        head_num: ``H`` (1 for MLA).
        head_dim: ``D`` (``kv_dim`` for MLA).
        dtype: element type; moved as bytes, so any dtype (fp8 too) works.
        page_size: ``P``, tokens per page.
        mla: one latent tensor per layer instead of K and V.

    Example:
        >>> lay = KVLayout("page_head", num_layers=4, num_slots=64, head_num=2,
        ...                head_dim=8, dtype=torch.bfloat16, page_size=16)
        >>> lay.shape
        (4, 2, 16, 4, 8)
        >>> lay.byte_offset(slot=17, layer=3, head=1)  # 2048*1 + 1024*1 + 64*1 + 16*3
        3184
    """

    kind: LayoutKind
    num_layers: int
    num_slots: int
    head_num: int
    head_dim: int
    dtype: torch.dtype
    page_size: int = 1
    mla: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", LayoutKind.parse(self.kind))
        for name in ("num_layers", "num_slots", "head_num", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {self.dtype!r}")
        if self.mla and self.head_num != 1:
            raise ValueError(f"head_num: MLA layouts have head_num=1, got {self.head_num}")
        if self.paged and self.num_slots % self.page_size:
            raise ValueError(
                f"num_slots: {self.kind.value} needs a multiple of page_size={self.page_size}, "
                f"got {self.num_slots}"
            )
        if self.kind is LayoutKind.PAGE_HEAD and self.mla:
            raise ValueError("layout: page_head is defined for MHA only (SGLang has no MLA page_head)")

    # -- sizes -----------------------------------------------------------------
    @property
    def paged(self) -> bool:
        """Whether a slot is split into (page, in_page) dimensions."""
        return "page" in _DIM_ORDER[self.kind]

    @property
    def num_planes_per_layer(self) -> int:
        """2 (K and V) for MHA, 1 for MLA."""
        return 1 if self.mla else 2

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def head_bytes(self) -> int:
        return self.head_dim * self.element_size

    @property
    def item_bytes(self) -> int:
        """Bytes of one slot of one layer of one plane (SGLang's ``item_size``)."""
        return self.head_num * self.head_bytes

    @property
    def plane_bytes(self) -> int:
        """Bytes of one whole K (or V) tensor."""
        return self.num_layers * self.num_slots * self.item_bytes

    @property
    def total_bytes(self) -> int:
        return self.plane_bytes * self.num_planes_per_layer

    def _dim_sizes(self) -> dict[str, int]:
        return {
            "layer": self.num_layers,
            "slot": self.num_slots,
            "page": self.num_slots // self.page_size,
            "in_page": self.page_size,
            "head": self.head_num,
            "dim": self.head_dim,
        }

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one K (or V) tensor of this layout."""
        sizes = self._dim_sizes()
        return tuple(sizes[d] for d in _DIM_ORDER[self.kind])

    @cached_property
    def _byte_strides(self) -> dict[str, int]:
        sizes = self._dim_sizes()
        strides: dict[str, int] = {}
        step = self.element_size
        for dim in reversed(_DIM_ORDER[self.kind]):
            strides[dim] = step
            step *= sizes[dim]
        return strides

    # -- addressing: the one place --------------------------------------------
    def layer_stride(self) -> int:
        """Bytes between layer ``l`` and ``l + 1`` of one K (or V) tensor."""
        return self._byte_strides["layer"]

    def plane_addressing(self) -> PlaneAddressing:
        """How items are addressed inside one layer of one K (or V) tensor."""
        s = self._byte_strides
        if self.paged:
            return PlaneAddressing(self.page_size, s["page"], s["in_page"], s["head"])
        return PlaneAddressing(1, s["slot"], 0, s["head"])

    def byte_offset(self, slot: int, layer: int, head: int = 0) -> int:
        """Byte offset of (slot, layer, head) from the start of a K (or V) tensor."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot: expected 0 <= slot < {self.num_slots}, got {slot}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if not 0 <= head < self.head_num:
            raise IndexError(f"head: expected 0 <= head < {self.head_num}, got {head}")
        return layer * self.layer_stride() + self.plane_addressing().item_offset(slot, head)

    def page_byte_runs(self) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` runs, adjacent ones merged, covering every byte of
        page 0 (slots ``0 .. page_size-1``) in every layer of one K (or V) tensor.

        Page ``p`` is the same runs shifted by ``plane_addressing().item_offset(p *
        page_size)``. A storage tier uses these to move whole pages: one run for
        the paged and page-first layouts, one per layer for ``layer_first``.
        """
        hb = self.head_bytes
        starts = sorted(self.byte_offset(slot, layer, head) for layer in range(self.num_layers)
                        for slot in range(self.page_size) for head in range(self.head_num))
        runs: list[list[int]] = []
        for start in starts:
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += hb
            else:
                runs.append([start, hb])
        return [(offset, nbytes) for offset, nbytes in runs]

    def page_items(self, page_size: int | None = None) -> "KVLayout | None":
        """The same memory described with one item per page (``page_size``
        consecutive slots, default ``self.page_size``, become one slot of
        ``page_size * item_bytes``), or None when a page is not one contiguous run
        in each plane (``page_first``, ``page_head``, ``page_first_direct`` with
        other pages) or the slots do not divide into pages.

        Moving page ``p`` of this layout moves slots ``p*P .. p*P+P-1`` of the
        original, so a caller that works in pages passes ``P`` times fewer
        indices (the manager's loads and backups).
        """
        P = self.page_size if page_size is None else page_size
        if self.kind is LayoutKind.LAYER_FIRST:
            pass                       # slots are contiguous whatever the page size
        elif self.kind is not LayoutKind.PAGE_FIRST_DIRECT or P != self.page_size:
            return None
        if P < 1 or self.num_slots % P:
            return None
        return self.with_(num_slots=self.num_slots // P, head_num=1,
                          head_dim=P * self.head_num * self.head_dim, page_size=1)

    # -- helpers ---------------------------------------------------------------
    def with_(self, **changes) -> "KVLayout":
        """A copy with some fields changed (``lay.with_(kind="page_first")``)."""
        fields = dict(
            kind=self.kind, num_layers=self.num_layers, num_slots=self.num_slots,
            head_num=self.head_num, head_dim=self.head_dim, dtype=self.dtype,
            page_size=self.page_size, mla=self.mla,
        )
        fields.update(changes)
        return KVLayout(**fields)

    def describe(self) -> str:
        attn = "MLA" if self.mla else "MHA"
        return (
            f"{self.kind.value} {attn} L={self.num_layers} N={self.num_slots} H={self.head_num} "
            f"D={self.head_dim} {str(self.dtype).removeprefix('torch.')} P={self.page_size} "
            f"({self.total_bytes / 2**30:.3f} GiB)"
        )


def layer_view(plane: torch.Tensor, layout: KVLayout, layer: int) -> torch.Tensor:
    """One layer of a K (or V) tensor as a uint8 view ``[pages, P, H, head_bytes]``.

    Built from torch's own indexing and permutes, not from
    :meth:`KVLayout.plane_addressing`, so the reference backend (and the tests
    that compare the two) stay independent of the address formula.
    ``plane`` may also be a single layer ``[N, H, D]`` of a layer-first pool
    (pass ``layer=0`` with a one-layer layout, or use :func:`slot_rows_view`).
    """
    kind = layout.kind
    if kind is LayoutKind.LAYER_FIRST:
        one = plane[layer]                           # [N, H, D]
        view = one.unsqueeze(1)                      # [N, 1, H, D]
    elif kind is LayoutKind.PAGE_FIRST:
        view = plane[:, layer].unsqueeze(1)          # [N, 1, H, D]
    elif kind is LayoutKind.PAGE_FIRST_DIRECT:
        view = plane[:, layer]                       # [N/P, P, H, D]
    else:  # PAGE_HEAD
        view = plane[:, :, :, layer].permute(0, 2, 1, 3)  # [N/P, P, H, D]
    return view.view(torch.uint8)


def slot_rows_view(layer_tensor: torch.Tensor, head_num: int) -> torch.Tensor:
    """A one-layer ``[N, ...]`` tensor as a uint8 view ``[N, 1, head_num, head_bytes]``."""
    # view, never reshape: a copy would silently drop writes to a destination
    rows = layer_tensor.view(layer_tensor.shape[0], -1).view(torch.uint8)
    return rows.view(rows.shape[0], 1, head_num, -1)
