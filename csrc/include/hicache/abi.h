/* The C ABI between the library and its callers (Python ctypes mirrors these
 * structs in hicache_kernels/backends/_native.py; hck_abi_version() and
 * hck_struct_sizes() let the caller refuse a library built from other headers).
 * Plain C: no torch, no CUDA headers. Every stride and size is in bytes. */
#ifndef HICACHE_ABI_H
#define HICACHE_ABI_H

#include <stdint.h>

#define HCK_ABI_VERSION 3

/* Return codes of the hck_* functions: 0 is success, a positive value is a
 * cudaError_t, a negative one is ours; hck_last_error() has the sentence. */
#define HCK_OK 0
#define HCK_ERR_INVALID_ARGUMENT (-1)
#define HCK_ERR_UNSUPPORTED (-2)
#define HCK_ERR_DRIVER (-3)

/* Which kernel hck_copy_items launches. */
#define HCK_KERNEL_REGISTERS 0 /* loads staged in registers, any architecture */
#define HCK_KERNEL_BULK 1      /* cp.async.bulk through shared memory, sm_90+ */

/* One side of a copy: plane p's item for slot s starts at
 *   bases[p] + (s / page_size) * page_stride + (s % page_size) * slot_stride
 * and its chunk c at chunk_stride * c further. */
typedef struct HckSide {
  const int64_t* bases;   /* [n_planes] plane base addresses, readable by the kernel */
  const int64_t* indices; /* [n_items] slots, readable by the kernel; negative = skip */
  int64_t page_size;
  int64_t page_stride;
  int64_t slot_stride;
  int64_t chunk_stride;
} HckSide;

/* Copy items src.indices[i] -> dst.indices[i] in every plane, each item
 * n_chunks chunks of chunk_bytes contiguous bytes on both sides.
 * hck_copy_items takes one whole description; hck_copy_prepared takes
 * descriptions filled once and sets src.indices, dst.indices, n_items and
 * stream from its arguments on every call (what they hold there is ignored). */
typedef struct HckCopyDesc {
  HckSide src;
  HckSide dst;
  int64_t n_items;
  int64_t n_planes;
  int64_t n_chunks;
  int64_t chunk_bytes;
  /* Power of two (<= 16) dividing chunk_bytes, every stride and, when
   * bases_known, every base: the widest access the kernel may use. */
  int64_t alignment;
  int32_t bases_known; /* 0: bases may have any alignment, checked per access */
  int32_t kernel;      /* HCK_KERNEL_* */
  /* The SM budget: at most max_blocks blocks of warps_per_block warps. The
   * register kernel runs a block of more than 8 warps as several blocks of
   * 8 (as many more blocks), so its blocks stay small enough to share an SM. */
  int32_t max_blocks;
  int32_t warps_per_block;
  int32_t device;
  /* Bulk kernel only, 0 = default: bytes of one shared-memory stage, stages
   * per pipeline (one pipeline per warp), and the most shared memory a block
   * may take (0: as much as the device allows a block). */
  int32_t stage_bytes;
  int32_t stages;
  int32_t smem_cap;
  void* stream; /* cudaStream_t */
} HckCopyDesc;

/* Copy count runs dsts[i] <- srcs[i] of sizes[i] bytes with copy engines. */
typedef struct HckMemcpyDesc {
  const int64_t* dsts; /* host arrays */
  const int64_t* srcs;
  const int64_t* sizes;
  int64_t count;
  int64_t max_per_call;      /* descriptors per cudaMemcpyBatchAsync call */
  int64_t bytes_per_stream;  /* a helper stream only for each this many bytes */
  int32_t max_streams;       /* helper streams the runs may spread over */
  int32_t device;
  int32_t force_per_run;     /* 1: one cudaMemcpyAsync per run, never the batch call */
  int32_t prefer_overlap;    /* 1: hint the driver to keep the copies off the SMs */
  void* stream;              /* cudaStream_t the copies are ordered on */
  /* outputs */
  int32_t used_streams;      /* helper streams used (0: the caller's stream itself) */
  int32_t used_batch;        /* 1 when cudaMemcpyBatchAsync issued the runs */
} HckMemcpyDesc;

#endif /* HICACHE_ABI_H */
