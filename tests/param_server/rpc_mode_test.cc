// The parameter server's selection modes through its gRPC face: union mode, ungated per_token
// selection and the max_rows cap (see rpc_test_util.h for the harness and the wire encoding).

#include <gmock/gmock.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "tests/param_server/rpc_test_util.h"

namespace meft::rpc_test {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// 5. Union mode and ungated selection.

TEST(RpcModeTest, UnionModeSendsNoPerTokenTensors) {
  server::ServerOptions o = SmallOptions();
  o.mode = server::Mode::kUnion;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(8);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 1, 0, 1});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  ASSERT_GT(n, 0);
  EXPECT_TRUE(std::is_sorted(d.rows.begin(), d.rows.end()));
  EXPECT_EQ(Shape(resp.keys()), (std::vector<int64_t>{n, kDim}));
  EXPECT_EQ(Shape(resp.values()), (std::vector<int64_t>{n, kDim}));
  EXPECT_TRUE(IsEmptyTensor(resp.token_rows()));
  EXPECT_TRUE(IsEmptyTensor(resp.token_gates()));
  EXPECT_TRUE(IsEmptyTensor(resp.token_experts()));
  EXPECT_TRUE(IsEmptyTensor(resp.expert_ids()));
  EXPECT_TRUE(IsEmptyTensor(resp.router_rows()));

  Grads g;
  g.keys = RandomGrads(&rng, n * kDim);
  g.values = RandomGrads(&rng, n * kDim);
  v1::GradientsRequest with_gates = MakeGradients(g, T, 0, 0, 0);
  *with_gates.mutable_gate_grads() = Fp32(std::vector<float>(T * kTopK, 0.0f), {T, kTopK});
  const uint64_t before = h->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = h->Gradients(with_gates, &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads:"));
  EXPECT_EQ(h->Digest(), before);

  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  const double expected = SumSquares(g.keys) + SumSquares(g.values);  // no router gradient
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-6 * expected);
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(n));
  EXPECT_EQ(sresp.router_rows_updated(), 0u);
}

TEST(RpcModeTest, UngatedPerTokenSendsUnitGatesAndNoRouter) {
  server::ServerOptions o = SmallOptions();
  o.selector.gated = false;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(9);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {0, 1, 1, 1, 1});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 2, true), &resp));
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_gates()), (std::vector<int64_t>{T, kTopK}));
  ASSERT_EQ(d.token_gates.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_rows.size(), static_cast<size_t>(T * kTopK));
  int filled = 0;
  for (int64_t s = 0; s < T * kTopK; ++s) {
    if (s < kTopK) {
      EXPECT_EQ(d.token_rows[s], -1) << "padding token 0 got a row";
      continue;
    }
    ASSERT_GE(d.token_rows[s], 0);
    ASSERT_LT(d.token_rows[s], n);
    EXPECT_EQ(d.token_gates[s], 1.0f) << "slot " << s;
    ++filled;
  }
  EXPECT_EQ(filled, (T - 1) * kTopK);
  EXPECT_TRUE(IsEmptyTensor(resp.token_experts()));
  EXPECT_TRUE(IsEmptyTensor(resp.expert_ids()));
  EXPECT_TRUE(IsEmptyTensor(resp.router_rows()));

  Grads g = RandomGradsFor(d, T, /*with_gates=*/true, &rng);
  const uint64_t before = h->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = h->Gradients(MakeGradients(g, T, 0, 0, 2), &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads:"));
  EXPECT_EQ(h->Digest(), before);
  g.gates.clear();
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 2), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(n));
}

// The max_rows cap keeps the rows chosen by the most tokens (ties: lower id) and empties the
// slots of the others; compared against the uncapped selection of an identical store.
TEST(RpcModeTest, MaxRowsCapKeepsTheMostChosenRows) {
  constexpr int64_t kCap = 12;
  server::ServerOptions capped_options = SmallOptions();
  capped_options.selector.max_rows = kCap;
  auto full = StartHarness(SmallOptions());
  auto capped = StartHarness(capped_options);
  ASSERT_NE(full, nullptr);
  ASSERT_NE(capped, nullptr);
  std::mt19937 rng(17);
  constexpr int64_t T = 12;
  const Batch batch = RandomBatch(&rng, T);
  v1::LookupResponse full_resp, capped_resp;
  ASSERT_RPC_OK(full->Lookup(MakeLookup(batch, 0, 0, 0, false), &full_resp));
  ASSERT_RPC_OK(capped->Lookup(MakeLookup(batch, 0, 0, 0, true), &capped_resp));
  const Decoded f = Decode(full_resp);
  const Decoded c = Decode(capped_resp);
  ASSERT_GT(static_cast<int64_t>(f.rows.size()), kCap);
  EXPECT_EQ(full_resp.rows_dropped(), 0u);
  EXPECT_EQ(capped_resp.rows_dropped(), f.rows.size() - kCap);

  std::map<int32_t, int> count;
  for (int32_t pos : f.token_rows) {
    if (pos >= 0) ++count[f.rows[pos]];
  }
  std::vector<int32_t> order = f.rows;
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return count[a] > count[b]; });
  std::vector<int32_t> kept(order.begin(), order.begin() + kCap);
  std::sort(kept.begin(), kept.end());
  EXPECT_EQ(c.rows, kept);
  EXPECT_EQ(Shape(capped_resp.keys()), (std::vector<int64_t>{kCap, kDim}));

  const std::set<int32_t> kept_set(kept.begin(), kept.end());
  std::set<int32_t> experts;
  for (int64_t s = 0; s < T * kTopK; ++s) {
    const int32_t row = f.rows[f.token_rows[s]];
    if (kept_set.count(row)) {
      ASSERT_GE(c.token_rows[s], 0) << "slot " << s;
      EXPECT_EQ(c.rows[c.token_rows[s]], row);
      EXPECT_EQ(c.token_gates[s], f.token_gates[s]);
      ASSERT_GE(c.token_experts[s], 0);
      EXPECT_EQ(c.expert_ids[c.token_experts[s]], row / kRowsPerExpert);
      experts.insert(row / static_cast<int32_t>(kRowsPerExpert));
    } else {
      EXPECT_EQ(c.token_rows[s], -1) << "slot " << s << " holds a dropped row";
      EXPECT_EQ(c.token_experts[s], -1);
    }
  }
  EXPECT_EQ(c.expert_ids, std::vector<int32_t>(experts.begin(), experts.end()));

  // A gate gradient on a slot emptied by the cap is rejected.
  Grads g = RandomGradsFor(c, T, true, &rng);
  const auto dropped = std::find(c.token_rows.begin(), c.token_rows.end(), -1);
  ASSERT_NE(dropped, c.token_rows.end());
  g.gates[dropped - c.token_rows.begin()] = 0.5f;
  const uint64_t before = capped->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = capped->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads.data:"));
  EXPECT_EQ(capped->Digest(), before);
  g.gates[dropped - c.token_rows.begin()] = 0.0f;
  ASSERT_RPC_OK(capped->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(kCap));
}

}  // namespace
}  // namespace meft::rpc_test
