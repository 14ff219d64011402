#include "param_server/store/layer_store.h"

#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tbb/global_control.h"

namespace meft::store {
namespace {

// Brute force: the divisor of r nearest 4 * ceil(sqrt(r)), larger on a tie.
int64_t ReferenceExperts(int64_t r) {
  int64_t target = 1;
  while (target * target < r) ++target;  // ceil(sqrt(r)) in integers
  target *= 4;
  int64_t best = -1;
  for (int64_t e = r; e >= 1; --e) {
    if (r % e) continue;
    if (best < 0 || std::llabs(e - target) < std::llabs(best - target)) best = e;
  }
  return best;
}

TEST(DefaultExpertsTest, MatchesBruteForceAndDesignExamples) {
  EXPECT_EQ(DefaultExperts(8464), 368);  // 4 * 92, 23 keys each
  EXPECT_EQ(DefaultExperts(32768), 512);
  for (int64_t r = 1; r <= 3000; ++r) ASSERT_EQ(DefaultExperts(r), ReferenceExperts(r)) << r;
}

TEST(LayerStoreTest, InitialisationFollowsTheDesign) {
  InitOptions init;
  init.seed = 11;
  auto s = LayerStore::Create(3, 96, 40, 8, init);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->rows_per_expert, 12);
  for (float v : s->values.param) ASSERT_EQ(v, 0.0f);
  double sum = 0, sq = 0;
  for (float v : s->keys.param) {
    sum += v;
    sq += double{v} * v;
  }
  const double n = static_cast<double>(s->keys.param.size());
  EXPECT_NEAR(sum / n, 0.0, 0.002);
  EXPECT_NEAR(std::sqrt(sq / n), 0.02, 0.001);
  // G_e = 50 * mean of the expert's keys.
  for (int64_t e = 0; e < 8; ++e) {
    for (int64_t j = 0; j < 40; ++j) {
      double mean = 0;
      for (int64_t k = 0; k < 12; ++k) mean += s->keys.Row(e * 12 + k)[j];
      mean /= 12;
      ASSERT_NEAR(s->router.Row(e)[j], 50.0 * mean, 1e-5);
    }
  }
  for (const ParamBlock* b : {&s->keys, &s->values, &s->router}) {
    EXPECT_TRUE(b->touched_rows.empty());
    EXPECT_EQ(b->adam_step, 0);
    for (float v : b->exp_avg) ASSERT_EQ(v, 0.0f);
  }
}

TEST(LayerStoreTest, DeterministicPerSeedAndLayerWhateverTheThreads) {
  InitOptions init;
  init.seed = 5;
  auto a = LayerStore::Create(0, 200, 33, 10, init);
  std::vector<float> single_thread_keys;
  {
    tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
    single_thread_keys = LayerStore::Create(0, 200, 33, 10, init)->keys.param;
  }
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->keys.param, single_thread_keys);
  auto other_layer = LayerStore::Create(1, 200, 33, 10, init);
  EXPECT_NE(a->keys.param, other_layer->keys.param);
  init.seed = 6;
  EXPECT_NE(a->keys.param, LayerStore::Create(0, 200, 33, 10, init)->keys.param);
  init.router_init = RouterInit::kNormal;
  auto normal = LayerStore::Create(0, 200, 33, 10, init);
  double sq = 0;
  for (float v : normal->router.param) sq += double{v} * v;
  EXPECT_NEAR(std::sqrt(sq / normal->router.param.size()), 0.02, 0.004);
}

// Each failure is INVALID_ARGUMENT with a message naming the layer and the offending sizes.
void ExpectInvalid(const absl::StatusOr<LayerStore>& s, const std::string& message) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
  EXPECT_EQ(s.status().message(), message);
}

TEST(LayerStoreTest, RejectsBadShapes) {
  EXPECT_FALSE(LayerStore::Create(0, 10, 4, 3, {}).ok());  // 3 does not divide 10
  EXPECT_FALSE(LayerStore::Create(0, 0, 4, 1, {}).ok());
  EXPECT_FALSE(LayerStore::Create(0, 10, 0, 1, {}).ok());
  ExpectInvalid(LayerStore::Create(0, 10, 4, 3, {}), "layer 0: experts (3) must divide rows (10)");
  ExpectInvalid(LayerStore::Create(0, 0, 4, 1, {}),
                "layer 0: rows (0), dim (4) and experts (1) must be positive");
  ExpectInvalid(LayerStore::Create(0, 10, 0, 1, {}),
                "layer 0: rows (10), dim (0) and experts (1) must be positive");
  ExpectInvalid(LayerStore::Create(2, 10, 4, 0, {}),
                "layer 2: rows (10), dim (4) and experts (0) must be positive");
  ExpectInvalid(LayerStore::Create(5, int64_t{INT32_MAX} + 1, 4, 1, {}),
                "layer 5: rows (2147483648) exceeds the int32 row-id range");
}

}  // namespace
}  // namespace meft::store
