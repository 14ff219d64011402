// The MEFT adapter's output and gradients equal the obvious dense computation restricted to the
// same rows, in both modes, gated and ungated, against a real parameter server on port 0.

#include "gpu_worker/adapters/meft_adapter.h"

#include <torch/torch.h>

#include <mutex>

#include "gmock/gmock.h"
#include "gpu_worker/client/forwarding_param_client.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gtest/gtest.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

// Forwards to a real client and records what crosses the wire. Calls may come from the adapter's
// background threads (overlap); read the records after FinishBackward.
class RecordingClient : public ForwardingParamClient {
 public:
  using ForwardingParamClient::ForwardingParamClient;
  struct Sent {
    RequestHeader header;
    torch::Tensor key_grads, value_grads, gate_grads;
  };
  absl::StatusOr<LookupReply> Lookup(const RequestHeader& h, const torch::Tensor& x,
                                      const torch::Tensor& mask, bool training) override {
    auto r = inner()->Lookup(h, x, mask, training);
    std::lock_guard lock(mu_);
    queries.push_back(x.detach().clone());
    if (r.ok()) lookups.push_back(*r);
    return r;
  }
  absl::Status Gradients(const RequestHeader& h, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& g) override {
    {
      std::lock_guard lock(mu_);
      sent.push_back(
          {h, k.detach().clone(), v.detach().clone(), g.defined() ? g.detach().clone() : g});
    }
    return inner()->Gradients(h, k, v, g);
  }

  std::vector<torch::Tensor> queries;
  std::vector<LookupReply> lookups;
  std::vector<Sent> sent;

 private:
  std::mutex mu_;  // guards the records
};

struct Setup : testing::InProcessServer {
  std::unique_ptr<ParamClient> grpc_client;
  std::unique_ptr<RecordingClient> client;
  ServerInfo description;
};

std::unique_ptr<Setup> Start(server::Mode mode, bool gated, std::vector<uint32_t> layers = {0}) {
  auto s = std::make_unique<Setup>();
  server::ServerOptions o = testing::SmallServerOptions();  // 64 rows, d = 8, 8 experts
  o.layers = layers;
  o.selector.gated = gated;
  o.mode = mode;
  // Non-zero values so outputs and dx are not trivially zero at step 0.
  o.init.router_init = store::RouterInit::kNormal;
  o.init.init_std = 0.5f;
  const absl::Status started = s->Start(o);
  EXPECT_TRUE(started.ok()) << started;
  GrpcClientOptions co;
  co.address = s->address();
  co.bf16_rows = false;  // exact rows, so the reference sees what the adapter saw
  s->grpc_client = *CreateGrpcParamClient(co);
  s->client = std::make_unique<RecordingClient>(s->grpc_client.get());
  s->description = *s->client->Describe();
  return s;
}

// The server starts with V = 0; give it values by one training step with a known gradient so
// outputs are non-zero.
void MakeValuesNonZero(Setup* s, std::vector<uint32_t> layers, bool gated, bool per_token) {
  torch::manual_seed(11);
  const torch::Tensor x = torch::randn({6, 8});
  for (uint32_t layer : layers) {
    auto r = s->grpc_client->Lookup({0, 99, layer}, x, {}, true);
    ASSERT_TRUE(r.ok()) << r.status();
    const int64_t n = r->row_ids.size(0);
    torch::Tensor gate;
    if (gated && per_token) gate = torch::zeros({6, 5});
    ASSERT_TRUE(
        s->grpc_client->Gradients({0, 99, layer}, torch::randn({n, 8}), torch::randn({n, 8}), gate)
            .ok());
  }
  ASSERT_TRUE(s->grpc_client->Step(0, 0.3, 1.0).ok());
}

struct Case {
  server::Mode mode;
  bool gated;
  bool refetch;
};

class MeftAdapterTest : public ::testing::TestWithParam<Case> {};

