#include "gpu_worker/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "tests/testing/temp_dir.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

// A small corpus with the words of the Alpaca template, digits and punctuation. Characters that
// do not occur here (most non-ASCII text) go through byte fallback.
std::vector<std::string> Corpus() {
  return {
      "Below is an instruction that describes a task.",
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context.",
      "Write a response that appropriately completes the request.",
      "### Instruction:",
      "### Input:",
      "### Response:",
      "What is the capital of France? The capital of France is Paris.",
      "Who wrote the novel about a whale? Herman Melville wrote it.",
      "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
      "May.",
      "How many clips did Natalia sell altogether in April and May? #### 72",
      "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes.",
      "The quick brown fox jumps over the lazy dog.",
      "Call the search_flights API, then call the book_hotel API.",
      "Translate the following sentence into German: good morning.",
      "Summarize the following text in one sentence.",
      "The answer is 3.50 dollars, or 1,000 cents in total for ten items.",
      "In 1969, the first humans landed on the Moon.",
      "Water boils at 100 degrees Celsius at sea level.",
      "She said: \"Hello, world!\" and left (quickly).",
      "Grüße aus Köln, schöne Grüße.",
  };
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void WriteAll(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
}

// Encode that must succeed (SentencePiece never fails).
std::vector<int64_t> Ids(const Tokenizer& t, std::string_view text,
                         std::span<const TextSpan> spans = {}) {
  absl::StatusOr<std::vector<int64_t>> ids = t.Encode(text, spans);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int64_t>{};
}

constexpr int kVocabSize = 340;

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::MakeTempDir("meft_tokenizer"));
    ASSERT_TRUE(TrainTokenizer(Corpus(), *dir_ + "/tokenizer", kVocabSize).ok());
    auto tokenizer = Tokenizer::Load(*dir_ + "/tokenizer.model");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(tokenizer_, nullptr); }

  static std::string* dir_;
  static Tokenizer* tokenizer_;
};

std::string* TokenizerTest::dir_ = nullptr;
Tokenizer* TokenizerTest::tokenizer_ = nullptr;

TEST_F(TokenizerTest, LlamaLikeSpecialIds) {
  EXPECT_EQ(tokenizer_->unk_id(), 0);
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  // No pad piece in the model: pads with unk, as LLaMA fine-tuning does.
  EXPECT_EQ(tokenizer_->pad_id(), 0);
  EXPECT_EQ(tokenizer_->vocab_size(), kVocabSize);
  EXPECT_EQ(tokenizer_->IdToPiece(0), "<unk>");
  EXPECT_EQ(tokenizer_->IdToPiece(1), "<s>");
  EXPECT_EQ(tokenizer_->IdToPiece(2), "</s>");
  EXPECT_EQ(tokenizer_->IdToPiece(3), "<0x00>");
  EXPECT_EQ(tokenizer_->IdToPiece(-1), "");
  EXPECT_EQ(tokenizer_->IdToPiece(kVocabSize), "");
}

TEST_F(TokenizerTest, TrainingIsDeterministic) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string other = tmp.path();
  ASSERT_TRUE(TrainTokenizer(Corpus(), other + "/tokenizer", kVocabSize).ok());
  const std::string first = ReadAll(*dir_ + "/tokenizer.model");
  ASSERT_FALSE(first.empty());
  EXPECT_TRUE(first == ReadAll(other + "/tokenizer.model"));

  // The corpus read from a file gives the same model as the in-memory sentences.
  std::string corpus;
  for (const std::string& sentence : Corpus()) corpus += sentence + "\n\n";
  WriteAll(other + "/corpus.txt", corpus);
  ASSERT_TRUE(TrainTokenizerFromFile(other + "/corpus.txt", other + "/from_file", kVocabSize).ok());
  EXPECT_TRUE(first == ReadAll(other + "/from_file.model"));
}

TEST_F(TokenizerTest, RoundTrips) {
  const std::vector<std::string> texts = {
      "Hello, world! 123 + 456 = 579.",
      "What is the capital of France?",
      "  leading, double  and trailing spaces ",
      "tabs\tand\nnew lines\n\n",
      "Grüße aus Köln",
      "日本語のテキスト 🙂 Ω≈ç√",
      "{braces} [brackets] <s> </s> <unk> ~`^|\\",
      "",
  };
  for (const std::string& text : texts) {
    std::vector<int64_t> ids = Ids(*tokenizer_, text);
    for (const int64_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, kVocabSize);
      EXPECT_NE(id, tokenizer_->unk_id()) << text;
    }
    EXPECT_EQ(tokenizer_->Decode(ids), text);
    ids.insert(ids.begin(), tokenizer_->bos_id());
    ids.push_back(tokenizer_->eos_id());
    EXPECT_EQ(tokenizer_->Decode(ids), text);
  }
}

