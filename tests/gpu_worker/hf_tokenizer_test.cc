// The tokenizer.json backend: ids and decoded text against transformers' goldens
// (tests/golden/make_tokenizer_golden.py, make_smollm2_golden.py and
// make_bpe_tokenizer_golden.py), hand-checked unit cases of its components, and its error messages.

#include "gpu_worker/tokenizer/hf_tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/io/file_util.h"
#include "gpu_worker/tokenizer/hf/bpe.h"
#include "gpu_worker/tokenizer/hf/regex.h"
#include "gpu_worker/tokenizer/hf/utf8.h"
#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "gpu_worker/tokenizer/tokenizer.h"
#include "tests/testing/temp_dir.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

const std::string kGolden = std::string(MEFT_GOLDEN_DIR) + "/transformers";
const std::string kTiny = kGolden + "/tokenizers_tiny";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::vector<int64_t> IdList(const Json& json) { return json.get<std::vector<int64_t>>(); }

int64_t IdOrMinusOne(const Json& json) { return json.is_null() ? -1 : json.get<int64_t>(); }

// Checks the tokenizer of `dir` against a tokens.json golden: every case's ids (special tokens
// matched, as transformers' tokenizer(text, add_special_tokens=False)) and decoded text, and
// where the golden has them the data ids (split_special_tokens=True), the skip-special decode,
// the special ids and what add_special_tokens puts around a sequence. A missing file fails.
void CheckGolden(const std::string& dir, const std::string& tokens_json) {
  ASSERT_TRUE(io::PathExists(tokens_json)) << "golden file " << tokens_json << " is missing";
  ASSERT_TRUE(io::PathExists(dir)) << "tokenizer folder " << dir << " is missing";
  auto tokenizer = Tokenizer::Load(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  const Json golden = Json::parse(ReadAll(tokens_json));
  ASSERT_TRUE(golden.contains("cases")) << tokens_json;
  ASSERT_FALSE(golden["cases"].empty()) << tokens_json;

  if (golden.contains("eos_token_id")) {
    EXPECT_EQ(t.bos_id(), IdOrMinusOne(golden["bos_token_id"]));
    EXPECT_EQ(t.eos_id(), IdOrMinusOne(golden["eos_token_id"]));
    EXPECT_EQ(t.unk_id(), IdOrMinusOne(golden["unk_token_id"]));
    // transformers may have no pad token; meft then pads with unk or eos.
    if (!golden["pad_token_id"].is_null()) {
      EXPECT_EQ(t.pad_id(), golden["pad_token_id"].get<int64_t>());
    }
    EXPECT_EQ(t.vocab_size(), golden["vocab_size"].get<int64_t>());
    EXPECT_EQ(t.prefix_ids(), IdList(golden["prefix_ids"]));
    EXPECT_EQ(t.suffix_ids(), IdList(golden["suffix_ids"]));
  }
  int mismatches = 0;
  for (const Json& c : golden["cases"]) {
    const std::string text = c["text"];
    const std::vector<int64_t> ids = IdList(c["ids"]);
    auto trusted = t.EncodeTrusted(text);
    ASSERT_TRUE(trusted.ok()) << trusted.status();
    EXPECT_EQ(*trusted, ids) << "text: " << Json(text).dump();
    mismatches += *trusted != ids;
    if (c.contains("ids_split_special")) {
      auto data = t.Encode(text);
      ASSERT_TRUE(data.ok()) << data.status();
      EXPECT_EQ(*data, IdList(c["ids_split_special"])) << "data text: " << Json(text).dump();
      mismatches += *data != IdList(c["ids_split_special"]);
    }
    const std::string decoded = t.Decode(ids, /*skip_special_tokens=*/false);
    EXPECT_EQ(decoded, c["decoded"].get<std::string>()) << "ids of " << Json(text).dump();
    mismatches += decoded != c["decoded"].get<std::string>();
    if (c.contains("decoded_skip")) {
      EXPECT_EQ(t.Decode(ids, /*skip_special_tokens=*/true), c["decoded_skip"].get<std::string>())
          << "ids of " << Json(text).dump();
    }
  }
  EXPECT_EQ(mismatches, 0) << "in " << golden["cases"].size() << " cases of " << tokens_json;
}

TEST(HfTokenizerGoldenTest, ByteLevelLikeSmolLM2) {
  CheckGolden(kTiny + "/bytelevel", kTiny + "/bytelevel/tokens.json");
}

TEST(HfTokenizerGoldenTest, Llama3SplitRegexAndIgnoreMerges) {
  CheckGolden(kTiny + "/llama3", kTiny + "/llama3/tokens.json");
}

TEST(HfTokenizerGoldenTest, Normalizers) {
  CheckGolden(kTiny + "/normalizers", kTiny + "/normalizers/tokens.json");
}

TEST(HfTokenizerGoldenTest, SplitBehavioursAndAddedTokenFlags) {
  CheckGolden(kTiny + "/split_flags", kTiny + "/split_flags/tokens.json");
}

TEST(HfTokenizerGoldenTest, LlamaLegacyByteFallback) {
  CheckGolden(kTiny + "/llama_legacy", kTiny + "/llama_legacy/tokens.json");
}

TEST(HfTokenizerGoldenTest, LlamaMetaspaceByteFallback) {
  CheckGolden(kTiny + "/llama_metaspace", kTiny + "/llama_metaspace/tokens.json");
}

// The byte-fallback fixtures converted by transformers from a SentencePiece model
// (make_bpe_tokenizer_golden.py): legacy Prepend + Replace, and Metaspace.
TEST(HfTokenizerGoldenTest, LlamaBpeTiny) {
  CheckGolden(kGolden + "/llama_bpe_tiny", kGolden + "/llama_bpe_tiny/tokens.json");
}

TEST(HfTokenizerGoldenTest, LlamaBpeTinyMetaspace) {
  CheckGolden(kGolden + "/llama_bpe_tiny_metaspace",
              kGolden + "/llama_bpe_tiny_metaspace/tokens.json");
}

// SmolLM2-135M's own tokenizer (the folder scripts/fetch-model.sh smollm2-135m writes; the test
// command passes it in MEFT_SMOLLM2_DIR). Fails, never skips, without it.
TEST(HfTokenizerGoldenTest, SmolLM2) {
  const char* dir = std::getenv("MEFT_SMOLLM2_DIR");
  ASSERT_TRUE(dir != nullptr && *dir != '\0')
      << "MEFT_SMOLLM2_DIR is not set: run scripts/fetch-model.sh smollm2-135m and point "
         "MEFT_SMOLLM2_DIR at the folder it writes";
  CheckGolden(dir, kGolden + "/smollm2_135m/tokens.json");
}

// ---------------------------------------------------------------------------------------------
// Special tokens in data and in templates.

class ByteLevelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tokenizer = Tokenizer::Load(kTiny + "/bytelevel");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(tokenizer_, nullptr); }
  static std::vector<int64_t> Ids(std::string_view text, std::vector<TextSpan> spans = {}) {
    auto ids = tokenizer_->Encode(text, spans);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int64_t>{};
  }
  static Tokenizer* tokenizer_;
};
Tokenizer* ByteLevelTest::tokenizer_ = nullptr;

