#pragma once

// Page-locks host memory for the CUDA driver (cudaHostRegister), so that a host-to-device copy
// from it is one DMA instead of a staged copy. Used for the shared-memory arena of the same-host
// transport. Builds without CUDA compile pinned_host_none.cc instead, which never pins.

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"

namespace meft::worker {

// Holds one registration; the destructor unregisters. The memory must outlive it.
class PinnedHostRegistration {
 public:
  virtual ~PinnedHostRegistration() = default;
};

// True when this build can pin (LibTorch with CUDA) and a CUDA device is present now.
bool CanPinHostMemory();

// Registers [data, data + bytes). UNIMPLEMENTED in a build without CUDA; INTERNAL with the CUDA
// error text when the driver refuses.
absl::StatusOr<std::unique_ptr<PinnedHostRegistration>> PinHostMemory(void* data, size_t bytes);

// True when the CUDA driver reports `data` as page-locked host memory (registered with
// PinHostMemory or allocated pinned), i.e. a host-to-device copy from it is a direct DMA. Always
// false in a build without CUDA or without a device. For tests and diagnostics.
bool IsPinnedHostMemory(const void* data);

}  // namespace meft::worker
