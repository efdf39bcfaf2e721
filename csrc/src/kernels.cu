// The transfer kernels and their launcher. Kernel bodies live in the headers
// (copy_registers.h, copy_bulk.h) so the host emulation test runs the same
// code; this file supplies the device memory operations and the launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>

#include "hicache/copy_bulk.h"
#include "hicache/copy_registers.h"
#include "internal.h"
#include "launch.h"

namespace hicache {
namespace {

// ---- register kernel: device loads and stores ---------------------------------------
//
// Loads go through the read-only path without allocating in L1 (each byte is
// read once); stores cache in L2 only. Both are volatile asm so the compiler
// keeps all of a thread's loads ahead of its stores.

template <int P>
__device__ __forceinline__ uint32_t load_word(const char* p) {
  if constexpr (P == 4) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
  } else if constexpr (P == 2) {
    unsigned short v;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
  } else {
    unsigned short v;
    asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=h"(v) : "l"(p));
    return v & 0xffu;
  }
}

template <int P>
__device__ __forceinline__ void store_word(char* p, uint32_t v) {
  if constexpr (P == 4) {
    asm volatile("st.global.cg.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
  } else if constexpr (P == 2) {
    asm volatile("st.global.cg.u16 [%0], %1;" ::"l"(p), "h"((unsigned short)v) : "memory");
  } else {
    asm volatile("st.global.cg.u8 [%0], %1;" ::"l"(p), "h"((unsigned short)(v & 0xffu)) : "memory");
  }
}

// Bits [8*byte, 8*byte + 8*P) of a unit, as words of at most 32 bits.
template <int W>
__device__ __forceinline__ void put_bits(Unit<W>& u, int byte, uint32_t v) {
  if constexpr (W >= 4) {
    u.w[byte / 4] |= v << (8 * (byte % 4));
  } else {
    u.w[0] = typename Unit<W>::word(u.w[0] | (v << (8 * byte)));
  }
}
template <int W, int P>
__device__ __forceinline__ uint32_t get_bits(const Unit<W>& u, int byte) {
  const uint32_t mask = P == 4 ? 0xffffffffu : (1u << (8 * P)) - 1u;
  if constexpr (W >= 4) {
    return (u.w[byte / 4] >> (8 * (byte % 4))) & mask;
  } else {
    return (uint32_t(u.w[0]) >> (8 * byte)) & mask;
  }
}

// One W-byte access, predicated: with ``on`` false nothing is read or written
// (and a load gives zeros), with no branch, so a thread's loads issue back to
// back. The data loads are coherent (not .nc) on purpose: ptxas then keeps
// every load of a tile ahead of its stores, which it may not assume to be
// independent of them, instead of interleaving them to save registers.
#define HCK_PRED(pred, insn) "{\n .reg .pred p;\n setp.ne.b32 p, %" pred ", 0;\n @p " insn ";\n}"

template <int W>
__device__ __forceinline__ Unit<W> load_exact(const char* p, bool on) {
  Unit<W> u{};
  const uint32_t pred = on;
  if constexpr (W == 16) {
    asm volatile(HCK_PRED("5", "ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4]")
                 : "+r"(u.w[0]), "+r"(u.w[1]), "+r"(u.w[2]), "+r"(u.w[3]) : "l"(p), "r"(pred));
  } else if constexpr (W == 8) {
    asm volatile(HCK_PRED("3", "ld.global.L1::no_allocate.v2.u32 {%0, %1}, [%2]")
                 : "+r"(u.w[0]), "+r"(u.w[1]) : "l"(p), "r"(pred));
  } else if constexpr (W == 4) {
    asm volatile(HCK_PRED("2", "ld.global.L1::no_allocate.u32 %0, [%1]") : "+r"(u.w[0]) : "l"(p), "r"(pred));
  } else {
    unsigned short v = 0;
    if constexpr (W == 2) {
      asm volatile(HCK_PRED("2", "ld.global.L1::no_allocate.u16 %0, [%1]") : "+h"(v) : "l"(p), "r"(pred));
    } else {
      asm volatile(HCK_PRED("2", "ld.global.L1::no_allocate.u8 %0, [%1]") : "+h"(v) : "l"(p), "r"(pred));
    }
    u.w[0] = typename Unit<W>::word(v);
  }
  return u;
}

template <int W>
__device__ __forceinline__ void store_exact(char* p, const Unit<W>& u, bool on) {
  const uint32_t pred = on;
  if constexpr (W == 16) {
    asm volatile(HCK_PRED("0", "st.global.cg.v4.u32 [%1], {%2, %3, %4, %5}")
                 ::"r"(pred), "l"(p), "r"(u.w[0]), "r"(u.w[1]), "r"(u.w[2]), "r"(u.w[3]) : "memory");
  } else if constexpr (W == 8) {
    asm volatile(HCK_PRED("0", "st.global.cg.v2.u32 [%1], {%2, %3}")
                 ::"r"(pred), "l"(p), "r"(u.w[0]), "r"(u.w[1]) : "memory");
  } else if constexpr (W == 4) {
    asm volatile(HCK_PRED("0", "st.global.cg.u32 [%1], %2") ::"r"(pred), "l"(p), "r"(u.w[0]) : "memory");
  } else if constexpr (W == 2) {
    asm volatile(HCK_PRED("0", "st.global.cg.u16 [%1], %2") ::"r"(pred), "l"(p), "h"((unsigned short)u.w[0])
                 : "memory");
  } else {
    asm volatile(HCK_PRED("0", "st.global.cg.u8 [%1], %2") ::"r"(pred), "l"(p), "h"((unsigned short)u.w[0])
                 : "memory");
  }
}
#undef HCK_PRED

// A W-byte access split into P-byte pieces (P < W, P <= 4).
template <int W, int P>
__device__ __forceinline__ Unit<W> load_pieces(const char* p) {
  Unit<W> u{};
#pragma unroll
  for (int b = 0; b < W; b += P) put_bits<W>(u, b, load_word<P>(p + b));
  return u;
}
template <int W, int P>
__device__ __forceinline__ void store_pieces(char* p, const Unit<W>& u) {
#pragma unroll
  for (int b = 0; b < W; b += P) store_word<P>(p + b, get_bits<W, P>(u, b));
}

struct DeviceMem {
  static __device__ __forceinline__ int64_t load_index(const int64_t* p) { return __ldg(p); }
  // The same value, opaque to the compiler: a unit's position is worked out
  // again in each step instead of held in registers across the loads.
  static __device__ __forceinline__ uint32_t fresh(uint32_t v) {
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
    return v;
  }

  // ``on`` false: no access. RUNTIME_ALIGN: split where the address is less aligned than W.
  template <int W, bool RUNTIME_ALIGN>
  static __device__ __forceinline__ Unit<W> load(const char* p, bool on) {
    if constexpr (RUNTIME_ALIGN && W > 1) {
      const int a = on ? access_width<W>(p) : W;
      if (a != W) {
        if constexpr (W >= 8) {
          if (a >= 4) return load_pieces<W, 4>(p);
        }
        if constexpr (W >= 4) {
          if (a == 2) return load_pieces<W, 2>(p);
        }
        return load_pieces<W, 1>(p);
      }
    }
    return load_exact<W>(p, on);
  }

  template <int W, bool RUNTIME_ALIGN>
  static __device__ __forceinline__ void store(char* p, const Unit<W>& u, bool on) {
    if constexpr (RUNTIME_ALIGN && W > 1) {
      const int a = on ? access_width<W>(p) : W;
      if (a != W) {
        if constexpr (W >= 8) {
          if (a >= 4) return store_pieces<W, 4>(p, u);
        }
        if constexpr (W >= 4) {
          if (a == 2) return store_pieces<W, 2>(p, u);
        }
        return store_pieces<W, 1>(p, u);
      }
    }
    store_exact<W>(p, u, on);
  }
};

template <int W, bool RUNTIME_ALIGN>
__global__ void __launch_bounds__(kMaxRegisterThreads, 3) copy_registers_kernel(const RegisterPlan p) {
  for (uint32_t tile = blockIdx.x; tile < p.total_tiles; tile += gridDim.x) {
    copy_register_tile<W, RUNTIME_ALIGN, DeviceMem>(p, tile, threadIdx.x, blockDim.x);
  }
}

// ---- bulk kernel: cp.async.bulk through shared memory (sm_90+) -------------------------

// Only device code for sm_90+ has these instructions; the kernel is empty
// elsewhere and never launched there (the host checks the code's PTX version).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

struct BulkDeviceOps {
  char* stages;
  uint64_t* barriers;
  uint32_t stage_bytes;

  __device__ uint32_t lane() const { return threadIdx.x & 31u; }
  __device__ uint32_t lanes() const { return 32u; }
  __device__ void warp_sync() const { __syncwarp(); }
  __device__ uint32_t warp_sum(uint32_t x) const {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  }
  __device__ int64_t load_index(const int64_t* p) const { return __ldg(p); }
  __device__ char* stage(uint32_t s) const { return stages + size_t(s) * stage_bytes; }

  __device__ void expect_bytes(uint32_t s, uint32_t bytes) const {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"(smem_address(barriers + s)), "r"(bytes) : "memory");
  }
  __device__ void load(uint32_t s, char* smem, const char* src, uint32_t bytes) const {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(smem_address(smem)), "l"(src), "r"(bytes), "r"(smem_address(barriers + s))
        : "memory");
  }
  __device__ void wait_loaded(uint32_t s, uint32_t parity) const {
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          " selp.u32 %0, 1, 0, p;\n}"
          : "=r"(done) : "r"(smem_address(barriers + s)), "r"(parity) : "memory");
    }
    // the stores below read the stage through the async proxy
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __device__ void store(char* dst, const char* smem, uint32_t bytes) const {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 ::"l"(dst), "r"(smem_address(smem)), "r"(bytes) : "memory");
  }
  __device__ void commit_group() const { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
  __device__ void wait_reads_all_but_latest_group() const {
    asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
  }
  __device__ void wait_all_groups() const { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
};
#endif

__global__ void __launch_bounds__(1024) copy_bulk_kernel(const BulkPlan p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) char smem[];
  const uint32_t warp = threadIdx.x / 32u;
  const uint32_t warps = blockDim.x / 32u;
  BulkDeviceOps ops;
  ops.barriers = reinterpret_cast<uint64_t*>(smem) + warp * p.stages;
  ops.stages = smem + barrier_region(warps, p.stages) + size_t(warp) * p.stages * p.stage_bytes;
  ops.stage_bytes = p.stage_bytes;
  if (ops.lane() == 0) {
    for (uint32_t s = 0; s < p.stages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(ops.barriers + s))
                   : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncwarp();
  bulk_pipeline(p, blockIdx.x * warps + warp, gridDim.x * warps, ops);
#endif
}

// ---- launching ---------------------------------------------------------------------------

using RegisterKernel = void (*)(RegisterPlan);

RegisterKernel register_kernel(int width, bool runtime_align) {
  switch (width) {
    case 16: return runtime_align ? copy_registers_kernel<16, true> : copy_registers_kernel<16, false>;
    case 8: return runtime_align ? copy_registers_kernel<8, true> : copy_registers_kernel<8, false>;
    case 4: return runtime_align ? copy_registers_kernel<4, true> : copy_registers_kernel<4, false>;
    case 2: return runtime_align ? copy_registers_kernel<2, true> : copy_registers_kernel<2, false>;
    default: return copy_registers_kernel<1, false>;
  }
}

std::string cuda_message(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Per device, asked once: the shared memory a block may have (opt-in), and
// the largest dynamic shared memory set on the bulk kernel so far.
std::mutex g_smem_mutex;
int g_bulk_optin[64] = {0};
int g_bulk_smem[64] = {0};

int bulk_optin(int device, int* optin) {
  std::lock_guard<std::mutex> lock(g_smem_mutex);
  if (device >= 0 && device < 64 && g_bulk_optin[device] > 0) {
    *optin = g_bulk_optin[device];
    return 0;
  }
  cudaError_t e = cudaDeviceGetAttribute(optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "bulk kernel: asking the shared memory a block may have"));
    return int(e);
  }
  if (device >= 0 && device < 64) g_bulk_optin[device] = *optin;
  return 0;
}

