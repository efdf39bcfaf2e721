// How a copy (abi.h's HckCopyDesc) is cut into work, shared by the device
// kernels and the host-side emulation test. Nothing here touches CUDA: the
// address math is plain __host__ __device__ code so a CPU can run and check it.
//
// Why it is shaped this way: with a 2-block grid a thread has a budget of a
// few hundred instructions per 16 bytes it moves, so per-unit work is a few
// multiplies, two FastDivmods and two cached index loads; 64-bit divisions
// only happen once per launch, on the host.
#pragma once

#include <stdint.h>

#include "hicache/abi.h"
#include "hicache/fast_divmod.h"

namespace hicache {

// Independent loads each thread has in flight before its first store: 16-byte
// units make 32 KiB per 256-thread block, so the default grid (8 such blocks)
// keeps 256 KiB in flight, about twice what a host link with a ~2 us round
// trip needs to carry ~55 GB/s.
constexpr int kUnroll = 8;

// Threads in a register-kernel block at most: 8 warps. A larger block asked
// for runs as several such blocks (register_grid), and a block takes at most
// a third of an SM's registers (256 threads of at most 80: the kernel is
// built for 3 blocks an SM), so it can share the SM with other kernels.
constexpr uint32_t kMaxRegisterThreads = 256;

// Per-launch limits that keep every in-kernel index in 32 bits (tests lower them).
struct LaunchLimits {
  uint32_t max_units_per_plane = 0x7fffffffu;
  uint32_t max_tiles = 0x7fffffffu;
};

struct SidePlan {
  const int64_t* bases;
  const int64_t* indices;
  int64_t page_stride;
  int64_t slot_stride;
  int64_t chunk_stride;
  int64_t page_size;
  FastDivmod page;  // by page_size, for slots below 2^32
};

// Slots of 2^32 and beyond: a 64-bit division, out of line (it never runs in practice).
HCK_HD_COLD int64_t wide_slot_offset(const SidePlan& s, int64_t slot) {
  return (slot / s.page_size) * s.page_stride + (slot % s.page_size) * s.slot_stride;
}

// Byte offset of a slot below 2^32 from its plane's base (page_size 1 too:
// FastDivmod(1) gives the slot itself and remainder 0).
HCK_HD int64_t narrow_slot_offset(const SidePlan& s, uint32_t slot) {
  uint32_t page, in_page;
  s.page.divmod(slot, page, in_page);
  return int64_t(page) * s.page_stride + int64_t(in_page) * s.slot_stride;
}

// Byte offset of any slot's item from its plane's base.
HCK_HD int64_t slot_offset(const SidePlan& s, int64_t slot) {
  if (slot > int64_t(0xffffffff)) return wide_slot_offset(s, slot);
  return narrow_slot_offset(s, uint32_t(slot));
}

// Byte offset of (slot, chunk) + byte from the plane's base; WIDE: slots may
// be 2^32 or more (else the caller has checked that none is).
template <bool WIDE = true>
HCK_HD int64_t chunk_offset(const SidePlan& s, int64_t slot, uint32_t chunk, int64_t byte) {
  const int64_t at = WIDE ? slot_offset(s, slot) : narrow_slot_offset(s, uint32_t(slot));
  return at + int64_t(chunk) * s.chunk_stride + byte;
}

inline SidePlan make_side(const HckSide& side, int64_t first_item) {
  SidePlan s;
  s.bases = side.bases;
  s.indices = side.indices + first_item;
  s.page_stride = side.page_stride;
  s.slot_stride = side.slot_stride;
  s.chunk_stride = side.chunk_stride;
  s.page_size = side.page_size;
  s.page = FastDivmod(uint32_t(side.page_size));
  return s;
}

// -- register kernel -------------------------------------------------------------------
//
// Each plane's bytes are cut into units of W bytes (W = the alignment), in
// order (item, chunk, unit); a tile is threads * kUnroll consecutive units of
// one plane. Thread t of a block takes units t, t + threads, ... of its tile,
// so a warp's accesses are adjacent; it loads the tile's indices, then all of
// its units, then stores them (copy_registers.h).
struct RegisterPlan {
  SidePlan src, dst;
  uint32_t unit_bytes;
  uint32_t n_planes;
  uint32_t units_per_plane;
  uint32_t tile_units;  // threads * kUnroll
  uint32_t tiles_per_plane;
  uint32_t total_tiles;
  FastDivmod units_per_chunk;
  FastDivmod chunks;  // by n_chunks
  FastDivmod tiles;   // by tiles_per_plane
};

// The register kernel's grid for a request of warps_per_block warps and
// max_blocks blocks: blocks of at most kMaxRegisterThreads threads, more of
// them when the request's blocks are larger, so the grid holds at least the
// threads asked for (a 32-warp block runs as 4 blocks of 8 warps).
struct RegisterGrid {
  uint32_t threads;     // per block
  uint32_t max_blocks;  // the grid never exceeds it
};

inline RegisterGrid register_grid(int32_t warps_per_block, int32_t max_blocks) {
  const uint32_t asked = uint32_t(warps_per_block) * 32u;
  if (asked <= kMaxRegisterThreads) return {asked, uint32_t(max_blocks)};
  const int64_t split = (asked + kMaxRegisterThreads - 1) / kMaxRegisterThreads;
  const int64_t blocks = int64_t(max_blocks) * split;
  return {kMaxRegisterThreads, uint32_t(blocks < 0x7fffffff ? blocks : 0x7fffffff)};
}

// Items per launch so that every index fits the limits (0 if one item cannot).
inline int64_t register_items_per_launch(const HckCopyDesc& d, uint32_t unit_bytes,
                                         uint32_t threads, const LaunchLimits& lim = {}) {
  const int64_t units_per_item = d.n_chunks * (d.chunk_bytes / unit_bytes);
  const int64_t tile_units = int64_t(threads) * kUnroll;
  int64_t max_units = lim.max_units_per_plane;
  const int64_t by_tiles = (int64_t(lim.max_tiles) / d.n_planes) * tile_units;
  if (by_tiles < max_units) max_units = by_tiles;
  return units_per_item > 0 ? max_units / units_per_item : 0;
}

inline RegisterPlan make_register_plan(const HckCopyDesc& d, uint32_t unit_bytes, uint32_t threads,
                                       int64_t first_item, int64_t n_items) {
  RegisterPlan p;
  p.src = make_side(d.src, first_item);
  p.dst = make_side(d.dst, first_item);
  p.unit_bytes = unit_bytes;
  p.n_planes = uint32_t(d.n_planes);
  const uint32_t upc = uint32_t(d.chunk_bytes / unit_bytes);
  p.units_per_plane = uint32_t(n_items * d.n_chunks * upc);
  p.tile_units = threads * kUnroll;
  p.tiles_per_plane = (p.units_per_plane + p.tile_units - 1) / p.tile_units;
  p.total_tiles = p.tiles_per_plane * p.n_planes;
  p.units_per_chunk = FastDivmod(upc);
  p.chunks = FastDivmod(uint32_t(d.n_chunks));
  p.tiles = FastDivmod(p.tiles_per_plane > 0 ? p.tiles_per_plane : 1);
  return p;
}

// -- bulk kernel -----------------------------------------------------------------------
//
// A tile fills one shared-memory stage: several whole rows (a row is one chunk
// of one item) when a row fits a stage, else one piece of one row. Each warp
// runs its own pipeline over tiles pipe, pipe + n_pipes, ...
struct BulkPlan {
  SidePlan src, dst;
  uint32_t n_planes;
  uint32_t n_rows;  // rows per plane: items * chunks
  uint32_t chunk_bytes;
  uint32_t rows_per_tile;
  uint32_t pieces_per_row;
  uint32_t piece_bytes;
  uint32_t tiles_per_plane;
  uint32_t total_tiles;
  uint32_t stage_bytes;
  uint32_t stages;
  FastDivmod chunks;
  FastDivmod tiles;
  FastDivmod pieces;
};

// The rows [row_begin, row_end) of one plane, bytes [byte_begin, +byte_len)
// of each, staged at (row - row_begin) * byte_len in the stage.
struct BulkTile {
  uint32_t plane;
  uint32_t row_begin, row_end;
  uint32_t byte_begin, byte_len;
};

// Stages a pipeline keeps; a stage is reloaded only once the stores that read
// it two tiles earlier are done reading, so stages - 2 tiles load in flight.
constexpr uint32_t kMinBulkStages = 3;

// Shared memory: each warp's mbarriers, padded to 128 bytes, then each warp's stages.
HCK_HD uint32_t barrier_region(uint32_t warps, uint32_t stages) {
  return (warps * stages * 8u + 127u) / 128u * 128u;
}

// A block's shared memory: ``warps`` pipelines of ``stages`` stages of
// ``stage_bytes``, ``smem`` bytes in all.
struct BulkShape {
  uint32_t stage_bytes;
  uint32_t stages;
  int64_t smem;
};

// The shape for ``warps`` pipelines within ``limit`` bytes of shared memory a
// block, taking what is given (non-zero) and by default: stages of the largest
// power of two up to 16 KiB that leaves each pipeline 4 of them, and as many
// stages as fit, at most 8. The caller checks that the result is usable
// (stage_bytes a positive multiple of 16, at least kMinBulkStages stages,
// smem within the limit).
inline BulkShape bulk_shape(uint32_t warps, uint32_t stage_bytes, uint32_t stages, int64_t limit) {
  const int64_t room = limit - barrier_region(warps, 8);
  if (stage_bytes == 0) {
    int64_t want = room / (int64_t(warps) * 4);
    if (want > 16384) want = 16384;
    uint32_t pow2 = 0;
    for (uint32_t b = 16; int64_t(b) <= want; b *= 2) pow2 = b;
    stage_bytes = pow2;
  }
  if (stages == 0 && stage_bytes > 0) {
    const int64_t fit = room / (int64_t(warps) * stage_bytes);
    stages = uint32_t(fit < 8 ? (fit > 0 ? fit : 0) : 8);
  }
  const int64_t smem = barrier_region(warps, stages) + int64_t(warps) * stages * stage_bytes;
  return {stage_bytes, stages, smem};
}

inline int64_t bulk_items_per_launch(const HckCopyDesc& d, uint32_t stage_bytes,
                                     const LaunchLimits& lim = {}) {
  const int64_t rows_per_item = d.n_chunks;
  const int64_t pieces = (d.chunk_bytes + stage_bytes - 1) / stage_bytes;
  const int64_t tiles_per_row = pieces;  // a whole row or more per tile costs at most this
  int64_t max_rows = lim.max_units_per_plane;
  const int64_t by_tiles = int64_t(lim.max_tiles) / d.n_planes / tiles_per_row;
  if (by_tiles < max_rows) max_rows = by_tiles;
  return max_rows / rows_per_item;
}

inline BulkPlan make_bulk_plan(const HckCopyDesc& d, uint32_t stage_bytes, uint32_t stages,
                               int64_t first_item, int64_t n_items) {
  BulkPlan p;
  p.src = make_side(d.src, first_item);
  p.dst = make_side(d.dst, first_item);
  p.n_planes = uint32_t(d.n_planes);
  p.n_rows = uint32_t(n_items * d.n_chunks);
  p.chunk_bytes = uint32_t(d.chunk_bytes);
  p.stage_bytes = stage_bytes;
  p.stages = stages;
  if (p.chunk_bytes <= stage_bytes) {
    p.rows_per_tile = stage_bytes / p.chunk_bytes;
    p.pieces_per_row = 1;
    p.piece_bytes = p.chunk_bytes;
    p.tiles_per_plane = (p.n_rows + p.rows_per_tile - 1) / p.rows_per_tile;
  } else {
    p.rows_per_tile = 1;
    p.pieces_per_row = (p.chunk_bytes + stage_bytes - 1) / stage_bytes;
    p.piece_bytes = stage_bytes;
    p.tiles_per_plane = p.n_rows * p.pieces_per_row;
  }
  p.total_tiles = p.tiles_per_plane * p.n_planes;
  p.chunks = FastDivmod(uint32_t(d.n_chunks));
  p.tiles = FastDivmod(p.tiles_per_plane > 0 ? p.tiles_per_plane : 1);
  p.pieces = FastDivmod(p.pieces_per_row);
  return p;
}

HCK_HD BulkTile bulk_tile(const BulkPlan& p, uint32_t tile) {
  BulkTile t;
  uint32_t in_plane;
  p.tiles.divmod(tile, t.plane, in_plane);
  if (p.pieces_per_row == 1) {
    t.row_begin = in_plane * p.rows_per_tile;
    t.row_end = t.row_begin + p.rows_per_tile < p.n_rows ? t.row_begin + p.rows_per_tile : p.n_rows;
    t.byte_begin = 0;
    t.byte_len = p.chunk_bytes;
  } else {
    uint32_t piece;
    p.pieces.divmod(in_plane, t.row_begin, piece);
    t.row_end = t.row_begin + 1;
    t.byte_begin = piece * p.piece_bytes;
    const uint32_t left = p.chunk_bytes - t.byte_begin;
    t.byte_len = left < p.piece_bytes ? left : p.piece_bytes;
  }
  return t;
}

// -- copy-engine runs ------------------------------------------------------------------

// Split count runs into at most parts contiguous groups of about equal bytes;
// starts[0..n] receives the group boundaries (starts[n] = count). Returns n.
inline int partition_by_bytes(const int64_t* sizes, int64_t count, int parts, int64_t* starts) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += sizes[i];
  if (parts < 1) parts = 1;
  if (parts > count) parts = int(count > 0 ? count : 1);
  int n = 0;
  starts[0] = 0;
  int64_t acc = 0;
  for (int64_t i = 0; i < count && n < parts - 1; ++i) {
    acc += sizes[i];
    // close group n once it holds its share of the bytes
    if (acc * parts >= total * (n + 1) && i + 1 < count) starts[++n] = i + 1;
  }
  starts[++n] = count;
  return n;
}

}  // namespace hicache
