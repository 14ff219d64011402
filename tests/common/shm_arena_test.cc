// The shared-memory arena (creation, attach by name, nonce, bounds) and the region allocator
// against a byte-map reference on random operation sequences.

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common/shm/arena.h"

namespace meft::shm {
namespace {

using ::testing::HasSubstr;

TEST(ShmArenaTest, CreateOpenShareBytesAndNonce) {
  auto created = Arena::Create(1 << 20);
  ASSERT_TRUE(created.ok()) << created.status();
  Arena& a = **created;
  EXPECT_TRUE(IsArenaName(a.name())) << a.name();
  EXPECT_EQ(a.size(), 1u << 20);
  auto opened = Arena::Open(a.name(), a.size());
  ASSERT_TRUE(opened.ok()) << opened.status();
  Arena& b = **opened;
  EXPECT_EQ(a.Nonce(), b.Nonce());
  EXPECT_EQ(a.Nonce().size(), kNonceBytes);
  // Two mappings of one object: a write through one is seen through the other.
  std::memcpy(a.data() + 4096, "meft", 4);
  EXPECT_EQ(std::memcmp(b.data() + 4096, "meft", 4), 0);
  b.data()[(1 << 20) - 1] = 7;
  EXPECT_EQ(a.data()[(1 << 20) - 1], 7);
}

TEST(ShmArenaTest, TwoArenasDifferInNameAndNonce) {
  auto a = Arena::Create(4096);
  auto b = Arena::Create(4096);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->name(), (*b)->name());
  EXPECT_NE((*a)->Nonce(), (*b)->Nonce());
}

TEST(ShmArenaTest, CreatorUnlinksTheName) {
  std::string name;
  {
    auto a = Arena::Create(4096);
    ASSERT_TRUE(a.ok());
    name = (*a)->name();
  }
  auto opened = Arena::Open(name, 4096);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kNotFound) << opened.status();
}

TEST(ShmArenaTest, OpenRejectsBadNamesAndSizes) {
  for (const char* bad : {"", "/meft-", "meft-1", "/dev/shm/meft-1", "/meft-../x", "/other-1",
                          "/meft-a/b", "/meft-a b"}) {
    auto opened = Arena::Open(bad, 4096);
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(opened.status().message()), HasSubstr("name"));
  }
  EXPECT_EQ(Arena::Open("/meft-0-doesnotexist", 4096).status().code(), absl::StatusCode::kNotFound);
  auto a = Arena::Create(8192);
  ASSERT_TRUE(a.ok());
  auto too_big = Arena::Open((*a)->name(), 8193);
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kOutOfRange) << too_big.status();
  EXPECT_EQ(Arena::Open((*a)->name(), kHeaderBytes).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Arena::Create(kHeaderBytes).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShmArenaTest, CreateRefusesMoreThanDevShmHolds) {
  auto huge = Arena::Create(uint64_t{1} << 60);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_THAT(std::string(huge.status().message()), HasSubstr("/dev/shm"));
}

// tmpfs may be sized beyond the memory behind it: the arena is also checked against what the
// host (or its cgroup) can give.
TEST(ShmArenaTest, CreateRefusesMoreThanTheHostCanGive) {
  const io::HostMemory host{1 << 20, "a test limit"};
  auto refused = Arena::Create(2 << 20, &host);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("2 MiB exceed the memory this host can give (1.0 MiB: a test limit)"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("meft.shm_arena_mb"));
  EXPECT_TRUE(Arena::Create(4096, &host).ok());
}

bool ShmExists(const std::string& name) {
  const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

// A shared-memory object made without Arena::Create: no lock, pages not reserved.
std::string MakeBareObject(const std::string& tag, off_t size) {
  const std::string name = "/meft-" + std::to_string(::getpid()) + "-test-" + tag;
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
  EXPECT_GE(fd, 0) << name;
  if (fd >= 0) {
    EXPECT_EQ(::ftruncate(fd, size), 0);
    ::close(fd);
  }
  return name;
}

TEST(ShmArenaTest, CreateReservesEveryPage) {
  constexpr uint64_t kSize = (8 << 20) + 100;
  auto a = Arena::Create(kSize);
  ASSERT_TRUE(a.ok()) << a.status();
  const int fd = ::shm_open((*a)->name().c_str(), O_RDONLY, 0);
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(::fstat(fd, &st), 0);
  ::close(fd);
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, kSize);
}

