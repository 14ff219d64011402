#include "gpu_worker/data/dataset.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/io/file_util.h"
#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "gpu_worker/tokenizer/tokenizer.h"
#include "tests/testing/temp_dir.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

void WriteAll(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
}

std::vector<int64_t> Row(const at::Tensor& t, int64_t row) {
  at::Tensor r = t[row].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

std::vector<std::string> Corpus() {
  return {
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.",
      "### Instruction:",
      "### Input:",
      "### Response:",
      "What is the capital of France? The capital of France is Paris.",
      "Add the numbers 12 and 30. The sum is 42.",
      "Name a primary color. Red, blue and yellow are primary colors.",
      "The quick brown fox jumps over the lazy dog.",
  };
}

class DatasetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("meft_dataset");
    ASSERT_TRUE(TrainTokenizer(Corpus(), dir + "/tokenizer", 320).ok());
    auto tokenizer = Tokenizer::Load(dir + "/tokenizer.model");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(tokenizer_, nullptr);
    dir_ = testing::MakeTempDir("meft_dataset");
    auto formatter = PromptFormatter::Create();
    ASSERT_TRUE(formatter.ok()) << formatter.status();
    formatter_ = *formatter;
  }

  Example MakeExample(std::string instruction, std::string input, std::string output) {
    Example example;
    example.instruction = std::move(instruction);
    example.input = std::move(input);
    example.output = std::move(output);
    return example;
  }

  // Loads `content` from a file called `name`; returns the status message.
  std::string LoadError(const std::string& name, const std::string& content) {
    WriteAll(dir_ + "/" + name, content);
    auto examples = LoadJsonl(dir_ + "/" + name);
    EXPECT_FALSE(examples.ok());
    EXPECT_EQ(examples.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(examples.status().message());
  }

  static Tokenizer* tokenizer_;
  std::string dir_;
  PromptFormatter formatter_ = *PromptFormatter::Create();
};

Tokenizer* DatasetTest::tokenizer_ = nullptr;

TEST_F(DatasetTest, LoadsJsonl) {
  WriteAll(dir_ + "/train.jsonl",
           "{\"instruction\": \"Capital of France?\", \"output\": \"Paris\"}\n"
           "\n"
           "   \r\n"
           "{\"instruction\": \"Add\", \"input\": \"12 and 30\", \"output\": \"42\", \"id\": 7}\r\n"
           "{\"instruction\": \"Colors\", \"input\": null, \"output\": \"red\", \"id\": \"c-1\", "
           "\"answers\": [\"red\", \"blue\"], \"extra\": {\"ignored\": true}}");
  auto examples = LoadJsonl(dir_ + "/train.jsonl");
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 3u);
  const Example& a = (*examples)[0];
  EXPECT_EQ(a.instruction, "Capital of France?");
  EXPECT_EQ(a.input, "");
  EXPECT_EQ(a.output, "Paris");
  EXPECT_EQ(a.id, "0");
  EXPECT_EQ(a.line, 1);
  EXPECT_EQ(References(a), std::vector<std::string>{"Paris"});
  const Example& b = (*examples)[1];
  EXPECT_EQ(b.input, "12 and 30");
  EXPECT_EQ(b.id, "7");
  EXPECT_EQ(b.line, 4);
  const Example& c = (*examples)[2];
  EXPECT_EQ(c.input, "");
  EXPECT_EQ(c.id, "c-1");
  EXPECT_EQ(c.line, 5);
  EXPECT_EQ(References(c), (std::vector<std::string>{"red", "blue"}));
}

