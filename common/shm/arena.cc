#include "common/shm/arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace meft::shm {
namespace {

std::string ErrnoText(int err) { return std::strerror(err); }

// Closes a descriptor on every path out of a function.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  // Hands the descriptor to the caller; the destructor no longer closes it.
  int Release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

absl::StatusOr<uint8_t*> Map(int fd, uint64_t size, const std::string& name) {
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat("mmap of ", name, " (", size, " bytes): ", ErrnoText(errno)));
  }
  return static_cast<uint8_t*>(base);
}

}  // namespace

int RemoveOrphanedArenas() {
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return 0;
  std::vector<std::string> names;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = absl::StrCat("/", entry->d_name);
    if (IsArenaName(name)) names.push_back(name);
  }
  ::closedir(dir);
  int removed = 0;
  for (const std::string& name : names) {
    const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
    if (fd < 0) continue;  // gone meanwhile, or another user's
    FdCloser closer(fd);
    struct stat st;
    // Size 0: a creator between shm_open and its flock; leave it.
    if (::fstat(fd, &st) != 0 || st.st_size == 0) continue;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) continue;  // its creator is alive
    if (::shm_unlink(name.c_str()) == 0) ++removed;
  }
  return removed;
}

uint64_t AlignUp(uint64_t bytes) {
  if (bytes > UINT64_MAX - (kAlignment - 1)) return UINT64_MAX - (UINT64_MAX % kAlignment);
  return (bytes + kAlignment - 1) / kAlignment * kAlignment;
}

bool IsArenaName(std::string_view name) {
  constexpr std::string_view kPrefix = "/meft-";
  if (name.size() <= kPrefix.size() || name.size() > kPrefix.size() + 200) return false;
  if (name.substr(0, kPrefix.size()) != kPrefix) return false;
  for (char c : name.substr(kPrefix.size())) {
    const bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<Arena>> Arena::Create(uint64_t size, const io::HostMemory* host) {
  if (size <= kHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory arena: size ", size, " must exceed ", kHeaderBytes, " bytes"));
  }
  RemoveOrphanedArenas();
  struct statvfs fs;
  if (::statvfs("/dev/shm", &fs) == 0) {
    const uint64_t avail = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
    if (avail < size) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "shared-memory arena: ", size >> 20, " MiB do not fit /dev/shm (", avail >> 20,
          " MiB free); make the arena smaller or /dev/shm larger (docker: --shm-size)"));
    }
  }
  absl::StatusOr<io::HostMemory> detected = io::HostMemory{};
  if (host == nullptr) {
    detected = io::DetectHostMemory();
    if (detected.ok()) host = &*detected;
  }
  if (host != nullptr && static_cast<uint64_t>(std::max<int64_t>(0, host->bytes)) < size) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared-memory arena: ", size >> 20, " MiB exceed the memory this host can give (",
        io::FormatBytes(host->bytes), ": ", host->source,
        "); its pages are memory (pinned for CUDA): set meft.shm_arena_mb smaller or use "
        "meft.transport: grpc"));
  }
  std::random_device rd;
  std::string name;
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    const uint64_t tag = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    name = absl::StrFormat("/meft-%d-%016x", static_cast<int>(::getpid()), tag);
    fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 && errno != EEXIST) {
      return absl::InternalError(absl::StrCat("shm_open ", name, ": ", ErrnoText(errno)));
    }
  }
  if (fd < 0) return absl::InternalError("shm_open: no unused name after 8 attempts");
  FdCloser closer(fd);
  // The lock marks the object as having a live creator (RemoveOrphanedArenas); taken while the
  // size is still 0, which RemoveOrphanedArenas skips.
  if (::flock(fd, LOCK_SH) != 0) {
    const int err = errno;
    ::shm_unlink(name.c_str());
    return absl::InternalError(absl::StrCat("flock ", name, ": ", ErrnoText(err)));
  }
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    ::shm_unlink(name.c_str());
    return absl::InternalError(
        absl::StrCat("ftruncate ", name, " to ", size, ": ", ErrnoText(err)));
  }
  // Reserve every page now: the statvfs check above is advisory (another arena or process can
  // take the space meanwhile), and a page tmpfs cannot supply later is a SIGBUS, not an error.
  int err;
  do {
    err = ::posix_fallocate(fd, 0, static_cast<off_t>(size));  // returns the error number
  } while (err == EINTR);
  if (err != 0) {
    ::shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared-memory arena: cannot reserve ", size >> 20, " MiB (", size, " bytes) in /dev/shm: ",
        ErrnoText(err), "; make the arena smaller or /dev/shm larger (docker: --shm-size)"));
  }
  auto base = Map(fd, size, name);
  if (!base.ok()) {
    ::shm_unlink(name.c_str());
    return base.status();
  }
  std::unique_ptr<Arena> arena(new Arena(name, closer.Release(), *base, size, /*owner=*/true));
  for (uint64_t i = 0; i < kNonceBytes; i += 4) {
    const uint32_t word = rd();
    std::memcpy(arena->base_ + i, &word, 4);
  }
  return arena;
}