TEST_F(ByteLevelTest, SpecialTokensOnlyInsideTrustedSpans) {
  // SmolLM2's layout: <|endoftext|> = 0 (unk), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos, pad).
  EXPECT_EQ(tokenizer_->SpecialTokenId("<|im_start|>"), 1);
  EXPECT_EQ(tokenizer_->SpecialTokenId("<|im_end|>"), 2);
  EXPECT_EQ(tokenizer_->SpecialTokenId("hello"), -1);
  EXPECT_TRUE(tokenizer_->prefix_ids().empty());  // GPT2Tokenizer: no BOS
  const std::string text = "<|im_start|>user\nhi<|im_end|>";
  for (const int64_t id : Ids(text)) EXPECT_FALSE(tokenizer_->IsSpecial(id)) << id;
  EXPECT_EQ(tokenizer_->Decode(Ids(text), /*skip_special_tokens=*/true), text);

  const std::vector<int64_t> all = *tokenizer_->EncodeTrusted(text);
  ASSERT_GE(all.size(), 3u);
  EXPECT_EQ(all.front(), 1);
  EXPECT_EQ(all.back(), 2);
  // Trust only the first marker.
  const std::vector<int64_t> first = Ids(text, {{0, 12}});
  EXPECT_EQ(first.front(), 1);
  EXPECT_NE(first.back(), 2);
  // A span must hold the whole marker; spans past the end are clipped.
  for (const int64_t id : Ids(text, {{0, 11}, {13, 1000}})) {
    if (id == 2) continue;  // "<|im_end|>" lies inside {13, end}
    EXPECT_FALSE(tokenizer_->IsSpecial(id)) << id;
  }
  EXPECT_EQ(Ids(text, {{13, 1000}}).back(), 2);
  // Ill-formed UTF-8 before a trusted marker: the spans move with the repaired text.
  const std::string bad = "\xff<|im_end|>";
  const std::vector<int64_t> repaired = Ids(bad, {{1, bad.size()}});
  ASSERT_FALSE(repaired.empty());
  EXPECT_EQ(repaired.back(), 2);
  EXPECT_EQ(tokenizer_->Decode(repaired, false), "\xEF\xBF\xBD<|im_end|>");
}

