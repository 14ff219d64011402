// Tests of generation (greedy and beam search) against slow references that recompute the full
// forward pass without a cache, and of Evaluate end to end (prompts, generation, metrics, files).

#include "gpu_worker/eval/generate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "gpu_worker/data/dataset.h"
#include "gpu_worker/eval/evaluate.h"
#include "gpu_worker/eval/metrics.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "gpu_worker/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using Sequences = std::vector<std::vector<int64_t>>;

const std::string kLlamaTiny = std::string(MEFT_GOLDEN_DIR) + "/transformers/llama_tiny";
constexpr int64_t kVocab = 96;  // llama_tiny's vocabulary.
constexpr int64_t kBos = 1;
constexpr int64_t kPad = 0;
constexpr int64_t kNoEos = -1;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// BOS followed by random ids in [3, kVocab), one prompt per entry of `lengths` (BOS included).
Sequences RandomPrompts(const std::vector<int64_t>& lengths, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> id(3, kVocab - 1);
  Sequences prompts;
  for (int64_t length : lengths) {
    std::vector<int64_t> prompt = {kBos};
    while (static_cast<int64_t>(prompt.size()) < length) prompt.push_back(id(rng));
    prompts.push_back(std::move(prompt));
  }
  return prompts;
}

// Greedy decoding the slow way: one prompt, no padding, no cache, the whole sequence recomputed
// at every step.
std::vector<int64_t> ReferenceGreedy(const LlamaModel& model, const std::vector<int64_t>& prompt,
                                     int64_t eos_id, int64_t max_new_tokens) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> sequence = prompt, out;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    const torch::Tensor ids = torch::tensor(sequence, torch::kInt64).view({1, -1});
    const int64_t token = model.Forward(ids)[0][-1].argmax().item<int64_t>();
    if (token == eos_id) break;
    out.push_back(token);
    sequence.push_back(token);
  }
  return out;
}

// Log-probabilities of every two-token continuation of `prompt`, from uncached full forwards of
// the V sequences prompt + [a]: first[a] = log p(a | prompt), second[a][b] = log p(b | prompt, a).
struct TwoSteps {
  std::vector<double> first;
  std::vector<std::vector<double>> second;
};

TwoSteps BruteForceTwoSteps(const LlamaModel& model, const std::vector<int64_t>& prompt) {
  torch::NoGradGuard no_grad;
  const int64_t length = static_cast<int64_t>(prompt.size());
  torch::Tensor ids = torch::empty({kVocab, length + 1}, torch::kInt64);
  for (int64_t a = 0; a < kVocab; ++a) {
    for (int64_t j = 0; j < length; ++j) ids[a][j] = prompt[j];
    ids[a][length] = a;
  }
  const torch::Tensor logprobs =
      torch::log_softmax(model.Forward(ids), -1).to(torch::kFloat64).contiguous();
  TwoSteps out;
  out.first.resize(kVocab);
  out.second.assign(kVocab, std::vector<double>(kVocab));
  for (int64_t a = 0; a < kVocab; ++a) {
    out.first[a] = logprobs[0][length - 1][a].item<double>();
    for (int64_t b = 0; b < kVocab; ++b) out.second[a][b] = logprobs[a][length][b].item<double>();
  }
  return out;
}

// Beam score of continuation `tokens` (EOS excluded) under max_new_tokens = 2: it ended with EOS
// iff it is shorter than 2.
double TwoStepScore(const TwoSteps& t, const std::vector<int64_t>& tokens, int64_t eos_id,
                    double length_penalty) {
  switch (tokens.size()) {
    case 0:
      return t.first[eos_id];
    case 1:
      return (t.first[tokens[0]] + t.second[tokens[0]][eos_id]) / std::pow(2.0, length_penalty);
    default:
      return (t.first[tokens[0]] + t.second[tokens[0]][tokens[1]]) / std::pow(2.0, length_penalty);
  }
}

