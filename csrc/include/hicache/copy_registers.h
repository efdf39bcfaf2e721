// The register kernel's work for one tile, written once for the GPU and for
// the host-side emulation. ``Mem`` (DeviceMem in kernels.cu, a checking
// memcpy in the emulation test) supplies:
//   load_index(p)         an int64 index or base, read-only;
//   fresh(v)              v, opaque to the compiler (so a unit's position is
//                         worked out again instead of held in registers);
//   load<W, RA>(p, on)    a W-byte unit, nothing read when ``on`` is false;
//   store<W, RA>(p, u, on)  likewise.
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

// A thread's part of one tile, in three steps that never wait between its
// loads:
//   1. both slots of each of its kUnroll units, loaded back to back
//      (independent loads: one wait for all of them);
//   2. the kUnroll data loads, each address computed without a branch;
//   3. the kUnroll stores.
// A unit past the plane's end, or with a negative slot on either side, is a
// load and a store that ``Mem`` predicates off; it reads the last unit's
// slots, so every index load is in bounds and unconditional. Each unit's
// (item, chunk) is worked out again in each step rather than kept in
// registers. Slots of 2^32 and beyond need a 64-bit division: one branch per
// tile, on whether any live slot is that large, picks the code that does it.
// RUNTIME_ALIGN: the bases' alignment is unknown, so each access checks its
// address and splits into narrower pieces when it must.
struct UnitPos {
  uint32_t item, chunk;
  int64_t byte;
};

template <int W>
HCK_HD UnitPos unit_pos(const RegisterPlan& p, uint32_t unit) {
  const uint32_t at = unit < p.units_per_plane ? unit : p.units_per_plane - 1;
  uint32_t row, unit_in_chunk;
  UnitPos pos;
  p.units_per_chunk.divmod(at, row, unit_in_chunk);
  p.chunks.divmod(row, pos.item, pos.chunk);
  pos.byte = int64_t(unit_in_chunk) * W;
  return pos;
}

// Steps 2 and 3; WIDE: some slot is 2^32 or more.
template <int W, bool RUNTIME_ALIGN, bool WIDE, class Mem>
HCK_HD void move_units(const RegisterPlan& p, const char* src_base, char* dst_base, uint32_t first,
                       uint32_t threads, const int64_t (&s)[kUnroll], const int64_t (&d)[kUnroll],
                       uint32_t on) {
  Unit<W> data[kUnroll];
  uint32_t at = Mem::fresh(first);
HCK_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const UnitPos pos = unit_pos<W>(p, at + uint32_t(u) * threads);
    const bool live = (on >> u) & 1u;
    // a unit that is off gets an address too (from slot 0), never read
    data[u] = Mem::template load<W, RUNTIME_ALIGN>(
        src_base + chunk_offset<WIDE>(p.src, live ? s[u] : 0, pos.chunk, pos.byte), live);
  }
  at = Mem::fresh(first);
HCK_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const UnitPos pos = unit_pos<W>(p, at + uint32_t(u) * threads);
    const bool live = (on >> u) & 1u;
    Mem::template store<W, RUNTIME_ALIGN>(
        dst_base + chunk_offset<WIDE>(p.dst, live ? d[u] : 0, pos.chunk, pos.byte), data[u], live);
  }
}

template <int W, bool RUNTIME_ALIGN, class Mem>
HCK_HD void copy_register_tile(const RegisterPlan& p, uint32_t tile, uint32_t thread,
                               uint32_t threads) {
  uint32_t plane, tile_in_plane;
  p.tiles.divmod(tile, plane, tile_in_plane);
  const uint32_t first = tile_in_plane * p.tile_units + thread;

  // 1. slots
  const char* src_base = reinterpret_cast<const char*>(Mem::load_index(p.src.bases + plane));
  char* dst_base = reinterpret_cast<char*>(Mem::load_index(p.dst.bases + plane));
  int64_t s[kUnroll], d[kUnroll];
HCK_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const uint32_t item = unit_pos<W>(p, first + uint32_t(u) * threads).item;
    s[u] = Mem::load_index(p.src.indices + item);
    d[u] = Mem::load_index(p.dst.indices + item);
  }
  uint32_t on = 0;  // bit u: unit u moves
  bool wide = false;
HCK_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const bool live = first + uint32_t(u) * threads < p.units_per_plane && s[u] >= 0 && d[u] >= 0;
    on |= uint32_t(live) << u;
    wide |= live && ((s[u] | d[u]) >> 32) != 0;
  }
  // 2 and 3
  if (wide) {
    move_units<W, RUNTIME_ALIGN, true, Mem>(p, src_base, dst_base, first, threads, s, d, on);
  } else {
    move_units<W, RUNTIME_ALIGN, false, Mem>(p, src_base, dst_base, first, threads, s, d, on);
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
