// The host twin of libhicache_cuda: the library's launch surface
// (hck_copy_items, hck_copy_prepared and what a caller checks first) built by
// the host compiler, for tests and benchmarks on machines without a GPU.
//
// It runs the library's own host logic (csrc/src/launch.h: checks, launch
// splitting, the prepared loop and its event records). Where the library
// launches the register kernel, the twin either runs that kernel's code
// (copy_registers.h) on the CPU, block by block and thread by thread, so that
// tests can compare bytes, or does nothing ("launch stubbed"), so that
// benchmarks time everything but the driver's launch. Launches and event
// records are logged for tests to read (hck_twin_mode sets both). Bulk-kernel descriptions are refused.
//
// Build (tests/host_twin.py does this):
//   g++ -std=c++17 -O2 -shared -fPIC -fvisibility=hidden -I csrc/include
//       -I csrc/src csrc/tests/host_twin.cpp -o libhicache_host_twin.so
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "hicache/copy_registers.h"
#include "launch.h"

#define HCK_API extern "C" __attribute__((visibility("default")))

namespace hicache {
namespace {
thread_local std::string g_last_error;
int g_mode = 3;  // bit 0: launches run the kernel's code; bit 1: launches and records are logged
std::mutex g_log_mutex;
std::vector<int64_t> g_log;  // 4 values per entry, see hck_twin_log
}  // namespace

void set_error(const std::string& message) { g_last_error = message; }
std::string last_error() { return g_last_error; }

namespace {

// The register kernel's memory operations on host memory (the GPU's unified
// addresses are host addresses here).
struct TwinMem {
  static int64_t load_index(const int64_t* p) { return *p; }
  static uint32_t fresh(uint32_t v) { return v; }
  template <int W, bool RUNTIME_ALIGN>
  static Unit<W> load(const char* p, bool on) {
    Unit<W> u{};
    if (on) std::memcpy(&u, p, W);
    return u;
  }
  template <int W, bool RUNTIME_ALIGN>
  static void store(char* p, const Unit<W>& u, bool on) {
    if (on) std::memcpy(p, &u, W);
  }
};

template <int W, bool RA>
void run_grid(const RegisterPlan& p, uint32_t blocks, uint32_t threads) {
  for (uint32_t block = 0; block < blocks; ++block)
    for (uint32_t tile = block; tile < p.total_tiles; tile += blocks)
      for (uint32_t thread = 0; thread < threads; ++thread)
        copy_register_tile<W, RA, TwinMem>(p, tile, thread, threads);
}

void log_entry(int64_t kind, int64_t a, int64_t b, int64_t c) {
  if (!(g_mode & 2)) return;
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.insert(g_log.end(), {kind, a, b, c});
}

int copy_checked(const HckCopyDesc& d) {
  if (d.kernel != HCK_KERNEL_REGISTERS) {
    set_error("kernel: the host twin runs the register kernel only");
    return HCK_ERR_UNSUPPORTED;
  }
  return for_each_register_launch(d, [&](int width, bool ra, uint32_t blocks, uint32_t threads,
                                         const RegisterPlan& p) {
    log_entry(1, reinterpret_cast<int64_t>(d.stream), p.n_planes, int64_t(p.units_per_plane) * width);
    if (!(g_mode & 1)) return;
    switch (width) {
      case 16: return ra ? run_grid<16, true>(p, blocks, threads) : run_grid<16, false>(p, blocks, threads);
      case 8: return ra ? run_grid<8, true>(p, blocks, threads) : run_grid<8, false>(p, blocks, threads);
      case 4: return ra ? run_grid<4, true>(p, blocks, threads) : run_grid<4, false>(p, blocks, threads);
      case 2: return ra ? run_grid<2, true>(p, blocks, threads) : run_grid<2, false>(p, blocks, threads);
      default: return run_grid<1, false>(p, blocks, threads);
    }
  });
}

}  // namespace
}  // namespace hicache

using namespace hicache;

HCK_API int hck_abi_version(void) { return HCK_ABI_VERSION; }

HCK_API void hck_struct_sizes(int64_t* side, int64_t* copy, int64_t* memcpy_desc) {
  *side = int64_t(sizeof(HckSide));
  *copy = int64_t(sizeof(HckCopyDesc));
  *memcpy_desc = int64_t(sizeof(HckMemcpyDesc));
}

HCK_API const char* hck_last_error(void) { return g_last_error.c_str(); }

HCK_API const char* hck_build_info(void) { return "cuda=host twin;archs=host;source=twin"; }

HCK_API int hck_copy_items(const HckCopyDesc* desc) {
  if (!desc) {
    set_error("desc: expected a HckCopyDesc, got NULL");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  const std::string bad = check_desc(*desc);
  if (!bad.empty()) {
    set_error(bad);
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (desc->n_items == 0 || desc->n_planes == 0) return 0;
  return copy_checked(*desc);
}

HCK_API int hck_copy_prepared(const HckCopyDesc* descs, int64_t n_descs, const int64_t* src_indices,
                              const int64_t* dst_indices, int64_t n_items, void* stream,
                              void* const* events) {
  return copy_prepared(descs, n_descs, src_indices, dst_indices, n_items, stream, events, copy_checked,
                       [](void* event, void* on) {
                         log_entry(2, reinterpret_cast<int64_t>(on), reinterpret_cast<int64_t>(event), 0);
                         return 0;
                       });
}

// Nanoseconds per hck_copy_prepared call, the lowest of 5 averages of reps calls: the
// library's own host logic, timed in C (the benchmarks subtract nothing, they report it).
HCK_API double hck_twin_time_prepared(const HckCopyDesc* descs, int64_t n_descs,
                                      const int64_t* src_indices, const int64_t* dst_indices,
                                      int64_t n_items, int64_t reps) {
  double best = -1;
  for (int round = 0; round < 5 && reps > 0; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i)
      if (hck_copy_prepared(descs, n_descs, src_indices, dst_indices, n_items, nullptr, nullptr) != 0)
        return -1;
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start)
                          .count() / double(reps);
    if (best < 0 || ns < best) best = ns;
  }
  return best;
}

// Bit 0: launches run the kernel's code on the CPU; bit 1: launches and event
// records are logged. 3 (both) by default; 0 for benchmarks: the launch stubbed.
HCK_API void hck_twin_mode(int mode) { g_mode = mode; }

// Moves up to capacity entries of 4 int64s out of the log, oldest first;
// returns how many the log held. Entries: (1, stream, planes, bytes per plane) for a kernel
// launch, (2, stream, event, 0) for an event record.
HCK_API int64_t hck_twin_log(int64_t* out, int64_t capacity) {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  const int64_t n = int64_t(g_log.size() / 4);
  const int64_t copy = n < capacity ? n : capacity;
  if (!out || copy <= 0) return n;
  std::memcpy(out, g_log.data(), size_t(copy) * 4 * sizeof(int64_t));
  g_log.erase(g_log.begin(), g_log.begin() + copy * 4);
  return n;
}