TEST_F(DatasetTest, BadLinesNameFileLineAndField) {
  const std::string ok = "{\"instruction\": \"i\", \"output\": \"o\"}\n";
  const std::string path = dir_ + "/train.jsonl";
  EXPECT_THAT(LoadError("train.jsonl", ok + ok + "{\"instruction\": \"i\"}\n"),
              HasSubstr(path + ":3: field \"output\" is missing"));
  EXPECT_THAT(LoadError("train.jsonl", ok + "\n{\"output\": \"o\"}\n"),
              HasSubstr(path + ":3: field \"instruction\" is missing"));
  EXPECT_THAT(LoadError("train.jsonl", "{\"instruction\": \"i\", \"output\": 5}\n"),
              HasSubstr(path + ":1: field \"output\" must be a string, got number"));
  EXPECT_THAT(LoadError("train.jsonl", "{\"instruction\": null, \"output\": \"o\"}\n"),
              HasSubstr(path + ":1: field \"instruction\" must be a string, got null"));
  EXPECT_THAT(
      LoadError("train.jsonl", "{\"instruction\": \"i\", \"input\": [1], \"output\": \"o\"}"),
      HasSubstr(path + ":1: field \"input\" must be a string, got array"));
  EXPECT_THAT(LoadError("train.jsonl", ok + "{\"instruction\": \"i\", \"output\": \"o\"\n"),
              HasSubstr(path + ":2: not valid JSON"));
  EXPECT_THAT(LoadError("train.jsonl", ok + ok + ok + "[1, 2]\n"),
              HasSubstr(path + ":4: expected a JSON object, got array"));
  EXPECT_THAT(LoadError("train.jsonl", "{\"instruction\": \"i\", \"output\": \"o\", \"id\": 1.5}"),
              HasSubstr(path + ":1: field \"id\" must be a string or an integer"));
  EXPECT_THAT(LoadError("train.jsonl",
                        "{\"instruction\": \"i\", \"output\": \"o\", "
                        "\"answers\": [\"a\", 3]}"),
              HasSubstr(path + ":1: field \"answers\"[1] must be a string"));
  EXPECT_THAT(LoadError("train.jsonl",
                        "{\"instruction\": \"i\", \"output\": \"o\", "
                        "\"answers\": \"a\"}"),
              HasSubstr(path + ":1: field \"answers\" must be an array of strings"));
  EXPECT_THAT(LoadError("train.jsonl", "{\"instruction\": \"\xff\", \"output\": \"o\"}"),
              HasSubstr(path + ":1: not valid JSON"));
  EXPECT_THAT(LoadError("train.jsonl", "\n  \n"), HasSubstr(path + ": no examples"));

  auto missing = LoadJsonl(dir_ + "/missing.jsonl");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(dir_ + "/missing.jsonl"));
}

