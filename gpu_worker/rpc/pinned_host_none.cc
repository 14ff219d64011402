// PinnedHost for builds whose LibTorch has no CUDA: nothing can be pinned.

#include "gpu_worker/rpc/pinned_host.h"

namespace meft::worker {

bool CanPinHostMemory() { return false; }

absl::StatusOr<std::unique_ptr<PinnedHostRegistration>> PinHostMemory(void*, size_t) {
  return absl::UnimplementedError("pinning host memory: this build's LibTorch has no CUDA");
}

bool IsPinnedHostMemory(const void*) { return false; }

}  // namespace meft::worker
