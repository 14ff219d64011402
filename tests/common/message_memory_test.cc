// KeepMessageBuffersInHeap: a freed buffer of message size is reused without the kernel faulting
// its pages in again. Each case runs in a forked child, since the setting is process-wide.

#include "common/rpc/message_memory.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/config/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::rpc {
namespace {

constexpr size_t kBytes = size_t{24} << 20;  // a 24 MiB message buffer: 6144 pages of 4 KiB

long MinorFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// In a child process: optionally tunes the allocator, then allocates, fills and frees the
// buffer twice, and returns the minor page faults of the second fill (-1 on failure).
long SecondFillFaults(bool tune) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    if (tune) KeepMessageBuffersInHeap(/*environment_tunes_allocator=*/false);
    long faults = 0;
    for (int round = 0; round < 2; ++round) {
      char* p = static_cast<char*>(std::malloc(kBytes));
      const long before = MinorFaults();
      std::memset(p, round + 1, kBytes);
      // Keeps the compiler from dropping the malloc / memset / free as unobservable.
      asm volatile("" : : "r"(p) : "memory");
      faults = MinorFaults() - before;
      std::free(p);
    }
    const ssize_t written = write(fds[1], &faults, sizeof(faults));
    _exit(written == sizeof(faults) ? 0 : 1);
  }
  close(fds[1]);
  long faults = -1;
  if (read(fds[0], &faults, sizeof(faults)) != sizeof(faults)) faults = -1;
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? faults : -1;
}

TEST(MessageMemoryTest, FreedMessageBuffersAreReusedWithoutPageFaults) {
  if (config::AllocatorTunedByEnvironment()) {
    GTEST_SKIP() << "the environment tunes the allocator, which the untuned control measures";
  }
  const long untuned = SecondFillFaults(false);
  const long tuned = SecondFillFaults(true);
  ASSERT_GE(untuned, 0);
  ASSERT_GE(tuned, 0);
  std::printf("second fill of %zu MiB: %ld minor faults untuned, %ld tuned\n", kBytes >> 20,
              untuned, tuned);
  // The control proves the test can fail: glibc's defaults fault the buffer in again (with 4 KiB
  // pages 6144 faults; fewer with transparent huge pages, still hundreds at least).
  EXPECT_GT(untuned, 10) << "glibc's defaults reused the buffer too; the test cannot tell";
  EXPECT_LT(tuned * 10, untuned) << "tuned: " << tuned << " faults, untuned: " << untuned;
}

TEST(MessageMemoryTest, LeavesAnAllocatorTunedByTheEnvironmentAlone) {
  EXPECT_THAT(KeepMessageBuffersInHeap(/*environment_tunes_allocator=*/true),
              ::testing::HasSubstr("left as the environment"));
  ASSERT_EQ(setenv("MALLOC_TRIM_THRESHOLD_", "1000000", 1), 0);
  EXPECT_TRUE(config::AllocatorTunedByEnvironment());
  unsetenv("MALLOC_TRIM_THRESHOLD_");
  ASSERT_EQ(setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000", 1), 0);
  EXPECT_TRUE(config::AllocatorTunedByEnvironment());
  unsetenv("GLIBC_TUNABLES");
}

}  // namespace
}  // namespace meft::rpc