// The best-scoring continuation of all V^2 two-token sequences (and the EOS-terminated ones).
std::vector<int64_t> BruteForceBest(const TwoSteps& t, int64_t eos_id, double length_penalty) {
  std::vector<int64_t> best;
  double best_score = -std::numeric_limits<double>::infinity();
  auto consider = [&](std::vector<int64_t> tokens) {
    const double score = TwoStepScore(t, tokens, eos_id, length_penalty);
    if (score > best_score) {
      best_score = score;
      best = std::move(tokens);
    }
  };
  for (int64_t a = 0; a < kVocab; ++a) {
    if (a == eos_id) {
      consider({});
      continue;
    }
    for (int64_t b = 0; b < kVocab; ++b)
      consider(b == eos_id ? std::vector<int64_t>{a} : std::vector<int64_t>{a, b});
  }
  return best;
}

// Beam search the slow way, written from Hugging Face's BeamSearchScorer (one prompt, no cache,
// every beam recomputed from scratch, all V candidates of every beam ranked, no early stopping:
// it always runs max_new_tokens steps).
std::vector<int64_t> ReferenceBeamSearch(const LlamaModel& model,
                                         const std::vector<int64_t>& prompt, int64_t eos_id,
                                         size_t num_beams, int64_t max_new_tokens,
                                         double length_penalty) {
  torch::NoGradGuard no_grad;
  struct Beam {
    double sum;
    std::vector<int64_t> tokens;
  };
  std::vector<Beam> beams = {{0.0, {}}};
  std::vector<std::pair<double, std::vector<int64_t>>> finished;  // Unbounded; best taken last.
  auto penalised = [&](double sum, int64_t length) {
    return sum / std::pow(static_cast<double>(length), length_penalty);
  };
  for (int64_t length = 1; length <= max_new_tokens && !beams.empty(); ++length) {
    struct Candidate {
      double sum;
      size_t beam;
      int64_t token;
    };
    std::vector<Candidate> candidates;
    for (size_t b = 0; b < beams.size(); ++b) {
      std::vector<int64_t> sequence = prompt;
      sequence.insert(sequence.end(), beams[b].tokens.begin(), beams[b].tokens.end());
      const torch::Tensor ids = torch::tensor(sequence, torch::kInt64).view({1, -1});
      const torch::Tensor logprobs =
          torch::log_softmax(model.Forward(ids)[0][-1], -1).to(torch::kFloat64).contiguous();
      for (int64_t v = 0; v < kVocab; ++v) {
        candidates.push_back({beams[b].sum + logprobs[v].item<double>(), b, v});
      }
    }
    std::stable_sort(candidates.begin(), candidates.end(),
                     [](const Candidate& x, const Candidate& y) { return x.sum > y.sum; });
    std::vector<Beam> next;
    for (size_t rank = 0; rank < 2 * num_beams && next.size() < num_beams; ++rank) {
      const Candidate& c = candidates[rank];
      if (c.token == eos_id) {
        if (rank < num_beams) finished.emplace_back(penalised(c.sum, length), beams[c.beam].tokens);
        continue;
      }
      next.push_back({c.sum, beams[c.beam].tokens});
      next.back().tokens.push_back(c.token);
    }
    if (length == max_new_tokens) {
      for (const Beam& beam : next) finished.emplace_back(penalised(beam.sum, length), beam.tokens);
    }
    beams = std::move(next);
  }
  std::stable_sort(finished.begin(), finished.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  return finished.empty() ? std::vector<int64_t>{} : finished.front().second;
}

// Counts the forward passes (calls for layer 0) of a decoding run.
class CountingHooks : public AdapterHooks {
 public:
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& /*ffn_input*/,
                         const torch::Tensor& /*token_mask*/) override {
    if (layer == 0) ++forwards_;
    return {};
  }
  int64_t forwards() const { return forwards_; }

 private:
  int64_t forwards_ = 0;
};

class GenerateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = LlamaModel::Load(kLlamaTiny, torch::kCPU, torch::kFloat32);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(model_, nullptr); }

  static Sequences Run(const Sequences& prompts, int64_t eos_id, const GenerateOptions& options) {
    auto out = Generate(*model_, prompts, eos_id, kPad, options, /*hooks=*/nullptr);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : Sequences(prompts.size());
  }

  static LlamaModel* model_;
};

