// The bulk kernel's pipeline for one warp, written once for the GPU and for
// the host-side emulation. ``Ops`` supplies the warp and the asynchronous
// copies: BulkDeviceOps in kernels.cu (cp.async.bulk, mbarriers), a checking
// single-lane emulation in the test, which also verifies the protocol: no
// stage reloaded while stores still read it, no store before its loads landed.
//
// Per tile j of this pipeline (stage j % stages):
//   1. wait until the stores of tile j - stages have read their stage
//      (cp.async.bulk.wait_group.read 1: all but the latest store group);
//   2. lane 0 announces the tile's bytes on the stage's mbarrier; every lane
//      issues bulk loads global -> shared for its rows;
//   3. for tile j - lag (lag = stages - 2): wait on its mbarrier, issue bulk
//      stores shared -> global, commit them as one group.
// So stages - 2 tiles are loading while one is stored and one drains.
#pragma once

#include <stdint.h>

#include "hicache/copy_plan.h"

namespace hicache {

// Calls fn(row, src_address, dst_address, smem_offset, bytes) for each live
// row of tile t that this lane owns.
template <class Ops, class Fn>
HCK_HD void for_each_bulk_row(const BulkPlan& p, const BulkTile& t, Ops& ops, Fn&& fn) {
  const char* src_base = reinterpret_cast<const char*>(ops.load_index(p.src.bases + t.plane));
  char* dst_base = reinterpret_cast<char*>(ops.load_index(p.dst.bases + t.plane));
  for (uint32_t row = t.row_begin + ops.lane(); row < t.row_end; row += ops.lanes()) {
    uint32_t item, chunk;
    p.chunks.divmod(row, item, chunk);
    const int64_t s = ops.load_index(p.src.indices + item);
    const int64_t d = ops.load_index(p.dst.indices + item);
    if (s < 0 || d < 0) continue;
    fn(src_base + chunk_offset(p.src, s, chunk, t.byte_begin),
       dst_base + chunk_offset(p.dst, d, chunk, t.byte_begin),
       (row - t.row_begin) * t.byte_len, t.byte_len);
  }
}

template <class Ops>
HCK_HD void bulk_pipeline(const BulkPlan& p, uint32_t pipe, uint32_t n_pipes, Ops& ops) {
  const uint32_t n_tiles = p.total_tiles > pipe ? (p.total_tiles - pipe - 1) / n_pipes + 1 : 0;
  const uint32_t lag = p.stages - 2;
  for (uint32_t j = 0; j < n_tiles + lag; ++j) {
    if (j < n_tiles) {
      const uint32_t stage = j % p.stages;
      const BulkTile t = bulk_tile(p, pipe + j * n_pipes);
      if (j >= p.stages) ops.wait_reads_all_but_latest_group();
      uint32_t bytes = 0;
      for_each_bulk_row(p, t, ops, [&](const char*, char*, uint32_t, uint32_t n) { bytes += n; });
      bytes = ops.warp_sum(bytes);
      if (ops.lane() == 0) ops.expect_bytes(stage, bytes);
      ops.warp_sync();
      char* smem = ops.stage(stage);
      for_each_bulk_row(p, t, ops, [&](const char* src, char*, uint32_t at, uint32_t n) {
        ops.load(stage, smem + at, src, n);
      });
    }
    if (j >= lag && j - lag < n_tiles) {
      const uint32_t jj = j - lag;
      const uint32_t stage = jj % p.stages;
      const BulkTile t = bulk_tile(p, pipe + jj * n_pipes);
      ops.wait_loaded(stage, (jj / p.stages) & 1u);
      const char* smem = ops.stage(stage);
      for_each_bulk_row(p, t, ops, [&](const char*, char* dst, uint32_t at, uint32_t n) {
        ops.store(dst, smem + at, n);
      });
      ops.commit_group();
    }
  }
  ops.wait_all_groups();
}

}  // namespace hicache
