// Tests of the frozen LLaMA / Mistral decoder: golden logits from Hugging Face transformers
// (tests/golden/make_decoder_golden.py), loading variants, incremental decoding, gradients into
// adapter hooks, and errors for bad model folders.

#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors/safetensors.h"
#include "gmock/gmock.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/model/weights.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using Weights = std::map<std::string, torch::Tensor>;

const std::string kGoldenDir = MEFT_GOLDEN_DIR;
// Written by tests/golden/make_decoder_golden.py: config.json, model.safetensors, golden.json.
const std::string kTransformersDir = kGoldenDir + "/transformers";
const std::vector<std::string> kModels = {"llama_tiny", "mistral_tiny"};

// Throws (failing the test) when `path` is missing or not JSON.
json ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in.good()) throw std::runtime_error("cannot read " + path);
  return json::parse(in);
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  ASSERT_TRUE(out.good()) << path;
}

struct Golden {
  torch::Tensor input_ids;       // [B, T] int64
  torch::Tensor attention_mask;  // [B, T] int64
  torch::Tensor logits;          // [B, T, V] fp32
  std::string source;
};

Golden ReadGolden(const std::string& model_dir) {
  json g = ReadJson(model_dir + "/golden.json");
  Golden out;
  out.source = g.at("source").get<std::string>();
  auto to_2d = [](const json& rows) {
    std::vector<int64_t> flat;
    for (const json& row : rows) {
      for (const json& x : row) flat.push_back(x.get<int64_t>());
    }
    const int64_t b = static_cast<int64_t>(rows.size());
    return torch::tensor(flat, torch::kInt64).view({b, -1});
  };
  out.input_ids = to_2d(g.at("input_ids"));
  out.attention_mask = to_2d(g.at("attention_mask"));
  std::vector<int64_t> shape = g.at("logits_shape").get<std::vector<int64_t>>();
  std::vector<float> logits = g.at("logits").get<std::vector<float>>();
  out.logits = torch::tensor(logits, torch::kFloat32).view(shape);
  return out;
}