TEST_F(DatasetTest, AlpacaTemplateExactStrings) {
  EXPECT_EQ(formatter_.Format(MakeExample("Name a color.", "", "red")),
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n");
  EXPECT_EQ(formatter_.Format(MakeExample("Add.", "12 and 30", "42")),
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd.\n\n### Input:\n12 and 30\n\n### Response:\n");
}

TEST_F(DatasetTest, CustomTemplates) {
  PromptTemplate t;
  t.with_input = "Q: {instruction} {{ctx}}: {input}\nA:";
  t.without_input = "Q: {instruction} }\nA:";
  auto formatter = PromptFormatter::Create(t);
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  // Substituted text is never expanded again.
  EXPECT_EQ(formatter->Format(MakeExample("say {input}", "x{instruction}", "")),
            "Q: say {input} {ctx}: x{instruction}\nA:");
  EXPECT_EQ(formatter->Format(MakeExample("hi", "", "")), "Q: hi }\nA:");

  auto error = [](std::string with_input, std::string without_input) {
    PromptTemplate bad;
    bad.with_input = std::move(with_input);
    bad.without_input = std::move(without_input);
    auto f = PromptFormatter::Create(bad);
    EXPECT_FALSE(f.ok());
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(f.status().message());
  };
  EXPECT_THAT(error("{instruction} {context}", "{instruction}"),
              HasSubstr("with_input: unknown placeholder \"{context}\""));
  EXPECT_THAT(error("{instruction} {input}", "{instruction} {Instruction}"),
              HasSubstr("without_input: unknown placeholder \"{Instruction}\""));
  EXPECT_THAT(error("{instruction} {input}", "{instruction} {input}"),
              HasSubstr("without_input: placeholder \"{input}\" is not allowed"));
  EXPECT_THAT(error("{instruction}", "{instruction}"),
              HasSubstr("with_input: placeholder \"{input}\" is missing"));
  EXPECT_THAT(error("{input}", "{instruction}"),
              HasSubstr("with_input: placeholder \"{instruction}\" is missing"));
  EXPECT_THAT(error("{instruction} {input", "{instruction}"),
              HasSubstr("with_input: unterminated \"{\""));
}

TEST_F(DatasetTest, LabelsMaskThePromptExactly) {
  const Example example = MakeExample("Capital of France?", "", "The capital is Paris.");
  const std::vector<int64_t> prompt = *tokenizer_->Encode(formatter_.Format(example));
  const std::vector<int64_t> output = *tokenizer_->Encode(example.output);
  auto tokenized = TokenizeExample(example, formatter_, *tokenizer_, TokenizeOptions{});
  ASSERT_TRUE(tokenized.ok()) << tokenized.status();

  std::vector<int64_t> expected_ids = {tokenizer_->bos_id()};
  expected_ids.insert(expected_ids.end(), prompt.begin(), prompt.end());
  expected_ids.insert(expected_ids.end(), output.begin(), output.end());
  expected_ids.push_back(tokenizer_->eos_id());
  EXPECT_EQ(tokenized->input_ids, expected_ids);
  EXPECT_FALSE(tokenized->truncated);

  const int64_t boundary = 1 + static_cast<int64_t>(prompt.size());
  EXPECT_EQ(tokenized->prompt_length, boundary);
  ASSERT_EQ(tokenized->labels.size(), expected_ids.size());
  for (int64_t i = 0; i < boundary; ++i) EXPECT_EQ(tokenized->labels[i], kIgnoreIndex) << i;
  for (size_t i = boundary; i < expected_ids.size(); ++i) {
    EXPECT_EQ(tokenized->labels[i], expected_ids[i]) << i;
  }
  EXPECT_EQ(tokenized->labels[boundary - 1], kIgnoreIndex);
  EXPECT_EQ(tokenized->labels[boundary], output.front());
  EXPECT_EQ(tokenized->labels.back(), tokenizer_->eos_id());
  // The response decodes back to the output.
  const std::vector<int64_t> response(expected_ids.begin() + boundary, expected_ids.end());
  EXPECT_EQ(tokenizer_->Decode(response), example.output);

  TokenizeOptions on_inputs;
  on_inputs.train_on_inputs = true;
  auto all = TokenizeExample(example, formatter_, *tokenizer_, on_inputs);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->input_ids, expected_ids);
  EXPECT_EQ(all->labels, expected_ids);

  // An empty output still trains the EOS.
  auto empty = TokenizeExample(MakeExample("Say nothing.", "", ""), formatter_, *tokenizer_, {});
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->labels.back(), tokenizer_->eos_id());
  EXPECT_EQ(empty->prompt_length + 1, static_cast<int64_t>(empty->labels.size()));
}

