// Host-side emulation of the transfer kernels: the very functions the GPU runs
// (copy_register_tile, bulk_pipeline, the plans and the address math from
// csrc/include/hicache) driven on the CPU for every block, warp and thread of
// the grid the launcher would use, then compared byte for byte with a
// straightforward reference that addresses each layout from its shape alone.
//
// Besides the bytes it checks what a GPU would not forgive: every access of
// the width the kernel claims is aligned to it, nothing is read or written
// outside the buffers, every destination byte is written exactly once, and the
// bulk pipeline's protocol (no stage reloaded while stores still read it, no
// store before its loads landed, the bytes announced equal to the bytes loaded).
//
// Build and run (tests/test_cuda_native.py does this):
//   g++ -std=c++17 -O1 -I csrc/include csrc/tests/emulate_kernels.cpp -o emulate && ./emulate
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "hicache/copy_bulk.h"
#include "hicache/copy_plan.h"
#include "hicache/copy_registers.h"

using namespace hicache;

static int g_failures = 0;
static std::string g_case;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (g_failures < 20) {                                               \
        std::fprintf(stderr, "FAIL [%s] %s:%d: %s: ", g_case.c_str(), __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                 \
        std::fprintf(stderr, "\n");                                        \
      }                                                                    \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

// ---- memory the emulated kernels may touch ---------------------------------------------

struct Region {
  const char* begin;
  size_t size;
  std::vector<uint8_t>* writes;  // per-byte write counts, for destinations
};

struct Memory {
  std::vector<Region> readable, writable;
  int64_t loads = 0, stores = 0;

  bool inside(const std::vector<Region>& regions, const void* p, size_t n, Region** hit) {
    const char* c = static_cast<const char*>(p);
    for (auto& r : regions) {
      if (c >= r.begin && c + n <= r.begin + r.size) {
        *hit = const_cast<Region*>(&r);
        return true;
      }
    }
    return false;
  }
  void read(void* out, const void* p, size_t n) {
    Region* r = nullptr;
    CHECK(inside(readable, p, n, &r), "read of %zu bytes outside the source", n);
    if (r) std::memcpy(out, p, n);
    ++loads;
  }
  void write(void* p, const void* in, size_t n) {
    Region* r = nullptr;
    CHECK(inside(writable, p, n, &r), "write of %zu bytes outside the destination", n);
    if (!r) return;
    std::memcpy(p, in, n);
    const size_t at = size_t(static_cast<const char*>(p) - r->begin);
    for (size_t i = 0; i < n; ++i) (*r->writes)[at + i]++;
    ++stores;
  }
};
static Memory* g_mem = nullptr;

// The register kernel's Mem: checks alignment, bounds and write counts, and
// the order of a thread's accesses within a tile: every index load (the two
// plane bases and both slots of each unit) before its first data load, and
// every data load before its first store, kUnroll of each (accesses that are
// predicated off count: the device issues them too).
struct HostMem {
  struct Tile {
    int phase = 0;  // 0: index loads, 1: data loads, 2: stores
    int indices = 0, loads = 0, stores = 0;
  };
  static Tile tile;

  static int64_t load_index(const int64_t* p) {
    CHECK(tile.phase == 0, "index load after the tile's first data load");
    ++tile.indices;
    return *p;
  }
  static uint32_t fresh(uint32_t v) { return v; }

  template <int W, bool RUNTIME_ALIGN>
  static Unit<W> load(const char* p, bool on) {
    CHECK(tile.phase <= 1, "data load after the tile's first store");
    tile.phase = 1;
    ++tile.loads;
    Unit<W> u{};
    if (!on) return u;
    check_width<W, RUNTIME_ALIGN>(p);
    g_mem->read(&u, p, W);
    return u;
  }
  template <int W, bool RUNTIME_ALIGN>
  static void store(char* p, const Unit<W>& u, bool on) {
    tile.phase = 2;
    ++tile.stores;
    if (!on) return;
    check_width<W, RUNTIME_ALIGN>(p);
    g_mem->write(p, &u, W);
  }
  template <int W, bool RUNTIME_ALIGN>
  static void check_width(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (RUNTIME_ALIGN) {  // the device splits into pieces of access_width bytes
      const int w = access_width<W>(p);
      CHECK(w >= 1 && w <= W && (w & (w - 1)) == 0 && a % uintptr_t(w) == 0,
            "access_width %d for address %% 16 = %d", w, int(a % 16));
    } else {
      CHECK(a % W == 0, "%d-byte access at an address %% 16 = %d", W, int(a % 16));
    }
  }
};
HostMem::Tile HostMem::tile;

// One thread's part of one tile, with the order of its accesses checked.
template <int W, bool RA>
static void run_tile(const RegisterPlan& p, uint32_t tile, uint32_t thread, uint32_t threads) {
  HostMem::tile = {};
  copy_register_tile<W, RA, HostMem>(p, tile, thread, threads);
  const HostMem::Tile& t = HostMem::tile;
  CHECK(t.indices == 2 + 2 * kUnroll && t.loads == kUnroll && t.stores == kUnroll,
        "a tile made %d index loads, %d loads, %d stores (expected %d, %d, %d)", t.indices, t.loads,
        t.stores, 2 + 2 * kUnroll, kUnroll, kUnroll);
}

// The bulk kernel's Ops for one warp emulated as a single lane, with the
// pipeline protocol checked.
struct HostBulkOps {
  const BulkPlan* plan;
  std::vector<char> smem;
  struct Barrier {
    uint32_t phase = 0;     // completed phases
    int64_t expected = -1;  // bytes announced for the current phase (-1: none yet)
    int64_t arrived = 0;    // bytes loaded in the current phase
  };
  std::vector<Barrier> barriers;
  std::vector<bool> landed;            // stage's current contents were waited for
  std::vector<int64_t> reads_pending;  // per stage: latest store group reading it
  int64_t groups_committed = 0, groups_read_done = 0;  // groups [0, read_done) have read

  explicit HostBulkOps(const BulkPlan& p) : plan(&p) {
    smem.assign(size_t(p.stages) * p.stage_bytes, 0);
    barriers.resize(p.stages);
    landed.assign(p.stages, false);
    reads_pending.assign(p.stages, -1);
  }
  uint32_t lane() const { return 0; }
  uint32_t lanes() const { return 1; }
  void warp_sync() const {}
  uint32_t warp_sum(uint32_t x) const { return x; }
  int64_t load_index(const int64_t* p) const { return *p; }
  char* stage(uint32_t s) { return smem.data() + size_t(s) * plan->stage_bytes; }

  void expect_bytes(uint32_t s, uint32_t bytes) {
    CHECK(barriers[s].expected < 0, "stage %u announced twice in one phase", s);
    CHECK(reads_pending[s] < groups_read_done, "stage %u reloaded while store group %lld still reads it",
          s, (long long)reads_pending[s]);
    barriers[s].expected = bytes;
    landed[s] = false;
  }
  void load(uint32_t s, char* dst, const char* src, uint32_t n) {
    CHECK(barriers[s].expected >= 0, "load into stage %u before its bytes were announced", s);
    CHECK(reinterpret_cast<uintptr_t>(src) % 16 == 0 && n % 16 == 0, "bulk load not 16-byte aligned");
    CHECK(dst >= stage(s) && dst + n <= stage(s) + plan->stage_bytes, "bulk load outside stage %u", s);
    g_mem->read(dst, src, n);
    barriers[s].arrived += n;
  }
  void wait_loaded(uint32_t s, uint32_t parity) {
    Barrier& b = barriers[s];
    CHECK(b.expected >= 0 && b.arrived == b.expected, "stage %u: %lld bytes announced, %lld loaded", s,
          (long long)b.expected, (long long)b.arrived);
    CHECK((b.phase & 1u) == parity, "stage %u waited with parity %u in phase %u", s, parity, b.phase);
    ++b.phase;
    b.expected = -1;
    b.arrived = 0;
    landed[s] = true;
  }
  void store(char* dst, const char* src, uint32_t n) {
    const uint32_t s = uint32_t((src - smem.data()) / plan->stage_bytes);
    CHECK(s < plan->stages && landed[s], "store from stage %u before its loads landed", s);
    CHECK(reinterpret_cast<uintptr_t>(dst) % 16 == 0 && n % 16 == 0, "bulk store not 16-byte aligned");
    g_mem->write(dst, src, n);
    reads_pending[s] = groups_committed;  // read by the group being built
  }
  void commit_group() { ++groups_committed; }
  void wait_reads_all_but_latest_group() {
    if (groups_committed - 1 > groups_read_done) groups_read_done = groups_committed - 1;
  }
  void wait_all_groups() { groups_read_done = groups_committed; }
};

// ---- layouts, addressed from their shape alone -----------------------------------------

enum Kind { LAYER_FIRST, PAGE_FIRST, PAGE_FIRST_DIRECT, PAGE_HEAD };
static const char* kKindNames[] = {"layer_first", "page_first", "page_first_direct", "page_head"};

struct Layout {
  Kind kind;
  int64_t L, N, H, hb, P;  // layers, slots, heads, head bytes, page size
  bool per_layer;          // layer_first as one tensor per layer (a device pool)

  int64_t layer_bytes() const { return N * H * hb; }
  int64_t plane_bytes() const { return L * N * H * hb; }
  // Offset of (layer, slot, head, byte) in one K (or V) tensor, by shape:
  // the index of the element in the nested array, times nothing (bytes).
  int64_t offset(int64_t l, int64_t s, int64_t h, int64_t b) const {
    const int64_t pg = s / P, ip = s % P;
    switch (kind) {
      case LAYER_FIRST: return ((l * N + s) * H + h) * hb + b;
      case PAGE_FIRST: return ((s * L + l) * H + h) * hb + b;
      case PAGE_FIRST_DIRECT: return (((pg * L + l) * P + ip) * H + h) * hb + b;
      case PAGE_HEAD: return (((pg * H + h) * P + ip) * L + l) * hb + b;
    }
    return -1;
  }
};

// Buffers of one side: K (and V) tensors, or per-layer tensors, at chosen misalignments.
struct Side {
  Layout lay;
  int planes_per_layer;  // 2 (K, V) or 1 (MLA)
  std::vector<std::vector<char>> storage;
  std::vector<char*> tensors;  // [kv] or [kv * L + l] when per_layer
  std::vector<uint8_t> writes_storage;

  char* tensor(int kv, int64_t l) { return lay.per_layer ? tensors[size_t(kv * lay.L + l)] : tensors[size_t(kv)]; }
  int64_t local(int64_t l, int64_t s, int64_t h, int64_t b) const {
    if (lay.per_layer) return (s * lay.H + h) * lay.hb + b;
    return lay.offset(l, s, h, b);
  }
};

static Side make_side(const Layout& lay, int planes_per_layer, int misalign, std::mt19937_64& rng, bool poison) {
  Side side{lay, planes_per_layer, {}, {}, {}};
  const int n = lay.per_layer ? planes_per_layer * int(lay.L) : planes_per_layer;
  const int64_t bytes = lay.per_layer ? lay.layer_bytes() : lay.plane_bytes();
  for (int i = 0; i < n; ++i) {
    side.storage.emplace_back(size_t(bytes + 32 + 64));
    auto& buf = side.storage.back();
    // 16-byte aligned start plus the chosen misalignment (vector storage is 16-aligned on x86-64 glibc)
    uintptr_t base = (reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15);
    base += uintptr_t(misalign + (misalign ? i % 3 : 0)) % 16;
    for (auto& c : buf) c = poison ? char(0xA5) : char(rng());
    side.tensors.push_back(reinterpret_cast<char*>(base));
  }
  return side;
}

static int64_t pow2_alignment(const std::vector<int64_t>& values) {
  int64_t g = 0;
  for (int64_t v : values) {
    int64_t a = v < 0 ? -v : v, b = g;
    while (b) { int64_t t = a % b; a = b; b = t; }
    g = a;
  }
  if (g == 0) return 16;
  int64_t low = g & -g;
  return low < 16 ? low : 16;
}

// The HckCopyDesc a caller (hicache_kernels/backends/cuda.py) builds for these sides:
// plane addressing, one chunk per item when both sides keep heads adjacent, else one per head.
struct Job {
  HckCopyDesc desc{};
  std::vector<int64_t> src_bases, dst_bases, src_idx, dst_idx;
};

static void addressing(const Layout& lay, int64_t& page_size, int64_t& page_stride, int64_t& slot_stride,
                       int64_t& head_stride) {
  const int64_t item = lay.H * lay.hb;
  head_stride = lay.hb;
  if (lay.per_layer || lay.kind == LAYER_FIRST) {
    page_size = 1, page_stride = item, slot_stride = 0;
  } else if (lay.kind == PAGE_FIRST) {
    page_size = 1, page_stride = lay.L * item, slot_stride = 0;
  } else if (lay.kind == PAGE_FIRST_DIRECT) {
    page_size = lay.P, page_stride = lay.L * lay.P * item, slot_stride = item;
  } else {  // PAGE_HEAD [pages, H, P, L, hb]
    page_size = lay.P, page_stride = lay.H * lay.P * lay.L * lay.hb, slot_stride = lay.L * lay.hb;
    head_stride = lay.P * lay.L * lay.hb;
  }
}

static Job make_job(Side& src, Side& dst, int64_t layer_begin, int64_t layer_end,
                    const std::vector<int64_t>& s_idx, const std::vector<int64_t>& d_idx, bool bases_known) {
  Job job;
  job.src_idx = s_idx;
  job.dst_idx = d_idx;
  for (int kv = 0; kv < src.planes_per_layer; ++kv) {
    for (int64_t l = layer_begin; l < layer_end; ++l) {
      job.src_bases.push_back(int64_t(reinterpret_cast<uintptr_t>(src.tensor(kv, l) + src.local(l, 0, 0, 0))));
      job.dst_bases.push_back(int64_t(reinterpret_cast<uintptr_t>(dst.tensor(kv, l) + dst.local(l, 0, 0, 0))));
    }
  }
  HckCopyDesc& d = job.desc;
  int64_t s_hs, d_hs;
  addressing(src.lay, d.src.page_size, d.src.page_stride, d.src.slot_stride, s_hs);
  addressing(dst.lay, d.dst.page_size, d.dst.page_stride, d.dst.slot_stride, d_hs);
  const int64_t H = src.lay.H, hb = src.lay.hb;
  if (H == 1 || (s_hs == hb && d_hs == hb)) {
    d.n_chunks = 1, d.chunk_bytes = H * hb, d.src.chunk_stride = 0, d.dst.chunk_stride = 0;
  } else {
    d.n_chunks = H, d.chunk_bytes = hb, d.src.chunk_stride = s_hs, d.dst.chunk_stride = d_hs;
  }
  std::vector<int64_t> values = {d.chunk_bytes, d.src.chunk_stride, d.dst.chunk_stride, d.src.page_stride,
                                 d.src.slot_stride, d.dst.page_stride, d.dst.slot_stride};
  if (bases_known) {
    values.insert(values.end(), job.src_bases.begin(), job.src_bases.end());
    values.insert(values.end(), job.dst_bases.begin(), job.dst_bases.end());
  }
  d.alignment = pow2_alignment(values);
  d.bases_known = bases_known;
  d.n_items = int64_t(s_idx.size());
  d.n_planes = int64_t(job.src_bases.size());
  d.src.bases = job.src_bases.data();
  d.dst.bases = job.dst_bases.data();
  d.src.indices = job.src_idx.data();
  d.dst.indices = job.dst_idx.data();
  return job;
}

static void reference_copy(Side& src, Side& dst, int64_t layer_begin, int64_t layer_end,
                           const std::vector<int64_t>& s_idx, const std::vector<int64_t>& d_idx) {
  for (int kv = 0; kv < src.planes_per_layer; ++kv)
    for (int64_t l = layer_begin; l < layer_end; ++l)
      for (size_t i = 0; i < s_idx.size(); ++i) {
        if (s_idx[i] < 0 || d_idx[i] < 0) continue;
        for (int64_t h = 0; h < src.lay.H; ++h)
          for (int64_t b = 0; b < src.lay.hb; ++b)
            dst.tensor(kv, l)[dst.local(l, d_idx[i], h, b)] = src.tensor(kv, l)[src.local(l, s_idx[i], h, b)];
      }
}

// ---- the emulated launches --------------------------------------------------------------

template <int W, bool RA>
static void run_register_grid(const HckCopyDesc& d, const LaunchLimits& lim) {
  const RegisterGrid grid = register_grid(d.warps_per_block, d.max_blocks);
  const uint32_t threads = grid.threads;
  CHECK(threads <= kMaxRegisterThreads && int64_t(threads) * grid.max_blocks >=
        std::min<int64_t>(int64_t(d.warps_per_block) * 32 * d.max_blocks, 0x7fffffff),
        "grid of %u x %u threads for %d blocks of %d warps", grid.max_blocks, threads, d.max_blocks,
        d.warps_per_block);
  const int64_t per_launch = register_items_per_launch(d, W, threads, lim);
  CHECK(per_launch >= 1, "no items per launch");
  if (per_launch < 1) return;
  for (int64_t first = 0; first < d.n_items; first += per_launch) {
    const int64_t n = std::min(per_launch, d.n_items - first);
    const RegisterPlan p = make_register_plan(d, W, threads, first, n);
    CHECK(p.units_per_plane <= lim.max_units_per_plane && p.total_tiles <= lim.max_tiles,
          "plan beyond its limits: %u units, %u tiles", p.units_per_plane, p.total_tiles);
    const uint32_t blocks = std::min<uint32_t>(grid.max_blocks, p.total_tiles);
    for (uint32_t block = 0; block < blocks; ++block)
      for (uint32_t tile = block; tile < p.total_tiles; tile += blocks)
        for (uint32_t t = 0; t < threads; ++t) run_tile<W, RA>(p, tile, t, threads);
  }
}

static void run_registers(const HckCopyDesc& d, const LaunchLimits& lim) {
  const bool ra = !d.bases_known && d.alignment > 1;
  switch (d.alignment) {
    case 16: return ra ? run_register_grid<16, true>(d, lim) : run_register_grid<16, false>(d, lim);
    case 8: return ra ? run_register_grid<8, true>(d, lim) : run_register_grid<8, false>(d, lim);
    case 4: return ra ? run_register_grid<4, true>(d, lim) : run_register_grid<4, false>(d, lim);
    case 2: return ra ? run_register_grid<2, true>(d, lim) : run_register_grid<2, false>(d, lim);
    default: return run_register_grid<1, false>(d, lim);
  }
}

static void run_bulk(const HckCopyDesc& d, uint32_t stage_bytes, uint32_t stages, const LaunchLimits& lim) {
  const uint32_t warps = uint32_t(d.warps_per_block);
  const int64_t per_launch = bulk_items_per_launch(d, stage_bytes, lim);
  CHECK(per_launch >= 1, "no items per launch");
  if (per_launch < 1) return;
  for (int64_t first = 0; first < d.n_items; first += per_launch) {
    const int64_t n = std::min(per_launch, d.n_items - first);
    const BulkPlan p = make_bulk_plan(d, stage_bytes, stages, first, n);
    CHECK(p.total_tiles <= lim.max_tiles, "plan beyond its limits: %u tiles", p.total_tiles);
    if (p.total_tiles == 0) continue;
    const uint32_t blocks = std::min<uint32_t>(uint32_t(d.max_blocks), (p.total_tiles + warps - 1) / warps);
    for (uint32_t block = 0; block < blocks; ++block)
      for (uint32_t warp = 0; warp < warps; ++warp) {
        HostBulkOps ops(p);
        bulk_pipeline(p, block * warps + warp, blocks * warps, ops);
        CHECK(ops.groups_read_done == ops.groups_committed, "pipeline ended with store groups pending");
      }
  }
}

// ---- cases -----------------------------------------------------------------------------

struct Case {
  Layout src, dst;
  int planes_per_layer;
  int64_t layer_begin, layer_end;
  int64_t n_items;
  int pad_every;  // every pad_every-th item gets a negative index on one side (0: none)
  int src_misalign, dst_misalign;
  bool bases_known;
  int warps, max_blocks;
  bool bulk;
  uint32_t stage_bytes, stages;
  int split_items;  // > 0: launch limits that allow only this many items per launch
};

static std::string describe(const Case& c, const HckCopyDesc& d, const LaunchLimits& lim) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "%s->%s%s L=%lld layers[%lld,%lld) N=%lld/%lld H=%lld hb=%lld P=%lld/%lld n=%lld pad=%d "
                "mis=%d/%d known=%d align=%lld chunks=%lldx%lld warps=%d blocks=%d %s stage=%u x%u limits=%u/%u",
                kKindNames[c.src.kind], kKindNames[c.dst.kind], c.planes_per_layer == 1 ? " MLA" : "",
                (long long)c.src.L, (long long)c.layer_begin, (long long)c.layer_end, (long long)c.src.N,
                (long long)c.dst.N, (long long)c.src.H, (long long)c.src.hb, (long long)c.src.P,
                (long long)c.dst.P, (long long)c.n_items, c.pad_every, c.src_misalign, c.dst_misalign,
                int(c.bases_known), (long long)d.alignment, (long long)d.n_chunks, (long long)d.chunk_bytes,
                c.warps, c.max_blocks, c.bulk ? "bulk" : "registers", c.stage_bytes, c.stages,
                lim.max_units_per_plane, lim.max_tiles);
  return buf;
}

