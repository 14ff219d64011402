#pragma once

// The components of a tokenizer.json around its model, with Hugging Face tokenizers' semantics
// (only the strings matter here; tokenizers' offset bookkeeping is not reproduced):
//
//   normalizer      null, Sequence, Prepend, Replace (String or Regex pattern), NFC, NFD, NFKC,
//                   NFKD (ICU);
//   pre_tokenizer   null, Sequence, ByteLevel (add_prefix_space, use_regex with GPT-2's regex),
//                   Split (String or Regex pattern, behavior Removed / Isolated /
//                   MergedWithPrevious / MergedWithNext / Contiguous, invert), Digits
//                   (individual_digits), Metaspace (replacement, prepend_scheme always / first /
//                   never, split);
//   decoder         null, Sequence, ByteLevel, Metaspace, Replace (String pattern), ByteFallback,
//                   Fuse, Strip;
//   post_processor  null, Sequence, ByteLevel, TemplateProcessing (its single-sequence template).
//
// Anything else is UNIMPLEMENTED with the JSON path of its "type"; malformed fields are
// INVALID_ARGUMENT with their path. All components are immutable after parsing and may be used
// from several threads at once.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/hf/json_ref.h"

namespace meft::worker::hf {

// A piece of normalized text on its way to the model.
struct Piece {
  std::string text;
  // Whether the piece starts where the original input starts (tokenizers' offsets_original().0
  // == 0), which Metaspace's prepend_scheme "first" asks. Derived from the piece's position in
  // the normalized text: exact unless a normalizer inserted text that a later split separates.
  bool at_origin = false;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // Rewrites `text` (valid UTF-8, stays valid). Fails only with RESOURCE_EXHAUSTED from the
  // regular-expression engine or INTERNAL from ICU.
  virtual absl::Status Normalize(std::string* text) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits and rewrites `pieces` in place; no piece is empty afterwards. Fails only with
  // RESOURCE_EXHAUSTED from the regular-expression engine.
  virtual absl::Status PreTokenize(std::vector<Piece>* pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  // tokenizers' decode_chain: rewrites the token strings; the decoded text is their
  // concatenation. Strings may hold any bytes on input; the output is valid UTF-8 wherever a
  // ByteLevel or ByteFallback step produced it.
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

// Ids a post-processor puts around a single sequence.
struct PostProcessor {
  std::vector<int64_t> prefix;
  std::vector<int64_t> suffix;
};

// Parsers of the "normalizer", "pre_tokenizer", "decoder" and "post_processor" fields; null (or
// absent) gives nullptr / an empty PostProcessor.
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const JsonRef& json);
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const JsonRef& json);
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const JsonRef& json);
absl::StatusOr<PostProcessor> ParsePostProcessor(const JsonRef& json);

}  // namespace meft::worker::hf
