"""The Triton backend: one persistent gather/scatter kernel for every layout pair.

Each program walks tiles of ``ROWS`` rows (a row is one chunk of one item in
one plane) by ``COLS`` words. A whole tile is loaded before it is stored, so
every thread has several independent loads in flight; the grid is capped by
the SM budget. All address math is int64. Bases come from int64 address
tables, so a pinned host buffer is read or written directly through unified
addressing, with no staging copy.

Every specialization a launch makes is compiled for sm_80, sm_90 and sm_100 under
each supported Triton without a GPU (tests/test_triton_compile.py).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..plan import TransferPlan, address_table

name = "triton"

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - triton is a dependency, but be explicit
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = ""

# Bytes each thread moves per tile: 8 x 16-byte loads in flight before the first store,
# as the CUDA kernel does. A program of 16 warps then has 64 KiB in flight; a host link
# needs bandwidth x latency (about 55 GB/s x 1.5 us = 80 KB), which 2 programs cover.
# Scaling the tile with the warps keeps each thread's registers the same at any num_warps.
BYTES_PER_THREAD = 128
MAX_COLS = 1024
# Rows per tile: narrow words (1-byte fp8 items) would otherwise make tall tiles
# (4096 x 16) that spill to the stack; 512 rows still keep every thread busy.
MAX_ROWS = 512
DEFAULT_NUM_WARPS = 16
# Programs when no SM budget is given: enough to carry the link on Hopper
# (measured on an H200: 4-8 wide blocks reach ~92% of the link) while leaving the model its SMs.
DEFAULT_SM_BUDGET = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> tuple[bool, str]:
    if triton is None:
        return False, _IMPORT_ERROR
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


# What the JIT specializes on: the constexprs (word, vector, tile shape), num_warps and
# the anchor's 16-byte alignment (for 16-byte vectors), nothing else. Counts and pointers
# change with every call, strides with the pool; specializing them (on a value of 1, on
# divisibility by 16) would compile a kernel per combination, on the hot path for the
# counts, and the explicit multiple_of hints already carry the alignment that matters.
JIT_OPTIONS = dict(do_not_specialize=(
    "anchor_addr", "src_bases", "dst_bases", "src_idx", "dst_idx", "n_rows", "row_tiles",
    "total_tiles", "n_chunks", "chunk_vecs",
    "src_page_size", "src_page_stride", "src_slot_stride", "src_chunk_stride",
    "dst_page_size", "dst_page_stride", "dst_slot_stride", "dst_chunk_stride",
))

if triton is not None:

    @triton.jit(**JIT_OPTIONS)
    def _copy_items_kernel(
        anchor, anchor_addr,             # a word-typed pointer and its address (see below)
        src_bases, dst_bases,            # int64 [n_planes]: base byte address of each plane
        src_idx, dst_idx,                # int64 [n_items]: slots; negative = skip
        n_rows, row_tiles, total_tiles, n_chunks, chunk_vecs,
        src_page_size, src_page_stride, src_slot_stride, src_chunk_stride,  # strides in words
        dst_page_size, dst_page_stride, dst_slot_stride, dst_chunk_stride,
        WORD_BYTES: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ):
        # Planes are reached as ``anchor + (base - anchor_addr) / WORD_BYTES`` rather than
        # by casting the base to a pointer: a cast hides alignment from the compiler,
        # while an offset from a real, aligned pointer argument keeps 16-byte vectors.
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        lanes = tl.arange(0, ROWS).to(tl.int64)
        col_lanes = tl.arange(0, COLS).to(tl.int64)
        chunk_words = chunk_vecs * VEC   # a visible multiple of VEC keeps the mask vector-wide
        for tile in range(pid, total_tiles, n_programs):
            plane = tile // row_tiles
            rows = (tile % row_tiles) * ROWS + lanes
            in_range = rows < n_rows
            item = rows // n_chunks
            chunk = rows % n_chunks
            s = tl.load(src_idx + item, mask=in_range, other=-1)
            d = tl.load(dst_idx + item, mask=in_range, other=-1)
            live = in_range & (s >= 0) & (d >= 0)
            # Lanes that are not live are masked below; clamping keeps their offsets in
            # range. (tl.where here fails to compile on Triton 3.6 from 2 warps up.)
            s = tl.maximum(s, 0)
            d = tl.maximum(d, 0)
            s_off = (s // src_page_size) * src_page_stride + (s % src_page_size) * src_slot_stride \
                + chunk * src_chunk_stride
            d_off = (d // dst_page_size) * dst_page_stride + (d % dst_page_size) * dst_slot_stride \
                + chunk * dst_chunk_stride
            s_off += (tl.load(src_bases + plane) - anchor_addr) // WORD_BYTES
            d_off += (tl.load(dst_bases + plane) - anchor_addr) // WORD_BYTES
            if VEC > 1:
                s_off = tl.multiple_of(s_off, VEC)
                d_off = tl.multiple_of(d_off, VEC)
            for c0 in range(0, chunk_words, COLS):
                cols = c0 + col_lanes
                mask = live[:, None] & (cols < chunk_words)[None, :]
                words = tl.load(anchor + s_off[:, None] + cols[None, :], mask=mask,
                                eviction_policy="evict_first")
                tl.store(anchor + d_off[:, None] + cols[None, :], words, mask=mask,
                         eviction_policy="evict_first")


_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_ANCHORS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _anchor(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small, never-freed tensor whose address every plane is reached from."""
    key = (device, dtype)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.zeros(16, dtype=dtype, device=device)
    return _ANCHORS[key]