TEST_F(ByteLevelTest, ByteLevelRoundTripsAnyBytes) {
  std::mt19937 rng(7);
  const std::vector<std::string> pieces = {"a",        "Z",    " ",          "  ", "\n",   "\t",
                                           "7",        "'s",   "é",          "日", "🤗", "\xff",
                                           "\xe2\x82", "\xc3", "<|im_end|>", "x\r"};
  for (int round = 0; round < 300; ++round) {
    std::string text;
    const int n = static_cast<int>(rng() % 20);
    for (int k = 0; k < n; ++k) text += pieces[rng() % pieces.size()];
    const std::vector<int64_t> ids = Ids(text);
    for (const int64_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tokenizer_->vocab_size());
    }
    EXPECT_EQ(tokenizer_->Decode(ids, false), hf::ToValidUtf8(text));
  }
}

TEST_F(ByteLevelTest, DecodeDropsUnknownIdsAndSkipsSpecials) {
  std::vector<int64_t> ids = Ids("Paris");
  ids.insert(ids.begin(), 1);
  ids.push_back(2);
  ids.push_back(-3);
  ids.push_back(tokenizer_->vocab_size());
  EXPECT_EQ(tokenizer_->Decode(ids, true), "Paris");
  EXPECT_EQ(tokenizer_->Decode(ids, false), "<|im_start|>Paris<|im_end|>");
  EXPECT_EQ(tokenizer_->IdToPiece(1), "<|im_start|>");
  EXPECT_EQ(tokenizer_->IdToPiece(tokenizer_->vocab_size()), "");
  EXPECT_TRUE(tokenizer_->IsSpecial(0));
  EXPECT_FALSE(tokenizer_->IsSpecial(Ids("a").front()));
}

