#pragma once

// The BPE model of tokenizer.json ("model": {"type": "BPE", ...}), with the semantics of Hugging
// Face tokenizers' BPE::tokenize: a pre-token is split into characters (each looked up in the
// vocabulary, with continuing_subword_prefix / end_of_word_suffix where set; missing ones become
// byte tokens "<0xXX>" with byte_fallback, else unk, consecutive unks fused with fuse_unk, else
// they are dropped), then the pair of adjacent symbols with the lowest merge rank is merged
// (leftmost first among equal ranks) until no pair has a merge. With ignore_merges a pre-token
// that is itself in the vocabulary is taken whole. Dropout (a training-time option) is rejected.
//
// Like tokenizers, results for pre-tokens shorter than 256 bytes are cached (the first 10000
// distinct ones).
//
// Thread-safety: immutable after FromJson except for the cache, which a mutex guards; Tokenize
// may be called concurrently.

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/hf/json_ref.h"

namespace meft::worker::hf {

// Largest token id accepted in a tokenizer file (real vocabularies stay far below).
inline constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

class BpeModel {
 public:
  // Parses the "model" object. INVALID_ARGUMENT naming the JSON path for a malformed vocabulary
  // or merge (a merge whose parts or result are not in the vocabulary, an id outside
  // [0, kMaxTokenId]); UNIMPLEMENTED for another model type or a non-null, non-zero dropout.
  static absl::StatusOr<BpeModel> FromJson(const JsonRef& model);

  BpeModel(BpeModel&& other) noexcept;
  BpeModel& operator=(BpeModel&& other) = delete;

  // Appends the ids of `word`, one non-empty pre-token in valid UTF-8.
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  // Id of a vocabulary entry, or -1.
  int32_t TokenToId(std::string_view token) const;
  // The vocabulary entry of `id`, or null when no entry has that id.
  const std::string* IdToToken(int64_t id) const;
  // One more than the largest id in the vocabulary (0 for an empty one).
  int64_t id_limit() const { return id_limit_; }

 private:
  BpeModel() = default;
  // Tokenize without the cache.
  void Merge(std::string_view word, std::vector<int32_t>* ids) const;
  // Id of one character (valid UTF-8 `text`, a single code point), with the vocabulary's
  // single-character entries in a table when no prefix or suffix applies.
  int32_t CharId(std::string_view text) const;

  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  // The entry of each id (a map: ids need not be dense).
  absl::flat_hash_map<int32_t, std::string> id_to_token_;
  int64_t id_limit_ = 0;
  absl::flat_hash_map<uint64_t, MergeTarget> merges_;
  // Id of "<0xXX>" for each byte, or -1.
  std::vector<int32_t> byte_ids_;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  absl::flat_hash_map<char32_t, int32_t> char_ids_;

  mutable std::mutex cache_mutex_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;  // guarded by cache_mutex_
};

}  // namespace meft::worker::hf
