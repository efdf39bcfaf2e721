// The library's whole C surface: plain C types only, so Python reaches it
// through ctypes and no build is tied to one PyTorch ABI.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "hicache/abi.h"
#include "internal.h"

#define HCK_API extern "C" __attribute__((visibility("default")))

#ifndef HCK_ARCHS
#define HCK_ARCHS "unknown"
#endif
#ifndef HCK_SOURCE_HASH
#define HCK_SOURCE_HASH "unknown"
#endif

namespace hicache {

namespace {
thread_local std::string g_last_error;

std::string cuda_message(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}
}  // namespace

void set_error(const std::string& message) { g_last_error = message; }
std::string last_error() { return g_last_error; }

DeviceGuard::DeviceGuard(int device) {
  cudaError_t e = cudaGetDevice(&previous_);
  if (e == cudaSuccess && previous_ != device) e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    set_error(cuda_message(e, ("selecting device " + std::to_string(device)).c_str()));
    status_ = int(e);
    previous_ = -1;
    cudaGetLastError();
  }
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

}  // namespace hicache

using hicache::set_error;

HCK_API int hck_abi_version(void) { return HCK_ABI_VERSION; }

// Sizes of the ABI structs, so a caller with other headers refuses to go on.
HCK_API void hck_struct_sizes(int64_t* side, int64_t* copy, int64_t* memcpy_desc) {
  *side = int64_t(sizeof(HckSide));
  *copy = int64_t(sizeof(HckCopyDesc));
  *memcpy_desc = int64_t(sizeof(HckMemcpyDesc));
}

HCK_API const char* hck_last_error(void) { return hicache::g_last_error.c_str(); }

// "cuda=<toolkit>;archs=<CMake architecture list>;source=<digest of csrc/>"
HCK_API const char* hck_build_info(void) {
  static char info[512];
  std::snprintf(info, sizeof(info), "cuda=%d.%d;archs=%s;source=%s", CUDART_VERSION / 1000,
                (CUDART_VERSION % 1000) / 10, HCK_ARCHS, HCK_SOURCE_HASH);
  return info;
}

// Devices this library's CUDA runtime sees; fails (with the runtime's reason,
// e.g. no driver) where there are none.
HCK_API int hck_device_count(int* count) {
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    set_error(hicache::cuda_message(e, "counting CUDA devices"));
    cudaGetLastError();
    *count = 0;
    return int(e);
  }
  return 0;
}

// info[0..6]: compute capability major, minor, multiprocessors, has the
// register kernel, has the bulk kernel, cudaMemcpyBatchAsync's API version
// (13000, 12080 or 0), async copy engines.
HCK_API int hck_probe(int device, int32_t* info) {
  std::memset(info, 0, 7 * sizeof(int32_t));
  int major = 0, minor = 0, sms = 0, engines = 0;
  cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&engines, cudaDevAttrAsyncEngineCount, device);
  if (e != cudaSuccess) {
    set_error(hicache::cuda_message(e, ("querying device " + std::to_string(device)).c_str()));
    cudaGetLastError();
    return int(e);
  }
  int has_register = 0, has_bulk = 0;
  if (int rc = hicache::probe_kernels(device, &has_register, &has_bulk)) return rc;
  info[0] = major;
  info[1] = minor;
  info[2] = sms;
  info[3] = has_register;
  info[4] = has_bulk;
  info[5] = hicache::batch_api_version();
  info[6] = engines;
  return 0;
}

// Why the copy engine gave up cudaMemcpyBatchAsync on this device ("" if it has not).
HCK_API int hck_batch_refusal(int device, char* buffer, int64_t size) {
  const std::string why = hicache::batch_refusal(device);
  if (size > 0) {
    std::snprintf(buffer, size_t(size), "%s", why.c_str());
  }
  return 0;
}

HCK_API int hck_copy_items(const HckCopyDesc* desc) {
  if (!desc) {
    set_error("desc: expected a HckCopyDesc, got NULL");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  return hicache::launch_copy_items(*desc);
}

// descs[0..n_descs) prepared once (everything but the indices, their count and
// the stream), launched in order on one stream with the call's indices, each
// followed by cudaEventRecord(events[i], stream) when events is not NULL.
HCK_API int hck_copy_prepared(const HckCopyDesc* descs, int64_t n_descs, const int64_t* src_indices,
                              const int64_t* dst_indices, int64_t n_items, void* stream,
                              void* const* events) {
  return hicache::launch_prepared(descs, n_descs, src_indices, dst_indices, n_items, stream, events);
}

HCK_API int hck_memcpy_runs(HckMemcpyDesc* desc) {
  if (!desc) {
    set_error("desc: expected a HckMemcpyDesc, got NULL");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  return hicache::issue_memcpy_runs(*desc);
}
