// Host memory admission (server/memory_budget.h): the prediction against what a created store
// really allocates, detection of the host's and a cgroup's limits from fake /proc and
// /sys/fs/cgroup trees, the refusal message, the lookup cache budget, and allocation failures
// that become RESOURCE_EXHAUSTED with the state unchanged.

#include "param_server/server/memory_budget.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "param_server/store/layer_store.h"

namespace meft::server {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

ServerOptions Small() {
  ServerOptions o;
  o.layers = {0, 3};
  o.rows = 64;
  o.dim = 8;
  o.experts = 8;
  o.selector.n_probe = 2;
  o.selector.top_k = 4;
  o.max_tokens = 16;
  return o;
}

int64_t AllocatedBytes(const store::ParamBlock& b) {
  return static_cast<int64_t>((b.param.size() + b.exp_avg.size() + b.exp_avg_sq.size() +
                               b.grad.size()) * sizeof(float) + b.touched.size());
}

// The prediction counts every byte a fresh store holds, plus the row-id list of touched rows
// (empty until a gradient arrives, at most one int32 per row).
TEST(MemoryBudgetTest, PredictionCoversWhatTheStoreAllocates) {
  const ServerOptions o = Small();
  int64_t allocated = 0;
  for (uint32_t l : o.layers) {
    auto s = store::LayerStore::Create(l, o.rows, o.dim, o.experts, {});
    ASSERT_TRUE(s.ok()) << s.status();
    allocated += AllocatedBytes(s->keys) + AllocatedBytes(s->values) + AllocatedBytes(s->router);
  }
  const MemoryPrediction p = PredictMemory(o, /*restoring=*/false);
  const int64_t row_ids = 2 * (2 * o.rows + o.experts) * 4;
  EXPECT_EQ(p.store_bytes, allocated + row_ids);
  EXPECT_EQ(p.restore_bytes, 0);
  // Restoring adds the checkpoint read whole: parameters and both moments, 12 bytes each.
  EXPECT_EQ(PredictMemory(o, true).restore_bytes, 2 * 12 * (2 * o.rows + o.experts) * o.dim);
  // Auto cache budget: two lookups of max_tokens per layer.
  EXPECT_EQ(p.lookup_cache_bytes, 2 * 2 * LookupCacheBytesBound(o, o.max_tokens));
  ServerOptions fixed = o;
  fixed.lookup_cache_bytes = 12345;
  EXPECT_EQ(PredictMemory(fixed, false).lookup_cache_bytes, 12345);
}

// LLaMA-7B shape at r = 16384 (DESIGN §4: about 16 bytes per adapter parameter).
TEST(MemoryBudgetTest, SevenBillionShape) {
  ServerOptions o;
  o.layers.clear();
  for (uint32_t l = 0; l < 32; ++l) o.layers.push_back(l);
  o.rows = 16384;
  o.dim = 4096;
  const MemoryPrediction p = PredictMemory(o, false);
  const double params = 32.0 * (2 * 16384 + store::DefaultExperts(16384)) * 4096;
  EXPECT_NEAR(static_cast<double>(p.store_bytes) / params, 16.0, 0.01);
}

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
  EXPECT_EQ(CheckMemoryAdmission({.store_bytes = 2LL << 30}, *h).code(), absl::StatusCode::kOk);
  const absl::Status refused = CheckMemoryAdmission(
      {.store_bytes = 2LL << 30, .lookup_cache_bytes = 1 << 20, .restore_bytes = 0}, *h);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("needs 2.00 GiB"));
  EXPECT_THAT(refused.message(), HasSubstr("lookup cache 1.0 MiB"));
  EXPECT_THAT(refused.message(), HasSubstr("can give 2.00 GiB (cgroup"));
  EXPECT_THAT(refused.message(), HasSubstr("memory_limit_mb"));
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


}  // namespace
}  // namespace meft::server