std::unique_ptr<LlamaModel> LoadOrDie(const std::string& dir,
                                      torch::ScalarType dtype = torch::kFloat32) {
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Load(dir, torch::Device(torch::kCPU), dtype);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

// Max |a - b| over the positions where mask is 1 ([B, T] masks, [B, T, V] logits).
double MaxErrorAtRealPositions(const torch::Tensor& a, const torch::Tensor& b,
                               const torch::Tensor& mask) {
  torch::Tensor real = mask.to(torch::kBool);
  return (a.index({real}) - b.index({real})).abs().max().item<double>();
}

// Forwards the golden inputs and checks the logits at real positions.
void ExpectGoldenLogits(const std::string& dir, double tolerance) {
  SCOPED_TRACE(dir);
  std::unique_ptr<LlamaModel> model = LoadOrDie(dir);
  ASSERT_NE(model, nullptr);
  Golden golden = ReadGolden(dir);
  torch::NoGradGuard no_grad;
  torch::Tensor logits = model->Forward(golden.input_ids, golden.attention_mask);
  ASSERT_EQ(logits.sizes(), golden.logits.sizes());
  EXPECT_EQ(logits.scalar_type(), torch::kFloat32);
  const double err = MaxErrorAtRealPositions(logits, golden.logits, golden.attention_mask);
  EXPECT_LE(err, tolerance) << "golden source: " << golden.source;
  std::cout << "[golden] " << dir << " (" << golden.source << "): max abs error " << err << "\n";
}

// Writes `weights` converted to `dtype` as one safetensors file.
void WriteWeights(const std::string& path, const Weights& weights,
                  safetensors::DType dtype = safetensors::DType::kF32) {
  torch::ScalarType torch_dtype = dtype == safetensors::DType::kBF16  ? torch::kBFloat16
                                  : dtype == safetensors::DType::kF16 ? torch::kFloat16
                                  : dtype == safetensors::DType::kF64 ? torch::kFloat64
                                                                      : torch::kFloat32;
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorToWrite> tensors;
  for (const auto& [name, t] : weights) {
    torch::Tensor c = t.to(torch_dtype).contiguous();
    keep.push_back(c);
    safetensors::TensorToWrite w;
    w.name = name;
    w.dtype = dtype;
    w.shape = std::vector<int64_t>(c.sizes().begin(), c.sizes().end());
    w.data = std::span<const uint8_t>(static_cast<const uint8_t*>(c.data_ptr()),
                                      static_cast<size_t>(c.numel() * c.element_size()));
    tensors.push_back(std::move(w));
  }
  absl::StatusOr<uint64_t> written = safetensors::Write(path, tensors);
  ASSERT_TRUE(written.ok()) << written.status();
}

class ModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/meft_model_", info->name(), "_", ::getpid(), "_",
                        counter++);
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(std::filesystem::create_directories(dir_));
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // A fresh model folder `name` under the test directory with the golden model's config.json
  // (possibly edited) and no weights.
  std::string NewModelDir(const std::string& name, const std::string& golden_model,
                          const json& config_patch = json::object()) {
    const std::string dir = dir_ + "/" + name;
    std::filesystem::create_directories(dir);
    json config = ReadJson(kTransformersDir + "/" + golden_model + "/config.json");
    config.merge_patch(config_patch);
    WriteText(dir + "/config.json", config.dump(2));
    return dir;
  }

  static Weights GoldenWeights(const std::string& golden_model) {
    absl::StatusOr<Weights> w = LoadWeights(kTransformersDir + "/" + golden_model, torch::kFloat32);
    EXPECT_TRUE(w.ok()) << w.status();
    return w.ok() ? *w : Weights();
  }

  // Loads `dir` and expects failure with `code` and a message containing every fragment.
  static void ExpectLoadError(const std::string& dir, absl::StatusCode code,
                              const std::vector<std::string>& fragments) {
    absl::StatusOr<std::unique_ptr<LlamaModel>> model =
        LlamaModel::Load(dir, torch::Device(torch::kCPU), torch::kFloat32);
    ASSERT_FALSE(model.ok()) << "loaded a bad model folder " << dir;
    EXPECT_EQ(model.status().code(), code) << model.status();
    for (const std::string& f : fragments) {
      EXPECT_THAT(std::string(model.status().message()), HasSubstr(f));
    }
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------------------------
// Golden logits

TEST(ModelGoldenTest, TransformersLogits) {
  for (const std::string& name : kModels) {
    const std::string dir = kTransformersDir + "/" + name;
    ASSERT_TRUE(std::filesystem::exists(dir + "/golden.json"))
        << dir << "/golden.json is missing (tests/golden/make_decoder_golden.py writes it)";
    ExpectGoldenLogits(dir, 1e-4);
  }
}

TEST(ModelGoldenTest, ConfigsAndSizes) {
  absl::StatusOr<ModelConfig> llama = LoadModelConfig(kTransformersDir + "/llama_tiny");
  ASSERT_TRUE(llama.ok()) << llama.status();
  EXPECT_EQ(llama->architecture, "llama");
  EXPECT_EQ(llama->hidden_size, 32);
  EXPECT_EQ(llama->num_attention_heads, 4);
  EXPECT_EQ(llama->num_key_value_heads, 2);
  EXPECT_EQ(llama->head_dim, 8);
  EXPECT_EQ(llama->rope_scaling_factor, 2.0);
  EXPECT_EQ(llama->sliding_window, 0);
  EXPECT_FALSE(llama->tie_word_embeddings);
  EXPECT_EQ(llama->bos_token_id, 1);
  EXPECT_EQ(llama->eos_token_id, 2);
  EXPECT_EQ(llama->pad_token_id, 0);
  EXPECT_EQ(llama->torch_dtype, "float32");

  absl::StatusOr<ModelConfig> mistral = LoadModelConfig(kTransformersDir + "/mistral_tiny");
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  EXPECT_EQ(mistral->architecture, "mistral");
  EXPECT_EQ(mistral->sliding_window, 4);
  EXPECT_TRUE(mistral->tie_word_embeddings);
  EXPECT_EQ(mistral->rope_theta, 1e6);
  EXPECT_EQ(mistral->rope_scaling_factor, 1.0);

  // Per layer: q 32x32, k and v 16x32, o 32x32, gate/up 64x32, down 32x64, two norms of 32.
  const int64_t per_layer = 1024 + 512 + 512 + 1024 + 3 * 2048 + 64;
  std::unique_ptr<LlamaModel> m = LoadOrDie(kTransformersDir + "/llama_tiny");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->NumParameters(), 96 * 32 * 2 + 2 * per_layer + 32);
  std::unique_ptr<LlamaModel> t = LoadOrDie(kTransformersDir + "/mistral_tiny");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->NumParameters(), 96 * 32 + 2 * per_layer + 32);
  EXPECT_EQ(t->NamedParameters().count("lm_head.weight"), 0u);
}

