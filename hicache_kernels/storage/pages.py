"""Where a page's bytes live in a host pool, and the page file format.

A *page* is ``layout.page_size`` consecutive token slots (the first one a
multiple of the page size) across every layer, K and V. In host memory its
bytes are a few contiguous *runs* (one per K/V tensor for ``page_first`` and
``page_head``; one per layer and plane for ``layer_first``). A page file holds
a 4 KiB header and then the runs, in the layout's canonical byte order (K
before V, each ordered by :meth:`KVLayout.byte_offset`), so two processes with
the same layout agree on the bytes whatever addresses their pools got.

File format (little-endian)::

    0     8s   magic b"HKVPAGE1"
    8     u32  format version (1)
    12    u32  header bytes (4096; the payload starts 4 KiB-aligned)
    16    u64  payload bytes
    24    u32  CRC-32 of the payload
    28    u32  reserved (0)
    32    64s  page key (hex)
    96    128s layout tag (ascii, NUL-padded)
    224   u32  CRC-32 of bytes 0..223
    228   ...  zeros up to 4096
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..buffers import KVBuffer

__all__ = ["PageGeometry", "PageHeader", "HEADER_BYTES", "layout_tag", "host_pages", "page_bytes", "read_back_ok",
           "check_keys", "check_pages"]

HEADER_BYTES = 4096
MAGIC = b"HKVPAGE1"
VERSION = 1
_HEADER = struct.Struct("<8sIIQII64s128s")
_HEADER_CRC = struct.Struct("<I")


def layout_tag(layout) -> str:
    """Readable name of everything that fixes a page's bytes, e.g.
    ``page_first_mha_L32_H8_D128_bfloat16_P64``."""
    attn = "mla" if layout.mla else "mha"
    dtype = str(layout.dtype).removeprefix("torch.")
    return (f"{layout.kind.value}_{attn}_L{layout.num_layers}_H{layout.head_num}"
            f"_D{layout.head_dim}_{dtype}_P{layout.page_size}")


def page_bytes(layout) -> int:
    """Bytes of one page: every layer of K and V (or MLA's one plane)."""
    return layout.num_planes_per_layer * layout.num_layers * layout.page_size * layout.item_bytes


class PageGeometry:
    """The runs of every page of a host :class:`KVBuffer`, computed once.

    ``page_runs(pages)`` gives, for page indices ``pages`` (``[n]``), the
    host addresses ``[n * R]`` and lengths ``[n * R]`` of their runs, page
    after page, each page's runs in file order; ``file_offsets`` (``[R]``)
    says where each run of a page lies in the payload.

    Example:
        >>> lay = KVLayout("page_first", num_layers=2, num_slots=8, head_num=1,
        ...                head_dim=4, dtype=torch.float16, page_size=4)
        >>> geo = PageGeometry(KVBuffer.allocate(lay))
        >>> geo.runs_per_page, geo.page_bytes   # one run in K, one in V
        (2, 128)
    """

    def __init__(self, host: KVBuffer):
        lay = host.layout
        self.layout = lay
        self.page_size = lay.page_size
        self.num_pages = lay.num_slots // lay.page_size
        if self.num_pages == 0:
            raise ValueError(f"host: needs at least one page of {lay.page_size} slots, has {lay.num_slots}")
        if host.per_layer:
            raise ValueError("host: expected one tensor per K and V (a host pool), got per-layer tensors")
        self.tag = layout_tag(lay)
        # Page 0's runs in one plane, in the layout's byte order (the file order),
        # then the same runs in V; page p is page 0 shifted by page_shift bytes.
        runs = np.asarray(lay.page_byte_runs(), dtype=np.int64).reshape(-1, 2)
        bases = np.asarray([plane.data_ptr() for plane in host.planes()], dtype=np.int64)
        addr = (bases[:, None] + runs[None, :, 0]).ravel()
        size = np.tile(runs[:, 1], bases.size)
        addressing = lay.plane_addressing()
        self.page_shift = addressing.item_offset(lay.page_size) - addressing.item_offset(0)
        # K's last run may end where V's first starts: one run then.
        starts = np.concatenate(([0], np.nonzero(addr[1:] != addr[:-1] + size[:-1])[0] + 1))
        self.run_addr = addr[starts]                                          # page 0, [R]
        self.run_bytes = np.add.reduceat(size, starts)                        # [R]
        self.file_offsets = np.concatenate(([0], np.cumsum(self.run_bytes)[:-1])).astype(np.int64)
        self.runs_per_page = int(self.run_addr.size)
        self.page_bytes = int(self.run_bytes.sum())
        expected = page_bytes(lay)
        if self.page_bytes != expected:
            raise AssertionError(f"page bytes {self.page_bytes} != {expected} for {lay.describe()}")
        self.device = host.device

    def page_runs(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host addresses and lengths (``[n * R]`` int64 each) of ``pages``' runs."""
        pages = np.asarray(pages, dtype=np.int64)
        addr = self.run_addr[None, :] + pages[:, None] * self.page_shift
        return addr.ravel(), np.broadcast_to(self.run_bytes, addr.shape).ravel()

    def checksum(self, page: int) -> int:
        """CRC-32 of one page's bytes in file order, read in place (no copy)."""
        if self.device.type != "cpu":
            raise NotImplementedError("checksums of device-memory pages need a GPU kernel; host pools only")
        crc = 0
        base = int(page) * self.page_shift
        for addr, size in zip(self.run_addr.tolist(), self.run_bytes.tolist()):
            crc = zlib.crc32((ctypes.c_char * size).from_address(addr + base), crc)
        return crc


_HEX = frozenset("0123456789abcdef")


def check_keys(keys: Sequence[str]) -> list[str]:
    """``keys`` as a list; ValueError unless each is a hex page hash (keys name files)."""
    keys = list(keys)
    for key in keys:
        if not isinstance(key, str) or not 0 < len(key) <= 64 or not set(key) <= _HEX:
            raise ValueError(f"keys: expected lowercase hex page hashes (page_keys), got {key!r}")
    return keys


def check_pages(keys: Sequence[str], host_indices, geometry: "PageGeometry") -> tuple[list[str], np.ndarray]:
    """Validated keys and host page indices ``[n]`` for a batch call; ValueError
    names the bad argument."""
    keys = check_keys(keys)
    pages = host_pages(host_indices, geometry)
    if pages.size != len(keys):
        raise ValueError(f"host_indices: expected {len(keys)} pages of {geometry.page_size} slots "
                         f"for {len(keys)} keys, got {pages.size} pages")
    return keys, pages


def read_back_ok(geometry: PageGeometry, pages: np.ndarray, crcs: Sequence[int]) -> list[bool]:
    """After a read into the host pool: ``True`` for the leading pages whose
    bytes match the CRC-32 their writer recorded, ``False`` from the first
    mismatch on (a prefix, like every store answer)."""
    ok = [False] * len(crcs)
    for i, want in enumerate(crcs):
        if geometry.checksum(pages[i]) != want:
            break
        ok[i] = True
    return ok


def host_pages(host_indices, geometry: PageGeometry, *, name: str = "host_indices") -> np.ndarray:
    """Page indices ``[n]`` from token-slot indices ``[n * page_size]``.

    Each page's slots must be consecutive, starting at a multiple of the page
    size (how SGLang's host pool hands out pages).
    """
    if isinstance(host_indices, torch.Tensor):
        if host_indices.dim() != 1 or host_indices.dtype.is_floating_point or host_indices.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {host_indices.dtype} "
                             f"of shape {tuple(host_indices.shape)}")
        idx = host_indices.detach().cpu().numpy().astype(np.int64, copy=False)
    else:
        idx = np.asarray(host_indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D sequence of slot indices, got shape {idx.shape}")
    p = geometry.page_size
    if idx.size % p:
        raise ValueError(f"{name}: expected a multiple of page_size={p} slot indices, got {idx.size}")
    rows = idx.reshape(-1, p)
    first = rows[:, 0]
    if (first % p).any() or (rows != first[:, None] + np.arange(p)).any():
        raise ValueError(f"{name}: each page needs {p} consecutive slots starting at a multiple of {p}")
    pages = first // p
    if pages.size and (pages.min() < 0 or pages.max() >= geometry.num_pages):
        raise ValueError(f"{name}: slots must lie in [0, {geometry.num_pages * p}), "
                         f"got [{idx.min()}, {idx.max()}]")
    return pages


@dataclass(frozen=True)
class PageHeader:
    key: str
    layout: str
    payload_bytes: int
    payload_crc: int

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, self.payload_bytes, self.payload_crc, 0,
                            self.key.encode("ascii"), self.layout.encode("ascii"))
        head = body + _HEADER_CRC.pack(zlib.crc32(body))
        return head + bytes(HEADER_BYTES - len(head))

    @classmethod
    def unpack(cls, raw: bytes) -> "PageHeader":
        """Parse a header; ValueError says what is wrong (the page is then a miss)."""
        need = _HEADER.size + _HEADER_CRC.size
        if len(raw) < need:
            raise ValueError(f"header truncated ({len(raw)} of {need} bytes)")
        body = raw[:_HEADER.size]
        (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
        if zlib.crc32(body) != crc:
            raise ValueError("header checksum mismatch")
        magic, version, header_bytes, payload, payload_crc, _, key, tag = _HEADER.unpack(body)
        if magic != MAGIC or version != VERSION or header_bytes != HEADER_BYTES:
            raise ValueError(f"not a version-{VERSION} page file (magic {magic!r}, version {version})")
        return cls(key.decode("ascii"), tag.rstrip(b"\0").decode("ascii"), payload, payload_crc)