static bool run_case(const Case& c, std::mt19937_64& rng) {
  Side src = make_side(c.src, c.planes_per_layer, c.src_misalign, rng, false);
  Side dst = make_side(c.dst, c.planes_per_layer, c.dst_misalign, rng, true);
  Side want = make_side(c.dst, c.planes_per_layer, c.dst_misalign, rng, true);
  // distinct random slots on each side, a few padded
  std::vector<int64_t> s_perm(size_t(c.src.N)), d_perm(size_t(c.dst.N));
  for (size_t i = 0; i < s_perm.size(); ++i) s_perm[i] = int64_t(i);
  for (size_t i = 0; i < d_perm.size(); ++i) d_perm[i] = int64_t(i);
  std::shuffle(s_perm.begin(), s_perm.end(), rng);
  std::shuffle(d_perm.begin(), d_perm.end(), rng);
  std::vector<int64_t> s_idx(s_perm.begin(), s_perm.begin() + c.n_items);
  std::vector<int64_t> d_idx(d_perm.begin(), d_perm.begin() + c.n_items);
  if (c.pad_every > 0) {
    for (int64_t i = 0; i < c.n_items; i += c.pad_every) (i / c.pad_every) % 2 ? s_idx[size_t(i)] = -1 : d_idx[size_t(i)] = -3;
  }
  Job job = make_job(src, dst, c.layer_begin, c.layer_end, s_idx, d_idx, c.bases_known);
  HckCopyDesc& d = job.desc;
  d.warps_per_block = c.warps;
  d.max_blocks = c.max_blocks;
  d.kernel = c.bulk ? HCK_KERNEL_BULK : HCK_KERNEL_REGISTERS;
  if (c.bulk && (d.alignment != 16 || !d.bases_known)) return false;  // the launcher refuses these
  LaunchLimits limits;
  if (c.split_items > 0) {  // limits that allow only split_items items per launch
    const int64_t k = c.split_items;
    if (c.bulk) {
      const int64_t pieces = (d.chunk_bytes + c.stage_bytes - 1) / c.stage_bytes;
      limits.max_units_per_plane = uint32_t(d.n_chunks * k);
      limits.max_tiles = uint32_t(d.n_planes * pieces * d.n_chunks * k);
    } else {
      const int64_t units = d.n_chunks * (d.chunk_bytes / d.alignment) * k;
      const int64_t tile_units = int64_t(register_grid(c.warps, c.max_blocks).threads) * kUnroll;
      limits.max_units_per_plane = uint32_t(units);
      limits.max_tiles = uint32_t(d.n_planes * ((units + tile_units - 1) / tile_units));
    }
  }
  g_case = describe(c, d, limits);

  // the memory the kernel may touch, with write counters on the destination
  Memory mem;
  for (size_t i = 0; i < src.tensors.size(); ++i) {
    const int64_t bytes = c.src.per_layer ? c.src.layer_bytes() : c.src.plane_bytes();
    mem.readable.push_back({src.tensors[i], size_t(bytes), nullptr});
  }
  dst.writes_storage.assign(dst.tensors.size() * size_t(c.dst.plane_bytes() + 1), 0);
  std::vector<std::vector<uint8_t>> counters(dst.tensors.size());
  for (size_t i = 0; i < dst.tensors.size(); ++i) {
    const int64_t bytes = c.dst.per_layer ? c.dst.layer_bytes() : c.dst.plane_bytes();
    counters[i].assign(size_t(bytes), 0);
    mem.writable.push_back({dst.tensors[i], size_t(bytes), &counters[i]});
  }
  g_mem = &mem;
  if (c.bulk) {
    run_bulk(d, c.stage_bytes, c.stages, limits);
  } else {
    run_registers(d, limits);
  }
  g_mem = nullptr;
  reference_copy(src, want, c.layer_begin, c.layer_end, s_idx, d_idx);

  // bytes equal the reference, and each destination byte the reference writes
  // was written once, every other byte never
  std::vector<std::vector<uint8_t>> should(dst.tensors.size());
  for (size_t i = 0; i < dst.tensors.size(); ++i) {
    const int64_t bytes = c.dst.per_layer ? c.dst.layer_bytes() : c.dst.plane_bytes();
    should[i].assign(size_t(bytes), 0);
  }
  for (int kv = 0; kv < c.planes_per_layer; ++kv)
    for (int64_t l = c.layer_begin; l < c.layer_end; ++l)
      for (size_t i = 0; i < s_idx.size(); ++i) {
        if (s_idx[i] < 0 || d_idx[i] < 0) continue;
        const size_t t = c.dst.per_layer ? size_t(kv * c.dst.L + l) : size_t(kv);
        for (int64_t h = 0; h < c.dst.H; ++h)
          for (int64_t b = 0; b < c.dst.hb; ++b) should[t][size_t(dst.local(l, d_idx[i], h, b))] = 1;
      }
  for (size_t i = 0; i < dst.tensors.size(); ++i) {
    const int64_t bytes = c.dst.per_layer ? c.dst.layer_bytes() : c.dst.plane_bytes();
    const int diff = std::memcmp(dst.tensors[i], want.tensors[i], size_t(bytes));
    CHECK(diff == 0, "tensor %zu differs from the reference", i);
    for (int64_t b = 0; b < bytes; ++b) {
      if (counters[i][size_t(b)] != should[i][size_t(b)]) {
        CHECK(false, "tensor %zu byte %lld written %d times, expected %d", i, (long long)b,
              int(counters[i][size_t(b)]), int(should[i][size_t(b)]));
        break;
      }
    }
  }
  return true;
}

