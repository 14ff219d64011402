// io::DetectHostMemory against fake /proc and /sys/fs/cgroup trees: MemAvailable alone, cgroup v2
// and v1 limits minus usage (the tightest ancestor wins), and corrupt files named in the error.

#include "common/io/host_memory.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::io {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

class HostMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("meft_host_memory_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_ / "proc/self");
    Write("proc/meminfo", "MemTotal:       24000000 kB\nMemAvailable:   16000000 kB\n");
  }
  void TearDown() override { fs::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    fs::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  absl::StatusOr<HostMemory> Detect() {
    return DetectHostMemory((root_ / "proc").string(), (root_ / "cgroup").string());
  }
  fs::path root_;
};

TEST_F(HostMemoryTest, MemAvailableWithoutACgroupLimit) {
  auto h = Detect();  // no /proc/self/cgroup at all
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->bytes, 16000000LL * 1024);
  EXPECT_THAT(h->source, HasSubstr("MemAvailable"));
  Write("proc/self/cgroup", "0::/job\n");
  Write("cgroup/job/memory.max", "max\n");
  h = Detect();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->bytes, 16000000LL * 1024);
}

TEST_F(HostMemoryTest, CgroupV2LimitMinusUsageOfTheTightestAncestor) {
  Write("proc/self/cgroup", "0::/a/b\n");
  Write("cgroup/a/b/memory.max", "max\n");
  Write("cgroup/a/memory.max", std::to_string(3LL << 30) + "\n");
  Write("cgroup/a/memory.current", std::to_string(1LL << 30) + "\n");
  auto h = Detect();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->bytes, 2LL << 30);
  EXPECT_THAT(h->source, HasSubstr("cgroup/a/memory.max (3.00 GiB)"));
}

TEST_F(HostMemoryTest, CgroupV1MemoryController) {
  Write("proc/self/cgroup", "5:cpu,cpuacct:/x\n4:memory:/job\n0::/\n");
  Write("cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");  // v1's "no limit"
  Write("cgroup/memory/job/memory.limit_in_bytes", std::to_string(1LL << 30) + "\n");
  Write("cgroup/memory/job/memory.usage_in_bytes", std::to_string(256LL << 20) + "\n");
  auto h = Detect();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->bytes, 768LL << 20);
  EXPECT_THAT(h->source, HasSubstr("memory.limit_in_bytes"));
}

TEST_F(HostMemoryTest, CorruptFilesAreNamed) {
  Write("proc/self/cgroup", "0::/job\n");
  Write("cgroup/job/memory.max", "lots\n");
  auto h = Detect();
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(h.status().message(), HasSubstr("job/memory.max: expected a byte count"));
  Write("proc/meminfo", "MemTotal: 1 kB\n");
  h = Detect();
  EXPECT_THAT(h.status().message(), HasSubstr("meminfo: no MemAvailable line"));
}


TEST(FormatBytesTest, Units) {
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(3 << 10), "3.0 KiB");
  EXPECT_EQ(FormatBytes(12 << 20), "12.0 MiB");
  EXPECT_EQ(FormatBytes(3LL << 29), "1.50 GiB");
}

}  // namespace
}  // namespace meft::io
