// Division by a run-time constant with a multiply and a shift: a 64-bit
// division costs tens of instructions, and with a 2-block grid the kernel's
// instruction budget per byte is small (see copy_plan.h).
#pragma once

#include <stdint.h>

// Code shared by the device and the host emulation test.
#if defined(__CUDACC__)
#define HCK_HD __host__ __device__ __forceinline__
#define HCK_HD_COLD __host__ __device__ __noinline__
#define HCK_UNROLL _Pragma("unroll")
#else
#define HCK_HD inline
#define HCK_HD_COLD inline
#define HCK_UNROLL
#endif

namespace hicache {

// q = n / d and r = n % d for any 32-bit n and a divisor 1 <= d < 2^31:
// q = (umulhi(n, mul) + n) >> shift, with shift = ceil(log2 d) and
// mul = floor(2^32 * (2^shift - d) / d) + 1 (Granlund and Montgomery's
// round-up method; the sum is formed in 64 bits so it never overflows).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t mul = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  HCK_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    uint32_t hi = __umulhi(n, mul);
#else
    uint32_t hi = uint32_t((uint64_t(n) * mul) >> 32);
#endif
    return uint32_t((uint64_t(hi) + n) >> shift);
  }

  HCK_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace hicache
