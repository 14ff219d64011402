// Overlap of the worker's compute with the server (MeftAdapterOptions::overlap): training is
// bit-identical with and without it (for prefetch 0, 1 and 2), the lookups really run while the
// decoder computes (proved with rendezvous latches that deadlock, up to a bound, when the lookup
// is synchronous), and errors from background calls surface with the server's message. A real
// parameter server on port 0 answers.

#include <torch/torch.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "gmock/gmock.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/client/forwarding_param_client.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/random_weights.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/trainer.h"
#include "gtest/gtest.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kDim = 32;

std::unique_ptr<LlamaModel> RandomModel(int64_t layers) {
  ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = kDim;
  c.intermediate_size = 64;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 128;
  // Larger than HF's 0.02 so that the layers' FFN inputs differ visibly.
  auto model =
      LlamaModel::FromWeights(c, RandomLlamaWeights(c, 17, 0.2), torch::kCPU, torch::kFloat32);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

// A real server behind gRPC on port 0 and a client.
struct Server : testing::InProcessServer {
  std::unique_ptr<ParamClient> client;
};

std::unique_ptr<Server> StartServer(std::vector<uint32_t> layers, double step_wait_seconds = 30) {
  auto s = std::make_unique<Server>();
  server::ServerOptions o;
  o.layers = std::move(layers);
  o.rows = 256;
  o.dim = kDim;
  o.selector.top_k = 8;
  o.selector.n_probe = 4;
  o.init.seed = 5;
  o.step_wait_seconds = step_wait_seconds;
  const absl::Status started = s->Start(o);
  EXPECT_TRUE(started.ok()) << started;
  GrpcClientOptions co;
  co.address = s->address();
  s->client = *CreateGrpcParamClient(co);
  return s;
}

std::vector<TokenizedExample> Examples(int64_t n) {
  std::vector<TokenizedExample> out;
  for (int64_t i = 0; i < n; ++i) {
    TokenizedExample e;
    e.input_ids = {1, 5 + i % 9, 20 + i % 7, 30 + (i * 5) % 30, 2};
    if (i % 2 == 0) e.input_ids.insert(e.input_ids.begin() + 1, 11 + i % 3);  // ragged: padding
    e.labels.assign(e.input_ids.size(), kIgnoreIndex);
    e.labels[e.labels.size() - 2] = e.input_ids[e.input_ids.size() - 2];
    e.labels.back() = 2;
    e.prompt_length = static_cast<int64_t>(e.input_ids.size()) - 2;
    out.push_back(e);
  }
  return out;
}

// Fails Step(fail_step) without asking the server.
class StepFailingClient : public ForwardingParamClient {
 public:
  using ForwardingParamClient::ForwardingParamClient;
  absl::Status Step(uint64_t step, double lr, double clip) override {
    if (static_cast<int64_t>(step) == fail_step) {
      return absl::UnavailableError("injected: the server lost its optimizer state");
    }
    return inner()->Step(step, lr, clip);
  }

  int64_t fail_step = -1;
};

struct TrainResult {
  std::vector<StepStats> history;
  uint64_t digest = 0;
  MeftTimings timings;
};

TrainResult Train(const MeftAdapterOptions& options, int64_t steps, int64_t grad_accum) {
  TrainResult out;
  auto model = RandomModel(4);
  auto server = StartServer({0, 1, 3});  // layer 2 has no adapter
  auto loader = *DataLoader::Create(Examples(10), 0, {.micro_batch_size = 3, .seed = 4});
  MeftAdapter adapter(server->client.get(), *server->client->Describe(), options);
  TrainTarget target{
      .adapter = "meft", .hooks = &adapter, .meft = &adapter, .server = server->client.get()};
  auto trainer = Trainer::Create(model.get(), target, loader.get(),
                                 {.max_steps = steps,
                                  .grad_accum = grad_accum,
                                  .lr = 5e-2,
                                  .warmup_ratio = 0.0,
                                  .progress = false});
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  auto history = (*trainer)->Run();
  EXPECT_TRUE(history.ok()) << history.status();
  if (history.ok()) out.history = *history;
  out.timings = adapter.TakeTimings();
  out.digest = server->domain->StateDigest();
  return out;
}

class OverlapTrainingTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(OverlapTrainingTest, BitIdenticalWithAndWithoutOverlap) {
  const int64_t prefetch = GetParam();
  const int64_t steps = 4, accum = 2;
  const TrainResult sync = Train({.prefetch_layers = prefetch, .overlap = false}, steps, accum);
  const TrainResult overlap = Train({.prefetch_layers = prefetch, .overlap = true}, steps, accum);
  ASSERT_EQ(sync.history.size(), static_cast<size_t>(steps));
  ASSERT_EQ(overlap.history.size(), static_cast<size_t>(steps));
  for (int64_t i = 0; i < steps; ++i) {
    EXPECT_EQ(sync.history[i].loss, overlap.history[i].loss) << "step " << i;
    EXPECT_EQ(sync.history[i].grad_norm, overlap.history[i].grad_norm) << "step " << i;
  }
  EXPECT_GT(sync.history.back().grad_norm, 0.0);
  EXPECT_NE(sync.history.front().loss, sync.history.back().loss) << "training changed nothing";
  EXPECT_EQ(sync.digest, overlap.digest) << "final server state differs";
  // 3 adapter layers per micro-batch.
  for (const MeftTimings* t : {&sync.timings, &overlap.timings}) {
    EXPECT_EQ(t->lookups, steps * accum * 3);
    EXPECT_EQ(t->gradient_sends, steps * accum * 3);
    EXPECT_EQ(t->steps, steps);
  }
}

INSTANTIATE_TEST_SUITE_P(Prefetch, OverlapTrainingTest, ::testing::Values(0, 1, 2));

TEST(OverlapTrainingTest, PrefetchChangesTheQuery) {
  // Guards the test above against comparing runs in which prefetch is ignored.
  const TrainResult p0 = Train({.prefetch_layers = 0}, 1, 1);
  const TrainResult p1 = Train({.prefetch_layers = 1}, 1, 1);
  EXPECT_NE(p0.digest, p1.digest);
}

// A one-shot event with a bounded wait.
class Latch {
 public:
  void Set() {
    std::lock_guard lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool WaitFor(double seconds) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return set_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// The lookup of `layer` and the decoder's projection `projection` of `compute_layer` wait for each
// other: each sets its latch and waits (up to `bound` seconds) for the other's. Both succeed only
// if the lookup is in flight while the decoder computes that projection.
struct Rendezvous {
  uint32_t layer = 1;
  int64_t compute_layer = 1;
  std::string projection = "down_proj";
  double bound = 60.0;
  Latch lookup_started, compute_reached;
  bool lookup_saw_compute = false, compute_saw_lookup = false;
};

class RendezvousClient : public ForwardingParamClient {
 public:
  RendezvousClient(ParamClient* inner, Rendezvous* r) : ForwardingParamClient(inner), r_(r) {}
  absl::StatusOr<LookupReply> Lookup(const RequestHeader& h, const torch::Tensor& x,
                                      const torch::Tensor& mask, bool training) override {
    if (h.layer == r_->layer) {
      r_->lookup_started.Set();
      r_->lookup_saw_compute = r_->compute_reached.WaitFor(r_->bound);
    }
    return inner()->Lookup(h, x, mask, training);
  }

 private:
  Rendezvous* r_;
};

class RendezvousHooks : public AdapterHooks {
 public:
  RendezvousHooks(MeftAdapter* adapter, Rendezvous* r) : adapter_(adapter), r_(r) {}
  void FfnInputReady(int64_t layer, const torch::Tensor& x, const torch::Tensor& mask) override {
    adapter_->FfnInputReady(layer, x, mask);
  }
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& x,
                         const torch::Tensor& mask) override {
    return adapter_->FfnDelta(layer, x, mask);
  }
  torch::Tensor ProjectionDelta(int64_t layer, const std::string& projection,
                                const torch::Tensor&) override {
    if (layer == r_->compute_layer && projection == r_->projection) {
      r_->compute_reached.Set();
      r_->compute_saw_lookup = r_->lookup_started.WaitFor(r_->bound);
    }
    return {};
  }

 private:
  MeftAdapter* adapter_;
  Rendezvous* r_;
};

// One training forward and backward of the 4-layer model through the rendezvous.
void RunRendezvous(const MeftAdapterOptions& options, Rendezvous* r) {
  auto model = RandomModel(4);
  auto server = StartServer({0, 1, 2, 3});
  RendezvousClient client(server->client.get(), r);
  MeftAdapter adapter(&client, *server->client->Describe(), options);
  RendezvousHooks hooks(&adapter, r);
  const torch::Tensor ids = torch::tensor({{1L, 7L, 9L, 4L, 3L}, {1L, 8L, 2L, 6L, 5L}});
  adapter.BeginMicroBatch(0, 0, /*training=*/true);
  const torch::Tensor logits = model->Forward(ids, {}, nullptr, &hooks);
  logits.pow(2).mean().backward();
  EXPECT_TRUE(adapter.FinishBackward().ok());
}

TEST(OverlapHappensTest, LookupRunsWhileTheBaseFfnComputes) {
  Rendezvous r;  // lookup of layer 1 <-> layer 1's down_proj (the base FFN)
  RunRendezvous({.prefetch_layers = 0, .overlap = true}, &r);
  EXPECT_TRUE(r.compute_saw_lookup);
  EXPECT_TRUE(r.lookup_saw_compute);
}

TEST(OverlapHappensTest, PrefetchedLookupRunsDuringTheNextLayersAttention) {
  Rendezvous r;
  r.projection = "q_proj";  // layer 1's attention, before its FFN input exists
  RunRendezvous({.prefetch_layers = 1, .overlap = true}, &r);
  EXPECT_TRUE(r.compute_saw_lookup);
  EXPECT_TRUE(r.lookup_saw_compute);
}

// Controls: where the lookup cannot be in flight, the rendezvous cannot happen, so the tests above
// can fail. The compute side gives up after the (short) bound; the lookup then finds the latch set.
TEST(OverlapHappensTest, ControlSynchronousLookupMissesTheRendezvous) {
  Rendezvous r;
  r.bound = 0.2;
  RunRendezvous({.prefetch_layers = 0, .overlap = false}, &r);
  EXPECT_FALSE(r.compute_saw_lookup);
  EXPECT_TRUE(r.lookup_saw_compute);
}

TEST(OverlapHappensTest, ControlWithoutPrefetchTheLookupStartsAfterAttention) {
  Rendezvous r;
  r.projection = "q_proj";
  r.bound = 0.2;
  RunRendezvous({.prefetch_layers = 0, .overlap = true}, &r);
  EXPECT_FALSE(r.compute_saw_lookup);
  EXPECT_TRUE(r.lookup_saw_compute);
}

// --- errors from background calls

// `fn` must throw c10::Error whose message contains `want`.
template <typename Fn>
void ExpectTorchError(Fn fn, const std::string& want) {
  try {
    fn();
    ADD_FAILURE() << "expected an error containing \"" << want << "\"";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr(want));
  }
}

TEST(OverlapErrorTest, AsyncLookupErrorSurfacesWithTheServersMessage) {
  auto server = StartServer({0});
  MeftAdapter adapter(server->client.get(), *server->client->Describe(), {.overlap = true});
  adapter.BeginMicroBatch(0, 0, true);
  const torch::Tensor x = torch::randn({1, 2, kDim - 1});  // the server has d = kDim
  adapter.FfnInputReady(0, x, {});
  ExpectTorchError([&] { adapter.FfnDelta(0, x, {}); }, "x.shape");
}

class ThrowingClient : public ForwardingParamClient {
 public:
  using ForwardingParamClient::ForwardingParamClient;
  absl::StatusOr<LookupReply> Lookup(const RequestHeader&, const torch::Tensor&, const torch::Tensor&,
                                      bool) override {
    TORCH_CHECK(false, "lookup exploded");
    return absl::InternalError("unreachable");
  }
};

TEST(OverlapErrorTest, ExceptionInABackgroundLookupBecomesAnError) {
  auto server = StartServer({0});
  ThrowingClient client(server->client.get());
  MeftAdapter adapter(&client, *server->client->Describe(), {.overlap = true});
  adapter.BeginMicroBatch(0, 0, true);
  const torch::Tensor x = torch::randn({1, 2, kDim});
  adapter.FfnInputReady(0, x, {});
  ExpectTorchError([&] { adapter.FfnDelta(0, x, {}); }, "lookup exploded");
}

class GradientErrorTest : public ::testing::TestWithParam<bool> {};

TEST_P(GradientErrorTest, ServersMessageSurfaces) {
  const bool overlap = GetParam();
  auto server = StartServer({0});
  MeftAdapter adapter(server->client.get(), *server->client->Describe(), {.overlap = overlap});
  adapter.BeginMicroBatch(0, 0, true);
  const torch::Tensor x = torch::randn({1, 3, kDim}, torch::requires_grad());
  adapter.FfnInputReady(0, x, {});
  const torch::Tensor y = adapter.FfnDelta(0, x, {});
  // The server moves past step 0 behind the adapter's back: its gradients are refused.
  ASSERT_TRUE(server->client->Step(0, 0.0, 1.0).ok());
  const char* want = "do not match the server's step";
  if (overlap) {
    (y.sum() + x.sum()).backward();  // sent in the background: no error yet
    const absl::Status s = adapter.FinishBackward();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(s.message(), HasSubstr(want));
    EXPECT_TRUE(adapter.FinishBackward().ok()) << "reported once";
  } else {
    ExpectTorchError([&] { (y.sum() + x.sum()).backward(); }, want);
    EXPECT_TRUE(adapter.FinishBackward().ok());
  }
}

INSTANTIATE_TEST_SUITE_P(Overlap, GradientErrorTest, ::testing::Bool());

TEST(OverlapErrorTest, StepErrorIsReportedByTheNextCallThatNeedsTheStep) {
  auto server = StartServer({0});
  MeftAdapter adapter(server->client.get(), *server->client->Describe(), {.overlap = true});
  EXPECT_TRUE(adapter.Step(5, 0.1, 1.0).ok()) << "with overlap Step does not wait";
  const absl::StatusOr<double> norm = adapter.GradNorm(0);
  EXPECT_EQ(norm.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(norm.status().message(), HasSubstr("step: 5 does not match"));
  EXPECT_TRUE(adapter.WaitForStep().ok()) << "reported once";
  EXPECT_TRUE(adapter.Step(0, 0.1, 1.0).ok());
  EXPECT_TRUE(adapter.WaitForStep().ok());
  EXPECT_EQ(server->domain->Info().step, 1u);
}

// A failed background Step leaves the server behind, so the next step's lookups time out on the
// server; the trainer reports the Step's error, the cause.
TEST(OverlapErrorTest, TrainerReportsAFailedBackgroundStep) {
  auto model = RandomModel(2);
  auto server = StartServer({0, 1}, /*step_wait_seconds=*/0.5);
  StepFailingClient client(server->client.get());
  client.fail_step = 1;
  auto loader = *DataLoader::Create(Examples(6), 0, {.micro_batch_size = 2, .seed = 1});
  MeftAdapter adapter(&client, *client.Describe(), {.overlap = true});
  TrainTarget target{.adapter = "meft", .hooks = &adapter, .meft = &adapter, .server = &client};
  auto trainer = *Trainer::Create(model.get(), target, loader.get(),
                                  {.max_steps = 4, .warmup_ratio = 0.0, .progress = false});
  const auto r = trainer->Run();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("injected"));
  EXPECT_EQ(server->domain->Info().step, 1u);
}

TEST(OverlapTimingsTest, TakeTimingsResets) {
  auto server = StartServer({0});
  MeftAdapter adapter(server->client.get(), *server->client->Describe(), {.overlap = true});
  adapter.BeginMicroBatch(0, 0, false);
  const torch::Tensor x = torch::randn({1, 3, kDim});
  adapter.FfnInputReady(0, x, {});
  adapter.FfnDelta(0, x, {});
  const MeftTimings t = adapter.TakeTimings();
  EXPECT_EQ(t.lookups, 1);
  EXPECT_EQ(t.gradient_sends, 0);
  const MeftTimings again = adapter.TakeTimings();
  EXPECT_EQ(again.lookups, 0);
  EXPECT_EQ(again.wait_seconds, 0.0);
  EXPECT_EQ(again.call_seconds, 0.0);
}

}  // namespace
}  // namespace meft::worker
