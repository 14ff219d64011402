// The worker on a CUDA device (issue 12). Every test here skips when no CUDA device is present,
// and only then; the kit selects them with --gtest_filter='Cuda*'.
//
//  - CudaAdapterTest: forward and backward of the tiny golden LLaMA with each adapter (meft,
//    parallel, lora) on CUDA equal the CPU results on the same inputs, in fp32 and in bf16.
//  - CudaPinnedArenaTest: the shared-memory arena is registered with CUDA (the driver says so),
//    rows copied from it to the device equal those of the unpinned and inline paths, and the
//    registration ends with the arena.
//  - CudaGoldenTest: bf16 logits of the tiny models and of SmolLM2 (MEFT_SMOLLM2_DIR names its
//    folder; unset fails) within a stated tolerance of the transformers goldens.
//  - CudaMetricsTest: meft_worker_gpu_memory_bytes after a training step is the allocator's peak.
//
// Tolerances bound the normwise relative error ||actual - expected|| / ||expected|| (Frobenius
// norms; for logits over the real tokens):
//  - fp32: 1e-5. CPU and CUDA sum the same products in different orders (blocked GEMMs, tree
//    reductions); each sum of n fp32 terms is off by at most about n * 2^-24 of its terms'
//    magnitude and typically sqrt(n) * 2^-24 (n <= 64 here: 5e-7), compounded over two layers'
//    norms, attention and FFN. LibTorch keeps TF32 off for fp32 GEMMs by default.
//  - bf16 on CUDA against fp32 arithmetic on the same bf16-rounded weights on the CPU: every op's
//    result is rounded to bf16 (unit roundoff u = 2^-9 = 2.0e-3), about 20 roundings per layer on
//    the path from embeddings to logits (norm, q/k/v, RoPE, scores, probabilities, attention
//    output, o_proj, residual, norm, gate, up, SiLU product, down, adapter, residual); with two
//    layers and the head about 45, whose errors add like a random walk: sqrt(45) u = 1.3e-2
//    (first-order worst case 45 u = 8.8e-2). Forward tolerance 4e-2 = 3x the random walk.
//    Gradients go through the forward's roundings and as many again in backward (sqrt(90) u =
//    1.9e-2), and ReLU and top-k gates near zero switch under perturbations of that size:
//    tolerance 1e-1. LibTorch 1.13's CPU bf16 path, a stand-in measured on these same passes,
//    gave 0.7-1.3e-2 for logits, 0.4-0.5e-2 for MEFT's queries and 0.6-4.2e-2 for gradients.
//  - bf16 logits against transformers' fp32 goldens: as the forward above (the weights' own
//    rounding adds u per weight); SmolLM2's 30 layers make it sqrt(30 * 20) u = 4.8e-2: tolerance
//    5e-2 for all goldens. The CPU bf16 stand-in measured 0.8e-2 (tiny models) and 1.3e-2
//    (SmolLM2, against our own fp32 forward on random tokens, same argmax at all 42 positions).

#include <ATen/CPUGeneratorImpl.h>
#include <sys/mman.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/metrics/metrics.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/metrics/worker_metrics.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/model/weights.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/rpc/pinned_host.h"
#include "gpu_worker/rpc/shm_transport.h"
#include "gpu_worker/train/trainer.h"
#include "gtest/gtest.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"
#include "tests/gpu_worker/golden_file.h"
#include "tests/gpu_worker/smollm2_model.h"
#include "tests/gpu_worker/tiny_dataset.h"