TEST(HfTokenizerLoadTest, PrefersTokenizerJsonAndAcceptsTheFile) {
  const testing::TempDir tmp("meft_hf_tokenizer");
  const std::string dir = tmp.path();
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    std::filesystem::copy_file(kTiny + "/bytelevel/" + name, dir + "/" + name);
  }
  const std::vector<std::string> corpus = {
      "one sentence for a tiny model", "and another one with other words",
      "the quick brown fox jumps over the lazy dog", "a third sentence, a fourth one",
      "tokenizers turn text into ids and back into text"};
  const absl::Status trained = TrainTokenizer(corpus, dir + "/tokenizer", 300);
  ASSERT_TRUE(trained.ok()) << trained;
  auto from_dir = Tokenizer::Load(dir);
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();
  EXPECT_EQ((*from_dir)->vocab_size(), 700);
  EXPECT_EQ((*from_dir)->source(), dir + "/tokenizer.json");
  auto from_file = Tokenizer::Load(dir + "/tokenizer.json");
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ((*from_file)->eos_id(), 2);  // tokenizer_config.json was read next to it
  std::filesystem::remove(dir + "/tokenizer.json");
  auto sentencepiece = Tokenizer::Load(dir);
  ASSERT_TRUE(sentencepiece.ok()) << sentencepiece.status();
  EXPECT_EQ((*sentencepiece)->vocab_size(), 300);
}

// ---------------------------------------------------------------------------------------------
// Components, hand-checked.

TEST(Utf8Test, RepairsLikeFromUtf8Lossy) {
  const std::string r(hf::kReplacementCharacter);
  EXPECT_EQ(hf::ToValidUtf8("abc"), "abc");
  EXPECT_EQ(hf::ToValidUtf8("a\xff"
                            "b"),
            "a" + r + "b");
  // A truncated sequence is one replacement character; a surrogate is three.
  EXPECT_EQ(hf::ToValidUtf8("\xe2\x82"
                            "x"),
            r + "x");
  EXPECT_EQ(hf::ToValidUtf8("\xf0\x9f\x98"), r);
  EXPECT_EQ(hf::ToValidUtf8("\xed\xa0\x80"), r + r + r);
  EXPECT_EQ(hf::ToValidUtf8("\xc0\xaf"), r + r);  // overlong
  EXPECT_EQ(hf::ToValidUtf8("\xe2\x82\xac"), "\xe2\x82\xac");
  std::vector<size_t> offsets;
  EXPECT_EQ(hf::ToValidUtf8("a\xe2\x82"
                            "b",
                            &offsets),
            "a" + r + "b");
  EXPECT_EQ(offsets, (std::vector<size_t>{0, 1, 1, 4, 5}));
  EXPECT_FALSE(hf::IsValidUtf8("\xed\xa0\x80"));
  EXPECT_TRUE(hf::IsValidUtf8("\xf4\x8f\xbf\xbf"));
  EXPECT_FALSE(hf::IsValidUtf8("\xf4\x90\x80\x80"));
  EXPECT_EQ(hf::ByteLevelChar(' '), "\xc4\xa0");   // Ġ
  EXPECT_EQ(hf::ByteLevelChar('\n'), "\xc4\x8a");  // Ċ
  EXPECT_EQ(hf::ByteLevelChar('a'), "a");
  EXPECT_EQ(hf::ByteLevelByte(0x120), ' ');
  EXPECT_EQ(hf::ByteLevelByte(0x144), -1);
}

std::vector<hf::MatchRange> FindAll(const std::string& pattern, const std::string& text) {
  auto regex = hf::Regex::Compile(pattern);
  EXPECT_TRUE(regex.ok()) << regex.status();
  std::vector<hf::MatchRange> matches;
  if (regex.ok()) {
    EXPECT_TRUE(regex->FindAll(text, &matches).ok());
  }
  return matches;
}