LlamaModel* GenerateTest::model_ = nullptr;

TEST_F(GenerateTest, GreedyWithCacheMatchesUncachedReference) {
  const Sequences prompts = RandomPrompts({5, 1, 9, 3, 12, 7}, 1);
  GenerateOptions options;
  options.max_new_tokens = 12;
  Sequences expected;
  for (const auto& prompt : prompts) {
    expected.push_back(ReferenceGreedy(*model_, prompt, kNoEos, options.max_new_tokens));
    ASSERT_EQ(expected.back().size(), 12u);
  }
  // One left-padded batch, several batches, and every prompt alone.
  for (int64_t batch_size : {8, 4, 1}) {
    options.batch_size = batch_size;
    EXPECT_EQ(Run(prompts, kNoEos, options), expected) << "batch_size " << batch_size;
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(Run({prompts[i]}, kNoEos, options), Sequences{expected[i]}) << "prompt " << i;
  }
}

TEST_F(GenerateTest, OneBeamIsGreedy) {
  const Sequences prompts = RandomPrompts({4, 8, 2}, 2);
  GenerateOptions options;
  options.max_new_tokens = 10;
  options.num_beams = 1;
  options.length_penalty = 3.0;  // Ignored by greedy decoding.
  const int64_t eos = 2;
  Sequences expected;
  for (const auto& prompt : prompts) {
    expected.push_back(ReferenceGreedy(*model_, prompt, eos, options.max_new_tokens));
  }
  EXPECT_EQ(Run(prompts, eos, options), expected);
}

TEST_F(GenerateTest, GreedyStopsAtEosWhileOthersContinue) {
  const Sequences prompts = RandomPrompts({6, 3, 10, 8}, 3);
  const int64_t max_new = 10;
  Sequences free_run;
  for (const auto& prompt : prompts) {
    free_run.push_back(ReferenceGreedy(*model_, prompt, kNoEos, max_new));
  }
  // Make the token prompt 0 emits second the EOS: prompt 0 stops after at most one token, every
  // sequence is cut before its first occurrence of that token.
  const int64_t eos = free_run[0][1];
  Sequences expected;
  for (const auto& run : free_run) {
    expected.emplace_back(run.begin(), std::find(run.begin(), run.end(), eos));
  }
  ASSERT_LE(expected[0].size(), 1u);
  size_t longest = 0;
  for (const auto& e : expected) longest = std::max(longest, e.size());
  ASSERT_GT(longest, expected[0].size() + 2) << "no other sequence continues; pick other prompts";

  GenerateOptions options;
  options.max_new_tokens = max_new;
  for (int64_t batch_size : {8, 1}) {
    options.batch_size = batch_size;
    EXPECT_EQ(Run(prompts, eos, options), expected) << "batch_size " << batch_size;
  }
}

TEST_F(GenerateTest, BeamSearchMatchesBruteForce) {
  // No EOS (eos_id = -1): all candidates have two tokens, so the length penalty cannot change the
  // ranking, and num_beams = V keeps every first token alive: the search is exhaustive.
  const Sequences prompts = RandomPrompts({4, 9, 6}, 4);
  std::vector<TwoSteps> brute;
  for (const auto& prompt : prompts) brute.push_back(BruteForceTwoSteps(*model_, prompt));

  GenerateOptions options;
  options.max_new_tokens = 2;
  options.num_beams = kVocab;
  const Sequences exact = Run(prompts, kNoEos, options);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int64_t> best = BruteForceBest(brute[i], kNoEos, 1.0);
    EXPECT_EQ(exact[i], best) << "prompt " << i << ": score "
                              << TwoStepScore(brute[i], exact[i], kNoEos, 1.0) << " vs best "
                              << TwoStepScore(brute[i], best, kNoEos, 1.0);
  }

  // Four beams keep greedy's first token, so after two steps they score at least as well.
  options.num_beams = 4;
  const Sequences four = Run(prompts, kNoEos, options);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(four[i].size(), 2u);
    const std::vector<int64_t> greedy = ReferenceGreedy(*model_, prompts[i], kNoEos, 2);
    EXPECT_GE(TwoStepScore(brute[i], four[i], kNoEos, 1.0) + 1e-9,
              TwoStepScore(brute[i], greedy, kNoEos, 1.0))
        << "prompt " << i;
    // Alone or batched: the same beams.
    options.batch_size = 1;
    EXPECT_EQ(Run({prompts[i]}, kNoEos, options), Sequences{four[i]}) << "prompt " << i;
    options.batch_size = 8;
  }
}