// The sliding window and RoPE scaling must matter for these inputs, or the golden files would
// not test them.
TEST_F(ModelTest, GoldenInputsExerciseWindowAndScaling) {
  for (const auto& [name, patch] :
       std::vector<std::pair<std::string, json>>{{"mistral_tiny", {{"sliding_window", nullptr}}},
                                                 {"llama_tiny", {{"rope_scaling", nullptr}}}}) {
    SCOPED_TRACE(name);
    const std::string dir = NewModelDir(name, name, patch);
    std::filesystem::copy_file(kTransformersDir + "/" + name + "/model.safetensors",
                               dir + "/model.safetensors");
    std::unique_ptr<LlamaModel> model = LoadOrDie(dir);
    ASSERT_NE(model, nullptr);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    torch::NoGradGuard no_grad;
    torch::Tensor logits = model->Forward(golden.input_ids, golden.attention_mask);
    EXPECT_GT(MaxErrorAtRealPositions(logits, golden.logits, golden.attention_mask), 1e-2);
  }
}

// transformers 5 writes RoPE settings as "rope_parameters"; the same model must load from it.
TEST_F(ModelTest, TransformersFiveRopeParameters) {
  const std::string dir = NewModelDir(
      "v5", "llama_tiny",
      {{"rope_theta", nullptr},
       {"rope_scaling", nullptr},
       {"torch_dtype", nullptr},
       {"dtype", "float32"},
       {"rope_parameters", {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10000.0}}}});
  std::filesystem::copy_file(kTransformersDir + "/llama_tiny/model.safetensors",
                             dir + "/model.safetensors");
  WriteText(dir + "/golden.json", ReadJson(kTransformersDir + "/llama_tiny/golden.json").dump());
  ExpectGoldenLogits(dir, 1e-4);
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->torch_dtype, "float32");
}

// ---------------------------------------------------------------------------------------------
// Loading variants

TEST_F(ModelTest, ShardedLoadingGivesIdenticalLogits) {
  for (const std::string& name : kModels) {
    SCOPED_TRACE(name);
    const std::string dir = NewModelDir(name, name);
    Weights all = GoldenWeights(name);
    Weights shard1, shard2;
    json weight_map = json::object();
    int i = 0;
    for (const auto& [tensor, t] : all) {
      const bool first = i++ % 2 == 0;
      (first ? shard1 : shard2)[tensor] = t;
      weight_map[tensor] =
          first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    }
    WriteWeights(dir + "/model-00001-of-00002.safetensors", shard1);
    WriteWeights(dir + "/model-00002-of-00002.safetensors", shard2);
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
    WriteText(dir + "/model.safetensors.index.json", index.dump(2));

    std::unique_ptr<LlamaModel> sharded = LoadOrDie(dir);
    std::unique_ptr<LlamaModel> single = LoadOrDie(kTransformersDir + "/" + name);
    ASSERT_NE(sharded, nullptr);
    ASSERT_NE(single, nullptr);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(sharded->Forward(golden.input_ids, golden.attention_mask),
                             single->Forward(golden.input_ids, golden.attention_mask)));
  }
}

