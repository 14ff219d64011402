// PinnedHost with the CUDA runtime: cudaHostRegister / cudaHostUnregister. Compiled only when
// LibTorch has CUDA (see gpu_worker/CMakeLists.txt).

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "gpu_worker/rpc/pinned_host.h"

namespace meft::worker {
namespace {

class CudaRegistration final : public PinnedHostRegistration {
 public:
  explicit CudaRegistration(void* data) : data_(data) {}
  ~CudaRegistration() override { cudaHostUnregister(data_); }

 private:
  void* const data_;
};

}  // namespace

bool CanPinHostMemory() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

absl::StatusOr<std::unique_ptr<PinnedHostRegistration>> PinHostMemory(void* data, size_t bytes) {
  // Portable: the pinning holds for every CUDA context of the process, not only the current one.
  const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state of this thread
    return absl::InternalError(
        absl::StrCat("cudaHostRegister of ", bytes, " bytes: ", cudaGetErrorString(err)));
  }
  return std::unique_ptr<PinnedHostRegistration>(new CudaRegistration(data));
}

bool IsPinnedHostMemory(const void* data) {
  if (!CanPinHostMemory()) return false;
  cudaPointerAttributes attributes{};
  // Since CUDA 11 an ordinary host pointer is not an error but cudaMemoryTypeUnregistered.
  if (cudaPointerGetAttributes(&attributes, data) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state of this thread
    return false;
  }
  return attributes.type == cudaMemoryTypeHost;
}

}  // namespace meft::worker
