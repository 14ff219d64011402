// The parameter server's gRPC face through whole training cycles: lookup, gradients, norm and
// step against references computed here, padding, a lookup that waits for its step, and replays
// of every request (see rpc_test_util.h for the harness and the wire encoding).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "tests/param_server/rpc_test_util.h"
#include "tests/testing/temp_dir.h"

namespace meft::rpc_test {
namespace {

using ::meft::testing::TempDir;

// ---------------------------------------------------------------------------------------------
// 1. One full training cycle.

TEST(RpcCycleTest, LookupGradientsGradNormStep) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  TempDir tmp;
  std::mt19937 rng(1234);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 0, 1, 1});  // token 2 is padding

  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, /*training=*/true), &resp));
  EXPECT_FALSE(resp.replayed());
  EXPECT_EQ(resp.rows_dropped(), 0u);
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  ASSERT_GT(n, 0);
  EXPECT_LE(n, 4 * kTopK);  // four real tokens

  // Shapes and dtypes.
  EXPECT_EQ(resp.row_ids().dtype(), v1::DTYPE_INT32);
  EXPECT_EQ(Shape(resp.row_ids()), (std::vector<int64_t>{n}));
  EXPECT_TRUE(std::is_sorted(d.rows.begin(), d.rows.end()));
  EXPECT_EQ(std::adjacent_find(d.rows.begin(), d.rows.end()), d.rows.end()) << "row_ids repeat";
  for (int32_t r : d.rows) {
    EXPECT_GE(r, 0);
    EXPECT_LT(r, kRows);
  }
  for (const v1::Tensor* t : {&resp.keys(), &resp.values()}) {
    EXPECT_EQ(t->dtype(), v1::DTYPE_FP32);
    EXPECT_EQ(Shape(*t), (std::vector<int64_t>{n, kDim}));
    EXPECT_EQ(t->data().size(), static_cast<size_t>(n * kDim * 4));
  }
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_gates()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_experts()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(resp.token_gates().dtype(), v1::DTYPE_FP32);
  ASSERT_EQ(d.token_rows.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_gates.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_experts.size(), static_cast<size_t>(T * kTopK));
  for (int64_t j = 0; j < kTopK; ++j) {
    EXPECT_EQ(d.token_rows[2 * kTopK + j], -1) << "padding token got a row";
    EXPECT_EQ(d.token_experts[2 * kTopK + j], -1) << "padding token got an expert";
  }
  const int64_t n_e = static_cast<int64_t>(d.expert_ids.size());
  ASSERT_GT(n_e, 0);
  EXPECT_TRUE(std::is_sorted(d.expert_ids.begin(), d.expert_ids.end()));
  EXPECT_EQ(std::adjacent_find(d.expert_ids.begin(), d.expert_ids.end()), d.expert_ids.end());
  EXPECT_EQ(Shape(resp.expert_ids()), (std::vector<int64_t>{n_e}));
  EXPECT_EQ(Shape(resp.router_rows()), (std::vector<int64_t>{n_e, kDim}));
  EXPECT_EQ(resp.router_rows().dtype(), v1::DTYPE_FP32);

  // The rows are the store's: compare with a checkpoint of it (saving changes no state), and
  // the selection with a slow reference.
  const uint64_t digest = h->Digest();
  v1::SaveCheckpointRequest save;
  save.set_directory(tmp.path() + "/before");
  v1::SaveCheckpointResponse saved;
  ASSERT_RPC_OK(h->Save(save, &saved));
  EXPECT_EQ(saved.step(), 0u);
  EXPECT_EQ(h->Digest(), digest) << "SaveCheckpoint changed the state";
  const Snapshot before = ReadSnapshot(saved.path(), 0);
  ASSERT_FALSE(HasFailure());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < kDim; ++k) {
      ASSERT_EQ(FloatBits(d.keys[i * kDim + k]), FloatBits(before.keys[d.rows[i] * kDim + k]))
          << "key row " << d.rows[i];
      ASSERT_EQ(d.values[i * kDim + k], 0.0f) << "V is initialised to zero";
    }
  }
  for (int64_t p = 0; p < n_e; ++p) {
    for (int64_t k = 0; k < kDim; ++k) {
      ASSERT_EQ(FloatBits(d.router[p * kDim + k]),
                FloatBits(before.router[d.expert_ids[p] * kDim + k]));
    }
  }
  CheckSelectionAgainstReference(d, batch, before);

  // A second (evaluation) lookup with fp32 rows sees the same selection and bit-identical keys;
  // one with the default wire dtype gets the same rows rounded to bf16.
  v1::LookupResponse again;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, /*training=*/false), &again));
  EXPECT_EQ(again.row_ids().data(), resp.row_ids().data());
  EXPECT_EQ(again.keys().data(), resp.keys().data());
  EXPECT_EQ(again.values().data(), resp.values().data());
  v1::LookupResponse bf16;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, false, v1::DTYPE_UNSPECIFIED), &bf16));
  EXPECT_EQ(bf16.keys().dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(bf16.row_ids().data(), resp.row_ids().data());
  ASSERT_EQ(bf16.keys().data().size(), static_cast<size_t>(n * kDim * 2));
  for (int64_t i = 0; i < n * kDim; ++i) {
    ASSERT_EQ(ReadLe(bf16.keys().data(), 2 * i, 2), ToBf16(d.keys[i])) << "element " << i;
  }
  EXPECT_EQ(h->Digest(), digest) << "an evaluation lookup changed the state";

  // Gradients, then the squared norm computed here from what was sent.
  const Grads g = RandomGradsFor(d, T, /*with_gates=*/true, &rng);
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_FALSE(gresp.duplicate());
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(n));
  const std::vector<double> dG = RouterGrad(d, batch, g);
  const double expected = SumSquares(g.keys) + SumSquares(g.values) + SumSquares(dG);
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);
  ASSERT_EQ(norm.layers_size(), 2);
  EXPECT_EQ(norm.layers(0), 0u);
  EXPECT_EQ(norm.layers(1), 2u);
  EXPECT_NEAR(norm.layer_squared_norms(0), expected, 1e-4 * expected);
  EXPECT_EQ(norm.layer_squared_norms(1), 0.0);
  norm_req.add_layers(0);
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);

  // The Adam step.
  constexpr double kLr = 1e-2;
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(kLr);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_FALSE(sresp.already_applied());
  EXPECT_EQ(sresp.server_step(), 1u);
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(n));
  EXPECT_EQ(sresp.router_rows_updated(), static_cast<uint64_t>(n_e));

  // Every touched parameter moved by one SparseAdam step, untouched ones did not.
  save.set_directory(tmp.path() + "/after");
  ASSERT_RPC_OK(h->Save(save, &saved));
  EXPECT_EQ(saved.step(), 1u);
  const Snapshot after = ReadSnapshot(saved.path(), 0);
  ASSERT_FALSE(HasFailure());
  std::vector<int> in_s(kRows, -1);
  for (int64_t i = 0; i < n; ++i) in_s[d.rows[i]] = static_cast<int>(i);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kDim; ++k) {
      const int64_t e = r * kDim + k;
      if (in_s[r] < 0) {
        ASSERT_EQ(after.keys[e], before.keys[e]) << "untouched key row " << r << " moved";
        ASSERT_EQ(after.values[e], 0.0f) << "untouched value row " << r << " moved";
      } else {
        const int64_t ge = in_s[r] * kDim + k;
        ASSERT_NEAR(after.keys[e] - before.keys[e], FirstAdamDelta(g.keys[ge], kLr), 1e-6);
        ASSERT_NEAR(after.values[e], FirstAdamDelta(g.values[ge], kLr), 1e-6);
      }
    }
  }
  for (int64_t p = 0; p < n_e; ++p) {
    for (int64_t k = 0; k < kDim; ++k) {
      const int64_t e = d.expert_ids[p] * kDim + k;
      EXPECT_NEAR(after.router[e] - before.router[e], FirstAdamDelta(dG[p * kDim + k], kLr), 1e-5)
          << "router row " << d.expert_ids[p];
    }
  }

  // The lookup of step 1 sees the new parameters: value rows selected again moved by about lr
  // against their gradient's sign, rows new to S are still zero.
  v1::LookupResponse next;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 1, 0, 0, /*training=*/true), &next));
  const Decoded d1 = Decode(next);
  int reselected = 0;
  for (size_t i = 0; i < d1.rows.size(); ++i) {
    const int32_t r = d1.rows[i];
    for (int64_t k = 0; k < kDim; ++k) {
      const float v = d1.values[i * kDim + k];
      if (in_s[r] < 0) {
        EXPECT_EQ(v, 0.0f) << "row " << r;
        continue;
      }
      const float grad = g.values[in_s[r] * kDim + k];
      EXPECT_NE(v, 0.0f);
      EXPECT_EQ(std::signbit(v), !std::signbit(grad)) << "row " << r << " moved along the gradient";
      EXPECT_NEAR(std::abs(v), kLr, 1e-4) << "row " << r;
      EXPECT_NEAR(d1.keys[i * kDim + k] - before.keys[r * kDim + k],
                  FirstAdamDelta(g.keys[in_s[r] * kDim + k], kLr), 1e-6);
    }
    if (in_s[r] >= 0) ++reselected;
  }
  EXPECT_GT(reselected, 0) << "no row of step 0 was selected again; the check saw nothing";
}