TEST(RegexTest, OnigurumaClassesAndIteration) {
  using M = std::vector<hf::MatchRange>;
  // \s is White_Space: NEL yes, U+180E MONGOLIAN VOWEL SEPARATOR no (PCRE2's own \s says yes).
  EXPECT_EQ(FindAll("\\s",
                    "a\xc2\x85"
                    "b\xe1\xa0\x8e"
                    "c"),
            (M{{1, 3}}));
  EXPECT_EQ(FindAll("[^\\s]+",
                    "ab\xc2\x85"
                    "c"),
            (M{{0, 2}, {4, 5}}));
  // \w includes combining marks (U+0301) and connector punctuation.
  EXPECT_EQ(FindAll("\\w+", "e\xcc\x81_x y"), (M{{0, 5}, {6, 7}}));
  EXPECT_EQ(FindAll("\\h+", "0xBEEFz"), (M{{0, 1}, {2, 6}}));
  // ^ and $ are line anchors (Ruby).
  EXPECT_EQ(FindAll("^a", "a\na"), (M{{0, 1}, {2, 3}}));
  // Empty matches, as Oniguruma's iterator yields them.
  EXPECT_EQ(FindAll("x*", "abxxc"), (M{{0, 0}, {1, 1}, {2, 4}, {5, 5}}));
  EXPECT_EQ(FindAll("(?i:'s)", "'S's"), (M{{0, 2}, {2, 4}}));

  auto nested = hf::Regex::Compile("[a-z&&[^aeiou]]");
  EXPECT_EQ(nested.status().code(), absl::StatusCode::kUnimplemented);
  auto broken = hf::Regex::Compile("(ab");
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr("regex \"(ab\" does not compile"));
  // Literal patterns are not regular expressions.
  auto literal = hf::Regex::Literal("a.b");
  ASSERT_TRUE(literal.ok());
  std::vector<hf::MatchRange> matches;
  ASSERT_TRUE(literal->FindAll("axb a.b", &matches).ok());
  EXPECT_EQ(matches, (M{{4, 7}}));
}

absl::StatusOr<hf::BpeModel> Bpe(const std::string& json) {
  const Json document = Json::parse(json);
  return hf::BpeModel::FromJson(hf::JsonRef(document, "tokenizer.json")["model"]);
}

std::vector<int32_t> Tokenize(const hf::BpeModel& bpe, std::string_view word) {
  std::vector<int32_t> ids;
  bpe.Tokenize(word, &ids);
  return ids;
}

TEST(BpeTest, MergesByRank) {
  const std::string vocab = R"("vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5})";
  // (b, c) has the lowest rank, then (a, bc).
  auto first =
      Bpe(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": ["b c", "a b", "a bc"]}})");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(Tokenize(*first, "abc"), (std::vector<int32_t>{5}));
  EXPECT_EQ(Tokenize(*first, "abab"), (std::vector<int32_t>{3, 3}));
  EXPECT_EQ(Tokenize(*first, "cab"), (std::vector<int32_t>{2, 3}));
  // (a, b) first: ab + c, and no merge (ab, c) -> stays two symbols.
  auto second =
      Bpe(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": [["a", "b"], ["b", "c"]]}})");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(Tokenize(*second, "abc"), (std::vector<int32_t>{3, 2}));
  // Equal ranks merge leftmost first: "bcbc" -> bc bc.
  EXPECT_EQ(Tokenize(*second, "bcbc"), (std::vector<int32_t>{4, 4}));
  // Characters without a token are dropped when there is no unk and no byte fallback, and their
  // neighbours then merge.
  EXPECT_EQ(Tokenize(*second, "aqb"), (std::vector<int32_t>{3}));
}

