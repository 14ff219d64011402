// A LoRA trained by meft on SmolLM2-135M-Instruct (all 30 layers run; the LoRA sits on every
// projection of layers 1 and 28) loads in Hugging Face PEFT itself
// (`PeftModel.from_pretrained`), and PEFT's logits equal the logits meft's evaluation computes.
//
// - LogitsMatchPeftGolden: the committed checkpoint tests/golden/peft/smollm2_lora/checkpoint/
//   (trained by meft) against PEFT 0.21.2's logits for it (logits.json), no Python needed. Both
//   were written by FreshCheckpointMatchesPeft with MEFT_PEFT_GOLDEN_OUT set
//   (tests/golden/make_peft_lora_golden.sh).
// - FreshCheckpointMatchesPeft: trains the LoRA for a few steps, saves a checkpoint, and runs
//   scripts/python/peft_lora_logits.py (PEFT, transformers, fp32 on the CPU) on it with the Python
//   environment MEFT_VENV (default: the CMake cache variable of that name).
//
// Both fail, never skip, when the model folder, the environment or a golden file is missing.

#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/train/trainer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/gpu_worker/smollm2_model.h"

namespace meft::worker {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kGoldenDir = fs::path(MEFT_GOLDEN_DIR) / "peft" / "smollm2_lora";

// fp32 logits of the same model and LoRA, computed by LibTorch (meft) and by PyTorch (PEFT).
// Measured max abs difference on the golden: 6.5e-5 (chatml, 37 positions) and 4.5e-5 (plain,
// 13 positions), with the LoRA moving the logits by up to 27; a fresh checkpoint gives the same
// (each test prints its figures). The bound is the one SmolLM2's own logits are held to against
// transformers (smollm2_test.cc).
constexpr double kMaxLogitError = 1e-3;

// The LoRA both tests use: every projection, two layers (PEFT's layers_to_transform), rank 2,
// scale lora_alpha / r = 4 (so a scale PEFT read differently could not pass).
LoraOptions Options() {
  LoraOptions o;
  o.rank = 2;
  o.alpha = 8.0;
  o.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.layers = {1, 28};
  o.seed = 5;
  return o;
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> MakeLora(const ModelConfig& c) {
  const int64_t d = c.hidden_size;
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  const int64_t f = c.intermediate_size;
  return LoraAdapter::Create(Options(),
                             {{"q_proj", {d, q}},
                              {"k_proj", {d, kv}},
                              {"v_proj", {d, kv}},
                              {"o_proj", {q, d}},
                              {"gate_proj", {d, f}},
                              {"up_proj", {d, f}},
                              {"down_proj", {f, d}}},
                             torch::kCPU);
}

TrainTarget Target(LoraAdapter* lora) {
  TrainTarget t;
  t.adapter = "lora";
  t.hooks = lora;
  t.local = lora->named_parameters();
  t.lora = lora;
  t.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct";
  return t;
}

absl::StatusOr<json> ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in.good()) return absl::NotFoundError(absl::StrCat(path.string(), " is missing"));
  json out = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (out.is_discarded()) return absl::DataLossError(absl::StrCat(path.string(), ": not JSON"));
  return out;
}

// The prompts: SmolLM2's golden prompts (tests/golden/transformers/smollm2_135m/logits.json),
// real text under the real tokenizer.
std::vector<std::vector<int64_t>> PromptIds(std::vector<std::string>* names) {
  absl::StatusOr<json> g =
      ReadJson(fs::path(MEFT_GOLDEN_DIR) / "transformers" / "smollm2_135m" / "logits.json");
  EXPECT_TRUE(g.ok()) << g.status();
  std::vector<std::vector<int64_t>> out;
  if (!g.ok()) return out;
  for (const json& p : g->at("prompts")) {
    if (p.at("name") == "digits") continue;  // two prompts keep the golden small
    names->push_back(p.at("name").get<std::string>());
    out.push_back(p.at("input_ids").get<std::vector<int64_t>>());
  }
  return out;
}