TEST(RpcCycleTest, AllPaddingMicroBatchSelectsNothing) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(77);
  constexpr int64_t T = 3;
  const Batch batch = RandomBatch(&rng, T, {0, 0, 0});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  EXPECT_EQ(Shape(resp.row_ids()), (std::vector<int64_t>{0}));
  EXPECT_EQ(Shape(resp.keys()), (std::vector<int64_t>{0, kDim}));
  EXPECT_EQ(Shape(resp.values()), (std::vector<int64_t>{0, kDim}));
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.expert_ids()), (std::vector<int64_t>{0}));
  EXPECT_EQ(Shape(resp.router_rows()), (std::vector<int64_t>{0, kDim}));
  const Decoded d = Decode(resp);
  for (int32_t pos : d.token_rows) EXPECT_EQ(pos, -1);
  for (int32_t pos : d.token_experts) EXPECT_EQ(pos, -1);

  const Grads g = RandomGradsFor(d, T, true, &rng);  // all gate grads zero: every slot is empty
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), 0u);
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_EQ(norm.squared_norm(), 0.0);
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-2);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), 0u);
  EXPECT_EQ(sresp.server_step(), 1u);
}

// DESIGN §3 ordering rule: a training lookup of step s+1 that arrives before Step(s) is held
// until the step is applied, then answered from the new parameters.
TEST(RpcCycleTest, EarlyLookupIsAnsweredAfterTheStep) {
  server::ServerOptions o = SmallOptions();
  o.step_wait_seconds = 60;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(31);
  constexpr int64_t T = 4;
  const Batch batch = RandomBatch(&rng, T);
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  const Decoded d = Decode(resp);
  const Grads g = RandomGradsFor(d, T, true, &rng);
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));

  // Whether the early lookup reaches the server before or after the Step, its answer must show
  // the parameters after Step(0).
  grpc::Status early_status;
  v1::LookupResponse early;
  std::thread client([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    early_status = h->stub->Lookup(&ctx, MakeLookup(batch, 1, 0, 0, true), &early);
  });
  grpc::ClientContext ctx;
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-2);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  const grpc::Status step_status = h->stub->Step(&ctx, step, &sresp);
  client.join();
  ASSERT_TRUE(step_status.ok()) << step_status.error_message();
  ASSERT_TRUE(early_status.ok()) << early_status.error_message();
  const Decoded d1 = Decode(early);
  std::set<int32_t> touched(d.rows.begin(), d.rows.end());
  int moved = 0;
  for (size_t i = 0; i < d1.rows.size(); ++i) {
    if (!touched.count(d1.rows[i])) continue;
    for (int64_t k = 0; k < kDim; ++k) EXPECT_NEAR(std::abs(d1.values[i * kDim + k]), 1e-2, 1e-4);
    ++moved;
  }
  EXPECT_GT(moved, 0);
}