TEST(ShmArenaTest, OpenRefusesASparseObject) {
  const std::string name = MakeBareObject("sparse", 1 << 20);
  auto opened = Arena::Open(name, 1 << 20);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kFailedPrecondition) << opened.status();
  EXPECT_THAT(std::string(opened.status().message()), HasSubstr("sparse"));
  ::shm_unlink(name.c_str());
}

TEST(ShmArenaTest, UnlinkedOnceTheCreatorIsGone) {
  auto a = Arena::Create(4096);
  ASSERT_TRUE(a.ok());
  auto opened = Arena::Open((*a)->name(), 4096);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_FALSE((*opened)->Unlinked());
  a->reset();
  EXPECT_TRUE((*opened)->Unlinked());
}

TEST(ShmArenaTest, RemoveOrphanedArenasKeepsOnlyObjectsWithALiveCreator) {
  // A worker killed with SIGKILL leaves its arena behind.
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto arena = Arena::Create(1 << 16);
    if (!arena.ok()) ::_exit(1);
    const std::string& n = (*arena)->name();
    if (::write(pipe_fds[1], n.data(), n.size()) != static_cast<ssize_t>(n.size())) ::_exit(1);
    ::close(pipe_fds[1]);
    for (;;) ::pause();
  }
  ::close(pipe_fds[1]);
  std::string killed_name;
  char buf[256];
  for (ssize_t got; (got = ::read(pipe_fds[0], buf, sizeof buf)) > 0;) killed_name.append(buf, got);
  ::close(pipe_fds[0]);
  ::kill(child, SIGKILL);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(IsArenaName(killed_name)) << killed_name;
  ASSERT_TRUE(ShmExists(killed_name));

  const std::string unlocked = MakeBareObject("unlocked", 4096);  // no creator holds it
  const std::string empty = MakeBareObject("empty", 0);  // a creator before its lock, or so
  auto live = Arena::Create(4096);  // removes the orphans itself, as a restarted worker would
  ASSERT_TRUE(live.ok());
  RemoveOrphanedArenas();  // and again, with nothing left to remove but with `live` present
  EXPECT_FALSE(ShmExists(killed_name));
  EXPECT_FALSE(ShmExists(unlocked));
  EXPECT_TRUE(ShmExists(empty));
  EXPECT_TRUE(ShmExists((*live)->name()));
  EXPECT_TRUE(Arena::Open((*live)->name(), 4096).ok());
  ::shm_unlink(empty.c_str());
}

TEST(ShmArenaTest, ContainsChecksBoundsWithoutOverflow) {
  auto a = Arena::Create(4096);
  ASSERT_TRUE(a.ok());
  const Arena& arena = **a;
  EXPECT_TRUE(arena.Contains(kHeaderBytes, 4096 - kHeaderBytes));
  EXPECT_TRUE(arena.Contains(4096, 0));
  EXPECT_FALSE(arena.Contains(0, 16));  // the header
  EXPECT_FALSE(arena.Contains(kHeaderBytes - 1, 1));
  EXPECT_FALSE(arena.Contains(kHeaderBytes, 4096));
  EXPECT_FALSE(arena.Contains(4097, 0));
  EXPECT_FALSE(arena.Contains(128, UINT64_MAX));
  EXPECT_FALSE(arena.Contains(UINT64_MAX, 2));
}

TEST(ShmArenaTest, AlignUp) {
  EXPECT_EQ(AlignUp(0), 0u);
  EXPECT_EQ(AlignUp(1), 64u);
  EXPECT_EQ(AlignUp(64), 64u);
  EXPECT_EQ(AlignUp(65), 128u);
  EXPECT_EQ(AlignUp(UINT64_MAX) % kAlignment, 0u);
}

