// CudaAllocatorMemory and ResetCudaAllocatorPeak for a LibTorch without CUDA (Debian's): there
// is no CUDA allocator.

#include "gpu_worker/metrics/worker_metrics.h"

namespace meft::worker {

std::optional<DeviceMemory> CudaAllocatorMemory(const torch::Device& device) {
  (void)device;
  return std::nullopt;
}

bool ResetCudaAllocatorPeak(const torch::Device& device) {
  (void)device;
  return false;
}

}  // namespace meft::worker