TEST_F(GenerateTest, BeamSearchWithEosAndLengthPenaltyMatchesBruteForce) {
  // With an EOS, candidates have 1 ([eos]) or 2 generated tokens and the length penalty decides
  // between them. num_beams = V is still exhaustive: every first token stays alive (the EOS one
  // becomes a hypothesis), and the best two-token candidate ranks first in step two.
  const Sequences prompts = RandomPrompts({5, 8}, 5);
  std::set<size_t> lengths_seen;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const TwoSteps brute = BruteForceTwoSteps(*model_, prompts[i]);
    // EOS = greedy's first or second token, so that EOS-terminated candidates compete.
    const std::vector<int64_t> greedy = ReferenceGreedy(*model_, prompts[i], kNoEos, 2);
    for (int64_t eos : {greedy[0], greedy[1]}) {
      for (double length_penalty : {-1.0, 0.0, 1.0, 4.0}) {
        GenerateOptions options;
        options.max_new_tokens = 2;
        options.num_beams = kVocab;
        options.length_penalty = length_penalty;
        const std::vector<int64_t> got = Run({prompts[i]}, eos, options)[0];
        const std::vector<int64_t> best = BruteForceBest(brute, eos, length_penalty);
        EXPECT_EQ(got, best) << "prompt " << i << " eos " << eos << " length_penalty "
                             << length_penalty;
        lengths_seen.insert(best.size());
      }
    }
  }
  // The cases exercise both an EOS-terminated winner and a full-length one.
  EXPECT_GT(lengths_seen.size(), 1u);
}

TEST_F(GenerateTest, BeamSearchMatchesUncachedReference) {
  // Longer searches with EOS: the cache must follow the beams, and stopping a prompt early (once
  // no live beam can beat its finished hypotheses) must not change the result.
  const Sequences prompts = RandomPrompts({3, 11, 6}, 9);
  const int64_t max_new = 7;
  int64_t fewest_forwards = max_new;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int64_t> greedy = ReferenceGreedy(*model_, prompts[i], kNoEos, 3);
    for (int64_t eos : {greedy[0], greedy[2]}) {
      for (int64_t num_beams : {2, 3}) {
        for (double length_penalty : {-0.5, 0.0, 1.0, 2.0}) {
          SCOPED_TRACE(::testing::Message() << "prompt " << i << " eos " << eos << " beams "
                                          << num_beams << " length_penalty " << length_penalty);
          GenerateOptions options;
          options.max_new_tokens = max_new;
          options.num_beams = num_beams;
          options.length_penalty = length_penalty;
          CountingHooks hooks;
          auto got = Generate(*model_, {prompts[i]}, eos, kPad, options, &hooks);
          ASSERT_TRUE(got.ok()) << got.status();
          EXPECT_EQ((*got)[0], ReferenceBeamSearch(*model_, prompts[i], eos, num_beams, max_new,
                                                   length_penalty));
          fewest_forwards = std::min(fewest_forwards, hooks.forwards());
        }
      }
    }
  }
  // Some search stopped before max_new_tokens.
  EXPECT_LT(fewest_forwards, max_new);
}

TEST_F(GenerateTest, LongerBeamSearchIsBatchInvariant) {
  const Sequences prompts = RandomPrompts({3, 11, 6, 8}, 6);
  GenerateOptions options;
  options.max_new_tokens = 8;
  options.num_beams = 3;
  options.length_penalty = 0.5;
  const int64_t eos = ReferenceGreedy(*model_, prompts[0], kNoEos, 3)[2];
  const Sequences batched = Run(prompts, eos, options);
  options.batch_size = 1;
  EXPECT_EQ(Run(prompts, eos, options), batched);
  for (const auto& out : batched) {
    EXPECT_LE(out.size(), 8u);
    EXPECT_EQ(std::count(out.begin(), out.end(), eos), 0);
  }
}

