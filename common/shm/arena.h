#pragma once

// The same-host transport's shared memory (DESIGN §3): a POSIX shared-memory object that the
// worker creates and the parameter server maps too, and an allocator of regions inside it.
// Tensors travel through regions; gRPC carries only (offset, bytes).
//
// Layout: bytes [0, kHeaderBytes) hold a random nonce written by the creator; the server must
// read it back to attach, which proves both processes see the same memory (the same host).
// Regions are handed out from [kHeaderBytes, size).

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace meft::shm {

inline constexpr uint64_t kHeaderBytes = 64;  // the nonce lives here; never handed out
inline constexpr uint64_t kNonceBytes = 16;
inline constexpr uint64_t kAlignment = 64;  // every region starts on a cache line

// Rounds `bytes` up to a multiple of kAlignment (saturating near UINT64_MAX).
uint64_t AlignUp(uint64_t bytes);

// True for names Arena::Create makes: "/meft-" followed by 1 to 200 characters of [A-Za-z0-9-].
// Open refuses any other name, so a request cannot make the server map an unrelated object.
bool IsArenaName(std::string_view name);

// A mapped shared-memory object. Not copyable; the mapping lives as long as the object.
// Thread-safe for concurrent reads and writes of distinct bytes (it is plain memory).
class Arena {
 public:
  // Creates a fresh object named "/meft-<pid>-<random>" of `size` bytes (> kHeaderBytes), maps
  // it and writes a random nonce into the header. Fails with RESOURCE_EXHAUSTED naming
  // /dev/shm when the file system has less than `size` bytes free (touching pages beyond its
  // limit would kill the process with SIGBUS). The creator unlinks the name on destruction.
  static absl::StatusOr<std::unique_ptr<Arena>> Create(uint64_t size);
  // Maps `size` bytes of the existing object `name` (the attaching side; never unlinks it).
  // INVALID_ARGUMENT for a bad name, NOT_FOUND when no such object exists here, OUT_OF_RANGE
  // when the object is smaller than `size`.
  static absl::StatusOr<std::unique_ptr<Arena>> Open(const std::string& name, uint64_t size);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  uint8_t* data() const { return base_; }
  // The kNonceBytes the creator wrote (as currently in memory).
  std::string Nonce() const;
  // True when [offset, offset + bytes) lies inside [kHeaderBytes, size()), without overflow.
  bool Contains(uint64_t offset, uint64_t bytes) const;

 private:
  Arena(std::string name, uint8_t* base, uint64_t size, bool owner)
      : name_(std::move(name)), base_(base), size_(size), owner_(owner) {}
  const std::string name_;
  uint8_t* const base_;
  const uint64_t size_;
  const bool owner_;  // unlink the name on destruction
};

struct Region {
  uint64_t offset = 0;
  uint64_t bytes = 0;  // a multiple of kAlignment
};

// First-fit allocator of aligned regions inside [begin, end). Thread-safe (one mutex).
class RegionAllocator {
 public:
  // begin must be a multiple of kAlignment.
  RegionAllocator(uint64_t begin, uint64_t end);
  // A free region of at least `bytes` (rounded up to kAlignment; 0 counts as kAlignment), or
  // nullopt when no free block is large enough.
  std::optional<Region> Allocate(uint64_t bytes);
  // Returns the tail of `region` beyond AlignUp(bytes) to the free list. bytes <= region->bytes.
  void Shrink(Region* region, uint64_t bytes);
  // Returns a region from Allocate (possibly shrunk) to the free list, merging neighbours.
  void Free(const Region& region);
  uint64_t free_bytes() const;
  uint64_t capacity() const { return end_ - begin_; }

 private:
  void InsertFreeLocked(uint64_t offset, uint64_t bytes);
  const uint64_t begin_, end_;
  mutable std::mutex mu_;
  std::map<uint64_t, uint64_t> free_;  // offset -> bytes, disjoint, never adjacent; guarded by mu_
  uint64_t free_bytes_ = 0;            // guarded by mu_
};

}  // namespace meft::shm