// ---- unit checks -----------------------------------------------------------------------

static void check_fast_divmod(std::mt19937_64& rng) {
  g_case = "FastDivmod";
  std::vector<uint32_t> divisors = {1, 2, 3, 5, 7, 9, 16, 17, 63, 64, 65, 100, 255, 256, 257, 1000, 4097,
                                    65535, 65536, 65537, 1u << 20, (1u << 20) + 1, 0x7fffffffu, 0x40000001u};
  for (int i = 0; i < 200; ++i) divisors.push_back(uint32_t(rng() % 0x7fffffffu) + 1);
  std::vector<uint32_t> edges = {0, 1, 2, 3, 0x7ffffffeu, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu};
  for (uint32_t d : divisors) {
    FastDivmod f(d);
    std::vector<uint32_t> ns = edges;
    for (uint32_t k : {d - 1, d, d + 1, 2 * d - 1, 2 * d, 3 * d + 1}) ns.push_back(k);
    for (int i = 0; i < 2000; ++i) ns.push_back(uint32_t(rng()));
    for (uint32_t n : ns) {
      uint32_t q, r;
      f.divmod(n, q, r);
      CHECK(q == n / d && r == n % d, "%u / %u gave %u r %u", n, d, q, r);
    }
  }
}

static void check_partition() {
  g_case = "partition_by_bytes";
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int64_t count = int64_t(rng() % 40) + 1;
    const int parts = int(rng() % 6) + 1;
    std::vector<int64_t> sizes(static_cast<size_t>(count));
    int64_t total = 0;
    for (auto& s : sizes) total += (s = int64_t(rng() % (trial % 3 ? 1000 : 1000000)) + 1);
    std::vector<int64_t> starts(size_t(parts) + 1, -1);
    const int n = partition_by_bytes(sizes.data(), count, parts, starts.data());
    CHECK(n >= 1 && n <= parts && n <= count, "%d groups for %d parts of %lld runs", n, parts, (long long)count);
    CHECK(starts[0] == 0 && starts[size_t(n)] == count, "groups do not cover the runs");
    int64_t largest = 0, biggest_run = 0;
    for (auto s : sizes) biggest_run = std::max(biggest_run, s);
    for (int g = 0; g < n; ++g) {
      CHECK(starts[size_t(g)] < starts[size_t(g) + 1], "empty group %d", g);
      int64_t bytes = 0;
      for (int64_t i = starts[size_t(g)]; i < starts[size_t(g) + 1]; ++i) bytes += sizes[size_t(i)];
      largest = std::max(largest, bytes);
    }
    // no group holds much more than its share (one run of slack)
    CHECK(largest <= total / n + 2 * biggest_run, "a group holds %lld of %lld bytes in %d groups",
          (long long)largest, (long long)total, n);
  }
  int64_t sizes[3] = {10, 10, 10}, starts[8];
  CHECK(partition_by_bytes(sizes, 3, 3, starts) == 3 && starts[1] == 1 && starts[2] == 2, "even split");
  CHECK(partition_by_bytes(sizes, 3, 7, starts) == 3, "more parts than runs");
  CHECK(partition_by_bytes(sizes, 3, 1, starts) == 1 && starts[1] == 3, "one part");
}

