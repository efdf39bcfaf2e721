// Declarations shared by the library's translation units (not installed).
#pragma once

#include <string>

#include "hicache/abi.h"

namespace hicache {

// The sentence hck_last_error() returns; set by whoever fails.
void set_error(const std::string& message);
std::string last_error();

// Returns an HCK_* code or a cudaError_t (positive), setting the error sentence.
int launch_copy_items(const HckCopyDesc& desc);
int launch_prepared(const HckCopyDesc* descs, int64_t n_descs, const int64_t* src_indices,
                    const int64_t* dst_indices, int64_t n_items, void* stream, void* const* events);
int issue_memcpy_runs(HckMemcpyDesc& desc);

// [has_register_kernel, has_bulk_kernel]: whether this library holds code the
// device can run (SASS or PTX for it); bulk also needs sm_90+ code.
int probe_kernels(int device, int* has_register, int* has_bulk);
int batch_api_version();  // 13000, 12080, or 0 where cudaMemcpyBatchAsync is missing
std::string batch_refusal(int device);  // why the batch call was given up on this device, or ""

// Switches to ``device`` for the guard's lifetime, then back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  int status() const { return status_; }

 private:
  int previous_ = -1;
  int status_ = 0;
};

}  // namespace hicache