TEST_F(TokenizerTest, MalformedUtf8BecomesReplacementCharacter) {
  const std::string malformed = std::string("a\xff") + "b";
  EXPECT_EQ(tokenizer_->Decode(Ids(*tokenizer_, malformed)), std::string("a\xEF\xBF\xBD") + "b");
}

TEST_F(TokenizerTest, UnseenCharactersUseByteFallback) {
  const std::vector<int64_t> ids = Ids(*tokenizer_, "Ω");
  std::vector<std::string> pieces;
  for (const int64_t id : ids) pieces.push_back(tokenizer_->IdToPiece(id));
  EXPECT_THAT(pieces, ::testing::Contains("<0xCE>"));
  EXPECT_THAT(pieces, ::testing::Contains("<0xA9>"));
  // Half a UTF-8 character decodes to the replacement character.
  const int64_t lead_byte = 3 + 0xCE;
  EXPECT_EQ(tokenizer_->IdToPiece(lead_byte), "<0xCE>");
  EXPECT_EQ(tokenizer_->Decode(std::vector<int64_t>{lead_byte}), "\xEF\xBF\xBD");
}

TEST_F(TokenizerTest, PrefixIsBosAndSpecialStringsAreTextOutsideTrustedSpans) {
  // No tokenizer_config.json: LlamaTokenizer's add_bos_token = true, add_eos_token = false.
  EXPECT_EQ(tokenizer_->prefix_ids(), (std::vector<int64_t>{1}));
  EXPECT_TRUE(tokenizer_->suffix_ids().empty());
  const std::string text = "The capital of France is Paris.";
  const std::vector<int64_t> plain = Ids(*tokenizer_, text);
  ASSERT_FALSE(plain.empty());
  for (const int64_t id : plain) {
    EXPECT_NE(id, 1);
    EXPECT_NE(id, 2);
  }
  EXPECT_TRUE(Ids(*tokenizer_, "").empty());
  // Literal special-token text is ordinary text unless it lies in a trusted span.
  const std::string with_specials = "<s>Paris</s>";
  for (const int64_t id : Ids(*tokenizer_, with_specials)) EXPECT_FALSE(tokenizer_->IsSpecial(id));
  const std::vector<int64_t> trusted = *tokenizer_->EncodeTrusted(with_specials);
  std::vector<int64_t> expected = {1};
  for (const int64_t id : Ids(*tokenizer_, "Paris")) expected.push_back(id);
  expected.push_back(2);
  EXPECT_EQ(trusted, expected);
  // Only "<s>" is trusted: "</s>" stays text.
  const TextSpan first[] = {{0, 3}};
  const std::vector<int64_t> partly = Ids(*tokenizer_, with_specials, first);
  ASSERT_FALSE(partly.empty());
  EXPECT_EQ(partly.front(), 1);
  EXPECT_NE(partly.back(), 2);
  // A span that covers only part of the special string does not make it special.
  const TextSpan cut[] = {{0, 2}};
  for (const int64_t id : Ids(*tokenizer_, with_specials, cut)) {
    EXPECT_FALSE(tokenizer_->IsSpecial(id));
  }
  EXPECT_EQ(tokenizer_->SpecialTokenId("</s>"), 2);
  EXPECT_EQ(tokenizer_->SpecialTokenId("Paris"), -1);
}

TEST(TokenizerConfigTest, SentencePieceReadsAddBosAndAddEos) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string dir = tmp.path();
  ASSERT_TRUE(TrainTokenizer(Corpus(), dir + "/tokenizer", kVocabSize).ok());
  WriteAll(dir + "/tokenizer_config.json", R"({"add_bos_token": false, "add_eos_token": true})");
  auto tokenizer = Tokenizer::Load(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_TRUE((*tokenizer)->prefix_ids().empty());
  EXPECT_EQ((*tokenizer)->suffix_ids(), (std::vector<int64_t>{2}));

  WriteAll(dir + "/tokenizer_config.json", R"({"add_bos_token": "yes"})");
  auto bad = Tokenizer::Load(dir);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr(dir + "/tokenizer_config.json: add_bos_token: expected true or false"));
}