TEST_F(ModelTest, HalfPrecisionWeightFilesLoadConverted) {
  struct Case {
    safetensors::DType file_dtype;
    torch::ScalarType model_dtype;
    double tolerance;
  };
  // bf16 keeps 8 mantissa bits, fp16 11: weight rounding alone moves the logits by about 1e-2
  // and 1e-3; computing in bf16 adds rounding of every activation.
  const std::vector<Case> cases = {
      {safetensors::DType::kBF16, torch::kFloat32, 0.25},
      {safetensors::DType::kF16, torch::kFloat32, 0.05},
      {safetensors::DType::kBF16, torch::kBFloat16, 0.5},
      {safetensors::DType::kF32, torch::kBFloat16, 0.5},
  };
  for (const std::string& name : kModels) {
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    for (const Case& c : cases) {
      const std::string dtype_name(safetensors::DTypeName(c.file_dtype));
      SCOPED_TRACE(
          absl::StrCat(name, " file ", dtype_name, " model ", c10::toString(c.model_dtype)));
      const std::string dir =
          NewModelDir(absl::StrCat(name, "_", dtype_name, "_", c10::toString(c.model_dtype)), name);
      WriteWeights(dir + "/model.safetensors", GoldenWeights(name), c.file_dtype);
      std::unique_ptr<LlamaModel> model = LoadOrDie(dir, c.model_dtype);
      ASSERT_NE(model, nullptr);
      EXPECT_EQ(model->dtype(), c.model_dtype);
      for (const auto& [tensor, t] : model->NamedParameters()) {
        EXPECT_EQ(t.scalar_type(), c.model_dtype) << tensor;
      }
      torch::NoGradGuard no_grad;
      torch::Tensor logits = model->Forward(golden.input_ids, golden.attention_mask);
      EXPECT_EQ(logits.scalar_type(), torch::kFloat32);
      const double err = MaxErrorAtRealPositions(logits, golden.logits, golden.attention_mask);
      EXPECT_LE(err, c.tolerance);
      std::cout << "[half] " << name << " file " << dtype_name << " model "
                << c10::toString(c.model_dtype) << ": max abs error " << err << "\n";
      if (c.file_dtype != safetensors::DType::kF32) {
        EXPECT_GT(err, 0.0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Incremental decoding

TEST(ModelDecodingTest, KvCacheMatchesFullForward) {
  for (const std::string& name : kModels) {
    SCOPED_TRACE(name);
    std::unique_ptr<LlamaModel> model = LoadOrDie(kTransformersDir + "/" + name);
    ASSERT_NE(model, nullptr);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    torch::NoGradGuard no_grad;
    const torch::Tensor ids = golden.input_ids.slice(0, 0, 1);  // [1, 12], no padding.
    const torch::Tensor full = model->Forward(ids);
    const int64_t prefill = 3;  // Fewer than the window of 4; decoding then crosses it.
    KvCache cache;
    torch::Tensor logits = model->Forward(ids.slice(1, 0, prefill), {}, &cache);
    EXPECT_EQ(cache.length(), prefill);
    EXPECT_EQ(cache.batch_size(), 1);
    EXPECT_LE((logits - full.slice(1, 0, prefill)).abs().max().item<double>(), 1e-5);
    // Mostly one token at a time, once two at once.
    int64_t t = prefill;
    for (int64_t n : {1, 1, 1, 1, 1, 1, 2, 1}) {
      logits = model->Forward(ids.slice(1, t, t + n), {}, &cache);
      ASSERT_EQ(cache.length(), t + n);
      const double err =
          (logits.select(1, n - 1) - full.select(1, t + n - 1)).abs().max().item<double>();
      EXPECT_LE(err, 1e-5) << "step at position " << t;
      t += n;
    }
    EXPECT_EQ(t, ids.size(1));
  }
}

TEST(ModelDecodingTest, LeftPaddingAndBeamReorder) {
  for (const std::string& name : kModels) {
    SCOPED_TRACE(name);
    std::unique_ptr<LlamaModel> model = LoadOrDie(kTransformersDir + "/" + name);
    ASSERT_NE(model, nullptr);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    torch::NoGradGuard no_grad;
    const int64_t T = golden.input_ids.size(1);
    const torch::Tensor a = golden.input_ids.slice(0, 0, 1);                 // 12 real tokens.
    const torch::Tensor b = golden.input_ids.slice(0, 1, 2).slice(1, 0, 8);  // 8 real tokens.
    const int64_t pad = T - b.size(1);

    // Batch [a; left-padded b]; pads carry an arbitrary id.
    torch::Tensor ids =
        torch::cat({a, torch::cat({torch::full({1, pad}, 5, torch::kInt64), b}, 1)});
    torch::Tensor mask = torch::ones({2, T}, torch::kInt64);
    mask.index_put_({1, torch::indexing::Slice(0, pad)}, 0);
    KvCache cache;
    torch::Tensor batch_logits = model->Forward(ids, mask, &cache);
    const torch::Tensor a_alone = model->Forward(a);
    const torch::Tensor b_alone = model->Forward(b);
    EXPECT_LE((batch_logits[0] - a_alone[0]).abs().max().item<double>(), 1e-5);
    EXPECT_LE((batch_logits[1].slice(0, pad) - b_alone[0]).abs().max().item<double>(), 1e-5);

    // Beam-search style: swap the rows and keep decoding one token per row.
    cache.ReorderBatch(torch::tensor({1, 0, 1}, torch::kInt64));
    EXPECT_EQ(cache.batch_size(), 3);
    const torch::Tensor next = torch::tensor({{7}, {9}, {11}}, torch::kInt64);
    torch::Tensor step = model->Forward(next, {}, &cache);
    const torch::Tensor b7 = model->Forward(torch::cat({b, next.slice(0, 0, 1)}, 1));
    const torch::Tensor a9 = model->Forward(torch::cat({a, next.slice(0, 1, 2)}, 1));
    const torch::Tensor b11 = model->Forward(torch::cat({b, next.slice(0, 2, 3)}, 1));
    EXPECT_LE((step[0][0] - b7[0][-1]).abs().max().item<double>(), 1e-5);
    EXPECT_LE((step[1][0] - a9[0][-1]).abs().max().item<double>(), 1e-5);
    EXPECT_LE((step[2][0] - b11[0][-1]).abs().max().item<double>(), 1e-5);

    // A wrong batch size is a caller error.
    EXPECT_THROW(model->Forward(next.slice(0, 0, 2), {}, &cache), c10::Error);
    cache.Clear();
    EXPECT_TRUE(cache.empty());
  }
}

TEST(ModelDecodingTest, RejectsBadInputIds) {
  std::unique_ptr<LlamaModel> model = LoadOrDie(kTransformersDir + "/llama_tiny");
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  EXPECT_THROW(model->Forward(torch::tensor({{1, 96}}, torch::kInt64)), c10::Error);
  EXPECT_THROW(model->Forward(torch::tensor({{1, -1}}, torch::kInt64)), c10::Error);
  EXPECT_THROW(model->Forward(torch::tensor({{1, 2}}, torch::kInt32)), c10::Error);
  EXPECT_THROW(model->Forward(torch::tensor({1, 2}, torch::kInt64)), c10::Error);
  EXPECT_THROW(model->Forward(torch::tensor({{1, 2}}, torch::kInt64), torch::ones({1, 3})),
               c10::Error);
}

// ---------------------------------------------------------------------------------------------
// Gradients into adapter hooks

class LinearFfnHook : public AdapterHooks {
 public:
  explicit LinearFfnHook(int64_t d) : w(torch::zeros({d, d}).requires_grad_(true)) {}
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& token_mask) override {
    EXPECT_EQ(ffn_input.dim(), 3);
    EXPECT_EQ(token_mask.sizes(), ffn_input.sizes().slice(0, 2));
    layers.insert(layer);
    return ffn_input.matmul(w);
  }
  torch::Tensor w;
  std::set<int64_t> layers;
};

class LoraLikeHook : public AdapterHooks {
 public:
  torch::Tensor ProjectionDelta(int64_t layer, const std::string& projection,
                                const torch::Tensor& input) override {
    calls.insert(absl::StrCat(layer, ".", projection));
    if (projection != "v_proj") return {};
    if (!a.defined()) a = (0.1 * torch::ones({input.size(-1), 16})).requires_grad_(true);
    return input.matmul(a);
  }
  torch::Tensor a;
  std::set<std::string> calls;
};

TEST(ModelGradientTest, GradientsReachHookParametersOnly) {
  for (const std::string& name : kModels) {
    SCOPED_TRACE(name);
    std::unique_ptr<LlamaModel> model = LoadOrDie(kTransformersDir + "/" + name);
    ASSERT_NE(model, nullptr);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    for (const auto& [tensor, t] : model->NamedParameters()) {
      EXPECT_FALSE(t.requires_grad()) << tensor;
    }

    LinearFfnHook ffn_hook(model->config().hidden_size);
    torch::Tensor logits =
        model->Forward(golden.input_ids, golden.attention_mask, nullptr, &ffn_hook);
    // A zero delta must not change the result.
    EXPECT_LE(MaxErrorAtRealPositions(logits.detach(), golden.logits, golden.attention_mask), 1e-4);
    EXPECT_EQ(ffn_hook.layers, (std::set<int64_t>{0, 1}));
    logits.sum().backward();
    ASSERT_TRUE(ffn_hook.w.grad().defined());
    EXPECT_GT(ffn_hook.w.grad().abs().sum().item<double>(), 0.0);
    for (const auto& [tensor, t] : model->NamedParameters()) {
      EXPECT_FALSE(t.grad().defined()) << tensor;
    }

    LoraLikeHook lora;
    torch::Tensor lora_logits =
        model->Forward(golden.input_ids, golden.attention_mask, nullptr, &lora);
    EXPECT_EQ(lora.calls.size(), 2u * 7u);
    EXPECT_EQ(lora.calls.count("1.down_proj"), 1u);
    EXPECT_GT((lora_logits.detach() - logits.detach()).abs().max().item<double>(), 1e-3);
    lora_logits.sum().backward();
    ASSERT_TRUE(lora.a.grad().defined());
    EXPECT_GT(lora.a.grad().abs().sum().item<double>(), 0.0);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA (skipped without a GPU)

TEST(ModelCudaTest, GoldenLogitsAndDecodingOnGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device cuda(torch::kCUDA, 0);
  for (const std::string& name : kModels) {
    SCOPED_TRACE(name);
    Golden golden = ReadGolden(kTransformersDir + "/" + name);
    torch::NoGradGuard no_grad;
    for (torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16}) {
      absl::StatusOr<std::unique_ptr<LlamaModel>> model =
          LlamaModel::Load(kTransformersDir + "/" + name, cuda, dtype);
      ASSERT_TRUE(model.ok()) << model.status();
      torch::Tensor logits = (*model)->Forward(golden.input_ids, golden.attention_mask);
      EXPECT_TRUE(logits.is_cuda());
      const double err =
          MaxErrorAtRealPositions(logits.cpu(), golden.logits, golden.attention_mask);
      EXPECT_LE(err, dtype == torch::kFloat32 ? 1e-4 : 0.5) << c10::toString(dtype);

      const torch::Tensor ids = golden.input_ids.slice(0, 0, 1);
      const torch::Tensor full = (*model)->Forward(ids).cpu();
      KvCache cache;
      (*model)->Forward(ids.slice(1, 0, 6), {}, &cache);
      for (int64_t t = 6; t < ids.size(1); ++t) {
        torch::Tensor step = (*model)->Forward(ids.slice(1, t, t + 1), {}, &cache).cpu();
        EXPECT_LE((step[0][0] - full[0][t]).abs().max().item<double>(),
                  dtype == torch::kFloat32 ? 1e-4 : 0.25)
            << "position " << t;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad model folders

TEST_F(ModelTest, CorruptAndTruncatedSafetensors) {
  const std::string src = kTransformersDir + "/llama_tiny/model.safetensors";
  const std::string data = [&] {
    std::ifstream in(src, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  ASSERT_GT(data.size(), 1000u);

  const std::string truncated = NewModelDir("truncated", "llama_tiny");
  WriteText(truncated + "/model.safetensors", data.substr(0, data.size() - 100));
  ExpectLoadError(truncated, absl::StatusCode::kInvalidArgument,
                  {truncated + "/model.safetensors", "model.norm.weight"});

  const std::string corrupt = NewModelDir("corrupt", "llama_tiny");
  std::string bad = data;
  bad[7] = '\x7f';  // Header length far beyond the file.
  WriteText(corrupt + "/model.safetensors", bad);
  ExpectLoadError(corrupt, absl::StatusCode::kInvalidArgument,
                  {corrupt + "/model.safetensors", "header length"});

  const std::string garbage = NewModelDir("garbage", "llama_tiny");
  bad = data;
  bad[9] = '[';  // Header no longer a JSON object.
  WriteText(garbage + "/model.safetensors", bad);
  ExpectLoadError(garbage, absl::StatusCode::kInvalidArgument, {garbage + "/model.safetensors"});

  const std::string none = NewModelDir("none", "llama_tiny");
  ExpectLoadError(none, absl::StatusCode::kNotFound,
                  {none, "model.safetensors", "model.safetensors.index.json"});
}

TEST_F(ModelTest, MissingWrongShapeExtraAndUnsupportedTensors) {
  Weights golden = GoldenWeights("llama_tiny");

  const std::string missing = NewModelDir("missing", "llama_tiny");
  Weights w = golden;
  w.erase("model.layers.1.mlp.up_proj.weight");
  WriteWeights(missing + "/model.safetensors", w);
  ExpectLoadError(missing, absl::StatusCode::kNotFound,
                  {missing, "model.layers.1.mlp.up_proj.weight", "[64, 32]"});

  const std::string shape = NewModelDir("shape", "llama_tiny");
  w = golden;
  w["model.layers.0.mlp.gate_proj.weight"] = w["model.layers.0.mlp.gate_proj.weight"].t();
  WriteWeights(shape + "/model.safetensors", w);
  ExpectLoadError(shape, absl::StatusCode::kInvalidArgument,
                  {shape + "/model.safetensors", "model.layers.0.mlp.gate_proj.weight",
                   "has shape [32, 64], expected [64, 32]"});

  // An explicit head_dim other than hidden / heads changes the expected projection shapes.
  const std::string head_dim = NewModelDir("head_dim", "llama_tiny", {{"head_dim", 16}});
  WriteWeights(head_dim + "/model.safetensors", golden);
  ExpectLoadError(head_dim, absl::StatusCode::kInvalidArgument,
                  {"model.layers.0.self_attn.q_proj.weight", "expected [64, 32]"});

  const std::string extra = NewModelDir("extra", "llama_tiny");
  w = golden;
  w["model.layers.2.mlp.up_proj.weight"] = torch::zeros({64, 32});
  w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch::zeros({4});  // Ignored.
  WriteWeights(extra + "/model.safetensors", w);
  ExpectLoadError(extra, absl::StatusCode::kInvalidArgument,
                  {extra + "/model.safetensors", "unexpected tensor 'model.layers.2.mlp.up_proj"});

  const std::string f64 = NewModelDir("f64", "llama_tiny");
  WriteWeights(f64 + "/model.safetensors", golden, safetensors::DType::kF64);
  ExpectLoadError(f64, absl::StatusCode::kInvalidArgument,
                  {f64 + "/model.safetensors", "F64", "lm_head.weight"});

  // A tied model ignores a stored lm_head (as transformers does).
  const std::string tied = NewModelDir("tied", "llama_tiny", {{"tie_word_embeddings", true}});
  WriteWeights(tied + "/model.safetensors", golden);
  std::unique_ptr<LlamaModel> model = LoadOrDie(tied);
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->NamedParameters().count("lm_head.weight"), 0u);

  absl::StatusOr<Weights> bad_dtype = LoadWeights(kTransformersDir + "/llama_tiny", torch::kInt32);
  ASSERT_FALSE(bad_dtype.ok());
  EXPECT_EQ(bad_dtype.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelTest, BadConfigValues) {
  struct Case {
    std::string name;
    json patch;
    absl::StatusCode code;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {"heads",
       {{"num_attention_heads", 5}},
       absl::StatusCode::kInvalidArgument,
       {"num_attention_heads", "(5) must divide hidden_size (32)"}},
      {"kv_heads",
       {{"num_key_value_heads", 3}},
       absl::StatusCode::kInvalidArgument,
       {"num_key_value_heads"}},
      {"missing",
       {{"hidden_size", nullptr}},
       absl::StatusCode::kInvalidArgument,
       {"\"hidden_size\"", "missing"}},
      {"type",
       {{"vocab_size", "96"}},
       absl::StatusCode::kInvalidArgument,
       {"\"vocab_size\"", "integer"}},
      {"negative",
       {{"intermediate_size", -64}},
       absl::StatusCode::kInvalidArgument,
       {"\"intermediate_size\"", "positive"}},
      {"eps", {{"rms_norm_eps", 0}}, absl::StatusCode::kInvalidArgument, {"\"rms_norm_eps\""}},
      {"rope",
       {{"rope_scaling", {{"rope_type", nullptr}, {"type", "dynamic"}}}},
       absl::StatusCode::kUnimplemented,
       {"rope_scaling.type", "\"dynamic\""}},
      {"rope3",
       {{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}}},
       absl::StatusCode::kUnimplemented,
       {"rope_scaling.rope_type", "\"llama3\""}},
      {"factor",
       {{"rope_scaling", {{"factor", nullptr}}}},
       absl::StatusCode::kInvalidArgument,
       {"rope_scaling.factor"}},
      {"arch", {{"model_type", "gpt2"}}, absl::StatusCode::kUnimplemented, {"model_type", "gpt2"}},
      {"act", {{"hidden_act", "gelu"}}, absl::StatusCode::kUnimplemented, {"hidden_act"}},
      {"bias", {{"attention_bias", true}}, absl::StatusCode::kUnimplemented, {"attention_bias"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = NewModelDir(c.name, "llama_tiny", c.patch);
    absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
    if (config.ok()) {
      ADD_FAILURE() << "accepted a bad config.json";
      continue;
    }
    EXPECT_EQ(config.status().code(), c.code) << config.status();
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(dir + "/config.json"));
    for (const std::string& f : c.fragments) {
      EXPECT_THAT(std::string(config.status().message()), HasSubstr(f));
    }
    ExpectLoadError(dir, c.code, {dir + "/config.json"});
  }

  const std::string broken = NewModelDir("broken", "llama_tiny");
  WriteText(broken + "/config.json", "{\"hidden_size\": 32,");
  ExpectLoadError(broken, absl::StatusCode::kInvalidArgument, {broken + "/config.json", "JSON"});
  ExpectLoadError(dir_ + "/nowhere", absl::StatusCode::kNotFound, {"config.json"});
}

TEST_F(ModelTest, BadShardIndex) {
  Weights golden = GoldenWeights("mistral_tiny");
  auto make_sharded = [&](const std::string& name) {
    const std::string dir = NewModelDir(name, "mistral_tiny");
    WriteWeights(dir + "/model-00001-of-00002.safetensors", golden);
    json weight_map = json::object();
    for (const auto& [tensor, t] : golden) weight_map[tensor] = "model-00001-of-00002.safetensors";
    return std::make_pair(dir, weight_map);
  };
  auto write_index = [](const std::string& dir, const json& weight_map) {
    WriteText(dir + "/model.safetensors.index.json", json{{"weight_map", weight_map}}.dump());
  };

  auto [missing_dir, missing_map] = make_sharded("missing_shard");
  missing_map["model.norm.weight"] = "model-00002-of-00002.safetensors";
  write_index(missing_dir, missing_map);
  ExpectLoadError(missing_dir, absl::StatusCode::kNotFound,
                  {missing_dir + "/model.safetensors.index.json",
                   "model-00002-of-00002.safetensors", "model.norm.weight"});

  auto [absent_dir, absent_map] = make_sharded("absent_tensor");
  absent_map["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors";
  write_index(absent_dir, absent_map);
  ExpectLoadError(absent_dir, absl::StatusCode::kNotFound,
                  {"model.safetensors.index.json", "model.layers.7.mlp.up_proj.weight",
                   "model-00001-of-00002.safetensors"});

  auto [unlisted_dir, unlisted_map] = make_sharded("unlisted");
  unlisted_map.erase("model.norm.weight");
  write_index(unlisted_dir, unlisted_map);
  ExpectLoadError(
      unlisted_dir, absl::StatusCode::kInvalidArgument,
      {"model.safetensors.index.json", "model.norm.weight", "model-00001-of-00002.safetensors"});

  auto [escape_dir, escape_map] = make_sharded("escape");
  escape_map["model.norm.weight"] = "../other/model.safetensors";
  write_index(escape_dir, escape_map);
  ExpectLoadError(escape_dir, absl::StatusCode::kInvalidArgument,
                  {"model.safetensors.index.json", "../other/model.safetensors"});

  auto [malformed_dir, malformed_map] = make_sharded("malformed");
  WriteText(malformed_dir + "/model.safetensors.index.json", "{\"weight_map\": [1, 2]}");
  ExpectLoadError(malformed_dir, absl::StatusCode::kInvalidArgument,
                  {malformed_dir + "/model.safetensors.index.json", "weight_map"});
}

}  // namespace
}  // namespace meft::worker