// ---------------------------------------------------------------------------------------------
// 2. Replays.

TEST(RpcReplayTest, RepeatedRequestsAreIdempotent) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(99);
  constexpr int64_t T = 6;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 1, 1, 0, 1});
  const v1::LookupRequest lookup = MakeLookup(batch, 0, 3, 2, true, v1::DTYPE_BF16);

  v1::LookupResponse first, second;
  ASSERT_RPC_OK(h->Lookup(lookup, &first));
  const uint64_t after_first = h->Digest();
  ASSERT_RPC_OK(h->Lookup(lookup, &second));
  EXPECT_FALSE(first.replayed());
  EXPECT_TRUE(second.replayed());
  EXPECT_EQ(h->Digest(), after_first) << "a replayed lookup changed the state";
  v1::LookupResponse a = first, b = second;
  a.set_replayed(false);
  b.set_replayed(false);
  EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString()) << "the replay differs";

  const Decoded d = Decode(first);
  const Grads g = RandomGradsFor(d, T, true, &rng);
  const v1::GradientsRequest grads = MakeGradients(g, T, 0, 3, 2);
  v1::GradientsResponse g1, g2;
  ASSERT_RPC_OK(h->Gradients(grads, &g1));
  EXPECT_FALSE(g1.duplicate());
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse n1, n2;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &n1));
  const uint64_t after_grads = h->Digest();
  ASSERT_RPC_OK(h->Gradients(grads, &g2));
  EXPECT_TRUE(g2.duplicate());
  EXPECT_EQ(g2.rows_accumulated(), g1.rows_accumulated());
  ASSERT_RPC_OK(h->GradNorm(norm_req, &n2));
  EXPECT_EQ(n2.squared_norm(), n1.squared_norm()) << "duplicate gradients were applied";
  EXPECT_EQ(h->Digest(), after_grads);

  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(0.5);
  v1::StepResponse s1, s2;
  ASSERT_RPC_OK(h->Step(step, &s1));
  EXPECT_FALSE(s1.already_applied());
  EXPECT_EQ(s1.server_step(), 1u);
  const uint64_t after_step = h->Digest();
  EXPECT_NE(after_step, after_grads);
  ASSERT_RPC_OK(h->Step(step, &s2));
  EXPECT_TRUE(s2.already_applied());
  EXPECT_EQ(s2.server_step(), 1u);
  EXPECT_EQ(s2.rows_updated(), s1.rows_updated()) << "the replay must return the recorded result";
  EXPECT_EQ(s2.router_rows_updated(), s1.router_rows_updated());
  EXPECT_EQ(h->Digest(), after_step) << "a replayed Step changed the state";
}

}  // namespace
}  // namespace meft::rpc_test
