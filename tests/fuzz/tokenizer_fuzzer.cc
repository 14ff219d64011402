// Fuzzes the tokenizer.json backend. The first byte chooses what the rest is:
//   even  a tokenizer.json file, optionally followed by a NUL byte and a tokenizer_config.json:
//         HfTokenizer::Create must accept it or return an error naming the file; an accepted
//         tokenizer then encodes and decodes a fixed text and the input itself;
//   odd   a text for the two fixed tokenizers of tests/golden/transformers/tokenizers_tiny
//         (byte-level like SmolLM2, and Llama 2's byte-fallback layout), encoded as data and with
//         trusted spans taken from the second byte, then decoded.
// Invariants: ids lie in [0, vocab_size()); decoded text is valid UTF-8; the byte-level
// tokenizer gives back exactly the text (ill-formed UTF-8 replaced by U+FFFD); decoding
// arbitrary ids never fails.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_worker/tokenizer/hf/utf8.h"
#include "gpu_worker/tokenizer/hf_tokenizer.h"

namespace {

using meft::worker::HfTokenizer;
using meft::worker::TextSpan;
using meft::worker::Tokenizer;

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "tokenizer_fuzzer: %s\n", what);
  std::abort();
}

std::unique_ptr<HfTokenizer> LoadFixture(const char* name) {
  auto tokenizer =
      HfTokenizer::LoadFile(std::string(MEFT_FUZZ_TOKENIZERS_DIR) + "/" + name + "/tokenizer.json");
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "tokenizer_fuzzer: %s\n",
                 std::string(tokenizer.status().message()).c_str());
    std::abort();
  }
  return *std::move(tokenizer);
}

// Encodes `text`, checks the ids and returns them. Only a fuzzed tokenizer (`may_fail`) may
// fail, and only with RESOURCE_EXHAUSTED: its regexes may backtrack catastrophically.
std::vector<int64_t> CheckedEncode(const Tokenizer& t, std::string_view text,
                                   const std::vector<TextSpan>& spans, bool may_fail = false) {
  auto ids = t.Encode(text, spans);
  if (!ids.ok()) {
    if (!may_fail || ids.status().code() != absl::StatusCode::kResourceExhausted ||
        ids.status().message().empty()) {
      std::fprintf(stderr, "status: %s\n", ids.status().ToString().c_str());
      Fail("Encode failed");
    }
    return {};
  }
  for (const int64_t id : *ids) {
    if (id < 0 || id >= t.vocab_size()) Fail("id outside the vocabulary");
  }
  return *std::move(ids);
}

std::string CheckedDecode(const Tokenizer& t, const std::vector<int64_t>& ids, bool skip) {
  std::string text = t.Decode(ids, skip);
  if (!meft::worker::hf::IsValidUtf8(text)) Fail("Decode returned ill-formed UTF-8");
  return text;
}

// Ids made of the input bytes, some of them out of range.
std::vector<int64_t> IdsFromBytes(std::string_view bytes, int64_t vocab_size) {
  std::vector<int64_t> ids;
  for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
    const int64_t v = static_cast<uint8_t>(bytes[i]) * 256 + static_cast<uint8_t>(bytes[i + 1]);
    ids.push_back(v % (vocab_size + 8) - 4);
  }
  return ids;
}

void FuzzText(std::string_view text) {
  static const std::unique_ptr<HfTokenizer> bytelevel = LoadFixture("bytelevel");
  static const std::unique_ptr<HfTokenizer> llama = LoadFixture("llama_legacy");
  // The first byte places two trusted spans; the second one runs past the end.
  size_t control = 0;
  if (!text.empty()) {
    control = static_cast<uint8_t>(text[0]);
    text.remove_prefix(1);
  }
  const size_t split = control % (text.size() + 1);
  const std::vector<TextSpan> spans = {TextSpan{split / 2, split},
                                       TextSpan{split, text.size() + 3}};
  const std::string expected = meft::worker::hf::ToValidUtf8(text);
  for (const bool trusted : {false, true}) {
    const std::vector<TextSpan> used = trusted ? spans : std::vector<TextSpan>{};
    const std::vector<int64_t> ids = CheckedEncode(*bytelevel, text, used);
    if (CheckedDecode(*bytelevel, ids, false) != expected) Fail("byte-level round trip differs");
    CheckedDecode(*bytelevel, ids, true);
    const std::vector<int64_t> llama_ids = CheckedEncode(*llama, text, used);
    CheckedDecode(*llama, llama_ids, false);
    CheckedDecode(*llama, llama_ids, true);
  }
  CheckedDecode(*bytelevel, IdsFromBytes(text, bytelevel->vocab_size()), false);
  CheckedDecode(*llama, IdsFromBytes(text, llama->vocab_size()), false);
}

void FuzzFiles(std::string_view data) {
  meft::worker::HfTokenizerFiles files;
  const size_t nul = data.find('\0');
  files.tokenizer_json = std::string(data.substr(0, nul));
  if (nul != std::string_view::npos) files.tokenizer_config = std::string(data.substr(nul + 1));
  auto tokenizer = HfTokenizer::Create(files);
  if (!tokenizer.ok()) {
    const std::string message(tokenizer.status().message());
    if (message.find("tokenizer.json") == std::string::npos &&
        message.find("tokenizer_config.json") == std::string::npos) {
      std::fprintf(stderr, "message: %s\n", message.c_str());
      Fail("an error that names no file");
    }
    return;
  }
  const Tokenizer& t = **tokenizer;
  if (t.eos_id() < 0 || t.eos_id() >= t.vocab_size()) Fail("eos outside the vocabulary");
  for (const std::string_view text : {std::string_view("Hello, world! 123 <s> </s>"), data}) {
    const std::vector<int64_t> ids =
        CheckedEncode(t, text, {TextSpan{0, text.size()}}, /*may_fail=*/true);
    CheckedDecode(t, ids, false);
    CheckedDecode(t, CheckedEncode(t, text, {}, /*may_fail=*/true), true);
  }
  CheckedDecode(t, IdsFromBytes(data, t.vocab_size()), false);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    FuzzFiles(rest);
  } else {
    FuzzText(rest);
  }
  return 0;
}
