// ForwardingParamClient hands every ParamClient method, the defaulted LayerGradNorms and
// RestartStep included, to its inner client with the same arguments and returns the inner
// client's answer unchanged.

#include "gpu_worker/client/forwarding_param_client.h"

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace meft::worker {
namespace {

// Records each call (its name and arguments) and answers with values no default implementation
// would give: RestartStep's 77 differs from Describe's step, LayerGradNorms is not UNIMPLEMENTED.
class RecordingFake : public ParamClient {
 public:
  absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override {
    calls.push_back("Lookup");
    header_ = header;
    x_ = x;
    mask_ = token_mask;
    training_ = training;
    LookupReply r;
    r.row_ids = torch::tensor({int64_t{4}, int64_t{9}});
    r.replayed = true;
    return r;
  }
  absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override {
    calls.push_back("Gradients");
    header_ = header;
    key_grads_ = key_grads;
    value_grads_ = value_grads;
    gate_grads_ = gate_grads;
    return absl::DataLossError("gradients answer");
  }
  absl::StatusOr<double> GradNorm(uint64_t step) override {
    calls.push_back("GradNorm");
    step_ = step;
    return 2.5;
  }
  absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) override {
    calls.push_back("LayerGradNorms");
    step_ = step;
    return std::vector<std::pair<uint32_t, double>>{{1, 0.5}, {3, 1.5}};
  }
  absl::Status Step(uint64_t step, double lr, double clip_factor) override {
    calls.push_back("Step");
    step_ = step;
    lr_ = lr;
    clip_ = clip_factor;
    return absl::AbortedError("step answer");
  }
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) override {
    calls.push_back("SaveCheckpoint");
    path_ = directory;
    return directory + "/checkpoint-5";
  }
  absl::Status RestoreCheckpoint(const std::string& path) override {
    calls.push_back("RestoreCheckpoint");
    path_ = path;
    return absl::NotFoundError("restore answer");
  }
  absl::StatusOr<ServerInfo> Describe() override {
    calls.push_back("Describe");
    ServerInfo d;
    d.layers = {1, 3};
    d.rows = 64;
    d.step = 12;
    return d;
  }
  absl::StatusOr<uint64_t> RestartStep() override {
    calls.push_back("RestartStep");
    return uint64_t{77};
  }

  std::vector<std::string> calls;
  RequestHeader header_;
  torch::Tensor x_, mask_, key_grads_, value_grads_, gate_grads_;
  bool training_ = false;
  uint64_t step_ = 0;
  double lr_ = 0, clip_ = 0;
  std::string path_;
};

using Calls = std::vector<std::string>;

TEST(ForwardingParamClientTest, ExposesItsInnerClient) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  EXPECT_EQ(client.inner(), &fake);
}

TEST(ForwardingParamClientTest, LookupForwardsArgumentsAndAnswer) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  const torch::Tensor x = torch::randn({3, 4});
  const torch::Tensor mask = torch::tensor({1, 1, 0});
  absl::StatusOr<LookupReply> r =
      client.Lookup({.step = 6, .micro_step = 2, .layer = 3}, x, mask, /*training=*/true);
  EXPECT_EQ(fake.calls, Calls{"Lookup"});
  EXPECT_EQ(fake.header_.step, 6u);
  EXPECT_EQ(fake.header_.micro_step, 2u);
  EXPECT_EQ(fake.header_.layer, 3u);
  EXPECT_TRUE(fake.x_.is_same(x));
  EXPECT_TRUE(fake.mask_.is_same(mask));
  EXPECT_TRUE(fake.training_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(torch::equal(r->row_ids, torch::tensor({int64_t{4}, int64_t{9}})));
  EXPECT_TRUE(r->replayed);
}

TEST(ForwardingParamClientTest, GradientsForwardsArgumentsAndStatus) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  const torch::Tensor k = torch::randn({2, 4}), v = torch::randn({2, 4});
  const absl::Status s = client.Gradients({.step = 1, .micro_step = 0, .layer = 2}, k, v, {});
  EXPECT_EQ(fake.calls, Calls{"Gradients"});
  EXPECT_EQ(fake.header_.step, 1u);
  EXPECT_EQ(fake.header_.layer, 2u);
  EXPECT_TRUE(fake.key_grads_.is_same(k));
  EXPECT_TRUE(fake.value_grads_.is_same(v));
  EXPECT_FALSE(fake.gate_grads_.defined());
  EXPECT_EQ(s, absl::DataLossError("gradients answer"));
}

TEST(ForwardingParamClientTest, GradNormForwards) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  absl::StatusOr<double> n = client.GradNorm(41);
  EXPECT_EQ(fake.calls, Calls{"GradNorm"});
  EXPECT_EQ(fake.step_, 41u);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 2.5);
}

// ParamClient's default answers UNIMPLEMENTED without asking anyone.
TEST(ForwardingParamClientTest, LayerGradNormsForwards) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  auto n = client.LayerGradNorms(42);
  EXPECT_EQ(fake.calls, Calls{"LayerGradNorms"});
  EXPECT_EQ(fake.step_, 42u);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, (std::vector<std::pair<uint32_t, double>>{{1, 0.5}, {3, 1.5}}));
}

TEST(ForwardingParamClientTest, StepForwardsArgumentsAndStatus) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  const absl::Status s = client.Step(8, 1e-3, 0.25);
  EXPECT_EQ(fake.calls, Calls{"Step"});
  EXPECT_EQ(fake.step_, 8u);
  EXPECT_EQ(fake.lr_, 1e-3);
  EXPECT_EQ(fake.clip_, 0.25);
  EXPECT_EQ(s, absl::AbortedError("step answer"));
}

TEST(ForwardingParamClientTest, CheckpointsForward) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  absl::StatusOr<std::string> saved = client.SaveCheckpoint("/ckpt");
  EXPECT_EQ(fake.path_, "/ckpt");
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(*saved, "/ckpt/checkpoint-5");
  const absl::Status restored = client.RestoreCheckpoint("/ckpt/checkpoint-3");
  EXPECT_EQ(fake.path_, "/ckpt/checkpoint-3");
  EXPECT_EQ(restored, absl::NotFoundError("restore answer"));
  EXPECT_EQ(fake.calls, (Calls{"SaveCheckpoint", "RestoreCheckpoint"}));
}

TEST(ForwardingParamClientTest, DescribeForwards) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  absl::StatusOr<ServerInfo> d = client.Describe();
  EXPECT_EQ(fake.calls, Calls{"Describe"});
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->layers, (std::vector<uint32_t>{1, 3}));
  EXPECT_EQ(d->rows, 64);
  EXPECT_EQ(d->step, 12u);
}

// ParamClient's default would call Describe and answer its step (12).
TEST(ForwardingParamClientTest, RestartStepForwards) {
  RecordingFake fake;
  ForwardingParamClient client(&fake);
  absl::StatusOr<uint64_t> step = client.RestartStep();
  EXPECT_EQ(fake.calls, Calls{"RestartStep"});
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 77u);
}

}  // namespace
}  // namespace meft::worker
