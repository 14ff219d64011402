// Host memory admission (server/memory_budget.h): the prediction against what a created store
// really allocates, and the refusal message. (The lookup cache budget and allocation failures are
// in param_server_test.cc, detection of the host's limits in tests/common/host_memory_test.cc.)

#include "param_server/server/memory_budget.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "param_server/store/layer_store.h"

namespace meft::server {
namespace {

using ::testing::HasSubstr;

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

// The refusal names the need with its parts, the limit with its source, and the settings.
TEST(MemoryBudgetTest, AdmissionRefusesWhatDoesNotFit) {
  const HostMemory host{2LL << 30, "a test limit"};
  EXPECT_EQ(CheckMemoryAdmission({.store_bytes = 2LL << 30}, host).code(), absl::StatusCode::kOk);
  const absl::Status refused = CheckMemoryAdmission(
      {.store_bytes = 2LL << 30, .lookup_cache_bytes = 1 << 20, .restore_bytes = 4096}, host);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("needs 2.00 GiB"));
  EXPECT_THAT(refused.message(), HasSubstr("lookup cache 1.0 MiB"));
  EXPECT_THAT(refused.message(), HasSubstr("checkpoint being restored 4.0 KiB"));
  EXPECT_THAT(refused.message(), HasSubstr("can give 2.00 GiB (a test limit)"));
  EXPECT_THAT(refused.message(), HasSubstr("memory_limit_mb"));
}

}  // namespace
}  // namespace meft::server