TEST_F(GenerateTest, EdgeCasesAndBadInput) {
  GenerateOptions options;
  options.max_new_tokens = 0;
  EXPECT_EQ(Run(RandomPrompts({3, 4}, 7), kNoEos, options), Sequences(2));
  options.max_new_tokens = 4;
  EXPECT_EQ(Run({}, kNoEos, options), Sequences{});

  auto code = [&](const Sequences& prompts, int64_t eos, int64_t pad, const GenerateOptions& o) {
    return Generate(*model_, prompts, eos, pad, o, nullptr).status();
  };
  const Sequences good = RandomPrompts({3}, 8);
  EXPECT_THAT(code({good[0], {}}, 2, kPad, options).message(), HasSubstr("prompt 1 is empty"));
  EXPECT_THAT(code({{1, kVocab}}, 2, kPad, options).message(), HasSubstr("prompt 0 token 1"));
  EXPECT_EQ(code(good, kVocab, kPad, options).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, 2, -1, options).code(), absl::StatusCode::kInvalidArgument);
  for (auto mutate : std::vector<void (*)(GenerateOptions*)>{
           [](GenerateOptions* o) { o->max_new_tokens = -1; },
           [](GenerateOptions* o) { o->num_beams = 0; },
           [](GenerateOptions* o) { o->batch_size = 0; },
           [](GenerateOptions* o) { o->length_penalty = std::nan(""); }}) {
    GenerateOptions bad = options;
    mutate(&bad);
    EXPECT_EQ(code(good, 2, kPad, bad).code(), absl::StatusCode::kInvalidArgument);
  }
}

// ---- Evaluate --------------------------------------------------------------------------------

std::vector<std::string> Corpus() {
  return {
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.",
      "### Instruction:",
      "### Input:",
      "### Response:",
      "Name an animal. A cat, a dog or a zebra.",
      "The quick brown fox jumps over the lazy dog.",
      "What is the capital of France? The capital of France is Paris.",
  };
}

// A random tiny LLaMA (weights N(0, 0.02), norms 1) whose head maps unit vector e_slot of the
// final hidden state to token `tokens[slot]`: row tokens[slot] of lm_head is e_slot.
std::unique_ptr<LlamaModel> ForcibleModel(int64_t vocab_size, const std::vector<int64_t>& tokens) {
  ModelConfig c;
  c.vocab_size = vocab_size;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 1024;
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  torch::manual_seed(7);
  auto normal = [](std::vector<int64_t> shape) { return torch::randn(shape) * 0.02; };
  std::map<std::string, torch::Tensor> w;
  w["model.embed_tokens.weight"] = normal({vocab_size, d});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    w[p + "input_layernorm.weight"] = torch::ones({d});
    w[p + "post_attention_layernorm.weight"] = torch::ones({d});
    w[p + "self_attn.q_proj.weight"] = normal({32, d});
    w[p + "self_attn.k_proj.weight"] = normal({16, d});
    w[p + "self_attn.v_proj.weight"] = normal({16, d});
    w[p + "self_attn.o_proj.weight"] = normal({d, 32});
    w[p + "mlp.gate_proj.weight"] = normal({f, d});
    w[p + "mlp.up_proj.weight"] = normal({f, d});
    w[p + "mlp.down_proj.weight"] = normal({d, f});
  }
  w["model.norm.weight"] = torch::ones({d});
  torch::Tensor head = normal({vocab_size, d});
  for (size_t slot = 0; slot < tokens.size(); ++slot) {
    head[tokens[slot]].zero_();
    head[tokens[slot]][slot] = 1.0;
  }
  w["lm_head.weight"] = head;
  auto model = LlamaModel::FromWeights(c, std::move(w), torch::kCPU, torch::kFloat32);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