int ensure_bulk_smem(int device, int bytes) {
  std::lock_guard<std::mutex> lock(g_smem_mutex);
  if (device >= 0 && device < 64 && g_bulk_smem[device] >= bytes) return 0;
  cudaError_t e = cudaFuncSetAttribute(copy_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "bulk kernel: setting its shared memory size"));
    return int(e);
  }
  if (device >= 0 && device < 64) g_bulk_smem[device] = bytes;
  return 0;
}

int launch_bulk(const HckCopyDesc& d, cudaStream_t stream) {
  int has_register = 0, has_bulk = 0;
  if (int rc = probe_kernels(d.device, &has_register, &has_bulk)) return rc;
  if (!has_bulk) {
    set_error("kernel: the bulk kernel needs sm_90 or newer and code built for it");
    return HCK_ERR_UNSUPPORTED;
  }
  int optin = 0;
  if (int rc = bulk_optin(d.device, &optin)) return rc;
  const int64_t limit = d.smem_cap > 0 ? std::min<int64_t>(d.smem_cap, optin) : optin;
  const uint32_t warps = uint32_t(d.warps_per_block);
  const BulkShape shape = bulk_shape(warps, uint32_t(d.stage_bytes), uint32_t(d.stages), limit);
  if (shape.stage_bytes == 0 || shape.stage_bytes % 16) {
    set_error("stage_bytes: expected a positive multiple of 16");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (shape.stages < kMinBulkStages || shape.smem > limit) {
    set_error("bulk kernel: " + std::to_string(warps) + " warps x " + std::to_string(shape.stages) +
              " stages x " + std::to_string(shape.stage_bytes) + " bytes do not fit the " +
              std::to_string(limit) + " bytes of shared memory a block may have here (" +
              (limit < optin ? "smem_cap; the device allows " + std::to_string(optin)
                             : std::string("the device's limit")) +
              "); at least " + std::to_string(kMinBulkStages) + " stages are needed");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (int rc = ensure_bulk_smem(d.device, int(shape.smem))) return rc;
  const int64_t per_launch = bulk_items_per_launch(d, shape.stage_bytes);
  if (per_launch < 1) {
    set_error("n_chunks, chunk_bytes: one item is too large for one launch");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  for (int64_t first = 0; first < d.n_items; first += per_launch) {
    const int64_t n = std::min(per_launch, d.n_items - first);
    const BulkPlan p = make_bulk_plan(d, shape.stage_bytes, shape.stages, first, n);
    if (p.total_tiles == 0) continue;
    const uint32_t blocks = std::min<uint32_t>(uint32_t(d.max_blocks), (p.total_tiles + warps - 1) / warps);
    copy_bulk_kernel<<<blocks, warps * 32u, size_t(shape.smem), stream>>>(p);
  }
  return 0;
}

int launch_registers(const HckCopyDesc& d, cudaStream_t stream) {
  return for_each_register_launch(d, [&](int width, bool runtime_align, uint32_t blocks, uint32_t threads,
                                         const RegisterPlan& p) {
    register_kernel(width, runtime_align)<<<blocks, threads, 0, stream>>>(p);
  });
}

// One checked description with items, on the current device.
int launch_checked(const HckCopyDesc& d) {
  cudaStream_t stream = static_cast<cudaStream_t>(d.stream);
  const int rc = d.kernel == HCK_KERNEL_BULK ? launch_bulk(d, stream) : launch_registers(d, stream);
  if (rc) return rc;
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "launching the copy kernel"));
    return int(e);
  }
  return 0;
}

}  // namespace

