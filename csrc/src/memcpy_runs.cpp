// The copy-engine path: runs issued with cudaMemcpyBatchAsync (0 SMs),
// spread over helper streams joined back to the caller's stream by events.
//
// cudaMemcpyBatchAsync is resolved through the driver at run time, so one
// build serves CUDA 12.8 drivers (whose entry point takes a failIdx argument)
// and CUDA 13 drivers (which dropped it), and falls back to one
// cudaMemcpyAsync per run where the call is missing, where it refuses the
// caller's legacy default stream, and inside CUDA graph capture (the batch
// call cannot be captured, and a refused call there would silently drop the copy).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "hicache/copy_plan.h"
#include "internal.h"

namespace hicache {
namespace {

#if CUDA_VERSION >= 12080
using BatchAttributes = CUmemcpyAttributes;
#else
struct BatchAttributes {  // CUmemcpyAttributes' layout, for older headers
  int srcAccessOrder;
  struct { int type; int id; } srcLocHint, dstLocHint;
  unsigned int flags;
};
#endif

using BatchV13 = CUresult (*)(CUdeviceptr*, CUdeviceptr*, size_t*, size_t, BatchAttributes*,
                              size_t*, size_t, CUstream);
using BatchV128 = CUresult (*)(CUdeviceptr*, CUdeviceptr*, size_t*, size_t, BatchAttributes*,
                               size_t*, size_t, size_t*, CUstream);
using ErrorString = CUresult (*)(CUresult, const char**);

constexpr int kSrcAccessOrderStream = 1;  // CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
constexpr unsigned kPreferOverlapWithCompute = 1;  // CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE

struct BatchApi {
  int version = 0;  // 13000, 12080 or 0
  void* fn = nullptr;
  ErrorString error_string = nullptr;
};

void* driver_symbol(const char* name, unsigned version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &found);
#else
  (void)version;
  cudaError_t e = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#endif
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return fn;
}

const BatchApi& batch_api() {
  static BatchApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    api.error_string = reinterpret_cast<ErrorString>(driver_symbol("cuGetErrorString", 6000));
    // The signature is the one of the version we ask for, whatever the driver.
    for (int version : {13000, 12080}) {
      if (driver < version) continue;
      if (void* fn = driver_symbol("cuMemcpyBatchAsync", unsigned(version))) {
        api.fn = fn;
        api.version = version;
        return;
      }
    }
  });
  return api;
}

std::string driver_message(CUresult r, const char* what) {
  const char* text = nullptr;
  if (batch_api().error_string) batch_api().error_string(r, &text);
  return std::string(what) + ": CUresult " + std::to_string(int(r)) + (text ? std::string(" (") + text + ")" : "");
}

std::string cuda_message(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Helper streams and the events that fork them from, and join them to, a
// caller. Captures get their own set: a helper that joins a capture stays in it
// until the capture ends, and eager copies must never land in that graph.
struct Helpers {
  std::vector<cudaStream_t> streams;
  std::vector<cudaEvent_t> joins;
  cudaEvent_t fork = nullptr;
};

struct DeviceState {
  std::mutex mutex;
  Helpers eager, capture;
  bool batch_refused = false;  // the batch call failed once here: per run from then on
  std::string refusal;         // why, for hck_probe's callers
};

DeviceState& device_state(int device) {
  static std::mutex mutex;
  static std::vector<DeviceState*> states;  // never freed: they live as long as the process
  std::lock_guard<std::mutex> lock(mutex);
  if (size_t(device) >= states.size()) states.resize(size_t(device) + 1, nullptr);
  if (!states[size_t(device)]) states[size_t(device)] = new DeviceState();
  return *states[size_t(device)];
}

int ensure_helpers(Helpers& h, int n) {
  if (!h.fork) {
    cudaError_t e = cudaEventCreateWithFlags(&h.fork, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      set_error(cuda_message(e, "copy engine: creating an event"));
      return int(e);
    }
  }
  while (int(h.streams.size()) < n) {
    cudaStream_t s;
    cudaEvent_t ev;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      set_error(cuda_message(e, "copy engine: creating a helper stream"));
      return int(e);
    }
    h.streams.push_back(s);
    h.joins.push_back(ev);
  }
  return 0;
}

// One cudaMemcpyAsync per run.
int issue_per_run(const int64_t* dsts, const int64_t* srcs, const int64_t* sizes, int64_t count,
                  cudaStream_t stream) {
  for (int64_t i = 0; i < count; ++i) {
    cudaError_t e = cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<const void*>(srcs[i]),
                                    size_t(sizes[i]), cudaMemcpyDefault, stream);
    if (e != cudaSuccess) {
      set_error(cuda_message(e, ("copy engine: cudaMemcpyAsync of run " + std::to_string(i)).c_str()));
      return int(e);
    }
  }
  return 0;
}

