// CudaAllocatorMemory and ResetCudaAllocatorPeak on LibTorch's CUDA caching allocator (built only
// when LibTorch has CUDA).

#include <c10/cuda/CUDACachingAllocator.h>

#include "gpu_worker/metrics/worker_metrics.h"

namespace meft::worker {

std::optional<DeviceMemory> CudaAllocatorMemory(const torch::Device& device) {
  if (!device.is_cuda()) return std::nullopt;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
      device.has_index() ? device.index() : c10::DeviceIndex{0});
  // Index 0 is StatType::AGGREGATE (all pools). The enum moved namespaces in LibTorch 2.5; the
  // index did not.
  const auto& bytes = stats.allocated_bytes[0];
  return DeviceMemory{.allocated_bytes = bytes.current, .peak_bytes = bytes.peak};
}

bool ResetCudaAllocatorPeak(const torch::Device& device) {
  if (!device.is_cuda()) return false;
  c10::cuda::CUDACachingAllocator::resetPeakStats(device.has_index() ? device.index()
                                                                     : c10::DeviceIndex{0});
  return true;
}

}  // namespace meft::worker
