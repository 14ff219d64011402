// Tests of the synthetic closed-book benchmark (make-facts): determinism, the template split,
// short answers under the trained tokenizer, a loadable model, and option validation.

#include "gpu_worker/facts/make_facts.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/tokenizer/tokenizer.h"
#include "tests/testing/temp_dir.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kTrainTemplates = 3;

const char* const kFiles[] = {
    "train.jsonl",       "eval.jsonl",
    "heldout.jsonl",     "corpus.txt",
    "facts.json",        "model/tokenizer.model",
    "model/config.json", "model/model.safetensors",
};

std::string Render(std::string templ, const std::string& entity) {
  const std::string placeholder = "{entity}";
  templ.replace(templ.find(placeholder), placeholder.size(), entity);
  return templ;
}

// The facts as facts.json describes them.
struct ExpectedFact {
  std::string entity;
  std::string answer;
  std::vector<std::string> train_questions;    // template index 0..2
  std::vector<std::string> heldout_questions;  // template index 3..4
};

class MakeFactsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_a_ = new std::string(testing::MakeTempDir("meft_facts"));
    dir_b_ = new std::string(testing::MakeTempDir("meft_facts"));
    FactsOptions options;
    options.seed = 7;
    options.output_dir = *dir_a_ + "/out";
    auto a = MakeFacts(options);
    ASSERT_TRUE(a.ok()) << a.status();
    summary_ = new FactsSummary(*a);
    options.output_dir = *dir_b_ + "/out";
    auto b = MakeFacts(options);
    ASSERT_TRUE(b.ok()) << b.status();
  }
  static void TearDownTestSuite() {
    (void)io::RemoveAll(*dir_a_);
    (void)io::RemoveAll(*dir_b_);
    delete dir_a_;
    delete dir_b_;
    delete summary_;
  }

  static std::string Out() { return *dir_a_ + "/out"; }

  static std::vector<Example> Load(const std::string& name) {
    auto examples = LoadJsonl(Out() + "/" + name);
    EXPECT_TRUE(examples.ok()) << examples.status();
    return examples.ok() ? *examples : std::vector<Example>{};
  }

  static std::map<std::string, ExpectedFact> ExpectedFacts() {
    auto text = io::ReadFile(Out() + "/facts.json");
    EXPECT_TRUE(text.ok()) << text.status();
    const nlohmann::json root = nlohmann::json::parse(*text);
    std::map<std::string, nlohmann::json> kinds;
    for (const auto& kind : root.at("kinds")) kinds[kind.at("name")] = kind;
    std::map<std::string, ExpectedFact> facts;
    for (const auto& entity : root.at("entities")) {
      const std::string name = entity.at("name");
      for (const auto& fact : entity.at("facts")) {
        ExpectedFact expected;
        expected.entity = name;
        expected.answer = fact.at("answer");
        const nlohmann::json& kind = kinds.at(fact.at("kind"));
        for (const auto& t : kind.at("train_templates")) {
          expected.train_questions.push_back(Render(t, name));
        }
        for (const auto& t : kind.at("heldout_templates")) {
          expected.heldout_questions.push_back(Render(t, name));
        }
        facts[fact.at("id")] = expected;
      }
    }
    return facts;
  }

  static std::string* dir_a_;
  static std::string* dir_b_;
  static FactsSummary* summary_;
};

std::string* MakeFactsTest::dir_a_ = nullptr;
std::string* MakeFactsTest::dir_b_ = nullptr;
FactsSummary* MakeFactsTest::summary_ = nullptr;

TEST_F(MakeFactsTest, SameOptionsGiveByteIdenticalFiles) {
  for (const char* file : kFiles) {
    auto a = io::ReadFile(*dir_a_ + "/out/" + file);
    auto b = io::ReadFile(*dir_b_ + "/out/" + file);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_FALSE(a->empty()) << file;
    EXPECT_TRUE(*a == *b) << file << " differs between two runs";
  }
}