static void check_bulk_tiles() {
  g_case = "bulk_tile";
  // every (plane, row, byte) is covered by exactly one tile
  for (uint32_t chunk : {16u, 48u, 256u, 1152u, 4096u, 4112u})
    for (uint32_t stage : {16u, 64u, 1024u, 4096u}) {
      if (chunk % 16) continue;
      HckCopyDesc d{};
      d.n_items = 5, d.n_planes = 3, d.n_chunks = 2, d.chunk_bytes = chunk;
      d.src.page_size = d.dst.page_size = 1;
      int64_t idx[5] = {0, 1, 2, 3, 4}, bases[3] = {0, 0, 0};
      d.src.indices = d.dst.indices = idx;
      d.src.bases = d.dst.bases = bases;
      const BulkPlan p = make_bulk_plan(d, stage, 3, 0, d.n_items);
      std::vector<int> seen(size_t(3 * 10 * chunk), 0);
      for (uint32_t t = 0; t < p.total_tiles; ++t) {
        const BulkTile bt = bulk_tile(p, t);
        CHECK((bt.row_end - bt.row_begin) * bt.byte_len <= stage, "tile %u overflows its stage", t);
        for (uint32_t r = bt.row_begin; r < bt.row_end; ++r)
          for (uint32_t b = bt.byte_begin; b < bt.byte_begin + bt.byte_len; ++b)
            seen[size_t((bt.plane * 10 + r) * chunk + b)]++;
      }
      for (int v : seen) CHECK(v == 1, "chunk %u stage %u: a byte covered %d times", chunk, stage, v);
    }
}

