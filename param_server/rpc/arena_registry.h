#pragma once

// Shared-memory arenas that workers on this host attached (the same-host transport, DESIGN §3).
// Plain C++: the gRPC service maps AttachArena and the requests' arena ids onto it.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/shm/arena.h"

namespace meft::rpc {

// Thread-safe. A request keeps the arena it uses alive through the shared_ptr that Find returns,
// even when the arena is replaced or evicted meanwhile.
class ArenaRegistry {
 public:
  // At most `max_arenas` stay mapped; attaching one more unmaps the one attached longest ago
  // (its worker gets "arena not attached" and attaches again).
  explicit ArenaRegistry(size_t max_arenas = 64) : max_arenas_(max_arenas) {}

  // Maps `size` bytes of the object `name` and compares its first shm::kNonceBytes with `nonce`.
  // Returns a new non-zero id. Replaces an arena attached earlier under the same name and unmaps
  // those whose object was unlinked (shm::Arena::Unlinked) since they attached. Errors:
  // INVALID_ARGUMENT (name, size or nonce malformed; size over 1 TiB), NOT_FOUND (no such object
  // on this host), FAILED_PRECONDITION "nonce: ..." (the memory is not the worker's) or
  // "name: ... sparse" (the object's pages are not reserved).
  absl::StatusOr<uint64_t> Attach(const std::string& name, uint64_t size, std::string_view nonce);

  // The arena `id`; FAILED_PRECONDITION "arena_id: arena not attached ..." when unknown.
  absl::StatusOr<std::shared_ptr<const shm::Arena>> Find(uint64_t id) const;

  // Unmaps the arenas whose object was unlinked (their worker exited, or a later worker removed
  // them as orphaned), so that a worker that left does not keep its pages pinned until the next
  // Attach; requests still using one keep it alive until they finish. Returns how many.
  size_t ReleaseUnlinked();

  size_t size() const;

 private:
  const size_t max_arenas_;
  mutable std::mutex mu_;
  uint64_t next_serial_ = 0;  // attach order, for eviction; guarded by mu_
  struct Entry {
    std::shared_ptr<const shm::Arena> arena;
    uint64_t serial = 0;
  };
  std::map<uint64_t, Entry> by_id_;  // guarded by mu_
};

}  // namespace meft::rpc