TEST_F(TokenizerTest, DecodeSkipsOrShowsSpecialTokens) {
  std::vector<int64_t> ids = Ids(*tokenizer_, "Paris");
  ids.insert(ids.begin(), tokenizer_->bos_id());
  ids.push_back(tokenizer_->eos_id());
  ids.insert(ids.begin() + 1, tokenizer_->unk_id());
  ids.push_back(tokenizer_->pad_id());
  ids.push_back(-5);          // dropped
  ids.push_back(kVocabSize);  // dropped
  EXPECT_EQ(tokenizer_->Decode(ids), "Paris");
  EXPECT_EQ(tokenizer_->Decode(ids, /*skip_special_tokens=*/false), "<s><unk>Paris</s><unk>");
  EXPECT_EQ(tokenizer_->Decode(std::vector<int64_t>{}), "");
  EXPECT_TRUE(tokenizer_->IsSpecial(0));
  EXPECT_TRUE(tokenizer_->IsSpecial(1));
  EXPECT_TRUE(tokenizer_->IsSpecial(2));
  EXPECT_FALSE(tokenizer_->IsSpecial(3));
}

TEST(TokenizerPadTest, PadPieceAndOverride) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string dir = tmp.path();
  TokenizerTrainOptions options;
  options.pad_id = 3;
  options.model_type = "unigram";
  ASSERT_TRUE(TrainTokenizer(Corpus(), dir + "/tokenizer", kVocabSize, options).ok());
  auto tokenizer = Tokenizer::Load(dir);  // a folder: loads its tokenizer.model
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  Tokenizer& t = **tokenizer;
  EXPECT_EQ(t.pad_id(), 3);
  EXPECT_EQ(t.IdToPiece(3), "<pad>");
  std::vector<int64_t> padded = Ids(t, "France");
  EXPECT_EQ(t.Decode(padded), "France");
  padded.insert(padded.begin(), t.bos_id());
  padded.push_back(t.eos_id());
  padded.push_back(3);
  EXPECT_EQ(t.Decode(padded, false), "<s>France</s><pad>");

  ASSERT_TRUE(t.set_pad_id(2).ok());
  EXPECT_EQ(t.pad_id(), 2);
  const absl::Status bad = t.set_pad_id(kVocabSize);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.message()), HasSubstr("pad_token_id"));
  EXPECT_EQ(t.pad_id(), 2);
}

TEST(TokenizerLoadTest, MissingFileIsNamed) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string dir = tmp.path();
  auto from_dir = Tokenizer::Load(dir);
  ASSERT_FALSE(from_dir.ok());
  EXPECT_EQ(from_dir.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(from_dir.status().message()), HasSubstr(dir + "/tokenizer.model"));
  EXPECT_THAT(std::string(from_dir.status().message()), HasSubstr(dir + "/tokenizer.json"));

  auto from_file = Tokenizer::Load(dir + "/nope.model");
  ASSERT_FALSE(from_file.ok());
  EXPECT_EQ(from_file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(from_file.status().message()), HasSubstr(dir + "/nope.model"));
}

TEST(TokenizerLoadTest, CorruptFileIsNamed) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string dir = tmp.path();
  const std::string path = dir + "/tokenizer.model";
  for (const std::string& content : {std::string("this is not a sentencepiece model"),
                                     std::string(), std::string("\x0a\x05\x0a\x03", 4)}) {
    WriteAll(path, content);
    auto tokenizer = Tokenizer::Load(dir);
    ASSERT_FALSE(tokenizer.ok());
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr(path));
  }
}

TEST(TokenizerTrainTest, RejectsBadOptions) {
  const testing::TempDir tmp("meft_tokenizer");
  const std::string dir = tmp.path();
  EXPECT_FALSE(TrainTokenizer({}, dir + "/t", kVocabSize).ok());
  EXPECT_FALSE(TrainTokenizer(Corpus(), dir + "/t", 0).ok());
  TokenizerTrainOptions options;
  options.model_type = "word-piece";
  EXPECT_FALSE(TrainTokenizer(Corpus(), dir + "/t", kVocabSize, options).ok());
  // Too many pieces for this corpus: SentencePiece's message comes back.
  const absl::Status too_big = TrainTokenizer(Corpus(), dir + "/t", 5000);
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_big.message()), HasSubstr("Vocabulary size"));
  EXPECT_FALSE(TrainTokenizerFromFile(dir + "/missing.txt", dir + "/t", kVocabSize).ok());
}

}  // namespace
}  // namespace meft::worker
