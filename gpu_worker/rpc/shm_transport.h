#pragma once

// The worker's side of the same-host transport (DESIGN §3): a shared-memory arena this process
// creates and the parameter server attaches; request tensors are written into regions of it
// and answers are read from it in place. Only gpu_worker/rpc code uses it (it sees protobuf).
//
// Thread-safe: several threads may put tensors and take answers at once (the region allocator
// has its own mutex; the arena id is atomic).

#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/shm/arena.h"
#include "gpu_worker/client/param_client.h"
#include "gpu_worker/rpc/pinned_host.h"
#include "meft/v1/param_server.pb.h"

namespace meft::worker {

// Upper bound of the bytes the server writes for one lookup of `tokens` tokens (the answer's
// layout, common/wire/lookup_layout.h, at its largest), for rows of `row_bytes_per_element` bytes.
uint64_t ResponseBytesBound(const ServerInfo& server, int64_t tokens,
                            int64_t row_bytes_per_element);

// Default arena size for `server`: room for two lookups of max_tokens tokens in flight (x, the
// answer, and fp32 gradients), at least 64 MiB and at most 4 GiB.
uint64_t DefaultArenaBytes(const ServerInfo& server, int64_t row_bytes_per_element);

class ShmTransport;

// A region holding one lookup's answer. Tensors handed to the caller alias it and hold a
// shared_ptr to the lease; the region returns to the allocator when the last one is released.
class ResponseLease {
 public:
  ResponseLease(std::shared_ptr<ShmTransport> owner, shm::Region region)
      : owner_(std::move(owner)), region_(region) {}
  ~ResponseLease();
  ResponseLease(const ResponseLease&) = delete;
  ResponseLease& operator=(const ResponseLease&) = delete;
  const shm::Region& region() const { return region_; }
  // Keeps only the first `bytes` of the region (the rest returns to the allocator).
  void Shrink(uint64_t bytes);

 private:
  std::shared_ptr<ShmTransport> owner_;
  shm::Region region_;
};

class ShmTransport : public std::enable_shared_from_this<ShmTransport> {
 public:
  // Creates an arena of `bytes`; with `pin`, registers it as pinned CUDA memory when this build
  // and machine can (CanPinHostMemory), else leaves it unpinned.
  static absl::StatusOr<std::shared_ptr<ShmTransport>> Create(uint64_t bytes, bool pin);

  v1::AttachArenaRequest AttachRequest() const;
  uint64_t arena_id() const { return arena_id_.load(); }
  void set_arena_id(uint64_t id) { arena_id_.store(id); }
  const shm::Arena& arena() const { return *arena_; }
  bool pinned() const { return pin_ != nullptr; }
  // Bytes available to regions (the arena minus its header).
  uint64_t capacity() const { return allocator_.capacity(); }

  // Writes `t` (float, any device) as fp32 or bf16 (round to nearest even with
  // wire::FloatToBf16, as the inline path) into a fresh region, fills `out` (dtype, shape, arena
  // span) and appends the region to `held`. Returns false, leaving `out` untouched, when no free
  // region is large enough.
  bool PutFloats(const torch::Tensor& t, bool bf16, v1::Tensor* out,
                 std::vector<shm::Region>* held);
  void Free(const std::vector<shm::Region>& regions);

  // A region of `bytes` for an answer, or null when no free region is large enough.
  std::shared_ptr<ResponseLease> AllocateResponse(uint64_t bytes);

  // The answer tensor `t` whose bytes lie in `lease`'s region: fp32/bf16 tensors alias the arena
  // (and keep `lease` alive); int32 ones are copied to int64. DATA_LOSS naming `field` when the
  // span leaves the region or does not match shape and dtype.
  absl::StatusOr<torch::Tensor> FromArena(const v1::Tensor& t, const char* field,
                                          const std::shared_ptr<ResponseLease>& lease) const;

 private:
  friend class ResponseLease;
  explicit ShmTransport(std::unique_ptr<shm::Arena> arena)
      : arena_(std::move(arena)), allocator_(shm::kHeaderBytes, arena_->size()) {}

  std::unique_ptr<shm::Arena> arena_;
  shm::RegionAllocator allocator_;
  std::unique_ptr<PinnedHostRegistration> pin_;  // destroyed (unpinned) before the arena
  std::atomic<uint64_t> arena_id_{0};            // 0 = not attached
};

}  // namespace meft::worker