// Slots of 2^32 and beyond (the register kernel's out-of-line 64-bit path),
// mixed with small ones and padding in the same tiles. A side addressed with
// page_stride 0 maps slot s to item s % page_size of a small buffer, so huge
// slots address real memory.
static void check_wide_slots(std::mt19937_64& rng) {
  for (int trial = 0; trial < 24; ++trial) {
    const int64_t item = std::initializer_list<int64_t>{6, 16, 48, 2048}.begin()[trial % 4];
    const int64_t n = 1 + int64_t(rng() % 700);
    const int64_t src_items = 1 + int64_t(rng() % 9), dst_items = n + int64_t(rng() % 5);
    std::vector<char> src(size_t(src_items * item + 32)), dst(size_t(dst_items * item + 32), char(0xA5));
    for (auto& c : src) c = char(rng());
    std::vector<char> want = dst;
    char* s0 = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(src.data()) + 15) & ~uintptr_t(15));
    char* d0 = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(dst.data()) + 15) & ~uintptr_t(15));
    char* w0 = want.data() + (d0 - dst.data());
    std::vector<int64_t> s_idx(static_cast<size_t>(n)), d_idx(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t hi = int64_t(rng() % 3) << (32 + rng() % 20);   // 0 or a multiple of 2^32..2^53
      s_idx[size_t(i)] = rng() % 11 == 0 ? -1 : hi + int64_t(rng() % 1000) * src_items + int64_t(rng() % src_items);
      // distinct destinations: residue i mod dst_items, some slots wide
      d_idx[size_t(i)] = rng() % 13 == 0 ? -7 : (int64_t(rng() % 2) << 33) * dst_items + i;
    }
    for (int64_t i = 0; i < n; ++i) {
      if (s_idx[size_t(i)] < 0 || d_idx[size_t(i)] < 0) continue;
      std::memcpy(w0 + (d_idx[size_t(i)] % dst_items) * item, s0 + (s_idx[size_t(i)] % src_items) * item,
                  size_t(item));
    }
    int64_t sb = int64_t(reinterpret_cast<uintptr_t>(s0)), db = int64_t(reinterpret_cast<uintptr_t>(d0));
    HckCopyDesc d{};
    d.src = HckSide{&sb, s_idx.data(), src_items, 0, item, 0};
    d.dst = HckSide{&db, d_idx.data(), dst_items, 0, item, 0};
    d.n_items = n, d.n_planes = 1, d.n_chunks = 1, d.chunk_bytes = item;
    d.alignment = pow2_alignment({item, sb, db});
    d.bases_known = trial % 3 != 0;
    d.warps_per_block = int32_t(std::initializer_list<int>{1, 4, 8, 32}.begin()[trial % 4]);
    d.max_blocks = 1 + int32_t(rng() % 5);
    char name[128];
    std::snprintf(name, sizeof(name), "wide slots: %lld items of %lld bytes, %lld/%lld per side",
                  (long long)n, (long long)item, (long long)src_items, (long long)dst_items);
    g_case = name;
    Memory mem;
    std::vector<uint8_t> counts(size_t(dst_items * item), 0);
    mem.readable.push_back({s0, size_t(src_items * item), nullptr});
    mem.writable.push_back({d0, size_t(dst_items * item), &counts});
    g_mem = &mem;
    run_registers(d, LaunchLimits{});
    g_mem = nullptr;
    CHECK(std::memcmp(dst.data(), want.data(), dst.size()) == 0, "bytes differ from the reference");
  }
}

