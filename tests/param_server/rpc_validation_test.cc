// Malformed requests to the parameter server's gRPC face get the exact code, a message naming
// the field, and change no state; oversize messages are refused; a listener that is not loopback
// needs to be insecure (see rpc_test_util.h for the harness and the wire encoding).

#include <gmock/gmock.h>

#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "tests/param_server/rpc_test_util.h"
#include "tests/testing/temp_dir.h"

namespace meft::rpc_test {
namespace {

using ::meft::testing::TempDir;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// 3. Malformed requests: the exact code, a message naming the field, and no state change.

class RpcMalformedTest : public ::testing::Test {
 protected:
  static constexpr int64_t kT = 4;
  static constexpr int64_t kMaxTokens = 32;

  void SetUp() override {
    server::ServerOptions o = SmallOptions();
    o.step_wait_seconds = 0.2;
    o.max_tokens = kMaxTokens;
    h_ = StartHarness(o);
    ASSERT_NE(h_, nullptr);
    batch_ = RandomBatch(&rng_, kT, {1, 0, 1, 1});  // token 1 is padding: empty slots
    // State to protect: a cached training lookup awaiting its gradients.
    v1::LookupResponse resp;
    ASSERT_RPC_OK(h_->Lookup(MakeLookup(batch_, 0, 0, 0, true), &resp));
    cached_ = Decode(resp);
    grads_ = RandomGradsFor(cached_, kT, true, &rng_);
  }

  // Runs `call` and checks the outcome. `field` must appear as "<field>:" in the message.
  template <typename Fn>
  void ExpectRejected(const std::string& what, grpc::StatusCode code, const std::string& field,
                      Fn call) {
    SCOPED_TRACE(what);
    const uint64_t before = h_->Digest();
    const grpc::Status s = call();
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field + ":"));
    EXPECT_EQ(h_->Digest(), before) << "a rejected request changed the state";
  }

  void ExpectLookupRejected(const std::string& what, grpc::StatusCode code,
                            const std::string& field, const v1::LookupRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::LookupResponse resp;
      return h_->Lookup(r, &resp);
    });
  }

  void ExpectGradientsRejected(const std::string& what, grpc::StatusCode code,
                               const std::string& field, const v1::GradientsRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::GradientsResponse resp;
      return h_->Gradients(r, &resp);
    });
  }

  void ExpectStepRejected(const std::string& what, grpc::StatusCode code, const std::string& field,
                          const v1::StepRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::StepResponse resp;
      return h_->Step(r, &resp);
    });
  }

  v1::GradientsRequest GoodGradients() const { return MakeGradients(grads_, kT, 0, 0, 0); }

  // Applies the cached lookup's gradients, so that a wrong Step would have something to do.
  void ApplyGradients() {
    v1::GradientsResponse resp;
    ASSERT_RPC_OK(h_->Gradients(GoodGradients(), &resp));
    ASSERT_FALSE(resp.duplicate());
  }

  std::mt19937 rng_{4321};
  std::unique_ptr<Harness> h_;
  Batch batch_;
  Decoded cached_;
  Grads grads_;
};