TEST_P(MeftAdapterTest, OutputAndGradientsEqualDenseComputationOnTheSameRows) {
  const Case c = GetParam();
  const bool per_token = c.mode == server::Mode::kPerToken;
  auto s = Start(c.mode, c.gated);
  MakeValuesNonZero(s.get(), {0}, c.gated, per_token);
  MeftAdapter adapter(s->client.get(), s->description,
                      {.prefetch_layers = 0, .refetch_in_backward = c.refetch});

  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({2, 4, 8}, torch::requires_grad());
  const torch::Tensor mask = torch::tensor({{1, 1, 1, 0}, {1, 1, 0, 0}});
  const torch::Tensor w = torch::randn({2, 4, 8});
  adapter.BeginMicroBatch(1, 0, /*training=*/true);
  const torch::Tensor y = adapter.FfnDelta(0, x, mask);
  ASSERT_TRUE(y.defined());
  (y * w).sum().backward();
  ASSERT_TRUE(adapter.FinishBackward().ok());

  ASSERT_EQ(s->client->lookups.size(), c.refetch ? 2u : 1u);
  if (c.refetch) {
    EXPECT_TRUE(s->client->lookups[1].replayed);
  }
  const LookupReply& r = s->client->lookups[0];
  ASSERT_EQ(s->client->sent.size(), 1u);
  const auto& sent = s->client->sent[0];

  // Reference with plain autograd on the same rows.
  const torch::Tensor xr = x.detach().reshape({8, 8}).clone().requires_grad_();
  const torch::Tensor keys = r.keys.clone().requires_grad_();
  const torch::Tensor values = r.values.clone().requires_grad_();
  const torch::Tensor router =
      r.router_rows.defined() ? r.router_rows.clone().requires_grad_() : torch::Tensor();
  const torch::Tensor yr = MeftOutputReference(r, xr, xr, mask.reshape({8}).ne(0), per_token,
                                               c.gated, keys, values, router);
  (yr * w.reshape({8, 8})).sum().backward();

  EXPECT_GT(y.abs().sum().item<float>(), 0.0f);
  EXPECT_TRUE(torch::allclose(y.reshape({8, 8}), yr, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(x.grad().reshape({8, 8}), xr.grad(), 1e-5, 1e-5))
      << x.grad().reshape({8, 8}) << xr.grad();
  EXPECT_TRUE(torch::allclose(sent.key_grads, keys.grad(), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(sent.value_grads, values.grad(), 1e-5, 1e-5));
  EXPECT_EQ(sent.header.step, 1u);
  double want_norm =
      keys.grad().pow(2).sum().item<double>() + values.grad().pow(2).sum().item<double>();
  if (per_token && c.gated) {
    // The server forms dG_e = sum over slots of gate_grads[t, j] x_t for the slot's expert: do
    // the same from what was sent and compare with autograd's gradient of the router rows.
    ASSERT_TRUE(sent.gate_grads.defined());
    torch::Tensor dg = torch::zeros_like(router);
    for (int64_t t = 0; t < 8; ++t) {
      for (int64_t j = 0; j < 5; ++j) {
        const int64_t e = r.token_experts[t][j].item<int64_t>();
        if (e >= 0) dg[e] += sent.gate_grads[t][j] * xr.detach()[t];
      }
    }
    EXPECT_TRUE(torch::allclose(dg, router.grad(), 1e-5, 1e-5));
    want_norm += router.grad().pow(2).sum().item<double>();
  } else {
    EXPECT_FALSE(sent.gate_grads.defined());
  }
  // End to end: the server's accumulated gradients have the reference's norm.
  auto norm = s->client->GradNorm(1);
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_NEAR(*norm, want_norm, 1e-4 * want_norm);
}

INSTANTIATE_TEST_SUITE_P(Modes, MeftAdapterTest,
                         ::testing::Values(Case{server::Mode::kPerToken, true, false},
                                           Case{server::Mode::kPerToken, false, false},
                                           Case{server::Mode::kUnion, false, false},
                                           Case{server::Mode::kUnion, true, false},
                                           Case{server::Mode::kPerToken, true, true}),
                         [](const auto& info) {
                           return std::string(info.param.mode == server::Mode::kPerToken
                                                  ? "PerToken"
                                                  : "Union") +
                                  (info.param.gated ? "Gated" : "Ungated") +
                                  (info.param.refetch ? "Refetch" : "");
                         });

TEST(MeftAdapterPrefetchTest, QueryIsAnEarlierLayersInputAndItsGradientFlows) {
  auto s = Start(server::Mode::kPerToken, /*gated=*/true, {0, 1});
  MakeValuesNonZero(s.get(), {0, 1}, true, true);
  MeftAdapter adapter(s->client.get(), s->description,
                      {.prefetch_layers = 1, .refetch_in_backward = false});
  torch::manual_seed(8);
  const torch::Tensor x0 = torch::randn({1, 3, 8}, torch::requires_grad());
  const torch::Tensor m = torch::randn({8, 8});
  const torch::Tensor x1 = torch::tanh(x0.matmul(m));
  adapter.BeginMicroBatch(1, 0, true);
  const torch::Tensor y0 = adapter.FfnDelta(0, x0, {});
  const torch::Tensor y1 = adapter.FfnDelta(1, x1, {});
  (y0.sum() + (y1 * y1).sum()).backward();
  ASSERT_TRUE(adapter.FinishBackward().ok());
  ASSERT_EQ(s->client->queries.size(), 2u);
  EXPECT_TRUE(torch::equal(s->client->queries[1], x0.detach().reshape({3, 8})))
      << "layer 1 must be looked up with layer 0's input";

  const torch::Tensor x0r = x0.detach().reshape({3, 8}).clone().requires_grad_();
  const torch::Tensor x1r = torch::tanh(x0r.matmul(m));
  const torch::Tensor all = torch::ones({3}, torch::kBool);
  const LookupReply& r0 = s->client->lookups[0];
  const LookupReply& r1 = s->client->lookups[1];
  const torch::Tensor y0r =
      MeftOutputReference(r0, x0r, x0r, all, true, true, r0.keys, r0.values, r0.router_rows);
  const torch::Tensor y1r =
      MeftOutputReference(r1, x1r, x0r, all, true, true, r1.keys, r1.values, r1.router_rows);
  (y0r.sum() + (y1r * y1r).sum()).backward();
  EXPECT_TRUE(torch::allclose(x0.grad().reshape({3, 8}), x0r.grad(), 1e-5, 1e-5));
}

TEST(MeftAdapterEvalTest, EvaluationMatchesTrainingForwardAndSendsNothing) {
  auto s = Start(server::Mode::kPerToken, true);
  MakeValuesNonZero(s.get(), {0}, true, true);
  MeftAdapter adapter(s->client.get(), s->description, {});
  torch::manual_seed(2);
  const torch::Tensor x = torch::randn({1, 5, 8});
  adapter.BeginMicroBatch(1, 0, /*training=*/false);
  const torch::Tensor y_eval = adapter.FfnDelta(0, x, {});
  EXPECT_FALSE(y_eval.requires_grad());
  EXPECT_TRUE(s->client->sent.empty());
  EXPECT_EQ(*s->client->GradNorm(1), 0.0);
  adapter.BeginMicroBatch(1, 0, /*training=*/true);
  const torch::Tensor y_train = adapter.FfnDelta(0, x, {});
  EXPECT_TRUE(torch::allclose(y_eval, y_train.detach(), 1e-6, 1e-6));
  // A layer the server does not own gets no adapter.
  EXPECT_FALSE(adapter.FfnDelta(3, x, {}).defined());
}

TEST(MeftAdapterErrorTest, ServerErrorsSurfaceWithTheServersMessage) {
  auto s = Start(server::Mode::kPerToken, true);
  MeftAdapter adapter(s->client.get(), s->description, {});
  adapter.BeginMicroBatch(0, 0, true);
  try {
    adapter.FfnDelta(0, torch::randn({1, 2, 7}), {});  // d = 7, server has 8
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("x.shape"));
  }
}

}  // namespace
}  // namespace meft::worker