// Reference: one owner id per 64-byte unit of [begin, end); 0 = free.
TEST(RegionAllocatorTest, RandomOperationsMatchAByteMapReference) {
  constexpr uint64_t kBegin = 64, kUnits = 512, kEnd = kBegin + kUnits * 64;
  for (uint32_t seed = 0; seed < 20; ++seed) {
    std::mt19937 rng(seed);
    RegionAllocator alloc(kBegin, kEnd);
    std::vector<int> owner(kUnits, 0);
    std::vector<std::pair<int, Region>> live;
    int next_id = 1;
    for (int op = 0; op < 2000; ++op) {
      const uint32_t kind = rng() % 3;
      if (kind == 0 || live.empty()) {
        const uint64_t bytes = rng() % 3000;
        auto r = alloc.Allocate(bytes);
        const uint64_t want = AlignUp(bytes == 0 ? 1 : bytes) / 64;
        // Reference first fit: the lowest run of `want` free units.
        std::optional<uint64_t> expect;
        for (uint64_t u = 0, run = 0; u < kUnits; ++u) {
          run = owner[u] == 0 ? run + 1 : 0;
          if (run == want) {
            expect = u + 1 - want;
            break;
          }
        }
        ASSERT_EQ(r.has_value(), expect.has_value()) << "seed " << seed << " op " << op;
        if (!r) continue;
        ASSERT_EQ(r->offset, kBegin + *expect * 64);
        ASSERT_EQ(r->bytes, want * 64);
        for (uint64_t u = *expect; u < *expect + want; ++u) owner[u] = next_id;
        live.emplace_back(next_id++, *r);
      } else if (kind == 1) {
        const size_t i = rng() % live.size();
        const Region r = live[i].second;
        alloc.Free(r);
        for (uint64_t u = (r.offset - kBegin) / 64; u < (r.offset - kBegin + r.bytes) / 64; ++u) {
          ASSERT_EQ(owner[u], live[i].first);
          owner[u] = 0;
        }
        live.erase(live.begin() + static_cast<long>(i));
      } else {
        auto& [id, r] = live[rng() % live.size()];
        const uint64_t keep = rng() % (r.bytes + 1);
        const uint64_t old_end = r.offset + r.bytes;
        alloc.Shrink(&r, keep);
        EXPECT_EQ(r.bytes, std::min<uint64_t>(r.bytes, AlignUp(keep == 0 ? 1 : keep)));
        for (uint64_t u = (r.offset + r.bytes - kBegin) / 64; u < (old_end - kBegin) / 64; ++u) {
          owner[u] = 0;
        }
      }
      const uint64_t free_units = std::count(owner.begin(), owner.end(), 0);
      ASSERT_EQ(alloc.free_bytes(), free_units * 64) << "seed " << seed << " op " << op;
    }
    for (const auto& [id, r] : live) alloc.Free(r);
    EXPECT_EQ(alloc.free_bytes(), kUnits * 64);
    // Everything coalesced back: the whole range is one block again.
    auto all = alloc.Allocate(kUnits * 64);
    ASSERT_TRUE(all.has_value());
    EXPECT_EQ(all->offset, kBegin);
  }
}

TEST(RegionAllocatorTest, ConcurrentThreadsNeverShareBytes) {
  constexpr uint64_t kEnd = 64 + (1 << 20);
  RegionAllocator alloc(64, kEnd);
  std::vector<std::atomic<int>> owner((kEnd - 64) / 64);
  std::atomic<int> overlaps{0};
  std::vector<std::thread> threads;
  for (int t = 1; t <= 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 3000; ++i) {
        auto r = alloc.Allocate(64 * (1 + rng() % 64));
        if (!r) continue;
        const uint64_t first = (r->offset - 64) / 64, last = first + r->bytes / 64;
        for (uint64_t u = first; u < last; ++u) {
          int expected = 0;
          if (!owner[u].compare_exchange_strong(expected, t)) ++overlaps;
        }
        for (uint64_t u = first; u < last; ++u) owner[u] = 0;
        alloc.Free(*r);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(alloc.free_bytes(), kEnd - 64);
}

}  // namespace
}  // namespace meft::shm