TEST(BpeTest, ByteFallbackUnkAndIgnoreMerges) {
  const std::string base =
      R"("vocab": {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "a": 3, "b": 4, "ab": 5, "ba": 6},
         "merges": ["a b"], "unk_token": "<unk>", "byte_fallback": true)";
  auto fused = Bpe(R"({"model": {)" + base + R"(, "fuse_unk": true}})");
  ASSERT_TRUE(fused.ok()) << fused.status();
  EXPECT_EQ(Tokenize(*fused, "é"), (std::vector<int32_t>{1, 2}));  // C3 A9
  EXPECT_EQ(Tokenize(*fused, "êê"), (std::vector<int32_t>{0}));    // C3 AA: no <0xAA>
  EXPECT_EQ(Tokenize(*fused, "ab"), (std::vector<int32_t>{5}));
  EXPECT_EQ(Tokenize(*fused, "ba"), (std::vector<int32_t>{4, 3}));  // no merge "b a"
  auto separate = Bpe(R"({"model": {)" + base + R"(}})");
  ASSERT_TRUE(separate.ok());
  EXPECT_EQ(Tokenize(*separate, "êê"), (std::vector<int32_t>{0, 0}));
  auto whole = Bpe(R"({"model": {)" + base + R"(, "ignore_merges": true}})");
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(Tokenize(*whole, "ba"), (std::vector<int32_t>{6}));

  // With a suffix and a prefix: "ab" -> "a" + "##b</w>" -> merged "ab</w>"; "b" -> "b</w>".
  auto affixed = Bpe(
      R"({"model": {"vocab": {"a": 0, "##b": 1, "ab</w>": 2, "b</w>": 3, "##b</w>": 4},
          "merges": ["a ##b</w>"], "continuing_subword_prefix": "##",
          "end_of_word_suffix": "</w>"}})");
  ASSERT_TRUE(affixed.ok()) << affixed.status();
  EXPECT_EQ(Tokenize(*affixed, "ab"), (std::vector<int32_t>{2}));
  EXPECT_EQ(Tokenize(*affixed, "b"), (std::vector<int32_t>{3}));
  EXPECT_EQ(Tokenize(*affixed, "abb"), (std::vector<int32_t>{0, 1, 4}));
}

absl::Status CreateError(const std::string& tokenizer_json,
                         std::optional<std::string> tokenizer_config = std::nullopt) {
  HfTokenizerFiles files;
  files.tokenizer_json = tokenizer_json;
  files.tokenizer_config = std::move(tokenizer_config);
  auto tokenizer = HfTokenizer::Create(files);
  EXPECT_FALSE(tokenizer.ok());
  return tokenizer.ok() ? absl::OkStatus() : tokenizer.status();
}

// A minimal valid tokenizer.json with `field` replaced.
std::string Minimal(const std::string& field = "", const std::string& value = "") {
  Json j = Json::parse(R"({
    "added_tokens": [{"id": 0, "content": "</s>", "special": true, "normalized": false}],
    "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "vocab": {"</s>": 0, "a": 1, "b": 2, "ab": 3}, "merges": ["a b"]}})");
  if (!field.empty()) j[field] = Json::parse(value);
  return j.dump();
}

TEST(HfTokenizerErrorTest, MessagesNameTheFileAndJsonPath) {
  const std::string config = R"({"eos_token": "</s>"})";
  ASSERT_TRUE(HfTokenizer::Create({Minimal(), "tokenizer.json", config}).ok());

  absl::Status s = CreateError(Minimal("pre_tokenizer", R"({"type": "Sequence", "pretokenizers": [
          {"type": "Digits", "individual_digits": true}, {"type": "Whitespace"}]})"),
                               config);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(s.message(),
            "tokenizer.json: pre_tokenizer.pretokenizers[1].type: unsupported "
            "\"Whitespace\"");

  s = CreateError(Minimal("model", R"({"type": "WordPiece", "vocab": {}})"), config);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer.json: model.type: unsupported"));

  s = CreateError(Minimal("model", R"({"vocab": {"a": 0, "b": 1}, "merges": ["a b", "a q"]})"),
                  config);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer.json: model.merges[0]: the merged "
                                                  "token \"ab\" is not in model.vocab"));
  s = CreateError(Minimal("model", R"({"vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b",
                                       "a q"]})"),
                  config);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer.json: model.merges[1]: \"q\" is not in model.vocab"));
  s = CreateError(Minimal("model", R"({"vocab": {"a b": "1"}, "merges": []})"), config);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer.json: model.vocab[\"a b\"]: expected an integer id"));
  s = CreateError(Minimal("decoder", R"({"type": "Replace", "pattern": {"Regex": "x"},
                                         "content": ""})"),
                  config);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer.json: decoder.pattern.Regex:"));
  s = CreateError(Minimal("pre_tokenizer", R"({"type": "Split", "pattern": {"Regex": "(a"},
                                               "behavior": "Isolated"})"),
                  config);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer.json: pre_tokenizer.pattern.Regex: regex \"(a\" does not "
                        "compile"));
  s = CreateError(Minimal("pre_tokenizer", R"({"type": "Split", "pattern": {"String": "a"},
                                               "behavior": "Sideways"})"),
                  config);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("pre_tokenizer.behavior: unknown split behavior \"Sideways\""));
  s = CreateError(Minimal("post_processor", R"({"type": "RobertaProcessing"})"), config);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer.json: post_processor.type: unsupported \"RobertaProcessing\""));
  s = CreateError("{not json", config);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer.json: not valid JSON"));
  s = CreateError(Minimal("added_tokens", R"([{"id": 7, "content": "a"}])"), config);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer.json: added_tokens[0]: id 7 of \"a\" differs from its id 1"));

  // tokenizer_config.json.
  s = CreateError(Minimal(), R"({"tokenizer_class": "BertTokenizer", "eos_token": "</s>"})");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer_config.json: tokenizer_class: unsupported \"BertTokenizer\""));
  s = CreateError(Minimal(), R"({"eos_token": "<x>"})");
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tokenizer_config.json: eos_token: \"<x>\" is not a token of "
                        "tokenizer.json"));
  s = CreateError(Minimal(), R"({})");
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer_config.json: eos_token"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("no end-of-sequence token"));
  s = CreateError(Minimal(), R"({"eos_token": {"contents": "</s>"}})");
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer_config.json: eos_token.content: "
                                                  "missing"));
  s = CreateError(Minimal(), R"({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "a",
                                 "eos_token": "</s>", "add_prefix_space": true})");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer_config.json: add_prefix_space:"));
}