// The bulk kernel's shared-memory shape under a cap: within the limit, and the
// defaults the launcher documents.
static void check_bulk_shape() {
  g_case = "bulk_shape";
  for (uint32_t warps : {1u, 2u, 3u, 4u, 8u, 32u})
    for (int64_t limit : {int64_t(16384), int64_t(49152), int64_t(65536), int64_t(101376), int64_t(232448)}) {
      const BulkShape b = bulk_shape(warps, 0, 0, limit);
      if (b.stages >= kMinBulkStages) {
        CHECK(b.smem <= limit && b.stage_bytes >= 16 && (b.stage_bytes & (b.stage_bytes - 1)) == 0 &&
                  b.stage_bytes <= 16384 && b.stages <= 8,
              "%u warps in %lld bytes: %u stages of %u = %lld", warps, (long long)limit, b.stages,
              b.stage_bytes, (long long)b.smem);
      }
    }
  // the device's whole opt-in allowance, two pipelines: 16 KiB stages, 7 of them (229,504 B)
  BulkShape big = bulk_shape(2, 0, 0, 232448);
  CHECK(big.stage_bytes == 16384 && big.stages == 7 && big.smem == 229504, "uncapped: %u x %u = %lld",
        big.stages, big.stage_bytes, (long long)big.smem);
  // capped at 64 KiB: 4 KiB stages, 7 of them per pipeline
  BulkShape capped = bulk_shape(2, 0, 0, 65536);
  CHECK(capped.stage_bytes == 4096 && capped.stages == 7 && capped.smem == 57472, "64 KiB cap: %u x %u = %lld",
        capped.stages, capped.stage_bytes, (long long)capped.smem);
}

