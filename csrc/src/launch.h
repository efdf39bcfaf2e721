// The host half of a copy launch, with no CUDA in it: checking a description,
// cutting the register kernel's work into launches, and hck_copy_prepared's
// loop over prepared descriptions. kernels.cu instantiates it with real
// launches and cudaEventRecord; the host twin (csrc/tests/host_twin.cpp), which
// tests and benchmarks use on machines without a GPU, with the same kernel
// code run on the CPU, so both run this very logic.
#pragma once

#include <stdint.h>

#include <string>

#include "hicache/abi.h"
#include "hicache/copy_plan.h"
#include "internal.h"

namespace hicache {

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// "" for a description the launchers can take, else what is wrong with it.
inline std::string check_desc(const HckCopyDesc& d) {
  if (d.n_items < 0 || d.n_planes < 0) return "n_items, n_planes: expected >= 0";
  if (d.n_chunks < 1 || d.chunk_bytes < 1) return "n_chunks, chunk_bytes: expected >= 1";
  if (!is_pow2(d.alignment) || d.alignment > 16 || d.chunk_bytes % d.alignment)
    return "alignment: expected a power of two <= 16 dividing chunk_bytes";
  if (d.warps_per_block < 1 || d.warps_per_block > 32) return "warps_per_block: expected 1..32";
  if (d.max_blocks < 1) return "max_blocks: expected >= 1";
  if (d.stage_bytes < 0 || d.stages < 0 || d.smem_cap < 0)
    return "stage_bytes, stages, smem_cap: expected >= 0 (0: the default)";
  for (const HckSide* s : {&d.src, &d.dst}) {
    if (s->page_size < 1 || s->page_size > 0x7fffffff) return "page_size: expected 1..2^31-1";
    if (d.n_items > 0 && d.n_planes > 0 && (!s->bases || !s->indices))
      return "bases, indices: expected non-null pointers";
  }
  if (d.kernel == HCK_KERNEL_BULK) {
    if (d.alignment != 16 || !d.bases_known)
      return "kernel: the bulk kernel needs every address and size 16-byte aligned";
    if (d.chunk_bytes > 0x7fffffff) return "chunk_bytes: the bulk kernel takes rows below 2 GiB";
  } else if (d.kernel != HCK_KERNEL_REGISTERS) {
    return "kernel: expected HCK_KERNEL_REGISTERS or HCK_KERNEL_BULK";
  }
  return "";
}

// The register kernel's launches for a checked description:
// launch(width, runtime_align, blocks, threads, plan) once per launch, each
// launch's indices kept within 32 bits.
template <class Launch>
int for_each_register_launch(const HckCopyDesc& d, Launch&& launch) {
  const int width = int(d.alignment);
  const bool runtime_align = !d.bases_known && width > 1;
  const RegisterGrid grid = register_grid(d.warps_per_block, d.max_blocks);
  const uint32_t threads = grid.threads;
  const int64_t per_launch = register_items_per_launch(d, uint32_t(width), threads);
  if (per_launch < 1) {
    set_error("n_chunks, chunk_bytes: one item is too large for one launch");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  for (int64_t first = 0; first < d.n_items; first += per_launch) {
    const int64_t n = d.n_items - first < per_launch ? d.n_items - first : per_launch;
    const RegisterPlan p = make_register_plan(d, uint32_t(width), threads, first, n);
    if (p.total_tiles == 0) continue;
    const uint32_t blocks = grid.max_blocks < p.total_tiles ? grid.max_blocks : p.total_tiles;
    launch(width, runtime_align, blocks, threads, p);
  }
  return 0;
}

// hck_copy_prepared: descs[i] with the call's indices, count and stream, for
// each i in order, each followed by record(events[i], stream) when events is
// given. Every description and event is checked before the first launch, so
// a bad one launches nothing. copy(desc) launches one checked description
// (on the device all of them share) and returns 0 or an error code.
template <class Copy, class Record>
int copy_prepared(const HckCopyDesc* descs, int64_t n_descs, const int64_t* src_indices,
                  const int64_t* dst_indices, int64_t n_items, void* stream, void* const* events,
                  Copy&& copy, Record&& record) {
  if (n_descs < 1 || !descs) {
    set_error("descs: expected at least one prepared description");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (n_items < 0) {
    set_error("n_items: expected >= 0");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  auto call = [&](int64_t i) {  // descs[i] with this call's indices, count and stream
    HckCopyDesc d = descs[i];
    d.src.indices = src_indices;
    d.dst.indices = dst_indices;
    d.n_items = n_items;
    d.stream = stream;
    return d;
  };
  for (int64_t i = 0; i < n_descs; ++i) {
    const HckCopyDesc d = call(i);
    const std::string bad = check_desc(d);
    if (!bad.empty()) {
      set_error("descs[" + std::to_string(i) + "]: " + bad);
      return HCK_ERR_INVALID_ARGUMENT;
    }
    if (d.device != descs[0].device) {
      set_error("descs[" + std::to_string(i) + "]: expected device " + std::to_string(descs[0].device) +
                " like descs[0], got " + std::to_string(d.device));
      return HCK_ERR_INVALID_ARGUMENT;
    }
    if (events && !events[i]) {
      set_error("events[" + std::to_string(i) + "]: expected an event, got NULL");
      return HCK_ERR_INVALID_ARGUMENT;
    }
  }
  for (int64_t i = 0; i < n_descs; ++i) {
    const HckCopyDesc d = call(i);
    int rc = n_items > 0 && d.n_planes > 0 ? copy(d) : 0;
    if (rc == 0 && events) rc = record(events[i], stream);
    if (rc) {
      set_error("descs[" + std::to_string(i) + "]: " + last_error());
      return rc;
    }
  }
  return 0;
}

}  // namespace hicache