TEST_F(MakeFactsTest, SummaryMatchesFiles) {
  EXPECT_EQ(summary_->num_facts, 64 * 3);
  EXPECT_EQ(summary_->train_examples, summary_->num_facts * kTrainTemplates);
  EXPECT_EQ(summary_->eval_examples, summary_->num_facts);
  EXPECT_EQ(summary_->heldout_examples, summary_->num_facts);
  EXPECT_EQ(summary_->model_dir, Out() + "/model");
  EXPECT_EQ(static_cast<int64_t>(Load("train.jsonl").size()), summary_->train_examples);
  EXPECT_EQ(static_cast<int64_t>(Load("eval.jsonl").size()), summary_->eval_examples);
  EXPECT_EQ(static_cast<int64_t>(Load("heldout.jsonl").size()), summary_->heldout_examples);
  EXPECT_EQ(static_cast<int64_t>(ExpectedFacts().size()), summary_->num_facts);
}

TEST_F(MakeFactsTest, TrainAndHeldOutUseDisjointTemplates) {
  const std::map<std::string, ExpectedFact> facts = ExpectedFacts();
  ASSERT_EQ(facts.size(), 192u);

  // train: every fact with exactly its three train questions.
  std::map<std::string, std::set<std::string>> train_questions;
  std::set<std::string> all_train;
  for (const Example& e : Load("train.jsonl")) {
    const std::string fact_id = e.id.substr(0, e.id.find('-'));
    ASSERT_TRUE(facts.count(fact_id)) << e.id;
    const ExpectedFact& fact = facts.at(fact_id);
    EXPECT_EQ(e.output, fact.answer) << e.id;
    EXPECT_EQ(e.answers, std::vector<std::string>{fact.answer}) << e.id;
    EXPECT_TRUE(e.input.empty());
    EXPECT_TRUE(train_questions[fact_id].insert(e.instruction).second) << e.id;
    all_train.insert(e.instruction);
  }
  for (const auto& [id, fact] : facts) {
    EXPECT_EQ(train_questions[id],
              std::set<std::string>(fact.train_questions.begin(), fact.train_questions.end()))
        << id;
  }

  // heldout: every fact once, with a held-out question never seen in training.
  std::set<std::string> seen;
  for (const Example& e : Load("heldout.jsonl")) {
    const std::string fact_id = e.id.substr(0, e.id.find('-'));
    ASSERT_TRUE(facts.count(fact_id)) << e.id;
    const ExpectedFact& fact = facts.at(fact_id);
    EXPECT_TRUE(seen.insert(fact_id).second) << e.id;
    EXPECT_THAT(fact.heldout_questions, ::testing::Contains(e.instruction)) << e.id;
    EXPECT_FALSE(all_train.count(e.instruction)) << e.instruction;
    EXPECT_EQ(e.answers, std::vector<std::string>{fact.answer}) << e.id;
  }
  EXPECT_EQ(seen.size(), facts.size());

  // eval: every fact once, with one of its train questions.
  seen.clear();
  for (const Example& e : Load("eval.jsonl")) {
    const std::string fact_id = e.id.substr(0, e.id.find('-'));
    ASSERT_TRUE(facts.count(fact_id)) << e.id;
    EXPECT_TRUE(seen.insert(fact_id).second) << e.id;
    EXPECT_THAT(facts.at(fact_id).train_questions, ::testing::Contains(e.instruction)) << e.id;
    EXPECT_EQ(e.answers, std::vector<std::string>{facts.at(fact_id).answer}) << e.id;
  }
  EXPECT_EQ(seen.size(), facts.size());
}