TEST_F(RpcMalformedTest, Lookup) {
  using grpc::StatusCode;
  const Batch fresh = RandomBatch(&rng_, kT);
  const v1::LookupRequest good = MakeLookup(fresh, 0, 1, 0, true);
  {
    v1::LookupResponse resp;
    const uint64_t before = h_->Digest();
    ASSERT_RPC_OK(h_->Lookup(MakeLookup(fresh, 0, 1, 0, false), &resp));
    EXPECT_EQ(h_->Digest(), before);
  }

  v1::LookupRequest r = good;
  r.mutable_header()->set_layer(1);
  ExpectLookupRejected("layer not owned", StatusCode::NOT_FOUND, "header.layer", r);
  r.set_training(false);
  ExpectLookupRejected("layer not owned, evaluation", StatusCode::NOT_FOUND, "header.layer", r);

  r = good;
  r.clear_x();
  ExpectLookupRejected("x missing", StatusCode::INVALID_ARGUMENT, "x", r);

  r = good;
  r.mutable_x()->set_dtype(v1::DTYPE_INT32);
  ExpectLookupRejected("x int32", StatusCode::INVALID_ARGUMENT, "x.dtype", r);
  r.mutable_x()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectLookupRejected("x dtype unspecified", StatusCode::INVALID_ARGUMENT, "x.dtype", r);
  r.mutable_x()->set_dtype(static_cast<v1::DType>(77));
  ExpectLookupRejected("x dtype unknown", StatusCode::INVALID_ARGUMENT, "x.dtype", r);

  r = good;
  *r.mutable_x() = Fp32(std::vector<float>(kT * 15, 0.5f), {kT, 15});
  ExpectLookupRejected("x [T, 15]", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {kT * kDim});
  ExpectLookupRejected("x rank 1", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {1, kT, kDim});
  ExpectLookupRejected("x rank 3", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {-kT, kDim});
  ExpectLookupRejected("x negative dim", StatusCode::INVALID_ARGUMENT, "x.shape", r);

  r = good;
  r.mutable_x()->mutable_data()->pop_back();
  ExpectLookupRejected("x one byte short", StatusCode::INVALID_ARGUMENT, "x.data", r);
  r = good;
  r.mutable_x()->mutable_data()->append(4, '\0');
  ExpectLookupRejected("x one float too many", StatusCode::INVALID_ARGUMENT, "x.data", r);
  r = good;
  *r.mutable_x() = Bf16(fresh.x, {kT, kDim});
  r.mutable_x()->mutable_data()->append(2, '\0');
  ExpectLookupRejected("bf16 x one element too many", StatusCode::INVALID_ARGUMENT, "x.data", r);

  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = fresh.x;
    x[kDim + 3] = bad;
    r = good;
    *r.mutable_x() = Fp32(x, {kT, kDim});
    ExpectLookupRejected("x holds " + std::to_string(bad), StatusCode::INVALID_ARGUMENT, "x.data",
                         r);
    r.set_training(false);
    ExpectLookupRejected("evaluation x holds " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                         "x.data", r);
  }
  r = good;
  *r.mutable_x() = MakeTensor(v1::DTYPE_BF16, {1, kDim}, std::string(2 * kDim, '\0'));
  (*r.mutable_x()->mutable_data())[0] = static_cast<char>(0x80);  // element 0 = 0x7f80 = +inf
  (*r.mutable_x()->mutable_data())[1] = static_cast<char>(0x7f);
  ExpectLookupRejected("bf16 x holds inf", StatusCode::INVALID_ARGUMENT, "x.data", r);

  r = good;
  *r.mutable_x() = MakeTensor(v1::DTYPE_FP32, {0, kDim}, "");
  ExpectLookupRejected("T = 0", StatusCode::INVALID_ARGUMENT, "x.shape", r);

  r = good;
  const Batch big = RandomBatch(&rng_, kMaxTokens + 1);
  *r.mutable_x() = Fp32(big.x, {big.tokens, kDim});
  ExpectLookupRejected("T > max_tokens", StatusCode::RESOURCE_EXHAUSTED, "x.shape", r);
  {
    SCOPED_TRACE("absurd shape with little data");
    r = good;
    *r.mutable_x() = Fp32(fresh.x, {int64_t{1} << 50, kDim});
    const uint64_t before = h_->Digest();
    v1::LookupResponse resp;
    const grpc::Status s = h_->Lookup(r, &resp);
    EXPECT_TRUE(s.error_code() == StatusCode::INVALID_ARGUMENT ||
                s.error_code() == StatusCode::RESOURCE_EXHAUSTED)
        << s.error_code() << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("x.shape:"));
    EXPECT_EQ(h_->Digest(), before);
  }

  r = good;
  *r.mutable_token_mask() = U8({1, 1, 1, 1, 1}, {kT + 1});
  ExpectLookupRejected("mask [T + 1]", StatusCode::INVALID_ARGUMENT, "token_mask.shape", r);
  *r.mutable_token_mask() = U8({1, 1, 1, 1}, {kT, 1});
  ExpectLookupRejected("mask [T, 1]", StatusCode::INVALID_ARGUMENT, "token_mask.shape", r);
  *r.mutable_token_mask() = U8({1, 1, 1}, {kT});
  ExpectLookupRejected("mask short data", StatusCode::INVALID_ARGUMENT, "token_mask.data", r);
  *r.mutable_token_mask() = U8({1, 2, 1, 1}, {kT});
  ExpectLookupRejected("mask value 2", StatusCode::INVALID_ARGUMENT, "token_mask.data", r);
  *r.mutable_token_mask() = Fp32({1, 1, 1, 1}, {kT});
  ExpectLookupRejected("mask fp32", StatusCode::INVALID_ARGUMENT, "token_mask.dtype", r);

  r = good;
  r.set_row_dtype(v1::DTYPE_INT32);
  ExpectLookupRejected("row_dtype int32", StatusCode::INVALID_ARGUMENT, "row_dtype", r);
  r.set_row_dtype(v1::DTYPE_UINT8);
  ExpectLookupRejected("row_dtype uint8", StatusCode::INVALID_ARGUMENT, "row_dtype", r);
  r.set_row_dtype(static_cast<v1::DType>(42));
  ExpectLookupRejected("row_dtype unknown", StatusCode::INVALID_ARGUMENT, "row_dtype", r);

  r = good;
  r.mutable_header()->set_step(5);
  // More than one step ahead: FAILED_PRECONDITION at once, not after step_wait_seconds.
  ExpectLookupRejected("step ahead of the server", StatusCode::FAILED_PRECONDITION, "header.step",
                       r);

  // Same (step, micro_step, layer) as the cached lookup, different x or mask.
  r = MakeLookup(fresh, 0, 0, 0, true);
  ExpectLookupRejected("cached key, different x", StatusCode::ALREADY_EXISTS, "header", r);
  Batch other_mask = batch_;
  other_mask.mask = {1, 1, 1, 1};
  ExpectLookupRejected("cached key, different mask", StatusCode::ALREADY_EXISTS, "header",
                       MakeLookup(other_mask, 0, 0, 0, true));

  // The cached lookup survived all of this: its replay still works.
  v1::LookupResponse replay;
  ASSERT_RPC_OK(h_->Lookup(MakeLookup(batch_, 0, 0, 0, true), &replay));
  EXPECT_TRUE(replay.replayed());
  EXPECT_EQ(Decode(replay).rows, cached_.rows);

  // A lookup of a step already applied, and one whose gradients were applied.
  ApplyGradients();
  ExpectLookupRejected("gradients already applied", StatusCode::FAILED_PRECONDITION, "header",
                       MakeLookup(batch_, 0, 0, 0, true));
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h_->Step(step, &sresp));
  ExpectLookupRejected("step already applied", StatusCode::FAILED_PRECONDITION, "header.step",
                       MakeLookup(batch_, 0, 0, 0, true));
}