// Compares meft's logits for `peft`'s prompts (its format: scripts/python/peft_lora_logits.py)
// with PEFT's; returns the max abs error over every prompt, position and stored id. The argmax
// must agree wherever PEFT's lead over the runner-up exceeds twice the bound. Also checks that
// the LoRA moves the logits far more than the bound, so the comparison could fail.
double CompareWithPeft(const LlamaModel& model, AdapterHooks* lora, const json& peft,
                       const std::string& label) {
  torch::NoGradGuard no_grad;
  double worst = 0.0;
  EXPECT_EQ(peft.at("prompts").size(), 2u);
  for (const json& p : peft.at("prompts")) {
    const std::string name = p.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const auto input_ids = p.at("input_ids").get<std::vector<int64_t>>();
    const auto ids = p.at("ids").get<std::vector<int64_t>>();
    const auto argmax = p.at("argmax").get<std::vector<int64_t>>();
    const auto margin = p.at("top2_margin").get<std::vector<double>>();
    const auto rows = p.at("logits").get<std::vector<std::vector<float>>>();
    const int64_t t = static_cast<int64_t>(input_ids.size());
    EXPECT_EQ(rows.size(), input_ids.size());
    std::vector<float> flat;
    for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
    const torch::Tensor want = torch::tensor(flat).view({t, static_cast<int64_t>(ids.size())});
    const torch::Tensor input = torch::tensor(input_ids, torch::kInt64).view({1, -1});
    const torch::Tensor index = torch::tensor(ids, torch::kInt64);

    const torch::Tensor logits = model.Forward(input, {}, nullptr, lora)[0];  // [T, V]
    const double err = (logits.index_select(1, index) - want).abs().max().item<double>();
    EXPECT_LE(err, kMaxLogitError);
    worst = std::max(worst, err);
    const torch::Tensor ours = logits.argmax(-1);
    int64_t compared = 0;
    for (int64_t i = 0; i < t; ++i) {
      if (margin[i] <= 2 * kMaxLogitError) continue;
      ++compared;
      EXPECT_EQ(ours[i].item<int64_t>(), argmax[i]) << "argmax at position " << i;
    }
    const torch::Tensor base = model.Forward(input)[0];
    const double moved = (base.index_select(1, index) - want).abs().max().item<double>();
    EXPECT_GT(moved, 100 * kMaxLogitError) << "the LoRA hardly changes the logits";
    std::cout << "[peft] " << label << ", " << name << ": " << t << " positions x " << ids.size()
              << " ids, max abs logit difference meft - PEFT " << err << " (bound "
              << kMaxLogitError << "); the LoRA moves the logits by up to " << moved
              << "; argmax compared at " << compared << "/" << t << " positions\n";
  }
  return worst;
}

using SmolLM2PeftTest = test_models::SmolLM2Suite;

TEST_F(SmolLM2PeftTest, LogitsMatchPeftGolden) {
  absl::StatusOr<json> peft = ReadJson(kGoldenDir / "logits.json");
  ASSERT_TRUE(peft.ok()) << peft.status() << " (tests/golden/make_peft_lora_golden.sh writes it)";
  absl::StatusOr<std::unique_ptr<LoraAdapter>> lora = MakeLora(model_->config());
  ASSERT_TRUE(lora.ok()) << lora.status();
  const absl::Status loaded =
      LoadAdapterCheckpoint((kGoldenDir / "checkpoint").string(), Target(lora->get()));
  ASSERT_TRUE(loaded.ok()) << loaded;
  std::cout << "[peft] golden made with PEFT " << peft->at("peft_version").get<std::string>()
            << ", transformers " << peft->at("transformers_version").get<std::string>() << "\n";
  CompareWithPeft(*model_, lora->get(), *peft, "golden");
}