namespace {
// probe_kernels' answers per device (0: not asked yet, else 1 + has_register + 2 * has_bulk),
// so launches ask the driver nothing (and stay legal during graph capture).
std::mutex g_probe_mutex;
int g_probed[64] = {0};
}  // namespace

int probe_kernels(int device, int* has_register, int* has_bulk) {
  *has_register = 0;
  *has_bulk = 0;
  {
    std::lock_guard<std::mutex> lock(g_probe_mutex);
    if (device >= 0 && device < 64 && g_probed[device]) {
      *has_register = (g_probed[device] - 1) & 1;
      *has_bulk = ((g_probed[device] - 1) >> 1) & 1;
      return 0;
    }
  }
  DeviceGuard guard(device);
  if (guard.status()) return guard.status();
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, copy_registers_kernel<16, false>);
  if (e == cudaErrorInvalidDeviceFunction || e == cudaErrorNoKernelImageForDevice) {
    cudaGetLastError();
    std::lock_guard<std::mutex> lock(g_probe_mutex);
    if (device >= 0 && device < 64) g_probed[device] = 1;
    return 0;
  }
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "looking for the kernels' code"));
    return int(e);
  }
  *has_register = 1;
  // Load every kernel now (CUDA loads modules lazily), so none is first loaded
  // inside a graph capture.
  for (int width : {8, 4, 2, 1}) {
    for (bool runtime_align : {false, true}) cudaFuncGetAttributes(&attr, register_kernel(width, runtime_align));
  }
  cudaFuncGetAttributes(&attr, register_kernel(16, true));
  e = cudaFuncGetAttributes(&attr, copy_bulk_kernel);
  // PTX version 90+: compiled for sm_90 or newer, not JIT-compiled from older PTX
  *has_bulk = e == cudaSuccess && attr.ptxVersion >= 90;
  cudaGetLastError();
  std::lock_guard<std::mutex> lock(g_probe_mutex);
  if (device >= 0 && device < 64) g_probed[device] = 1 + *has_register + 2 * *has_bulk;
  return 0;
}

int launch_copy_items(const HckCopyDesc& d) {
  const std::string bad = check_desc(d);
  if (!bad.empty()) {
    set_error(bad);
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (d.n_items == 0 || d.n_planes == 0) return 0;
  DeviceGuard guard(d.device);
  if (guard.status()) return guard.status();
  return launch_checked(d);
}

int launch_prepared(const HckCopyDesc* descs, int64_t n_descs, const int64_t* src_indices,
                    const int64_t* dst_indices, int64_t n_items, void* stream, void* const* events) {
  if (n_descs < 1 || !descs) {  // (copy_prepared says so too; the guard needs descs[0])
    set_error("descs: expected at least one prepared description");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  DeviceGuard guard(descs[0].device);
  if (guard.status()) return guard.status();
  return copy_prepared(descs, n_descs, src_indices, dst_indices, n_items, stream, events, launch_checked,
                       [](void* event, void* on) {
                         const cudaError_t e = cudaEventRecord(static_cast<cudaEvent_t>(event),
                                                               static_cast<cudaStream_t>(on));
                         if (e == cudaSuccess) return 0;
                         set_error(cuda_message(e, "recording the event"));
                         return int(e);
                       });
}

}  // namespace hicache