namespace meft::worker {
namespace {

using test_golden::Golden;
using test_golden::ReadGolden;
using test_golden::ReadJson;

// Where the transformers goldens live (tests/golden/README.md); one constant to repoint.
const std::string kTransformersGoldenDir = std::string(MEFT_GOLDEN_DIR) + "/transformers";
// The tiny models' weights and configs (identical in plain-torch/ and transformers/).
const std::string kPlainDir = std::string(MEFT_GOLDEN_DIR) + "/plain-torch";
const std::vector<std::string> kTinyModels = {"llama_tiny", "mistral_tiny"};
// SmolLM2: the model folder comes from MEFT_SMOLLM2_DIR (smollm2_model.h), its golden from here.
const std::string kSmolLm2Golden = kTransformersGoldenDir + "/smollm2_135m";

constexpr double kFp32Tolerance = 1e-5;
constexpr double kBf16Tolerance = 4e-2;
constexpr double kBf16GradTolerance = 1e-1;
constexpr double kGoldenBf16Tolerance = 5e-2;

#define MEFT_REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

const torch::Device kCuda(torch::kCUDA, 0);
const torch::Device kCpu(torch::kCPU);

// ||actual - expected|| / ||expected|| (Frobenius norms), both taken to the CPU.
double RelativeError(const torch::Tensor& actual, const torch::Tensor& expected) {
  const torch::Tensor a = actual.detach().to(kCpu, torch::kFloat64);
  const torch::Tensor e = expected.detach().to(kCpu, torch::kFloat64);
  return (a - e).norm().item<double>() / e.norm().item<double>();
}

void ExpectClose(const torch::Tensor& actual, const torch::Tensor& expected, double tolerance,
                 const std::string& what) {
  ASSERT_TRUE(actual.defined() && expected.defined()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  // A reference of zeros would make any relative comparison meaningless.
  ASSERT_GT(expected.abs().max().item<double>(), 0.0) << what << ": reference is all zeros";
  const double err = RelativeError(actual, expected);
  EXPECT_LE(err, tolerance) << what;
  std::cout << "[cuda] " << what << ": ||error|| / ||reference|| = " << err << " (tolerance "
            << tolerance << ")\n";
}

// ---------------------------------------------------------------------------------------------
// Adapters: CUDA equals CPU

// The golden llama_tiny (2 layers, d = 32, grouped-query attention, linear RoPE scaling) with its
// weights rounded to `weight_dtype`, computing in `dtype` on `device`.
std::unique_ptr<LlamaModel> TinyModel(torch::Device device, torch::ScalarType dtype,
                                      torch::ScalarType weight_dtype) {
  const std::string dir = kPlainDir + "/llama_tiny";
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::map<std::string, torch::Tensor>> weights = LoadWeights(dir, weight_dtype);
  EXPECT_TRUE(weights.ok()) << weights.status();
  if (!config.ok() || !weights.ok()) return nullptr;
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::FromWeights(*config, std::move(*weights), device, dtype);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

// Overwrites every tensor with seeded N(0, std^2) draws made on the CPU, so both devices start
// from the same values (the adapters' own init leaves V or LoRA's B at zero, which would make
// outputs and most gradients trivially zero).
void Randomize(const std::vector<std::pair<std::string, torch::Tensor>>& params, double std) {
  torch::NoGradGuard no_grad;
  uint64_t seed = 100;
  for (const auto& [name, p] : params) {
    torch::Generator gen = at::detail::createCPUGenerator(seed++);
    p.copy_(torch::randn(p.sizes(), gen, torch::kFloat32) * std);
  }
}

std::map<std::string, std::pair<int64_t, int64_t>> ProjectionShapes(const ModelConfig& c) {
  const int64_t d = c.hidden_size, q = c.num_attention_heads * c.head_dim,
                kv = c.num_key_value_heads * c.head_dim, f = c.intermediate_size;
  return {{"q_proj", {d, q}},    {"k_proj", {d, kv}}, {"v_proj", {d, kv}},  {"o_proj", {q, d}},
          {"gate_proj", {d, f}}, {"up_proj", {d, f}}, {"down_proj", {f, d}}};
}

// What one forward + backward produced, on the CPU in fp32.
struct PassOutput {
  torch::Tensor logits;                                        // [B, T, V]
  torch::Tensor loss;                                          // scalar
  std::vector<std::pair<std::string, torch::Tensor>> tensors;  // gradients, queries
};

// Labels of the golden inputs: next-token targets, ignored at padding.
torch::Tensor Labels(const Golden& g) {
  return g.input_ids.masked_fill(g.attention_mask.eq(0), kIgnoreIndex);
}

// Forward with `hooks`, CausalLmLoss, backward. Fills logits and loss.
void ForwardBackward(const LlamaModel& model, const Golden& g, AdapterHooks* hooks,
                     PassOutput* out) {
  const torch::Device device = model.device();
  const torch::Tensor logits =
      model.Forward(g.input_ids.to(device), g.attention_mask.to(device), nullptr, hooks);
  const torch::Tensor loss = CausalLmLoss(logits, Labels(g).to(device)).first;
  loss.backward();
  out->logits = logits.detach().to(kCpu, torch::kFloat32);
  out->loss = loss.detach().to(kCpu, torch::kFloat32);
}

void AddGradients(const std::vector<std::pair<std::string, torch::Tensor>>& params,
                  PassOutput* out) {
  for (const auto& [name, p] : params) {
    ASSERT_TRUE(p.grad().defined()) << name;
    out->tensors.emplace_back(name + ".grad", p.grad().to(kCpu, torch::kFloat32));
  }
}

PassOutput ParallelPass(torch::Device device, torch::ScalarType dtype,
                        torch::ScalarType weight_dtype, const Golden& g) {
  PassOutput out;
  std::unique_ptr<LlamaModel> model = TinyModel(device, dtype, weight_dtype);
  EXPECT_NE(model, nullptr);
  if (model == nullptr) return out;
  auto adapter = ParallelAdapter::Create({.rows = 48, .layers = {0, 1}, .seed = 5},
                                         model->config().hidden_size, device);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  if (!adapter.ok()) return out;
  Randomize((*adapter)->named_parameters(), 0.3);
  ForwardBackward(*model, g, adapter->get(), &out);
  AddGradients((*adapter)->named_parameters(), &out);
  return out;
}

PassOutput LoraPass(torch::Device device, torch::ScalarType dtype, torch::ScalarType weight_dtype,
                    const Golden& g) {
  PassOutput out;
  std::unique_ptr<LlamaModel> model = TinyModel(device, dtype, weight_dtype);
  EXPECT_NE(model, nullptr);
  if (model == nullptr) return out;
  auto adapter = LoraAdapter::Create({.rank = 4,
                                      .alpha = 8.0,
                                      .targets = {"q_proj", "v_proj", "gate_proj", "down_proj"},
                                      .layers = {0, 1},
                                      .seed = 5},
                                     ProjectionShapes(model->config()), device);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  if (!adapter.ok()) return out;
  Randomize((*adapter)->named_parameters(), 0.2);
  ForwardBackward(*model, g, adapter->get(), &out);
  AddGradients((*adapter)->named_parameters(), &out);
  return out;
}

// Records every query and gradient the adapter sends, per layer. Answers lookups from `replay`
// when it holds the layer, else from `inner` (and records the answer).
class RecordingClient : public ParamClient {
 public:
  struct Sent {
    torch::Tensor key_grads, value_grads, gate_grads;
  };

  RecordingClient(ParamClient* inner, ServerInfo description,
                  std::map<uint32_t, LookupReply> replay = {})
      : inner_(inner), description_(std::move(description)), replay_(std::move(replay)) {}

  absl::StatusOr<LookupReply> Lookup(const RequestHeader& h, const torch::Tensor& x,
                                      const torch::Tensor& mask, bool training) override {
    {
      std::lock_guard lock(mu_);
      queries[h.layer] = x.detach().to(kCpu, torch::kFloat32);
    }
    if (auto it = replay_.find(h.layer); it != replay_.end()) return it->second;
    absl::StatusOr<LookupReply> r = inner_->Lookup(h, x, mask, training);
    if (r.ok()) {
      std::lock_guard lock(mu_);
      lookups[h.layer] = *r;
    }
    return r;
  }
  absl::Status Gradients(const RequestHeader& h, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& g) override {
    {
      std::lock_guard lock(mu_);
      sent[h.layer] = {k.detach().to(kCpu, torch::kFloat32), v.detach().to(kCpu, torch::kFloat32),
                       g.defined() ? g.detach().to(kCpu, torch::kFloat32) : g};
    }
    return inner_ != nullptr ? inner_->Gradients(h, k, v, g) : absl::OkStatus();
  }
  absl::StatusOr<double> GradNorm(uint64_t) override {
    return absl::UnimplementedError("GradNorm: not used by this test");
  }
  absl::Status Step(uint64_t, double, double) override {
    return absl::UnimplementedError("Step: not used by this test");
  }
  absl::StatusOr<std::string> SaveCheckpoint(const std::string&) override {
    return absl::UnimplementedError("SaveCheckpoint: not used by this test");
  }
  absl::Status RestoreCheckpoint(const std::string&) override {
    return absl::UnimplementedError("RestoreCheckpoint: not used by this test");
  }
  absl::StatusOr<ServerInfo> Describe() override { return description_; }

  // Read after FinishBackward (background calls have finished).
  std::map<uint32_t, torch::Tensor> queries;
  std::map<uint32_t, LookupReply> lookups;
  std::map<uint32_t, Sent> sent;

 private:
  ParamClient* inner_;
  ServerInfo description_;
  std::map<uint32_t, LookupReply> replay_;
  std::mutex mu_;  // guards the records
};

// A real parameter server in-process on port 0 for layers 0 and 1 of the tiny model (d = 32),
// with non-zero values after one optimizer step, so adapter outputs and gradients are not zero.
struct MeftServer : testing::InProcessServer {
  std::unique_ptr<ParamClient> client;
  ServerInfo description;
};

std::unique_ptr<MeftServer> StartMeftServer(bool bf16_rows) {
  auto s = std::make_unique<MeftServer>();
  server::ServerOptions o = testing::SmallServerOptions();  // 64 rows, 8 experts
  o.layers = {0, 1};
  o.dim = 32;
  o.init.router_init = store::RouterInit::kNormal;
  o.init.init_std = 0.5f;
  const absl::Status started = s->Start(o);
  EXPECT_TRUE(started.ok()) << started;
  if (!started.ok()) return nullptr;
  GrpcClientOptions co;
  co.address = s->address();
  co.bf16_rows = bf16_rows;
  co.transport = GrpcClientOptions::Transport::kGrpc;
  auto client = CreateGrpcParamClient(co);
  EXPECT_TRUE(client.ok()) << client.status();
  if (!client.ok()) return nullptr;
  s->client = std::move(*client);
  s->description = *s->client->Describe();
  torch::Generator gen = at::detail::createCPUGenerator(11);
  const torch::Tensor x = torch::randn({6, 32}, gen);
  for (uint32_t layer : {0u, 1u}) {
    auto r = s->client->Lookup({0, 0, layer}, x, {}, true);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return nullptr;
    const int64_t n = r->row_ids.size(0);
    const absl::Status sent =
        s->client->Gradients({0, 0, layer}, torch::randn({n, 32}, gen), torch::randn({n, 32}, gen),
                             torch::zeros({6, 5}));
    EXPECT_TRUE(sent.ok()) << sent;
  }
  EXPECT_TRUE(s->client->Step(0, 0.3, 1.0).ok());
  return s;
}

// MEFT with its default options (overlap on). `client` either forwards to the server (the CPU
// pass) or replays the CPU pass's answers (the CUDA pass), so both compute on the same rows and
// the comparison does not hinge on near-ties in the server's selection.
PassOutput MeftPass(torch::Device device, torch::ScalarType dtype, torch::ScalarType weight_dtype,
                    const Golden& g, RecordingClient* client) {
  PassOutput out;
  std::unique_ptr<LlamaModel> model = TinyModel(device, dtype, weight_dtype);
  EXPECT_NE(model, nullptr);
  if (model == nullptr) return out;
  MeftAdapter adapter(client, *client->Describe(), {});
  adapter.BeginMicroBatch(/*step=*/1, 0, /*training=*/true);
  ForwardBackward(*model, g, &adapter, &out);
  const absl::Status finished = adapter.FinishBackward();
  EXPECT_TRUE(finished.ok()) << finished;
  for (uint32_t layer : {0u, 1u}) {
    const std::string l = "layer " + std::to_string(layer);
    EXPECT_EQ(client->queries.count(layer), 1u) << l;
    EXPECT_EQ(client->sent.count(layer), 1u) << l;
    if (client->queries.count(layer) == 0 || client->sent.count(layer) == 0) continue;
    const RecordingClient::Sent& s = client->sent.at(layer);
    out.tensors.emplace_back(l + " query x", client->queries.at(layer));
    out.tensors.emplace_back(l + " key_grads", s.key_grads);
    out.tensors.emplace_back(l + " value_grads", s.value_grads);
    out.tensors.emplace_back(l + " gate_grads", s.gate_grads);
  }
  return out;
}

void ExpectSamePass(const PassOutput& cuda, const PassOutput& cpu, const Golden& g,
                    double tolerance, double grad_tolerance) {
  ASSERT_TRUE(cuda.logits.defined() && cpu.logits.defined());
  const torch::Tensor real = g.attention_mask.to(torch::kBool);
  ExpectClose(cuda.logits.index({real}), cpu.logits.index({real}), tolerance, "logits");
  ExpectClose(cuda.loss, cpu.loss, tolerance, "loss");
  ASSERT_EQ(cuda.tensors.size(), cpu.tensors.size());
  for (size_t i = 0; i < cpu.tensors.size(); ++i) {
    ASSERT_EQ(cuda.tensors[i].first, cpu.tensors[i].first);
    const bool is_query = cpu.tensors[i].first.find("query") != std::string::npos;
    ExpectClose(cuda.tensors[i].second, cpu.tensors[i].second,
                is_query ? tolerance : grad_tolerance, cpu.tensors[i].first);
  }
}

// The adapter must move the logits by far more than the tolerance, or a CUDA pass that dropped
// it could still pass.
void ExpectAdapterMatters(const PassOutput& with_adapter, torch::ScalarType weight_dtype,
                          const Golden& g, double tolerance) {
  std::unique_ptr<LlamaModel> base = TinyModel(kCpu, torch::kFloat32, weight_dtype);
  ASSERT_NE(base, nullptr);
  torch::NoGradGuard no_grad;
  const torch::Tensor logits = base->Forward(g.input_ids, g.attention_mask);
  const torch::Tensor real = g.attention_mask.to(torch::kBool);
  EXPECT_GT(RelativeError(logits.index({real}), with_adapter.logits.index({real})), 10 * tolerance);
}

struct DtypeCase {
  const char* name;
  torch::ScalarType dtype;  // the CUDA pass computes in it; the CPU reference in fp32
  double tolerance, grad_tolerance;
};

const DtypeCase kDtypeCases[] = {
    {"fp32", torch::kFloat32, kFp32Tolerance, kFp32Tolerance},
    {"bf16", torch::kBFloat16, kBf16Tolerance, kBf16GradTolerance},
};

TEST(CudaAdapterTest, ParallelForwardAndBackwardEqualCpu) {
  MEFT_REQUIRE_CUDA();
  const Golden g = ReadGolden(kPlainDir + "/llama_tiny");
  for (const DtypeCase& c : kDtypeCases) {
    SCOPED_TRACE(c.name);
    std::cout << "[cuda] parallel, " << c.name << "\n";
    const PassOutput cpu = ParallelPass(kCpu, torch::kFloat32, c.dtype, g);
    const PassOutput cuda = ParallelPass(kCuda, c.dtype, c.dtype, g);
    ExpectSamePass(cuda, cpu, g, c.tolerance, c.grad_tolerance);
    ExpectAdapterMatters(cpu, c.dtype, g, c.tolerance);
  }
}

TEST(CudaAdapterTest, LoraForwardAndBackwardEqualCpu) {
  MEFT_REQUIRE_CUDA();
  const Golden g = ReadGolden(kPlainDir + "/llama_tiny");
  for (const DtypeCase& c : kDtypeCases) {
    SCOPED_TRACE(c.name);
    std::cout << "[cuda] lora, " << c.name << "\n";
    const PassOutput cpu = LoraPass(kCpu, torch::kFloat32, c.dtype, g);
    const PassOutput cuda = LoraPass(kCuda, c.dtype, c.dtype, g);
    ExpectSamePass(cuda, cpu, g, c.tolerance, c.grad_tolerance);
    ExpectAdapterMatters(cpu, c.dtype, g, c.tolerance);
  }
}

// fp32 rows with fp32 weights; bf16 rows (the default wire dtype, widened on the device) with
// bf16 weights.
TEST(CudaAdapterTest, MeftForwardAndBackwardEqualCpu) {
  MEFT_REQUIRE_CUDA();
  const Golden g = ReadGolden(kPlainDir + "/llama_tiny");
  for (const DtypeCase& c : kDtypeCases) {
    SCOPED_TRACE(c.name);
    std::cout << "[cuda] meft, " << c.name << "\n";
    const bool bf16_rows = c.dtype == torch::kBFloat16;
    auto server = StartMeftServer(bf16_rows);
    ASSERT_NE(server, nullptr);
    RecordingClient cpu_client(server->client.get(), server->description);
    const PassOutput cpu = MeftPass(kCpu, torch::kFloat32, c.dtype, g, &cpu_client);
    ASSERT_EQ(cpu_client.lookups.size(), 2u);
    EXPECT_EQ(cpu_client.lookups.at(0).keys.scalar_type(),
              bf16_rows ? torch::kBFloat16 : torch::kFloat32);
    RecordingClient cuda_client(nullptr, server->description, cpu_client.lookups);
    const PassOutput cuda = MeftPass(kCuda, c.dtype, c.dtype, g, &cuda_client);
    ExpectSamePass(cuda, cpu, g, c.tolerance, c.grad_tolerance);
    ExpectAdapterMatters(cpu, c.dtype, g, c.tolerance);
  }
}

// ---------------------------------------------------------------------------------------------
// The pinned shared-memory arena

TEST(CudaPinnedArenaTest, RegistrationIsSeenByTheDriverAndEndsWithItsHolder) {
  MEFT_REQUIRE_CUDA();
  ASSERT_TRUE(CanPinHostMemory());
  const size_t bytes = size_t{8} << 20;
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(data, MAP_FAILED);
  char* const end = static_cast<char*>(data) + bytes - 1;
  EXPECT_FALSE(IsPinnedHostMemory(data));
  {
    auto pinned = PinHostMemory(data, bytes);
    ASSERT_TRUE(pinned.ok()) << pinned.status();
    EXPECT_TRUE(IsPinnedHostMemory(data));
    EXPECT_TRUE(IsPinnedHostMemory(end));
    // The driver refuses a second registration of a registered range.
    EXPECT_FALSE(PinHostMemory(data, bytes).ok());
  }
  EXPECT_FALSE(IsPinnedHostMemory(data));
  // ... and accepts it again once the first one is released.
  auto again = PinHostMemory(data, bytes);
  EXPECT_TRUE(again.ok()) << again.status();
  if (again.ok()) again->reset();
  ASSERT_EQ(munmap(data, bytes), 0);
}

TEST(CudaPinnedArenaTest, ShmArenaIsPinnedOnlyWhenAskedAndUnpinnedWhenReleased) {
  MEFT_REQUIRE_CUDA();
  auto pinned = ShmTransport::Create(uint64_t{64} << 20, /*pin=*/true);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_TRUE((*pinned)->pinned());
  const uint8_t* data = (*pinned)->arena().data();
  EXPECT_TRUE(IsPinnedHostMemory(data));
  EXPECT_TRUE(IsPinnedHostMemory(data + (*pinned)->arena().size() - 1));
  auto unpinned = ShmTransport::Create(uint64_t{64} << 20, /*pin=*/false);
  ASSERT_TRUE(unpinned.ok()) << unpinned.status();
  EXPECT_FALSE((*unpinned)->pinned());
  EXPECT_FALSE(IsPinnedHostMemory((*unpinned)->arena().data()));
  // Releasing the transport unregisters the range before unmapping it; a registration left
  // behind would still be reported for these addresses.
  pinned->reset();
  EXPECT_FALSE(IsPinnedHostMemory(data));
}

struct TransportCase {
  const char* name;
  GrpcClientOptions::Transport transport;
  bool pin;
};

// Three identical servers (same seed); one client each: the arena pinned, the arena unpinned,
// tensors inline in gRPC messages. The same training micro-batch and an evaluation lookup on each.
TEST(CudaPinnedArenaTest, RowsAndTrainingOnTheDeviceEqualTheUnpinnedAndInlinePaths) {
  MEFT_REQUIRE_CUDA();
  const TransportCase cases[] = {{"shm pinned", GrpcClientOptions::Transport::kShm, true},
                                 {"shm unpinned", GrpcClientOptions::Transport::kShm, false},
                                 {"grpc inline", GrpcClientOptions::Transport::kGrpc, true}};
  struct Outcome {
    LookupReply eval;                   // host answer
    torch::Tensor keys, values, router;  // the same rows copied to the device
    torch::Tensor y, dx;                 // adapter output and input gradient on the device
    std::map<uint32_t, RecordingClient::Sent> sent;
    uint64_t digest = 0;  // server state after the optimizer step
  };
  std::vector<Outcome> outcomes;
  for (const TransportCase& c : cases) {
    SCOPED_TRACE(c.name);
    server::ServerOptions o;
    o.layers = {0};
    o.rows = 512;
    o.dim = 64;
    o.experts = 16;
    o.selector.n_probe = 4;
    o.selector.top_k = 8;
    o.init.seed = 21;
    o.init.router_init = store::RouterInit::kNormal;
    o.init.init_std = 0.5f;
    metrics::Registry registry;
    auto domain = server::ParamServer::Create(o, &registry);
    ASSERT_TRUE(domain.ok()) << domain.status();
    auto running = rpc::StartServer({.listen = "127.0.0.1:0"}, domain->get(), nullptr);
    ASSERT_TRUE(running.ok()) << running.status();
    GrpcClientOptions co;
    co.address = "127.0.0.1:" + std::to_string((*running)->port());
    co.transport = c.transport;
    co.shm_pin = c.pin;
    auto grpc = CreateGrpcParamClient(co);
    ASSERT_TRUE(grpc.ok()) << grpc.status();
    const ServerInfo description = *(*grpc)->Describe();
    RecordingClient client(grpc->get(), description);
    Outcome out;

    // Step 0: one training micro-batch on the device, gradients back, the optimizer step.
    torch::Generator gen = at::detail::createCPUGenerator(4);
    const torch::Tensor x_host = torch::randn({2, 12, 64}, gen);
    const torch::Tensor w = torch::randn({2, 12, 64}, gen).to(kCuda);
    const torch::Tensor x = x_host.to(kCuda).requires_grad_();
    {
      MeftAdapter adapter(&client, description, {});
      adapter.BeginMicroBatch(0, 0, /*training=*/true);
      out.y = adapter.FfnDelta(0, x, {});
      ASSERT_TRUE(out.y.is_cuda());
      (out.y * w).sum().backward();
      const absl::Status finished = adapter.FinishBackward();
      ASSERT_TRUE(finished.ok()) << finished;
      ASSERT_TRUE((*grpc)->Step(0, 0.1, 1.0).ok());
    }
    out.dx = x.grad();
    out.sent = client.sent;
    out.digest = (*domain)->StateDigest();

    // Step 1: an evaluation lookup (non-zero values now); its rows copied to the device.
    auto r = (*grpc)->Lookup({1, 0, 0}, torch::randn({24, 64}, gen), {}, /*training=*/false);
    ASSERT_TRUE(r.ok()) << r.status();
    out.eval = *r;
    // The answer's rows lie in the pinned arena exactly when the client pinned it, so the copy
    // below is a DMA from registered memory on the pinned path only.
    EXPECT_EQ(IsPinnedHostMemory(r->keys.data_ptr()),
              c.transport == GrpcClientOptions::Transport::kShm && c.pin);
    EXPECT_EQ(IsPinnedHostMemory(r->values.data_ptr()), IsPinnedHostMemory(r->keys.data_ptr()));
    out.keys = r->keys.to(kCuda);
    out.values = r->values.to(kCuda);
    out.router = r->router_rows.to(kCuda);
    ASSERT_TRUE(torch::equal(out.keys.cpu(), r->keys));
    EXPECT_GT(r->values.abs().max().item<double>(), 0.0);
    outcomes.push_back(std::move(out));
    (*running)->Shutdown(1.0);
  }
  ASSERT_EQ(outcomes.size(), 3u);
  const Outcome& ref = outcomes[0];  // pinned
  for (size_t i = 1; i < outcomes.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    const Outcome& o = outcomes[i];
    EXPECT_TRUE(torch::equal(o.eval.row_ids, ref.eval.row_ids));
    EXPECT_TRUE(torch::equal(o.keys.cpu(), ref.keys.cpu()));
    EXPECT_TRUE(torch::equal(o.values.cpu(), ref.values.cpu()));
    EXPECT_TRUE(torch::equal(o.router.cpu(), ref.router.cpu()));
    EXPECT_TRUE(torch::equal(o.y.detach().cpu(), ref.y.detach().cpu()));
    EXPECT_TRUE(torch::equal(o.dx.cpu(), ref.dx.cpu()));
    ASSERT_EQ(o.sent.count(0), 1u);
    EXPECT_TRUE(torch::equal(o.sent.at(0).key_grads, ref.sent.at(0).key_grads));
    EXPECT_TRUE(torch::equal(o.sent.at(0).value_grads, ref.sent.at(0).value_grads));
    EXPECT_TRUE(torch::equal(o.sent.at(0).gate_grads, ref.sent.at(0).gate_grads));
    EXPECT_EQ(o.digest, ref.digest);
  }
}

// ---------------------------------------------------------------------------------------------
// Golden logits in bf16 on CUDA

void ExpectBf16GoldenLogits(const std::string& model_dir, const std::string& golden_dir,
                            double tolerance) {
  SCOPED_TRACE(golden_dir);
  ASSERT_TRUE(std::filesystem::exists(golden_dir + "/golden.json"))
      << golden_dir << "/golden.json is missing: generate the transformers goldens "
      << "(tests/golden/README.md)";
  const Golden g = ReadGolden(golden_dir);
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Load(model_dir, kCuda, torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status();
  torch::NoGradGuard no_grad;
  torch::Tensor logits = (*model)->Forward(g.input_ids, g.attention_mask);
  ASSERT_TRUE(logits.is_cuda());
  logits = logits.cpu();
  if (g.vocab_indices.defined()) logits = logits.index_select(-1, g.vocab_indices);
  ASSERT_EQ(logits.sizes(), g.logits.sizes());
  const torch::Tensor real = g.attention_mask.to(torch::kBool);
  const torch::Tensor ours = logits.index({real}), theirs = g.logits.index({real});
  ExpectClose(ours, theirs, tolerance, "bf16 logits vs " + g.source);
  // bf16 may flip near-ties between the two best tokens, but not many: the same next token at no
  // fewer than 90 % of the real positions (the CPU bf16 stand-in agreed at all of them).
  const double agree =
      ours.argmax(-1).eq(theirs.argmax(-1)).to(torch::kFloat64).mean().item<double>();
  EXPECT_GE(agree, 0.9) << "top-1 agreement with " << g.source;
}

TEST(CudaGoldenTest, TinyModelsInBf16MatchTransformers) {
  MEFT_REQUIRE_CUDA();
  for (const std::string& name : kTinyModels) {
    ExpectBf16GoldenLogits(kTransformersGoldenDir + "/" + name, kTransformersGoldenDir + "/" + name,
                           kGoldenBf16Tolerance);
  }
}

// SmolLM2-135M: 30 layers, d = 576, a 49152-token vocabulary, tied embeddings. Its weights are
// not in the repository: MEFT_SMOLLM2_DIR names the converted Hugging Face folder
// (scripts/fetch-model.sh). The golden is tests/golden/transformers/smollm2_135m/logits.json (made
// by make_smollm2_golden.py, also read by smollm2_test.cc): per prompt its input_ids, the fp32
// logits at a stored subset of vocabulary ids ("ids", "logits" [T][ids]) and the argmax over the
// whole vocabulary. Each prompt runs alone on CUDA in bf16. A missing variable, model folder or
// golden fails the test (as in smollm2_test.cc).
TEST(CudaGoldenTest, SmolLm2InBf16MatchesTransformers) {
  MEFT_REQUIRE_CUDA();
  const absl::StatusOr<std::string> model_dir = test_models::SmolLM2Dir();
  ASSERT_TRUE(model_dir.ok()) << model_dir.status();
  const std::string& dir = *model_dir;
  const std::string path = kSmolLm2Golden + "/logits.json";
  ASSERT_TRUE(std::filesystem::exists(path))
      << path << " is missing: generate it with tests/golden/make_smollm2_golden.py";
  const nlohmann::json golden = ReadJson(path);
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Load(dir, kCuda, torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status();
  torch::NoGradGuard no_grad;
  ASSERT_FALSE(golden.at("prompts").empty());
  for (const nlohmann::json& prompt : golden.at("prompts")) {
    const std::string name = prompt.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const auto input_ids = prompt.at("input_ids").get<std::vector<int64_t>>();
    const auto ids = prompt.at("ids").get<std::vector<int64_t>>();
    const auto argmax = prompt.at("argmax").get<std::vector<int64_t>>();
    std::vector<float> flat;
    for (const auto& row : prompt.at("logits").get<std::vector<std::vector<float>>>()) {
      flat.insert(flat.end(), row.begin(), row.end());
    }
    const int64_t t = static_cast<int64_t>(input_ids.size());
    const torch::Tensor want = torch::tensor(flat).view({t, -1});
    torch::Tensor logits =
        (*model)->Forward(torch::tensor(input_ids, torch::kInt64).view({1, t}))[0];
    ASSERT_TRUE(logits.is_cuda());
    logits = logits.cpu();
    ExpectClose(logits.index_select(1, torch::tensor(ids, torch::kInt64)), want,
                kGoldenBf16Tolerance, "SmolLM2 bf16 logits (" + name + ") vs transformers fp32");
    // bf16 may flip near-ties between the two best tokens, but not many (see the tiny models).
    const torch::Tensor ours = logits.argmax(-1);
    const double agree = ours.eq(torch::tensor(argmax, torch::kInt64))
                             .to(torch::kFloat64)
                             .mean()
                             .item<double>();
    EXPECT_GE(agree, 0.9) << "top-1 agreement with transformers";
  }
}

// ---------------------------------------------------------------------------------------------
// The GPU memory metric

// Forwards to an adapter and, in layer 0's FFN, holds a temporary of kTemporaryBytes on the
// device for a moment: the allocator's peak must include it, the bytes allocated after the step
// must not.
class TemporaryAllocatingHooks : public AdapterHooks {
 public:
  static constexpr int64_t kTemporaryBytes = int64_t{64} << 20;
  explicit TemporaryAllocatingHooks(AdapterHooks* inner) : inner_(inner) {}
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& token_mask) override {
    if (layer == 0) {
      const torch::Tensor t =
          torch::ones({kTemporaryBytes / 4}, ffn_input.options().dtype(torch::kFloat32));
      EXPECT_EQ(t.sum().item<double>(), static_cast<double>(kTemporaryBytes / 4));
    }
    return inner_->FfnDelta(layer, ffn_input, token_mask);
  }

 private:
  AdapterHooks* inner_;
};

double Sample(const metrics::Registry& registry, const std::string& series) {
  std::istringstream lines(registry.SerializeText());
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind(series + " ", 0) == 0)
      return std::strtod(line.c_str() + series.size() + 1, nullptr);
  }
  ADD_FAILURE() << series << " missing in\n" << registry.SerializeText();
  return -1;
}

int64_t Bytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

TEST(CudaMetricsTest, GpuMemoryAfterATrainingStepIsTheAllocatorsPeak) {
  MEFT_REQUIRE_CUDA();
  // As the worker runs on CUDA: bf16 weights, the parallel adapter in fp32 with device AdamW.
  std::unique_ptr<LlamaModel> model = TinyModel(kCuda, torch::kBFloat16, torch::kBFloat16);
  ASSERT_NE(model, nullptr);
  auto parallel = ParallelAdapter::Create({.rows = 4096, .layers = {0, 1}, .seed = 1},
                                          model->config().hidden_size, kCuda);
  ASSERT_TRUE(parallel.ok()) << parallel.status();
  TemporaryAllocatingHooks hooks(parallel->get());
  auto loader = DataLoader::Create(test_data::TinyDataset(8), 0, {.micro_batch_size = 4});
  ASSERT_TRUE(loader.ok()) << loader.status();
  TrainTarget target{
      .adapter = "parallel", .hooks = &hooks, .local = (*parallel)->named_parameters()};
  auto trainer = Trainer::Create(model.get(), target, loader->get(),
                                 {.max_steps = 1, .warmup_ratio = 0.0, .progress = false});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  // Bytes that are allocated throughout the step and after it: the frozen weights, and per
  // adapter parameter the parameter, its gradient and AdamW's two moments.
  int64_t persistent = 0;
  for (const auto& [name, t] : model->NamedParameters()) persistent += Bytes(t);
  for (const auto& [name, p] : (*parallel)->named_parameters()) persistent += 4 * Bytes(p);

  ASSERT_TRUE(ResetCudaAllocatorPeak(kCuda));
  std::optional<DeviceMemory> before = CudaAllocatorMemory(kCuda);
  ASSERT_TRUE(before.has_value());
  EXPECT_EQ(before->peak_bytes, before->allocated_bytes) << "the reset starts the peak afresh";

  metrics::Registry registry;
  WorkerMetrics metrics(&registry, kCuda);
  auto history = (*trainer)->Run([&](const StepStats& stats) {
    metrics.RecordStep(stats, ServerTimings{});
    return absl::OkStatus();
  });
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 1u);
  const double peak = Sample(registry, "meft_worker_gpu_memory_bytes{kind=\"peak\"}");
  const double allocated = Sample(registry, "meft_worker_gpu_memory_bytes{kind=\"allocated\"}");
  std::cout << "[cuda] after one step: allocated " << allocated << " B, peak " << peak
            << " B, persistent " << persistent << " B\n";
  EXPECT_GE(allocated, static_cast<double>(persistent));
  EXPECT_GE(peak, static_cast<double>(persistent + TemporaryAllocatingHooks::kTemporaryBytes));
  EXPECT_GE(peak - allocated, static_cast<double>(TemporaryAllocatingHooks::kTemporaryBytes));
}

}  // namespace
}  // namespace meft::worker