TEST_F(RpcMalformedTest, Gradients) {
  using grpc::StatusCode;
  const int64_t n = static_cast<int64_t>(cached_.rows.size());
  const v1::GradientsRequest good = GoodGradients();

  ExpectGradientsRejected("no prior lookup", StatusCode::FAILED_PRECONDITION, "header",
                          MakeGradients(grads_, kT, 0, 9, 0));
  ExpectGradientsRejected("no prior lookup, other layer", StatusCode::FAILED_PRECONDITION, "header",
                          MakeGradients(grads_, kT, 0, 0, 2));
  ExpectGradientsRejected("wrong step", StatusCode::FAILED_PRECONDITION, "header.step",
                          MakeGradients(grads_, kT, 1, 0, 0));
  ExpectGradientsRejected("unknown layer", StatusCode::NOT_FOUND, "header.layer",
                          MakeGradients(grads_, kT, 0, 0, 1));

  v1::GradientsRequest r = good;
  r.clear_key_grads();
  ExpectGradientsRejected("key_grads missing", StatusCode::INVALID_ARGUMENT, "key_grads", r);
  r = good;
  r.clear_value_grads();
  ExpectGradientsRejected("value_grads missing", StatusCode::INVALID_ARGUMENT, "value_grads", r);

  r = good;
  *r.mutable_key_grads() = Fp32(std::vector<float>((n + 1) * kDim, 0.1f), {n + 1, kDim});
  ExpectGradientsRejected("key_grads [|S| + 1, d]", StatusCode::INVALID_ARGUMENT, "key_grads.shape",
                          r);
  *r.mutable_key_grads() = Fp32(grads_.keys, {n * kDim});
  ExpectGradientsRejected("key_grads rank 1", StatusCode::INVALID_ARGUMENT, "key_grads.shape", r);
  *r.mutable_key_grads() = Fp32(grads_.keys, {kDim, n});
  if (n != kDim) {
    ExpectGradientsRejected("key_grads transposed", StatusCode::INVALID_ARGUMENT, "key_grads.shape",
                            r);
  }
  r = good;
  r.mutable_key_grads()->set_dtype(v1::DTYPE_INT32);
  ExpectGradientsRejected("key_grads int32", StatusCode::INVALID_ARGUMENT, "key_grads.dtype", r);

  r = good;
  *r.mutable_value_grads() = Bf16(grads_.values, {n, kDim});
  r.mutable_value_grads()->mutable_data()->resize(n * kDim * 2 - 2);
  ExpectGradientsRejected("value_grads bf16 short", StatusCode::INVALID_ARGUMENT,
                          "value_grads.data", r);
  *r.mutable_value_grads() = Bf16(grads_.values, {n, kDim});
  r.mutable_value_grads()->set_dtype(v1::DTYPE_FP32);  // bf16 bytes labelled fp32: half the size
  ExpectGradientsRejected("value_grads mislabelled", StatusCode::INVALID_ARGUMENT,
                          "value_grads.data", r);

  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Grads g = grads_;
    g.keys[g.keys.size() - 1] = bad;
    ExpectGradientsRejected("key_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "key_grads.data", MakeGradients(g, kT, 0, 0, 0));
    g = grads_;
    g.values[0] = bad;
    ExpectGradientsRejected("value_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "value_grads.data", MakeGradients(g, kT, 0, 0, 0));
    g = grads_;
    g.gates[0] = bad;  // token 0 is real: slot 0 is not empty
    ExpectGradientsRejected("gate_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "gate_grads.data", MakeGradients(g, kT, 0, 0, 0));
  }

  r = good;
  r.clear_gate_grads();
  ExpectGradientsRejected("gate_grads missing", StatusCode::INVALID_ARGUMENT, "gate_grads", r);
  r = good;
  *r.mutable_gate_grads() = Fp32(grads_.gates, {kT * kTopK});
  ExpectGradientsRejected("gate_grads rank 1", StatusCode::INVALID_ARGUMENT, "gate_grads.shape", r);
  *r.mutable_gate_grads() = Fp32(std::vector<float>(kT * (kTopK + 1), 0.0f), {kT, kTopK + 1});
  ExpectGradientsRejected("gate_grads [T, top_k + 1]", StatusCode::INVALID_ARGUMENT,
                          "gate_grads.shape", r);
  *r.mutable_gate_grads() = Bf16(grads_.gates, {kT, kTopK});
  ExpectGradientsRejected("gate_grads bf16", StatusCode::INVALID_ARGUMENT, "gate_grads.dtype", r);

  Grads g = grads_;
  ASSERT_EQ(cached_.token_rows[1 * kTopK + 2], -1) << "token 1 is padding: its slots are empty";
  g.gates[1 * kTopK + 2] = 0.25f;
  ExpectGradientsRejected("gate grad on an empty slot", StatusCode::INVALID_ARGUMENT,
                          "gate_grads.data", MakeGradients(g, kT, 0, 0, 0));

  // After all those failures the cache entry is intact: the correct request is applied.
  v1::GradientsResponse resp;
  ASSERT_RPC_OK(h_->Gradients(good, &resp));
  EXPECT_FALSE(resp.duplicate());
  EXPECT_EQ(resp.rows_accumulated(), static_cast<uint64_t>(n));
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h_->GradNorm(norm_req, &norm));
  const double expected = SumSquares(grads_.keys) + SumSquares(grads_.values) +
                          SumSquares(RouterGrad(cached_, batch_, grads_));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);
}