def _word(alignment: int) -> tuple[int, int]:
    """(word bytes, words per 16-byte vector) for an alignment."""
    word_bytes = min(alignment, 8)
    return word_bytes, 2 if alignment >= 16 else 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(plan: TransferPlan, num_warps: int = DEFAULT_NUM_WARPS) -> dict:
    """Tile shape and word type for a plan (exposed for tests and benchmarks).

    A function of the plan and num_warps, not of the number of items: a plan
    compiles once.
    """
    n_chunks, chunk_bytes, _, _ = plan.chunks()
    word_bytes, vec = _word(plan.alignment())
    chunk_words = chunk_bytes // word_bytes
    cols = min(_next_pow2(chunk_words), MAX_COLS)
    tile_words = num_warps * 32 * BYTES_PER_THREAD // word_bytes
    rows = min(max(1, tile_words // cols), MAX_ROWS)
    return dict(word_bytes=word_bytes, vec=vec, rows=rows, cols=cols,
                n_chunks=n_chunks, chunk_words=chunk_words)


def _check_table_alignment(plan: TransferPlan, word_bytes: int) -> None:
    """Refuse address-table bases the kernel would truncate to a word.

    The kernel reaches a plane at ``(base - anchor) // word_bytes`` words. Tables
    on the host are checked here; tables on a GPU cannot be read without a sync
    and are taken to be 8-byte aligned (like SGLang's, which hold tensors' addresses).
    """
    for side in (plan.src, plan.dst):
        bases = side.bases
        if not isinstance(bases, torch.Tensor) or bases.device.type != "cpu":
            continue
        bad = (bases.view(torch.int64) % word_bytes).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"{side.name}: base address {int(bases.view(torch.int64)[i]):#x} of plane {i} is "
                f"not a multiple of {word_bytes} bytes; the triton kernel reads this transfer in "
                f"{word_bytes}-byte words, so every address-table base must be {word_bytes}-byte "
                "aligned")


def run(plan: TransferPlan, src_indices: torch.Tensor, dst_indices: torch.Tensor,
        *, sm_budget: int | None = None, num_warps: int | None = None,
        stream: "torch.cuda.Stream | None" = None) -> None:
    n_items = src_indices.numel()
    if n_items == 0 or plan.num_planes == 0:
        return
    num_warps = num_warps or DEFAULT_NUM_WARPS
    cfg = launch_config(plan, num_warps)
    wb = cfg["word_bytes"]
    _check_table_alignment(plan, wb)
    _, _, src_cs, dst_cs = plan.chunks()
    device = plan.device
    n_rows = n_items * cfg["n_chunks"]
    row_tiles = -(-n_rows // cfg["rows"])
    total_tiles = row_tiles * plan.num_planes
    grid = (max(1, min(sm_budget or DEFAULT_SM_BUDGET, total_tiles)),)
    s, d = plan.src.addressing, plan.dst.addressing
    anchor = _anchor(device, _WORD_DTYPES[wb])
    # Tables are built on the transfer's stream: a conversion or copy made for this
    # call is then ordered before the kernel, and its memory is not handed out again
    # until that stream is past the kernel.
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        src_bases = address_table(plan.src.bases, device)
        dst_bases = address_table(plan.dst.bases, device)
        _copy_items_kernel[grid](
            anchor, anchor.data_ptr(), src_bases, dst_bases, src_indices, dst_indices,
            n_rows, row_tiles, total_tiles, cfg["n_chunks"], cfg["chunk_words"] // cfg["vec"],
            s.page_size, s.page_stride // wb, s.slot_stride // wb, src_cs // wb,
            d.page_size, d.page_stride // wb, d.slot_stride // wb, dst_cs // wb,
            WORD_BYTES=wb, VEC=cfg["vec"], ROWS=cfg["rows"], COLS=cfg["cols"],
            num_warps=num_warps,
        )