// The substring metrics must not confuse two answers, nor credit an echoed name or question.
TEST_F(MakeFactsTest, NoAnswerHidesInOtherText) {
  auto text = io::ReadFile(Out() + "/facts.json");
  ASSERT_TRUE(text.ok()) << text.status();
  const nlohmann::json root = nlohmann::json::parse(*text);
  std::vector<std::string> answers;
  std::vector<std::string> others;
  for (const auto& kind : root.at("kinds")) {
    for (const auto& v : kind.at("values")) answers.push_back(v);
    for (const auto& t : kind.at("train_templates")) others.push_back(t);
    for (const auto& t : kind.at("heldout_templates")) others.push_back(t);
  }
  for (const auto& entity : root.at("entities")) others.push_back(entity.at("name"));
  others.push_back(kAlpacaPromptWithoutInput);
  const auto lower = [](std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  for (size_t i = 0; i < answers.size(); ++i) {
    for (size_t j = 0; j < answers.size(); ++j) {
      if (i != j) {
        EXPECT_EQ(answers[j].find(answers[i]), std::string::npos) << answers[i];
      }
    }
    for (const std::string& other : others) {
      EXPECT_EQ(lower(other).find(lower(answers[i])), std::string::npos)
          << answers[i] << " in " << other;
    }
  }
}

TEST_F(MakeFactsTest, AnswersAreFewTokensAndPromptsFit) {
  auto tokenizer = Tokenizer::Load(Out() + "/model");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->vocab_size(), 1024);
  EXPECT_EQ((*tokenizer)->vocab_size(), summary_->vocab_size);
  int64_t total = 0;
  size_t max_tokens = 0;
  const std::vector<Example> eval = Load("eval.jsonl");
  for (const Example& e : eval) {
    const std::vector<int64_t> ids = *(*tokenizer)->Encode(e.output);
    total += static_cast<int64_t>(ids.size());
    max_tokens = std::max(max_tokens, ids.size());
    EXPECT_EQ((*tokenizer)->Decode(ids), e.output);
  }
  const double mean = static_cast<double>(total) / static_cast<double>(eval.size());
  EXPECT_LE(mean, 3.0);
  EXPECT_LE(max_tokens, 4u);
  EXPECT_DOUBLE_EQ(mean, summary_->mean_answer_tokens);
  // The template words are pieces, not bytes: no byte-fallback in a prompt.
  auto formatter = PromptFormatter::Create();
  ASSERT_TRUE(formatter.ok());
  for (const Example& e : eval) {
    const std::vector<int64_t> ids = *(*tokenizer)->Encode(formatter->Format(e));
    for (const int64_t id : ids) {
      EXPECT_NE(id, (*tokenizer)->unk_id());
      const std::string piece = (*tokenizer)->IdToPiece(id);
      if (piece.rfind("<0x", 0) == 0) {
        EXPECT_EQ(piece, "<0x0A>") << e.instruction;
      }
    }
  }
  EXPECT_LE(summary_->max_example_tokens, 256);
  EXPECT_GT(summary_->max_example_tokens, 10);
}

TEST_F(MakeFactsTest, ModelLoadsAndGivesFiniteLogits) {
  auto model = LlamaModel::Load(Out() + "/model", torch::kCPU, torch::kFloat32);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config();
  EXPECT_EQ(config.vocab_size, summary_->vocab_size);
  EXPECT_EQ(config.hidden_size, 64);
  EXPECT_EQ(config.num_hidden_layers, 4);
  EXPECT_EQ(config.num_attention_heads, 4);
  EXPECT_EQ(config.num_key_value_heads, 2);
  EXPECT_EQ(config.intermediate_size, 128);
  EXPECT_EQ(config.bos_token_id, 1);
  EXPECT_EQ(config.eos_token_id, 2);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ((*model)->NumParameters(), summary_->num_parameters);

  // Hugging Face's init: N(0, 0.02) weights, unit norms.
  const auto params = (*model)->NamedParameters();
  const torch::Tensor embed = params.at("model.embed_tokens.weight");
  EXPECT_NEAR(embed.mean().item<double>(), 0.0, 0.002);
  EXPECT_NEAR(embed.std().item<double>(), 0.02, 0.001);
  EXPECT_NEAR(params.at("model.layers.3.mlp.down_proj.weight").std().item<double>(), 0.02, 0.002);
  EXPECT_TRUE(torch::equal(params.at("model.norm.weight"), torch::ones({64})));
  EXPECT_TRUE(torch::equal(params.at("model.layers.0.input_layernorm.weight"), torch::ones({64})));

  auto tokenizer = Tokenizer::Load(Out() + "/model");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto formatter = PromptFormatter::Create();
  ASSERT_TRUE(formatter.ok());
  const std::vector<Example> eval = Load("eval.jsonl");
  ASSERT_FALSE(eval.empty());
  std::vector<int64_t> ids = *TokenizePrompt(eval.front(), *formatter, **tokenizer, 256);
  const torch::Tensor input =
      torch::tensor(ids, torch::kInt64).reshape({1, static_cast<int64_t>(ids.size())});
  torch::NoGradGuard no_grad;
  const torch::Tensor logits = (*model)->Forward(input);
  ASSERT_EQ(logits.dim(), 3);
  EXPECT_EQ(logits.size(0), 1);
  EXPECT_EQ(logits.size(1), static_cast<int64_t>(ids.size()));
  EXPECT_EQ(logits.size(2), (*tokenizer)->vocab_size());
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
}

