// The register kernel's work for one tile, written once for the GPU and for
// the host-side emulation: ``Mem`` supplies the loads and stores (DeviceMem in
// kernels.cu, a checking memcpy in the emulation test).
#pragma once

#include <stdint.h>

#include "hicache/copy_plan.h"

namespace hicache {

// W bytes held in registers as 32-bit words (or one narrower word).
template <int W>
struct Unit {
  using word = uint32_t;
  word w[W / 4];
};
template <>
struct Unit<2> {
  using word = uint16_t;
  word w[1];
};
template <>
struct Unit<1> {
  using word = uint8_t;
  word w[1];
};

// Loads every unit of the tile that this thread owns, then stores them:
// kUnroll independent loads in flight before the first store. Units past the
// plane's end and items with a negative index on either side are skipped.
// Destination addresses are worked out again for the stores rather than kept
// from the loads: the registers are better spent on data in flight (1024
// threads have 64 registers each).
// RUNTIME_ALIGN: the bases' alignment is unknown, so each access checks its
// address and splits into narrower pieces when it must.
template <int W, bool RUNTIME_ALIGN, class Mem>
HCK_HD void copy_register_tile(const RegisterPlan& p, uint32_t tile, uint32_t thread,
                               uint32_t threads) {
  uint32_t plane, tile_in_plane;
  p.tiles.divmod(tile, plane, tile_in_plane);
  const uint32_t first = tile_in_plane * p.tile_units + thread;

  Unit<W> data[kUnroll];
  uint32_t live = 0;  // bit u: unit u was loaded and must be stored
  {
    const char* src_base = reinterpret_cast<const char*>(Mem::load_index(p.src.bases + plane));
HCK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t unit = first + uint32_t(u) * threads;
      if (unit >= p.units_per_plane) continue;
      uint32_t row, unit_in_chunk, item, chunk;
      p.units_per_chunk.divmod(unit, row, unit_in_chunk);
      p.chunks.divmod(row, item, chunk);
      const int64_t s = Mem::load_index(p.src.indices + item);
      const int64_t d = Mem::load_index(p.dst.indices + item);
      if (s < 0 || d < 0) continue;
      live |= 1u << u;
      data[u] = Mem::template load<W, RUNTIME_ALIGN>(
          src_base + chunk_offset(p.src, s, chunk, int64_t(unit_in_chunk) * W));
    }
  }
  char* dst_base = reinterpret_cast<char*>(Mem::load_index(p.dst.bases + plane));
HCK_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    if (!(live & (1u << u))) continue;
    const uint32_t unit = first + uint32_t(u) * threads;
    uint32_t row, unit_in_chunk, item, chunk;
    p.units_per_chunk.divmod(unit, row, unit_in_chunk);
    p.chunks.divmod(row, item, chunk);
    const int64_t d = Mem::load_index(p.dst.indices + item);
    Mem::template store<W, RUNTIME_ALIGN>(
        dst_base + chunk_offset(p.dst, d, chunk, int64_t(unit_in_chunk) * W), data[u]);
  }
}

// Pieces for an access whose address may be less aligned than W: the widest
// power of two dividing the address, at most W.
template <int W>
HCK_HD int access_width(const void* at) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(at) | uintptr_t(W);
  return int(a & (~a + 1));  // lowest set bit
}

}  // namespace hicache