TEST(HfTokenizerConfigTest, SpecialTokensFromTheSideFiles) {
  // "</s>" is only in the vocabulary: naming it as eos makes it a special added token.
  HfTokenizerFiles files;
  files.tokenizer_json = Minimal("added_tokens", "[]");
  files.tokenizer_config = R"({"eos_token": {"content": "</s>"}, "pad_token": "ab"})";
  auto t = HfTokenizer::Create(files);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->eos_id(), 0);
  EXPECT_EQ((*t)->pad_id(), 3);
  EXPECT_TRUE((*t)->IsSpecial(0));
  EXPECT_TRUE((*t)->IsSpecial(3));  // the pad token "ab" became special too
  EXPECT_FALSE((*t)->IsSpecial(1));
  EXPECT_EQ(*(*t)->EncodeTrusted("ab</s>ab"), (std::vector<int64_t>{3, 0, 3}));
  // As data: "ab" goes through BPE (same id), "</s>" has no characters in the vocabulary and
  // there is neither unk nor byte fallback, so it vanishes.
  EXPECT_EQ(*(*t)->Encode("ab</s>ab"), (std::vector<int64_t>{3, 3}));

  // special_tokens_map.json replaces tokenizer_config.json's entries only without
  // added_tokens_decoder; LlamaTokenizer puts BOS first.
  files.tokenizer_json = Minimal();
  files.tokenizer_config = R"({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "a",
                               "eos_token": "b", "unk_token": null})";
  files.special_tokens_map = R"({"eos_token": "</s>"})";
  t = HfTokenizer::Create(files);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->eos_id(), 0);
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->prefix_ids(), (std::vector<int64_t>{1}));
  EXPECT_EQ((*t)->pad_id(), 0);  // no pad, no unk: eos

  // No tokenizer_config.json: config.json's model_type picks the class (llama: "</s>" eos).
  files.tokenizer_config.reset();
  files.special_tokens_map.reset();
  files.model_config = R"({"model_type": "llama"})";
  t = HfTokenizer::Create(files);
  ASSERT_FALSE(t.ok());  // LlamaTokenizer's default bos "<s>" is not in the vocabulary
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("\"<s>\" is not a token"));
}

}  // namespace
}  // namespace meft::worker
