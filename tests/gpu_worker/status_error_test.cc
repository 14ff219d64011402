// Errors keep their code through the decoder's hooks (gpu_worker/model/status_error.h): the
// mapping of exceptions to a Status, a StatusError thrown inside autograd's backward arriving as
// itself, and the trainer reporting a failed server call with the call's code and whatever a step
// throws (std::bad_alloc included) as a Status.

#include "gpu_worker/model/status_error.h"

#include <torch/torch.h>

#include <new>
#include <stdexcept>

#include "gmock/gmock.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/client/forwarding_param_client.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/random_weights.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/trainer.h"
#include "gtest/gtest.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

template <typename Fn>
absl::Status Caught(Fn fn) {
  try {
    fn();
  } catch (...) {
    return StatusFromCurrentException("ctx");
  }
  return absl::OkStatus();
}

TEST(StatusFromCurrentExceptionTest, KeepsAStatusErrorsCode) {
  const absl::Status s = Caught([] { ThrowIfError(absl::UnavailableError("server gone")); });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "ctx: server gone");
}

TEST(StatusFromCurrentExceptionTest, OutOfMemoryIsResourceExhausted) {
  EXPECT_EQ(Caught([] { throw std::bad_alloc(); }).code(), absl::StatusCode::kResourceExhausted);
}

TEST(StatusFromCurrentExceptionTest, OtherExceptionsAreInternalWithTheirMessage) {
  const absl::Status torch_error = Caught([] { TORCH_CHECK(false, "shape mismatch"); });
  EXPECT_EQ(torch_error.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(torch_error.message(), HasSubstr("ctx: shape mismatch"));
  const absl::Status plain = Caught([] { throw std::runtime_error("boom"); });
  EXPECT_EQ(plain.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(plain.message(), "ctx: boom");
  EXPECT_EQ(Caught([] { throw 7; }).code(), absl::StatusCode::kInternal);
}

TEST(StatusErrorTest, IsACTenErrorWithTheStatusMessage) {
  try {
    ThrowIfError(absl::DeadlineExceededError("too slow"));
    FAIL() << "expected a throw";
  } catch (const c10::Error& e) {
    EXPECT_STREQ(e.what_without_backtrace(), "too slow");
  }
  EXPECT_NO_THROW(ThrowIfError(absl::OkStatus()));
}

// A node whose backward fails like a gradient send to a lost server.
struct FailingBackward : torch::autograd::Function<FailingBackward> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) {
    return x * 2;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    ThrowIfError(absl::UnavailableError("gradients: connection refused"));
    return {};
  }
};

TEST(StatusErrorTest, SurvivesAutogradsBackward) {
  const torch::Tensor x = torch::randn({3}, torch::requires_grad());
  const torch::Tensor y = FailingBackward::apply(x).sum();
  try {
    y.backward();
    FAIL() << "expected a throw";
  } catch (const StatusError& e) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(e.status().message(), HasSubstr("connection refused"));
  }
}

// --- the trainer's boundary

constexpr int64_t kDim = 32;

std::unique_ptr<LlamaModel> RandomModel() {
  ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = kDim;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 128;
  auto model =
      LlamaModel::FromWeights(c, RandomLlamaWeights(c, 3, 0.2), torch::kCPU, torch::kFloat32);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

std::unique_ptr<DataLoader> Loader() {
  std::vector<TokenizedExample> examples;
  for (int64_t i = 0; i < 4; ++i) {
    TokenizedExample e;
    e.input_ids = {1, 5 + i, 20 + i, 2};
    e.labels = {kIgnoreIndex, kIgnoreIndex, 20 + i, 2};
    e.prompt_length = 2;
    examples.push_back(e);
  }
  auto loader = DataLoader::Create(examples, 0, {.micro_batch_size = 2, .seed = 1});
  EXPECT_TRUE(loader.ok()) << loader.status();
  return loader.ok() ? *std::move(loader) : nullptr;
}

// Refuses every gradient send as a lost server would.
class UnreachableForGradients : public ForwardingParamClient {
 public:
  using ForwardingParamClient::ForwardingParamClient;
  absl::Status Gradients(const RequestHeader&, const torch::Tensor&, const torch::Tensor&,
                         const torch::Tensor&) override {
    return absl::UnavailableError("injected: connection refused");
  }
};

class TrainerErrorCodeTest : public ::testing::TestWithParam<bool> {};

TEST_P(TrainerErrorCodeTest, AFailedServerCallKeepsItsCode) {
  server::ServerOptions o;
  o.layers = {0, 1};
  o.rows = 64;
  o.dim = kDim;
  o.selector.top_k = 4;
  o.selector.n_probe = 2;
  auto domain = *server::ParamServer::Create(o, nullptr);
  auto running = *rpc::StartServer({.listen = "127.0.0.1:0"}, domain.get(), nullptr);
  GrpcClientOptions co;
  co.address = "127.0.0.1:" + std::to_string(running->port());
  auto grpc_client = *CreateGrpcParamClient(co);
  UnreachableForGradients client(grpc_client.get());
  auto model = RandomModel();
  auto loader = Loader();
  MeftAdapter adapter(&client, *client.Describe(), {.overlap = GetParam()});
  TrainTarget target{.adapter = "meft", .hooks = &adapter, .meft = &adapter, .server = &client};
  auto trainer = *Trainer::Create(model.get(), target, loader.get(),
                                  {.max_steps = 2, .warmup_ratio = 0.0, .progress = false});
  const auto r = trainer->Run();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("injected: connection refused"));
  EXPECT_EQ(domain->Info().step, 0u) << "no step was applied";
}

INSTANTIATE_TEST_SUITE_P(Overlap, TrainerErrorCodeTest, ::testing::Bool());

// Runs the parallel adapter, and runs out of host memory in layer 1's hook on the second call.
class OutOfMemoryHooks : public AdapterHooks {
 public:
  explicit OutOfMemoryHooks(AdapterHooks* inner) : inner_(inner) {}
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& x, const torch::Tensor& mask) override {
    if (layer == 1 && ++calls_ == 2) throw std::bad_alloc();
    return inner_->FfnDelta(layer, x, mask);
  }

 private:
  AdapterHooks* inner_;
  int calls_ = 0;
};

TEST(TrainerErrorCodeTest, AnyExceptionInAStepBecomesAStatus) {
  auto model = RandomModel();
  auto loader = Loader();
  auto parallel = *ParallelAdapter::Create({.rows = 8, .layers = {0, 1}, .seed = 4}, kDim,
                                           torch::kCPU);
  OutOfMemoryHooks hooks(parallel.get());
  TrainTarget target{.adapter = "parallel", .hooks = &hooks, .local = parallel->named_parameters()};
  auto trainer = *Trainer::Create(model.get(), target, loader.get(),
                                  {.max_steps = 3, .warmup_ratio = 0.0, .progress = false});
  const auto r = trainer->Run();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("step 1"));
}

}  // namespace
}  // namespace meft::worker