TEST_F(DatasetTest, Truncation) {
  const Example example = MakeExample("Capital of France?", "", "The capital is Paris.");
  auto full = TokenizeExample(example, formatter_, *tokenizer_, {});
  ASSERT_TRUE(full.ok());
  const int64_t n = static_cast<int64_t>(full->input_ids.size());
  const int64_t boundary = full->prompt_length;

  // Cut inside the response: a plain right truncation.
  TokenizeOptions options;
  options.max_length = boundary + 2;
  auto cut = TokenizeExample(example, formatter_, *tokenizer_, options);
  ASSERT_TRUE(cut.ok());
  EXPECT_TRUE(cut->truncated);
  EXPECT_EQ(cut->input_ids,
            std::vector<int64_t>(full->input_ids.begin(), full->input_ids.begin() + boundary + 2));
  EXPECT_EQ(cut->labels,
            std::vector<int64_t>(full->labels.begin(), full->labels.begin() + boundary + 2));
  EXPECT_EQ(cut->prompt_length, boundary);

  // Exactly the full length: not truncated.
  options.max_length = n;
  auto exact = TokenizeExample(example, formatter_, *tokenizer_, options);
  ASSERT_TRUE(exact.ok());
  EXPECT_FALSE(exact->truncated);
  EXPECT_EQ(exact->input_ids, full->input_ids);

  // The prompt alone fills max_length: one response token is kept as the last position.
  options.max_length = 5;
  auto tiny = TokenizeExample(example, formatter_, *tokenizer_, options);
  ASSERT_TRUE(tiny.ok());
  EXPECT_TRUE(tiny->truncated);
  ASSERT_EQ(tiny->input_ids.size(), 5u);
  EXPECT_EQ(std::vector<int64_t>(tiny->input_ids.begin(), tiny->input_ids.begin() + 4),
            std::vector<int64_t>(full->input_ids.begin(), full->input_ids.begin() + 4));
  EXPECT_EQ(tiny->input_ids[4], full->input_ids[boundary]);
  EXPECT_EQ(tiny->labels, (std::vector<int64_t>{kIgnoreIndex, kIgnoreIndex, kIgnoreIndex,
                                                kIgnoreIndex, full->input_ids[boundary]}));
  EXPECT_EQ(tiny->prompt_length, 4);

  // With train_on_inputs the prompt positions carry labels, so plain right truncation.
  options.train_on_inputs = true;
  auto tiny_inputs = TokenizeExample(example, formatter_, *tokenizer_, options);
  ASSERT_TRUE(tiny_inputs.ok());
  EXPECT_EQ(tiny_inputs->input_ids,
            std::vector<int64_t>(full->input_ids.begin(), full->input_ids.begin() + 5));
  EXPECT_EQ(tiny_inputs->labels, tiny_inputs->input_ids);

  options.max_length = 1;
  EXPECT_EQ(TokenizeExample(example, formatter_, *tokenizer_, options).status().code(),
            absl::StatusCode::kInvalidArgument);

  // The dataset counts truncated examples.
  TokenizeOptions dataset_options;
  dataset_options.max_length = boundary + 2;
  auto dataset = TokenizeExamples({example, MakeExample("Hi", "", "Yo"), example}, formatter_,
                                  *tokenizer_, dataset_options);
  ASSERT_TRUE(dataset.ok());
  EXPECT_EQ(dataset->examples.size(), 3u);
  EXPECT_EQ(dataset->num_truncated, 2);
}

