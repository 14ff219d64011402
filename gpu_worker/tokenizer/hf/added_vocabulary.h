#pragma once

// Added tokens of a tokenizer.json ("added_tokens", plus the special tokens transformers adds from
// tokenizer_config.json): found in the text before normalization and BPE, with Hugging Face
// tokenizers' AddedVocabulary semantics. Non-normalized tokens are matched in the raw text,
// normalized ones in each normalized piece (their content normalized the same way); matching is
// leftmost-longest and non-overlapping; single_word requires no word character (\w) on either
// side; lstrip / rstrip extend a match over the white space on its left / right.
//
// Thread-safety: immutable after Create; Split may be called concurrently.

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/hf/pipeline.h"
#include "gpu_worker/tokenizer/hf/regex.h"

namespace meft::worker::hf {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool normalized = true;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// A piece of text after splitting: an added token (id >= 0) or text to tokenize (id == -1).
struct Segment {
  size_t begin = 0;
  size_t end = 0;
  int32_t id = -1;
};

class AddedVocabulary {
 public:
  // `tokens` with distinct, non-empty contents; `normalizer` (may be null) normalizes the
  // contents of normalized tokens. Fails only when the normalizer does.
  static absl::StatusOr<AddedVocabulary> Create(std::vector<AddedToken> tokens,
                                                const Normalizer* normalizer);

  // Decides whether a special token matched at [begin, end) of the text being split is taken
  // as a token; a rejected one is left to be encoded as text.
  using SpecialFilter = std::function<bool(size_t begin, size_t end)>;

  // Splits `text` (valid UTF-8) into segments that cover it in order, using the tokens with
  // normalized == `normalized_pass`. Segments are non-empty; as in tokenizers, an rstrip match
  // followed by another match can make two segments overlap.
  absl::Status Split(std::string_view text, bool normalized_pass, const SpecialFilter& accept,
                     std::vector<Segment>* segments) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  AddedVocabulary(std::vector<AddedToken> tokens, Regex space, Regex word)
      : tokens_(std::move(tokens)), space_(std::move(space)), word_(std::move(word)) {}

  // A byte trie over the contents of one pass's tokens.
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;  // sorted by byte
    int32_t token = -1;                                 // index into tokens_, or -1
  };
  struct Trie {
    std::vector<Node> nodes{Node{}};
    void Insert(std::string_view key, int32_t token);
    // Longest token starting at text[pos]: (index, length), or (-1, 0).
    std::pair<int32_t, size_t> LongestAt(std::string_view text, size_t pos) const;
  };

  std::vector<AddedToken> tokens_;
  Trie raw_;         // normalized == false
  Trie normalized_;  // normalized == true, keyed by the normalized content
  Regex space_;      // one White_Space character
  Regex word_;       // one \w character (Rust regex: Alphabetic, M, Nd, Pc, Join_Control)
};

}  // namespace meft::worker::hf