TEST_F(RpcMalformedTest, GradNorm) {
  using grpc::StatusCode;
  ApplyGradients();
  auto norm = [&](uint64_t step, std::vector<uint32_t> layers) {
    v1::GradNormRequest r;
    r.set_step(step);
    for (uint32_t l : layers) r.add_layers(l);
    return r;
  };
  auto expect = [&](const std::string& what, StatusCode code, const std::string& field,
                    const v1::GradNormRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::GradNormResponse resp;
      return h_->GradNorm(r, &resp);
    });
  };
  expect("wrong step", StatusCode::FAILED_PRECONDITION, "step", norm(1, {}));
  expect("wrong step, one layer", StatusCode::FAILED_PRECONDITION, "step", norm(3, {2}));
  expect("unknown layer", StatusCode::NOT_FOUND, "layers[0]", norm(0, {1}));
  expect("unknown second layer", StatusCode::NOT_FOUND, "layers[1]", norm(0, {0, 5}));
  expect("duplicate layer", StatusCode::INVALID_ARGUMENT, "layers[1]", norm(0, {2, 2}));

  v1::GradNormResponse resp;
  ASSERT_RPC_OK(h_->GradNorm(norm(0, {2, 0}), &resp));
  ASSERT_EQ(resp.layers_size(), 2);
  EXPECT_EQ(resp.layers(0), 2u) << "layers come back in the order asked";
  EXPECT_EQ(resp.layers(1), 0u);
  EXPECT_EQ(resp.layer_squared_norms(0), 0.0);
  EXPECT_GT(resp.layer_squared_norms(1), 0.0);
  EXPECT_EQ(resp.squared_norm(), resp.layer_squared_norms(1));
}

