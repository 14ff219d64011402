#include "common/rpc/message_memory.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace meft::rpc {

std::string KeepMessageBuffersInHeap(bool environment_tunes_allocator) {
#if defined(__GLIBC__)
  if (environment_tunes_allocator) {
    return "allocator: left as the environment (MALLOC_* or GLIBC_TUNABLES) sets it";
  }
  constexpr int kMmapThreshold = 32 << 20;  // glibc refuses more (HEAP_MAX_SIZE / 2)
  constexpr int kTrimThreshold = 1 << 30;
  if (mallopt(M_MMAP_THRESHOLD, kMmapThreshold) != 1 ||
      mallopt(M_TRIM_THRESHOLD, kTrimThreshold) != 1) {
    return "allocator: glibc refused the thresholds; left as it was";
  }
  return "allocator: buffers up to 32 MiB come from the heap, which keeps up to 1 GiB free";
#else
  return "allocator: not glibc; left as it is";
#endif
}

}  // namespace meft::rpc
