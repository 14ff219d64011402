#pragma once

// Regular expressions of tokenizer.json (Split pre-tokenizers, Replace normalizers and decoders,
// GPT-2's ByteLevel split), run by PCRE2 in UTF + UCP mode.
//
// Hugging Face tokenizers compiles these patterns with Oniguruma (Ruby syntax). PCRE2 shares
// nearly all of that syntax; Compile rewrites the escapes whose meaning differs so that both
// engines agree:
//   \s, \S   White_Space (Oniguruma's set; PCRE2's own \s also matches U+180E);
//   \w, \W   Alphabetic, marks, decimal digits and connector punctuation (PCRE2's own \w lacks
//            marks and connectors);
//   \h, \H   hexadecimal digits (PCRE2's \h is horizontal space);
// and compiles with ^ and $ as line anchors, as in Ruby. Not rewritten (UNIMPLEMENTED):
// \W or \H inside a character class, nested classes and class intersection ("&&"). Known
// remaining differences: PCRE2 10.42 knows Unicode 14, tokenizers' Oniguruma Unicode 16, so
// characters assigned since Unicode 15 (mostly CJK extension H and I and historic scripts) are
// outside \p{L}, \p{N} here; \b uses PCRE2's word definition.
//
// Thread-safety: a Regex is immutable; its methods may be called concurrently.

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::worker::hf {

// [begin, end) byte offsets of one match.
using MatchRange = std::pair<size_t, size_t>;

class Regex {
 public:
  // Compiles an Oniguruma-syntax `pattern`. INVALID_ARGUMENT with PCRE2's message and the
  // offset for a pattern that does not compile or is not UTF-8; UNIMPLEMENTED for the constructs
  // listed above.
  static absl::StatusOr<Regex> Compile(std::string_view pattern);
  // A pattern that matches `text` literally (tokenizers' {"String": ...} patterns, which it
  // compiles as an escaped regex: an empty text matches the empty string everywhere).
  static absl::StatusOr<Regex> Literal(std::string_view text);

  // Appends every match in `text` (valid UTF-8) to `*matches`, left to right, as tokenizers'
  // Oniguruma iterator finds them: each search starts where the previous match ended, and an
  // empty match right at the end of the previous match is skipped (the search moves on by one
  // character). Fails only when PCRE2 runs out of memory or one search exceeds 100 million
  // backtracking points or 256 MiB of frames (RESOURCE_EXHAUSTED).
  absl::Status FindAll(std::string_view text, std::vector<MatchRange>* matches) const;

  // Length of the match anchored at text[pos], or -1 if there is none. Same failures.
  absl::StatusOr<long> MatchAt(std::string_view text, size_t pos) const;

  // The pattern as written in tokenizer.json (before the rewrite above).
  const std::string& pattern() const { return pattern_; }

  // PCRE2's compiled code and match settings (defined in regex.cc).
  struct Compiled;

 private:
  Regex(std::shared_ptr<const Compiled> compiled, std::string pattern)
      : compiled_(std::move(compiled)), pattern_(std::move(pattern)) {}

  std::shared_ptr<const Compiled> compiled_;
  std::string pattern_;
};

}  // namespace meft::worker::hf