TEST_F(DatasetTest, RightPaddedBatch) {
  std::vector<TokenizedExample> examples(3);
  examples[0] = {{1, 10, 11, 2}, {-100, -100, 11, 2}, 2, false};
  examples[1] = {{1, 20, 2}, {-100, 20, 2}, 1, false};
  examples[2] = {{1, 30, 31, 32, 33, 2}, {-100, -100, 31, 32, 33, 2}, 2, false};
  const std::vector<int64_t> indices = {1, 0};
  auto batch = CollateRightPadded(examples, indices, /*pad_id=*/0);
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(batch->input_ids.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(batch->input_ids.scalar_type(), at::kLong);
  EXPECT_EQ(batch->attention_mask.scalar_type(), at::kLong);
  EXPECT_EQ(batch->labels.scalar_type(), at::kLong);
  EXPECT_EQ(Row(batch->input_ids, 0), (std::vector<int64_t>{1, 20, 2, 0}));
  EXPECT_EQ(Row(batch->input_ids, 1), (std::vector<int64_t>{1, 10, 11, 2}));
  EXPECT_EQ(Row(batch->attention_mask, 0), (std::vector<int64_t>{1, 1, 1, 0}));
  EXPECT_EQ(Row(batch->attention_mask, 1), (std::vector<int64_t>{1, 1, 1, 1}));
  EXPECT_EQ(Row(batch->labels, 0), (std::vector<int64_t>{-100, 20, 2, -100}));
  EXPECT_EQ(Row(batch->labels, 1), (std::vector<int64_t>{-100, -100, 11, 2}));
  EXPECT_EQ(batch->example_indices, indices);

  const std::vector<int64_t> bad = {3};
  EXPECT_EQ(CollateRightPadded(examples, bad, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CollateRightPadded(examples, {}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(DatasetTest, LeftPaddedPromptsForGeneration) {
  const Example short_example = MakeExample("Hi", "", "unused");
  const Example long_example = MakeExample("Capital of France?", "some input", "unused");
  bool truncated = true;
  std::vector<std::vector<int64_t>> prompts = {
      *TokenizePrompt(short_example, formatter_, *tokenizer_, 4096, &truncated),
      *TokenizePrompt(long_example, formatter_, *tokenizer_, 4096)};
  EXPECT_FALSE(truncated);
  std::vector<int64_t> expected = {tokenizer_->bos_id()};
  const std::vector<int64_t> short_ids = *tokenizer_->Encode(formatter_.Format(short_example));
  expected.insert(expected.end(), short_ids.begin(), short_ids.end());
  EXPECT_EQ(prompts[0], expected);
  ASSERT_LT(prompts[0].size(), prompts[1].size());

  const std::vector<int64_t> indices = {0, 1};
  auto batch = CollateLeftPadded(prompts, indices, /*pad_id=*/7);
  ASSERT_TRUE(batch.ok()) << batch.status();
  const int64_t t = static_cast<int64_t>(prompts[1].size());
  const int64_t pad = t - static_cast<int64_t>(prompts[0].size());
  EXPECT_EQ(batch->input_ids.sizes(), (std::vector<int64_t>{2, t}));
  EXPECT_FALSE(batch->labels.defined());
  std::vector<int64_t> row0(pad, 7);
  row0.insert(row0.end(), prompts[0].begin(), prompts[0].end());
  EXPECT_EQ(Row(batch->input_ids, 0), row0);
  EXPECT_EQ(Row(batch->input_ids, 1), prompts[1]);
  std::vector<int64_t> mask0(pad, 0);
  mask0.resize(t, 1);
  EXPECT_EQ(Row(batch->attention_mask, 0), mask0);
  EXPECT_EQ(Row(batch->attention_mask, 1), std::vector<int64_t>(t, 1));

  // A long prompt keeps BOS and its end.
  std::vector<int64_t> cut = *TokenizePrompt(long_example, formatter_, *tokenizer_, 6, &truncated);
  EXPECT_TRUE(truncated);
  ASSERT_EQ(cut.size(), 6u);
  EXPECT_EQ(cut[0], tokenizer_->bos_id());
  EXPECT_EQ(std::vector<int64_t>(cut.begin() + 1, cut.end()),
            std::vector<int64_t>(prompts[1].end() - 5, prompts[1].end()));
}

std::vector<TokenizedExample> NumberedExamples(int n) {
  std::vector<TokenizedExample> examples;
  for (int i = 0; i < n; ++i) {
    TokenizedExample e;
    e.input_ids.assign(1 + i % 4, 100 + i);  // varying lengths; the value identifies it
    e.labels = e.input_ids;
    examples.push_back(e);
  }
  return examples;
}

TEST(EpochOrderTest, DeterministicPermutation) {
  const std::vector<int64_t> a = EpochOrder(50, 1234, 0, true);
  EXPECT_EQ(a, EpochOrder(50, 1234, 0, true));
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(50);
  for (int i = 0; i < 50; ++i) identity[i] = i;
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(a, identity);
  EXPECT_NE(a, EpochOrder(50, 1234, 1, true));
  EXPECT_NE(a, EpochOrder(50, 1235, 0, true));
  EXPECT_EQ(EpochOrder(50, 1234, 3, false), identity);
  EXPECT_EQ(EpochOrder(1, 9, 0, true), std::vector<int64_t>{0});
  EXPECT_TRUE(EpochOrder(0, 9, 0, true).empty());
  // Pinned values, computed by an independent Python transcription of SplitMix64 + Fisher-Yates:
  // the order must not change across platforms or releases, since resumed runs depend on it.
  EXPECT_EQ(EpochOrder(8, 42, 0, true), (std::vector<int64_t>{2, 6, 7, 4, 5, 0, 1, 3}));
}

TEST(DataLoaderTest, EpochsBatchesAndSeek) {
  DataLoaderOptions options;
  options.micro_batch_size = 3;
  options.seed = 7;
  auto loader = DataLoader::Create(NumberedExamples(10), /*pad_id=*/0, options);
  ASSERT_TRUE(loader.ok()) << loader.status();
  DataLoader& l = **loader;
  EXPECT_EQ(l.batches_per_epoch(), 4);

  std::vector<Batch> batches;
  for (int i = 0; i < 12; ++i) {
    EXPECT_EQ(l.position(), (DataPosition{i / 4, i % 4}));
    auto batch = l.Next();
    ASSERT_TRUE(batch.ok()) << batch.status();
    EXPECT_EQ(batch->epoch, i / 4);
    EXPECT_EQ(batch->index, i % 4);
    batches.push_back(*batch);
  }
  // Each epoch visits every example once, in EpochOrder; the last batch is the remainder.
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> visited;
    for (int b = 0; b < 4; ++b) {
      const Batch& batch = batches[epoch * 4 + b];
      EXPECT_EQ(batch.input_ids.size(0), b == 3 ? 1 : 3);
      for (size_t row = 0; row < batch.example_indices.size(); ++row) {
        const int64_t index = batch.example_indices[row];
        visited.push_back(index);
        EXPECT_EQ(Row(batch.input_ids, row)[0], 100 + index);
      }
    }
    EXPECT_EQ(visited, EpochOrder(10, 7, epoch, true));
  }
  EXPECT_NE(batches[0].example_indices, batches[4].example_indices);

  // A fresh loader seeked to a saved position continues with identical batches.
  auto resumed = DataLoader::Create(NumberedExamples(10), 0, options);
  ASSERT_TRUE(resumed.ok());
  ASSERT_TRUE((*resumed)->Seek(1, 2).ok());
  for (int i = 6; i < 12; ++i) {
    auto batch = (*resumed)->Next();
    ASSERT_TRUE(batch.ok());
    EXPECT_EQ(batch->example_indices, batches[i].example_indices) << i;
    EXPECT_TRUE(at::equal(batch->input_ids, batches[i].input_ids)) << i;
    EXPECT_TRUE(at::equal(batch->labels, batches[i].labels)) << i;
    EXPECT_TRUE(at::equal(batch->attention_mask, batches[i].attention_mask)) << i;
  }
  // The end of an epoch is the start of the next.
  ASSERT_TRUE((*resumed)->Seek(0, 4).ok());
  EXPECT_EQ((*resumed)->position(), (DataPosition{1, 0}));
  EXPECT_EQ((*resumed)->Seek(0, 5).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*resumed)->Seek(-1, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*resumed)->position(), (DataPosition{1, 0}));
}

TEST(DataLoaderTest, DropLastAndNoShuffle) {
  DataLoaderOptions options;
  options.micro_batch_size = 4;
  options.shuffle = false;
  options.drop_last = true;
  auto loader = DataLoader::Create(NumberedExamples(10), 0, options);
  ASSERT_TRUE(loader.ok());
  EXPECT_EQ((*loader)->batches_per_epoch(), 2);
  EXPECT_EQ((*loader)->Next()->example_indices, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ((*loader)->Next()->example_indices, (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ((*loader)->Next()->example_indices, (std::vector<int64_t>{0, 1, 2, 3}));

  EXPECT_FALSE(DataLoader::Create({}, 0, {}).ok());
  options.micro_batch_size = 0;
  EXPECT_FALSE(DataLoader::Create(NumberedExamples(3), 0, options).ok());
  options.micro_batch_size = 4;
  EXPECT_FALSE(DataLoader::Create(NumberedExamples(3), 0, options).ok());
}

TEST(PromptPresetTest, ChatmlShapes) {
  auto chatml = PresetTemplate("chatml", "Be {brief}.");
  ASSERT_TRUE(chatml.ok()) << chatml.status();
  auto formatter = PromptFormatter::Create(*chatml);
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  Example example;
  example.instruction = "Add {x}";
  example.input = "2 and 3";
  const FormattedPrompt prompt = formatter->FormatWithSpans(example);
  EXPECT_EQ(prompt.text,
            "<|im_start|>system\nBe {brief}.<|im_end|>\n<|im_start|>user\nAdd {x}\n\n2 and "
            "3<|im_end|>\n<|im_start|>assistant\n");
  // The template's pieces are trusted; the instruction and input are not.
  ASSERT_EQ(prompt.template_spans.size(), 3u);
  EXPECT_EQ(prompt.text.substr(prompt.template_spans[1].begin,
                               prompt.template_spans[1].end - prompt.template_spans[1].begin),
            "\n\n");
  example.input.clear();
  EXPECT_EQ(formatter->Format(example),
            "<|im_start|>system\nBe {brief}.<|im_end|>\n<|im_start|>user\nAdd "
            "{x}<|im_end|>\n<|im_start|>assistant\n");
  auto plain = PresetTemplate("chatml", "");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(PromptFormatter::Create(*plain)->Format(example),
            "<|im_start|>user\nAdd {x}<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(PresetTemplate("alpaca")->with_input, kAlpacaPromptWithInput);
  EXPECT_EQ(PresetTemplate("vicuna").status().code(), absl::StatusCode::kInvalidArgument);
}

// chatml prompts and training sequences against transformers' apply_chat_template with
// SmolLM2-Instruct's template (default system message) and a plain ChatML template, on the
// byte-level fixture (tests/golden/make_tokenizer_golden.py).
TEST(ChatmlGoldenTest, MatchesApplyChatTemplate) {
  const std::string dir = std::string(MEFT_GOLDEN_DIR) + "/transformers/tokenizers_tiny/bytelevel";
  const std::string path = dir + "/chatml.json";
  ASSERT_TRUE(io::PathExists(path)) << "golden file " << path << " is missing";
  auto tokenizer = Tokenizer::Load(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(buffer.str());
  EXPECT_EQ(golden["system_prompt"].get<std::string>(), kSmolLM2SystemPrompt);
  ASSERT_GE(golden["cases"].size(), 4u);
  int injected = 0;
  for (const nlohmann::json& c : golden["cases"]) {
    const bool smollm2 = c["template"] == "smollm2";
    auto tmpl = PresetTemplate("chatml", smollm2 ? kSmolLM2SystemPrompt : "");
    ASSERT_TRUE(tmpl.ok());
    auto formatter = PromptFormatter::Create(*tmpl);
    ASSERT_TRUE(formatter.ok());
    Example example;
    example.instruction = c["instruction"];
    example.input = c["input"];
    example.output = c["output"];
    EXPECT_EQ(formatter->Format(example), c["prompt"].get<std::string>());
    auto prompt = TokenizePrompt(example, *formatter, t, 4096);
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    TokenizeOptions options;
    options.max_length = 4096;
    auto tokenized = TokenizeExample(example, *formatter, t, options);
    ASSERT_TRUE(tokenized.ok()) << tokenized.status();
    EXPECT_EQ(tokenized->input_ids.back(), t.eos_id());  // <|im_end|> ends the answer
    EXPECT_EQ(tokenized->prompt_length, static_cast<int64_t>(prompt->size()));
    if (!c["data_has_special_strings"].get<bool>()) {
      EXPECT_EQ(*prompt, c["prompt_ids"].get<std::vector<int64_t>>()) << c["instruction"];
      EXPECT_EQ(tokenized->input_ids, c["train_ids"].get<std::vector<int64_t>>())
          << c["instruction"];
      continue;
    }
    // transformers turns "<|im_end|>" inside the user's text into the special token; meft keeps
    // data as text: only the template's markers are special, and the text survives intact.
    ++injected;
    EXPECT_NE(*prompt, c["prompt_ids"].get<std::vector<int64_t>>());
    int specials = 0;
    for (const int64_t id : *prompt) specials += t.IsSpecial(id);
    EXPECT_EQ(specials, smollm2 ? 5 : 3) << c["instruction"];
    EXPECT_EQ(t.Decode(*prompt, /*skip_special_tokens=*/false), c["prompt"].get<std::string>());
  }
  EXPECT_GT(injected, 0);
}

}  // namespace
}  // namespace meft::worker