TEST(MakeFactsSeedTest, SeedChangesTheFactsButNotTheirShape) {
  const testing::TempDir tmp("meft_facts");
  const std::string dir = tmp.path();
  FactsOptions options;
  options.num_entities = 8;
  options.attributes_per_entity = 2;
  options.values_per_attribute = 4;
  options.tokenizer_vocab_size = 320;
  options.output_dir = dir + "/s1";
  options.seed = 1;
  auto one = MakeFacts(options);
  ASSERT_TRUE(one.ok()) << one.status();
  options.output_dir = dir + "/s2";
  options.seed = 2;
  auto two = MakeFacts(options);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(one->num_facts, 16);
  EXPECT_EQ(two->train_examples, 48);
  EXPECT_NE(*io::ReadFile(dir + "/s1/train.jsonl"), *io::ReadFile(dir + "/s2/train.jsonl"));
  EXPECT_NE(*io::ReadFile(dir + "/s1/model/model.safetensors"),
            *io::ReadFile(dir + "/s2/model/model.safetensors"));
  (void)io::RemoveAll(dir);
}

TEST(MakeFactsOptionsTest, BadOptionsNameTheOption) {
  const testing::TempDir tmp("meft_facts");
  const std::string dir = tmp.path();
  struct Case {
    std::string option;
    void (*set)(FactsOptions*);
  };
  const std::vector<Case> cases = {
      {"output_dir", [](FactsOptions* o) { o->output_dir.clear(); }},
      {"num_entities", [](FactsOptions* o) { o->num_entities = 0; }},
      {"num_entities", [](FactsOptions* o) { o->num_entities = 1000000; }},
      {"attributes_per_entity", [](FactsOptions* o) { o->attributes_per_entity = 9; }},
      {"values_per_attribute", [](FactsOptions* o) { o->values_per_attribute = 1; }},
      {"tokenizer_vocab_size", [](FactsOptions* o) { o->tokenizer_vocab_size = 100; }},
      {"hidden_size", [](FactsOptions* o) { o->hidden_size = -64; }},
      {"num_layers", [](FactsOptions* o) { o->num_layers = 0; }},
      {"num_heads", [](FactsOptions* o) { o->num_heads = 0; }},
      {"num_heads", [](FactsOptions* o) { o->num_heads = 5; }},
      {"hidden_size / num_heads", [](FactsOptions* o) { o->hidden_size = 36; }},
      {"num_kv_heads", [](FactsOptions* o) { o->num_kv_heads = 3; }},
      {"intermediate_size", [](FactsOptions* o) { o->intermediate_size = 0; }},
      {"max_position_embeddings", [](FactsOptions* o) { o->max_position_embeddings = 0; }},
      {"output_init_std", [](FactsOptions* o) { o->output_init_std = 0.0; }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    FactsOptions options;
    options.output_dir = absl::StrCat(dir, "/case", i);
    cases[i].set(&options);
    auto result = MakeFacts(options);
    ASSERT_FALSE(result.ok()) << cases[i].option;
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(cases[i].option));
    // Validation comes before any write.
    EXPECT_FALSE(io::PathExists(options.output_dir)) << cases[i].option;
  }
  (void)io::RemoveAll(dir);
}

TEST(MakeFactsOptionsTest, LimitsFoundLaterNameTheOption) {
  const testing::TempDir tmp("meft_facts");
  const std::string dir = tmp.path();
  FactsOptions options;
  options.num_entities = 8;
  options.values_per_attribute = 4;
  options.tokenizer_vocab_size = 320;
  options.output_dir = dir + "/short";
  options.max_position_embeddings = 16;
  auto too_short = MakeFacts(options);
  ASSERT_FALSE(too_short.ok());
  EXPECT_EQ(too_short.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_short.status().message(), HasSubstr("max_position_embeddings"));

  options.max_position_embeddings = 256;
  options.tokenizer_vocab_size = 100000;
  options.output_dir = dir + "/big";
  auto too_big = MakeFacts(options);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_big.status().message(), HasSubstr("tokenizer_vocab_size"));
  (void)io::RemoveAll(dir);
}

}  // namespace
}  // namespace meft::worker
