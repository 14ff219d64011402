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
#include "common/io/host_memory.h"

namespace meft::shm {

inline constexpr uint64_t kHeaderBytes = 64;  // the nonce lives here; never handed out
inline constexpr uint64_t kNonceBytes = 16;
inline constexpr uint64_t kAlignment = 64;  // every region starts on a cache line

// Rounds `bytes` up to a multiple of kAlignment (saturating near UINT64_MAX).
uint64_t AlignUp(uint64_t bytes);

// True for names Arena::Create makes: "/meft-" followed by 1 to 200 characters of [A-Za-z0-9-].
// Open refuses any other name, so a request cannot make the server map an unrelated object.
bool IsArenaName(std::string_view name);

// Unlinks the arenas in /dev/shm whose creator is gone (killed, even by SIGKILL, or crashed), so
// that they stop holding memory. A creator holds a shared flock on its object from before the
// object has a size until it unlinks it, and the kernel drops the lock when the process dies; an
// object of non-zero size whose exclusive lock can be taken therefore has no live creator. Works
// across PID namespaces (containers sharing one /dev/shm) and is immune to PID reuse. Objects that
// this process cannot open (another user's) are left alone. Returns the number unlinked.
// Arena::Create calls it; a process attached to a removed object keeps its mapping.
int RemoveOrphanedArenas();

// A mapped shared-memory object. Not copyable; the mapping lives as long as the object.
// Thread-safe for concurrent reads and writes of distinct bytes (it is plain memory).
class Arena {
 public:
  // First removes orphaned arenas (RemoveOrphanedArenas). Then creates a fresh object named
  // "/meft-<pid>-<random>" of `size` bytes (> kHeaderBytes), reserves all of its pages
  // (posix_fallocate: tmpfs reserves nothing on ftruncate, and touching a page beyond its limit
  // would kill the process with SIGBUS), maps it and writes a random nonce into the header.
  // Fails with RESOURCE_EXHAUSTED naming /dev/shm when the pages cannot be reserved, and when
  // `size` exceeds what the host can give (`host`, or io::DetectHostMemory when null; the check
  // is skipped if detection fails): tmpfs pages are memory, which /dev/shm's own size may
  // overstate. The creator unlinks the name on destruction.
  static absl::StatusOr<std::unique_ptr<Arena>> Create(uint64_t size,
                                                       const io::HostMemory* host = nullptr);
  // Maps `size` bytes of the existing object `name` (the attaching side; never unlinks it).
  // INVALID_ARGUMENT for a bad name, NOT_FOUND when no such object exists here, OUT_OF_RANGE
  // when the object is smaller than `size`, FAILED_PRECONDITION when fewer than `size` bytes of
  // it are allocated (a sparse object: touching a hole could SIGBUS this process).
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
  // True when the object has no name any more (its creator, or RemoveOrphanedArenas, unlinked
  // it): no worker can use it again, so an attacher may drop it.
  bool Unlinked() const;

 private:
  Arena(std::string name, int fd, uint8_t* base, uint64_t size, bool owner)
      : name_(std::move(name)), fd_(fd), base_(base), size_(size), owner_(owner) {}
  const std::string name_;
  const int fd_;  // open for the arena's lifetime; the creator's holds the shared flock
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