// Forces a continuation from ForcibleModel by adding a large e_slot to the last layer's FFN
// output: step s of a decoding batch uses slot steps[min(s, last)]. A forward of more than one
// position is a batch's prompt and restarts at step 0.
class ForcingHooks : public AdapterHooks {
 public:
  ForcingHooks(int64_t last_layer, std::vector<int64_t> steps, int64_t hidden_size)
      : last_layer_(last_layer), steps_(std::move(steps)), hidden_size_(hidden_size) {}

  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& /*token_mask*/) override {
    if (layer != last_layer_) return {};
    step_ = ffn_input.size(1) > 1 ? 0 : step_ + 1;
    ++calls_;
    const int64_t last = static_cast<int64_t>(steps_.size()) - 1;
    torch::Tensor delta = torch::zeros({hidden_size_}, ffn_input.options());
    delta[steps_[std::min(step_, last)]] = 1000.0;
    return delta;
  }
  int64_t calls() const { return calls_; }

 private:
  int64_t last_layer_;
  std::vector<int64_t> steps_;
  int64_t hidden_size_;
  int64_t step_ = 0;
  int64_t calls_ = 0;
};

Example MakeExample(std::string id, std::string instruction, std::string input, std::string output,
                    std::vector<std::string> answers = {}) {
  Example e;
  e.id = std::move(id);
  e.instruction = std::move(instruction);
  e.input = std::move(input);
  e.output = std::move(output);
  e.answers = std::move(answers);
  return e;
}

class EvaluateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("meft_generate");
    ASSERT_TRUE(TrainTokenizer(Corpus(), dir + "/tokenizer", 300).ok());
    auto tokenizer = Tokenizer::Load(dir + "/tokenizer.model");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(tokenizer_, nullptr); }

  static Tokenizer* tokenizer_;
  PromptFormatter formatter_ = *PromptFormatter::Create();
};

Tokenizer* EvaluateTest::tokenizer_ = nullptr;