TEST_F(SmolLM2PeftTest, FreshCheckpointMatchesPeft) {
  std::string venv = MEFT_VENV_DEFAULT;
  if (const char* env = std::getenv("MEFT_VENV"); env != nullptr && *env != '\0') venv = env;
  ASSERT_TRUE(fs::exists(fs::path(venv) / "bin" / "python"))
      << "MEFT_VENV='" << venv << "' is not a Python environment: run scripts/python-env.sh and "
      << "configure with -DMEFT_VENV=<the path it prints> (scripts/test.sh does)";
  const fs::path root =
      fs::path(::testing::TempDir()) / ("meft_peft_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);

  // A few steps on the prompts themselves (every token labelled), lr high enough that the LoRA
  // moves the logits by whole units.
  std::vector<std::string> names;
  const std::vector<std::vector<int64_t>> prompts = PromptIds(&names);
  ASSERT_EQ(prompts.size(), 2u);
  std::vector<TokenizedExample> examples;
  for (const auto& ids : prompts) {
    TokenizedExample e;
    e.input_ids = ids;
    e.labels = ids;
    e.prompt_length = 0;
    examples.push_back(e);
  }
  absl::StatusOr<std::unique_ptr<DataLoader>> loader = DataLoader::Create(
      examples, /*pad_id=*/2, {.micro_batch_size = 2, .shuffle = false, .seed = 0});
  ASSERT_TRUE(loader.ok()) << loader.status();
  absl::StatusOr<std::unique_ptr<LoraAdapter>> lora = MakeLora(model_->config());
  ASSERT_TRUE(lora.ok()) << lora.status();
  TrainerOptions o;
  o.max_steps = 4;
  o.lr = 2e-2;
  o.warmup_ratio = 0.0;
  o.progress = false;
  o.output_dir = root.string();
  absl::StatusOr<std::unique_ptr<Trainer>> trainer =
      Trainer::Create(model_, Target(lora->get()), loader->get(), o);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<std::vector<StepStats>> history = (*trainer)->Run();
  ASSERT_TRUE(history.ok()) << history.status();
  const fs::path checkpoint = root / "checkpoint-4";
  ASSERT_TRUE(fs::exists(checkpoint / "adapter_model.safetensors"));

  json request = {{"prompts", json::array()}};
  for (size_t i = 0; i < prompts.size(); ++i) {
    request["prompts"].push_back({{"name", names[i]}, {"input_ids", prompts[i]}});
  }
  std::ofstream(root / "prompts.json") << request.dump();
  const std::string command = absl::StrCat(
      "'", venv, "/bin/python' '", MEFT_PYTHON_DIR, "/peft_lora_logits.py' --model-dir '",
      *model_dir_, "' --checkpoint '", checkpoint.string(), "' --prompts '",
      (root / "prompts.json").string(), "' --output '", (root / "peft.json").string(), "'");
  const int rc = std::system(command.c_str());
  ASSERT_EQ(rc, 0) << command;
  absl::StatusOr<json> peft = ReadJson(root / "peft.json");
  ASSERT_TRUE(peft.ok()) << peft.status();
  CompareWithPeft(*model_, lora->get(), *peft, "fresh checkpoint");

  // tests/golden/make_peft_lora_golden.sh: keep this checkpoint and PEFT's logits as the golden.
  if (const char* out = std::getenv("MEFT_PEFT_GOLDEN_OUT"); out != nullptr && *out != '\0') {
    const fs::path golden(out);
    fs::remove_all(golden / "checkpoint");
    fs::create_directories(golden / "checkpoint");
    for (const char* file :
         {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"}) {
      fs::copy_file(checkpoint / file, golden / "checkpoint" / file);
    }
    fs::copy_file(root / "peft.json", golden / "logits.json", fs::copy_options::overwrite_existing);
    std::cout << "[peft] golden written to " << golden << "\n";
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace meft::worker