int main(int argc, char** argv) {
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 400;
  std::mt19937_64 rng(20251128);
  check_fast_divmod(rng);
  check_partition();
  check_bulk_tiles();
  check_bulk_shape();
  check_wide_slots(rng);

  int cases = 0, bulk_cases = 0;
  auto pick = [&](std::initializer_list<int64_t> v) { return *(v.begin() + rng() % v.size()); };
  for (int i = 0; i < n_random; ++i) {
    Case c{};
    // One case in eight moves whole pages as items, as the manager does
    // (KVLayout.page_items: one head of page_size * item bytes, page size 1).
    const bool page_items = rng() % 8 == 0;
    const bool mla = page_items || rng() % 4 == 0;
    const int64_t L = pick({1, 2, 3, 4});
    const int64_t H = mla ? 1 : pick({1, 2, 3, 4, 8});
    // head bytes: every alignment from 1 to 16 and odd sizes (fp8 head_dim 5 is 5 bytes)
    const int64_t hb = page_items ? pick({1040, 4096, 36864, 131072})
                                  : pick({1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 36, 40, 64, 72, 128, 144, 256, 576});
    const int64_t P = page_items ? 1 : pick({1, 1, 2, 3, 4, 16, 64});
    Kind kinds[4] = {LAYER_FIRST, PAGE_FIRST, PAGE_FIRST_DIRECT, PAGE_HEAD};
    Kind ks = kinds[rng() % 4], kd = kinds[rng() % 4];
    if (mla) {  // SGLang has no MLA page_head
      if (ks == PAGE_HEAD) ks = PAGE_FIRST;
      if (kd == PAGE_HEAD) kd = PAGE_FIRST_DIRECT;
    }
    const int64_t pages_s = pick({1, 2, 5, 9}), pages_d = pick({1, 3, 6});
    c.src = Layout{ks, L, P * pages_s, H, hb, P, ks == LAYER_FIRST && rng() % 2};
    c.dst = Layout{kd, L, P * pages_d, H, hb, P, kd == LAYER_FIRST && rng() % 2};
    if (!page_items && rng() % 5 == 0)  // more items than a tile
      c.dst.N = c.src.N = std::max(c.src.N, c.dst.N) + P * 40;
    c.planes_per_layer = mla ? 1 : 2;
    c.layer_begin = int64_t(rng() % uint64_t(L));
    c.layer_end = rng() % 2 ? L : c.layer_begin + 1;
    const int64_t most = std::min(c.src.N, c.dst.N);
    c.n_items = rng() % 10 == 0 ? 0 : int64_t(rng() % uint64_t(most)) + 1;
    c.pad_every = int(pick({0, 0, 2, 5, 7}));
    c.src_misalign = int(rng() % 3 == 0 ? pick({1, 2, 4, 8}) : 0);
    c.dst_misalign = int(rng() % 3 == 0 ? pick({1, 2, 4, 8}) : 0);
    c.bases_known = rng() % 3 != 0;
    c.warps = int(pick({1, 2, 3, 4, 8, 12, 16, 32}));
    c.max_blocks = int(pick({1, 2, 3, 7, 1000}));
    c.bulk = rng() % 3 == 0;
    c.stage_bytes = uint32_t(pick({16, 48, 64, 256, 1024, 16384}));
    c.stages = uint32_t(pick({3, 4, 5, 8}));
    c.split_items = rng() % 4 == 0 ? int(pick({1, 2, 5})) : 0;  // several launches
    if (c.bulk && (hb * H) % 16) c.bulk = false;
    if (c.bulk) { c.src_misalign = c.dst_misalign = 0; c.bases_known = true; }
    const bool ran = run_case(c, rng);
    cases += ran;
    bulk_cases += ran && c.bulk;
  }
  std::printf("emulated %d transfers (%d through the bulk pipeline); %d failed checks\n", cases, bulk_cases,
              g_failures);
  return g_failures ? 1 : 0;
}