// Runs in slices of max_per_call descriptors through the batch call; a slice
// the driver refuses is issued per run instead (and the batch call is not
// tried again on this device).
int issue_batched(DeviceState& st, const HckMemcpyDesc& d, const int64_t* dsts, const int64_t* srcs,
                  const int64_t* sizes, int64_t count, cudaStream_t stream, bool& used_batch) {
  const BatchApi& api = batch_api();
  BatchAttributes attr{};
  attr.srcAccessOrder = decltype(attr.srcAccessOrder)(kSrcAccessOrderStream);
  attr.flags = d.prefer_overlap ? kPreferOverlapWithCompute : 0u;
  size_t attr_index = 0;
  const int64_t step = std::max<int64_t>(1, d.max_per_call);
  for (int64_t at = 0; at < count; at += step) {
    const int64_t n = std::min(step, count - at);
    // size_t and CUdeviceptr are 64-bit like our int64 arrays
    auto* dp = reinterpret_cast<CUdeviceptr*>(const_cast<int64_t*>(dsts + at));
    auto* sp = reinterpret_cast<CUdeviceptr*>(const_cast<int64_t*>(srcs + at));
    auto* np = reinterpret_cast<size_t*>(const_cast<int64_t*>(sizes + at));
    CUresult r = CUDA_ERROR_NOT_SUPPORTED;
    if (!st.batch_refused) {
      if (api.version == 13000) {
        r = reinterpret_cast<BatchV13>(api.fn)(dp, sp, np, size_t(n), &attr, &attr_index, 1,
                                                 reinterpret_cast<CUstream>(stream));
      } else {
        size_t fail_index = 0;
        r = reinterpret_cast<BatchV128>(api.fn)(dp, sp, np, size_t(n), &attr, &attr_index, 1,
                                                  &fail_index, reinterpret_cast<CUstream>(stream));
      }
    }
    if (r == CUDA_SUCCESS) {
      used_batch = true;
      continue;
    }
    // Per run instead; if that works the batch call was the problem (a driver
    // without it, or a memory kind it refuses) and is not tried again here.
    if (int rc = issue_per_run(dsts + at, srcs + at, sizes + at, n, stream)) return rc;
    if (!st.batch_refused) {
      st.batch_refused = true;
      st.refusal = driver_message(r, "cudaMemcpyBatchAsync");
    }
  }
  return 0;
}

bool is_legacy_stream(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy; }

}  // namespace

int batch_api_version() { return batch_api().version; }

std::string batch_refusal(int device) {
  DeviceState& st = device_state(device);
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.refusal;
}

int issue_memcpy_runs(HckMemcpyDesc& d) {
  d.used_streams = 0;
  d.used_batch = 0;
  if (d.count < 0 || (d.count > 0 && (!d.dsts || !d.srcs || !d.sizes))) {
    set_error("dsts, srcs, sizes: expected host arrays of count entries");
    return HCK_ERR_INVALID_ARGUMENT;
  }
  if (d.count == 0) return 0;
  DeviceGuard guard(d.device);
  if (guard.status()) return guard.status();
  cudaStream_t caller = static_cast<cudaStream_t>(d.stream);

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(caller, &capture);
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "copy engine: asking whether the stream is capturing"));
    return int(e);
  }
  DeviceState& st = device_state(d.device);
  std::lock_guard<std::mutex> lock(st.mutex);
  const bool batch = !d.force_per_run && batch_api().version && !st.batch_refused &&
                     capture == cudaStreamCaptureStatusNone;

  int64_t total = 0;
  for (int64_t i = 0; i < d.count; ++i) total += d.sizes[i];
  const int64_t per_stream = std::max<int64_t>(1, d.bytes_per_stream);
  int groups = int(std::min<int64_t>(std::max(1, d.max_streams), std::max<int64_t>(1, total / per_stream)));
  groups = int(std::min<int64_t>(groups, d.count));
  // The batch call refuses the legacy default stream: fork onto a helper.
  const bool helpers = groups > 1 || (batch && is_legacy_stream(caller));

  bool used_batch = false;
  if (!helpers) {
    int rc = batch ? issue_batched(st, d, d.dsts, d.srcs, d.sizes, d.count, caller, used_batch)
                   : issue_per_run(d.dsts, d.srcs, d.sizes, d.count, caller);
    d.used_batch = used_batch;
    return rc;
  }

  // every helper of both sets at once, so a later call (perhaps under capture) creates none
  const int n_helpers = std::max(groups, d.max_streams);
  if (int rc = ensure_helpers(st.eager, n_helpers)) return rc;
  if (int rc = ensure_helpers(st.capture, n_helpers)) return rc;
  Helpers& h = capture == cudaStreamCaptureStatusNone ? st.eager : st.capture;
  std::vector<int64_t> starts(size_t(groups) + 1);
  groups = partition_by_bytes(d.sizes, d.count, groups, starts.data());
  e = cudaEventRecord(h.fork, caller);
  if (e != cudaSuccess) {
    set_error(cuda_message(e, "copy engine: recording the fork event"));
    return int(e);
  }
  int rc = 0;
  int joined = 0;
  for (int g = 0; g < groups; ++g) {
    cudaStream_t s = h.streams[size_t(g)];
    e = cudaStreamWaitEvent(s, h.fork, 0);
    if (e != cudaSuccess) {
      set_error(cuda_message(e, "copy engine: ordering a helper stream after the caller's"));
      rc = int(e);
      break;
    }
    const int64_t a = starts[size_t(g)], n = starts[size_t(g) + 1] - a;
    if (rc == 0) {
      rc = batch ? issue_batched(st, d, d.dsts + a, d.srcs + a, d.sizes + a, n, s, used_batch)
                 : issue_per_run(d.dsts + a, d.srcs + a, d.sizes + a, n, s);
    }
    // join every stream that was forked, even after a failure, so a capture
    // is never left with unjoined work
    cudaError_t je = cudaEventRecord(h.joins[size_t(g)], s);
    if (je == cudaSuccess) je = cudaStreamWaitEvent(caller, h.joins[size_t(g)], 0);
    if (je != cudaSuccess && rc == 0) {
      set_error(cuda_message(je, "copy engine: joining a helper stream back to the caller's"));
      rc = int(je);
    }
    ++joined;
    if (rc) break;
  }
  d.used_streams = joined;
  d.used_batch = used_batch;
  return rc;
}

}  // namespace hicache