TEST_F(RpcMalformedTest, Step) {
  using grpc::StatusCode;
  ApplyGradients();
  v1::StepRequest good;
  good.set_step(0);
  good.set_lr(1e-3);
  good.set_clip_factor(1.0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();

  v1::StepRequest r = good;
  for (double lr : {nan, -1e-3, inf, -inf}) {
    r = good;
    r.set_lr(lr);
    ExpectStepRejected("lr " + std::to_string(lr), StatusCode::INVALID_ARGUMENT, "lr", r);
  }
  for (double clip : {0.0, 1.5, nan, -0.5, inf}) {
    r = good;
    r.set_clip_factor(clip);
    ExpectStepRejected("clip_factor " + std::to_string(clip), StatusCode::INVALID_ARGUMENT,
                       "clip_factor", r);
  }
  r = good;
  r.set_step(1);
  ExpectStepRejected("step ahead", StatusCode::FAILED_PRECONDITION, "step", r);
  r.set_step(7);
  ExpectStepRejected("step far ahead", StatusCode::FAILED_PRECONDITION, "step", r);
  r = good;
  r.add_layers(0);
  r.add_layers(0);
  ExpectStepRejected("duplicate layer", StatusCode::INVALID_ARGUMENT, "layers[1]", r);
  r = good;
  r.add_layers(2);
  r.add_layers(1);
  ExpectStepRejected("unknown layer", StatusCode::NOT_FOUND, "layers[1]", r);
  r = good;
  r.add_layers(3);
  ExpectStepRejected("unknown first layer", StatusCode::NOT_FOUND, "layers[0]", r);

  // The accumulated gradients survived: the real Step updates every row of the lookup.
  v1::StepResponse resp;
  ASSERT_RPC_OK(h_->Step(good, &resp));
  EXPECT_FALSE(resp.already_applied());
  EXPECT_EQ(resp.rows_updated(), cached_.rows.size());
  EXPECT_EQ(resp.server_step(), 1u);
  r = good;
  r.set_step(2);
  ExpectStepRejected("step ahead after one step", StatusCode::FAILED_PRECONDITION, "step", r);
}

// Step(2^64 - 1) on a server at step 0: `call.step + 1` wraps to 0 in ParamServer::Step, which
// then takes the request for a replay of an applied step.
TEST_F(RpcMalformedTest, StepWithMaximalStepIsRejected) {
  v1::StepRequest r;
  r.set_step(std::numeric_limits<uint64_t>::max());
  r.set_lr(1e-3);
  r.set_clip_factor(1.0);
  ExpectStepRejected("step 2^64 - 1", grpc::StatusCode::FAILED_PRECONDITION, "step", r);
}

TEST_F(RpcMalformedTest, Checkpoints) {
  using grpc::StatusCode;
  ExpectRejected("save with no directory", StatusCode::INVALID_ARGUMENT, "directory", [&] {
    v1::SaveCheckpointResponse resp;
    return h_->Save(v1::SaveCheckpointRequest(), &resp);
  });
  ExpectRejected("restore with no path", StatusCode::INVALID_ARGUMENT, "path", [&] {
    v1::RestoreCheckpointResponse resp;
    return h_->Restore(v1::RestoreCheckpointRequest(), &resp);
  });
  {
    SCOPED_TRACE("restore of a nonexistent path");
    const uint64_t before = h_->Digest();
    v1::RestoreCheckpointRequest req;
    req.set_path("/nonexistent/meft/checkpoint-3");
    v1::RestoreCheckpointResponse resp;
    const grpc::Status s = h_->Restore(req, &resp);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.error_code(), grpc::StatusCode::INTERNAL) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("/nonexistent/meft/checkpoint-3"));
    EXPECT_EQ(h_->Digest(), before);
  }

  // Checkpoints of servers shaped differently: rows, then dim, then layers.
  TempDir tmp;
  {
    SCOPED_TRACE("save while a Step is half applied");
    v1::StepRequest step;
    step.set_step(0);
    step.set_lr(1e-3);
    step.set_clip_factor(1.0);
    step.add_layers(2);
    v1::StepResponse sresp;
    ASSERT_RPC_OK(h_->Step(step, &sresp));
    const uint64_t before = h_->Digest();
    v1::SaveCheckpointRequest req;
    req.set_directory(tmp.path() + "/half");
    v1::SaveCheckpointResponse resp;
    const grpc::Status s = h_->Save(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    EXPECT_EQ(h_->Digest(), before);
    EXPECT_FALSE(std::filesystem::exists(tmp.path() + "/half/checkpoint-0"));
    EXPECT_FALSE(std::filesystem::exists(tmp.path() + "/half/checkpoint-1"));
  }
  auto write_other = [&](const std::string& name, auto edit) {
    server::ServerOptions o = SmallOptions();
    edit(&o);
    metrics::Registry registry;
    auto other = server::ParamServer::Create(o, &registry);
    if (!other.ok()) {
      ADD_FAILURE() << other.status();
      return std::string("/missing");
    }
    auto saved = (*other)->SaveCheckpoint(tmp.path() + "/" + name);
    EXPECT_TRUE(saved.ok()) << saved.status();
    return saved.ok() ? saved->path : std::string("/missing");
  };
  const std::string more_rows =
      write_other("rows", [](server::ServerOptions* o) { o->rows = 512; });
  const std::string other_dim = write_other("dim", [](server::ServerOptions* o) { o->dim = 8; });
  const std::string other_layers = write_other("layers", [](server::ServerOptions* o) {
    o->layers = {0, 1};
  });
  for (const auto& [path, field] : {std::pair<std::string, std::string>{more_rows, "\"rows\""},
                                    {other_dim, "\"dim\""},
                                    {other_layers, "\"layers\""}}) {
    SCOPED_TRACE(path);
    const uint64_t before = h_->Digest();
    v1::RestoreCheckpointRequest req;
    req.set_path(path);
    v1::RestoreCheckpointResponse resp;
    const grpc::Status s = h_->Restore(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field));
    EXPECT_EQ(h_->Digest(), before);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Oversize messages.

TEST(RpcOversizeTest, LargeLookupIsRejectedByTheTransport) {
  auto h = StartHarness(SmallOptions(), /*max_message_bytes=*/64 << 10);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(5);
  const Batch big = RandomBatch(&rng, (100 << 10) / (4 * kDim));  // 100 KiB of x
  const v1::LookupRequest r = MakeLookup(big, 0, 0, 0, true);
  ASSERT_GT(r.ByteSizeLong(), 100u << 10);
  const uint64_t before = h->Digest();
  v1::LookupResponse resp;
  const grpc::Status s = h->Lookup(r, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(h->Digest(), before);

  // The server still answers a request within the limit.
  const Batch small = RandomBatch(&rng, 4);
  ASSERT_RPC_OK(h->Lookup(MakeLookup(small, 0, 0, 0, true), &resp));
  EXPECT_GT(resp.row_ids().data().size(), 0u);
}

// A small request whose answer would be larger than max_message_bytes: the server refuses it
// with RESOURCE_EXHAUSTED before caching or counting anything (DESIGN §7: a failed request
// changes no state).
TEST(RpcOversizeTest, LookupWhoseAnswerIsTooLargeChangesNoState) {
  server::ServerOptions o;
  o.layers = {0};
  o.rows = 1024;
  o.dim = 64;
  o.experts = 16;
  o.selector.n_probe = 4;
  o.selector.top_k = 64;
  auto h = StartHarness(o, /*max_message_bytes=*/64 << 10);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(6);
  constexpr int64_t T = 16;
  v1::LookupRequest r;
  r.mutable_header()->set_step(0);
  r.set_training(true);
  r.set_row_dtype(v1::DTYPE_FP32);
  *r.mutable_x() = Fp32(RandomNormal(&rng, T * 64), {T, 64});
  ASSERT_LT(r.ByteSizeLong(), 8u << 10);  // the request is small
  const uint64_t before = h->Digest();
  v1::LookupResponse resp;
  const grpc::Status s = h->Lookup(r, &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(h->Digest(), before) << "the failed lookup left a cache entry behind";
}

// Which addresses are loopback: tests/common/address_test.cc.
TEST(RpcStartTest, NonLoopbackListenerNeedsInsecure) {
  metrics::Registry registry;
  auto server = server::ParamServer::Create(SmallOptions(), &registry);
  ASSERT_TRUE(server.ok()) << server.status();
  auto running = rpc::StartServer({.listen = "0.0.0.0:0"}, server->get(), &registry);
  ASSERT_FALSE(running.ok());
  EXPECT_EQ(running.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(running.status().message()), HasSubstr("listen:"));
}

}  // namespace
}  // namespace meft::rpc_test