TEST_F(EvaluateTest, WritesPredictionsAndMetrics) {
  // The model answers "cat dog" to every prompt, then EOS.
  std::vector<int64_t> forced = *tokenizer_->Encode("cat dog");
  const std::string answer = tokenizer_->Decode(forced);
  ASSERT_EQ(answer, "cat dog");
  forced.push_back(tokenizer_->eos_id());
  std::vector<int64_t> distinct;  // Slot i of the model and the hook forces token distinct[i].
  std::vector<int64_t> steps;
  for (int64_t token : forced) {
    auto it = std::find(distinct.begin(), distinct.end(), token);
    steps.push_back(it - distinct.begin());
    if (it == distinct.end()) distinct.push_back(token);
  }
  auto model = ForcibleModel(tokenizer_->vocab_size(), distinct);
  ASSERT_NE(model, nullptr);

  const std::vector<Example> examples = {
      MakeExample("a", "Name an animal.", "", "cat"),          // nq 1, squad 1
      MakeExample("b", "Name a pet.", "It barks.", "Dog"),     // nq 0, squad 1
      MakeExample("c", "Name a striped animal.", "", "zebra",  // nq 1 (second answer), squad 1
                  {"zebra", "dog"}),
      MakeExample("d", "Name a large animal that people ride in races.", "", "horse"),  // 0, 0
      MakeExample("e", "Not evaluated: beyond the limit.", "", "cat"),
  };
  const testing::TempDir tmp("meft_generate");
  const std::string dir = tmp.path() + "/eval/out";
  EvaluateOptions options;
  options.metrics = {Metric::kNqSubstring, Metric::kSquadLowercaseSubstring};
  options.generate.max_new_tokens = 16;
  options.generate.batch_size = 3;
  options.limit = 4;
  options.output_dir = dir;
  options.metadata = {{"model", "tiny"}};

  for (int64_t num_beams : {1, 2}) {
    SCOPED_TRACE(num_beams);
    options.generate.num_beams = num_beams;
    ForcingHooks hooks(/*last_layer=*/1, steps, /*hidden_size=*/32);
    std::vector<std::pair<int64_t, int64_t>> progress;
    auto result =
        Evaluate(*model, *tokenizer_, examples, formatter_, options, &hooks,
                 [&](int64_t done, int64_t total) { progress.emplace_back(done, total); });
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_GT(hooks.calls(), 0);
    EXPECT_EQ(progress, (std::vector<std::pair<int64_t, int64_t>>{{3, 4}, {4, 4}}));

    ASSERT_EQ(result->records.size(), 4u);
    const std::vector<std::string> ids = {"a", "b", "c", "d"};
    for (size_t i = 0; i < 4; ++i) {
      const PredictionRecord& r = result->records[i];
      EXPECT_EQ(r.id, ids[i]);
      EXPECT_EQ(r.prediction, answer);
      EXPECT_EQ(r.prompt, formatter_.Format(examples[i]));
      EXPECT_EQ(r.references, References(examples[i]));
    }
    EXPECT_EQ(result->records[2].scores.at("nq_substring_em"), 1.0);
    EXPECT_EQ(result->records[3].scores.at("nq_substring_em"), 0.0);
    EXPECT_EQ(result->summary.num_examples, 4);
    EXPECT_DOUBLE_EQ(result->summary.means.at("nq_substring_em"), 0.5);
    EXPECT_DOUBLE_EQ(result->summary.means.at("squad_lower_substring"), 0.75);

    std::istringstream lines(ReadAll(dir + "/predictions.jsonl"));
    std::string line;
    std::vector<json> parsed;
    while (std::getline(lines, line)) parsed.push_back(json::parse(line));
    ASSERT_EQ(parsed.size(), 4u);
    EXPECT_EQ(parsed[1].at("id"), "b");
    EXPECT_EQ(parsed[1].at("prediction"), answer);
    EXPECT_EQ(parsed[1].at("references"), json::array({"Dog"}));
    EXPECT_EQ(parsed[1].at("scores").at("squad_lower_substring"), 1.0);

    const json metrics = json::parse(ReadAll(dir + "/metrics.json"));
    EXPECT_EQ(metrics.at("num_examples"), 4);
    EXPECT_DOUBLE_EQ(metrics.at("metrics").at("nq_substring_em").get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(metrics.at("metrics").at("squad_lower_substring").get<double>(), 0.75);
    EXPECT_EQ(metrics.at("model"), "tiny");
    EXPECT_EQ(metrics.at("decoding"), num_beams == 1 ? "greedy" : "beam_search");
    EXPECT_EQ(metrics.at("max_new_tokens"), "16");
    EXPECT_EQ(metrics.at("num_beams"), std::to_string(num_beams));
    EXPECT_EQ(metrics.at("num_truncated_prompts"), "0");
  }
}

TEST_F(EvaluateTest, WithoutOutputDirAndBadInput) {
  auto model = ForcibleModel(tokenizer_->vocab_size(), {});
  ASSERT_NE(model, nullptr);
  const std::vector<Example> examples = {MakeExample("x", "Name an animal.", "", "cat")};
  EvaluateOptions options;
  options.metrics = {Metric::kNqSubstring};
  options.generate.max_new_tokens = 3;
  auto result = Evaluate(*model, *tokenizer_, examples, formatter_, options, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->summary.num_examples, 1);

  EvaluateOptions bad = options;
  bad.limit = -1;
  EXPECT_EQ(Evaluate(*model, *tokenizer_, examples, formatter_, bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = options;
  bad.max_prompt_length = 1;
  EXPECT_EQ(Evaluate(*model, *tokenizer_, examples, formatter_, bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = options;
  bad.metadata = {{"metrics", "x"}};
  EXPECT_EQ(Evaluate(*model, *tokenizer_, examples, formatter_, bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = options;
  bad.generate.num_beams = 0;
  EXPECT_EQ(Evaluate(*model, *tokenizer_, examples, formatter_, bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);

  // A tokenizer with more pieces than the model's vocabulary.
  auto small = LlamaModel::Load(kLlamaTiny, torch::kCPU, torch::kFloat32);
  ASSERT_TRUE(small.ok()) << small.status();
  const absl::Status status =
      Evaluate(**small, *tokenizer_, examples, formatter_, options, nullptr).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("vocabulary"));
}

}  // namespace
}  // namespace meft::worker