absl::StatusOr<std::unique_ptr<Arena>> Arena::Open(const std::string& name, uint64_t size) {
  if (!IsArenaName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name: \"", name, "\" is not a meft arena name (/meft-[A-Za-z0-9-]+)"));
  }
  if (size <= kHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("size: ", size, " must exceed ", kHeaderBytes, " bytes"));
  }
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat("name: no shared-memory object ", name, " on this host"));
    }
    return absl::PermissionDeniedError(absl::StrCat("name: shm_open ", name, ": ", ErrnoText(err)));
  }
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("fstat ", name, ": ", ErrnoText(errno)));
  }
  if (static_cast<uint64_t>(st.st_size) < size) {
    return absl::OutOfRangeError(
        absl::StrCat("size: ", size, " bytes, but ", name, " has only ", st.st_size));
  }
  const uint64_t allocated = static_cast<uint64_t>(st.st_blocks) * 512;
  if (allocated < size) {
    return absl::FailedPreconditionError(
        absl::StrCat("name: ", name, " is sparse (", allocated, " of ", size,
                     " bytes allocated); the creator must reserve its pages (posix_fallocate)"));
  }
  auto base = Map(fd, size, name);
  if (!base.ok()) return base.status();
  return std::unique_ptr<Arena>(new Arena(name, closer.Release(), *base, size, /*owner=*/false));
}

Arena::~Arena() {
  ::munmap(base_, size_);
  // Unlink before closing: closing drops the creator's lock.
  if (owner_) ::shm_unlink(name_.c_str());
  ::close(fd_);
}

bool Arena::Unlinked() const {
  struct stat st;
  return ::fstat(fd_, &st) == 0 && st.st_nlink == 0;
}

std::string Arena::Nonce() const {
  return std::string(reinterpret_cast<const char*>(base_), kNonceBytes);
}

bool Arena::Contains(uint64_t offset, uint64_t bytes) const {
  return offset >= kHeaderBytes && offset <= size_ && bytes <= size_ - offset;
}

RegionAllocator::RegionAllocator(uint64_t begin, uint64_t end)
    : begin_(begin), end_(end < begin ? begin : end) {
  if (end_ > begin_) {
    free_.emplace(begin_, end_ - begin_);
    free_bytes_ = end_ - begin_;
  }
}

std::optional<Region> RegionAllocator::Allocate(uint64_t bytes) {
  const uint64_t want = AlignUp(bytes == 0 ? 1 : bytes);
  std::lock_guard lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < want) continue;
    const Region region{it->first, want};
    const uint64_t rest = it->second - want;
    free_.erase(it);
    if (rest > 0) free_.emplace(region.offset + want, rest);
    free_bytes_ -= want;
    return region;
  }
  return std::nullopt;
}

void RegionAllocator::Shrink(Region* region, uint64_t bytes) {
  const uint64_t keep = AlignUp(bytes == 0 ? 1 : bytes);
  if (keep >= region->bytes) return;
  std::lock_guard lock(mu_);
  InsertFreeLocked(region->offset + keep, region->bytes - keep);
  region->bytes = keep;
}

void RegionAllocator::Free(const Region& region) {
  if (region.bytes == 0) return;
  std::lock_guard lock(mu_);
  InsertFreeLocked(region.offset, region.bytes);
}

void RegionAllocator::InsertFreeLocked(uint64_t offset, uint64_t bytes) {
  free_bytes_ += bytes;
  auto next = free_.lower_bound(offset);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      bytes += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && offset + bytes == next->first) {
    bytes += next->second;
    free_.erase(next);
  }
  free_.emplace(offset, bytes);
}

uint64_t RegionAllocator::free_bytes() const {
  std::lock_guard lock(mu_);
  return free_bytes_;
}

}  // namespace meft::shm
