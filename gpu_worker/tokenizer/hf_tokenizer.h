#pragma once

// tokenizer.json backend of Tokenizer: Hugging Face tokenizers' pipeline (added tokens,
// normalizer, pre-tokenizer, BPE model, decoder, post-processor; see hf/pipeline.h for the
// supported components) and transformers' reading of the files around it:
//
//   tokenizer_config.json   tokenizer_class; bos/eos/unk/pad_token and additional_special_tokens
//                           (strings or {"content": ...}); added_tokens_decoder;
//                           add_bos_token / add_eos_token (Llama-family classes only);
//                           clean_up_tokenization_spaces (Decode);
//   special_tokens_map.json its special tokens replace tokenizer_config.json's when that file
//                           has no added_tokens_decoder (transformers' legacy path);
//   config.json             model_type, when tokenizer_config.json names no tokenizer_class.
//
// Class defaults follow transformers 4.57: LlamaTokenizer(Fast) and CodeLlamaTokenizer(Fast)
// ("<s>", "</s>", "<unk>") rebuild the post-processor from add_bos_token (default true) and
// add_eos_token (default false); GPT2Tokenizer(Fast) ("<|endoftext|>" for bos, eos and unk),
// Qwen2Tokenizer(Fast) (eos, unk and pad "<|endoftext|>", no bos) and PreTrainedTokenizerFast
// (none) keep tokenizer.json's post-processor, and take a top-level ByteLevel pre-tokenizer's
// add_prefix_space from tokenizer_config.json (false when absent). A Llama-family
// add_prefix_space (transformers then rebuilds the tokenizer from tokenizer.model) must agree
// with tokenizer.json's Prepend normalizer / Metaspace prepend_scheme, else UNIMPLEMENTED. Other
// classes are UNIMPLEMENTED. As in transformers, special tokens named by these files that are not added
// tokens of tokenizer.json become special added tokens (they must be in the vocabulary), and
// added_tokens_decoder's lstrip / rstrip / single_word replace tokenizer.json's.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/hf/added_vocabulary.h"
#include "gpu_worker/tokenizer/hf/bpe.h"
#include "gpu_worker/tokenizer/hf/pipeline.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

// The contents of a model folder's tokenizer files; nullopt for a file that does not exist.
// Paths are used in messages only.
struct HfTokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_json_path = "tokenizer.json";
  std::optional<std::string> tokenizer_config;
  std::string tokenizer_config_path = "tokenizer_config.json";
  std::optional<std::string> special_tokens_map;
  std::string special_tokens_map_path = "special_tokens_map.json";
  std::optional<std::string> model_config;
  std::string model_config_path = "config.json";
};

class HfTokenizer final : public Tokenizer {
 public:
  // Builds the tokenizer from file contents. INVALID_ARGUMENT for malformed JSON or values,
  // UNIMPLEMENTED for unsupported components or tokenizer classes; messages name the file and
  // the JSON path. Requires an end-of-sequence token.
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Create(const HfTokenizerFiles& files);

  // Reads `tokenizer_json_path` and the side files next to it (those that exist), then Create.
  // NOT_FOUND when tokenizer.json does not exist.
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> LoadFile(
      const std::string& tokenizer_json_path);

  absl::StatusOr<std::vector<int64_t>> Encode(
      std::string_view text, std::span<const TextSpan> special_spans = {}) const override;
  std::string Decode(std::span<const int64_t> ids, bool skip_special_tokens = true) const override;
  std::string IdToPiece(int64_t id) const override;
  int64_t SpecialTokenId(std::string_view content) const override;
  bool IsSpecial(int64_t id) const override;

 private:
  HfTokenizer(std::string source, hf::BpeModel model)
      : Tokenizer(std::move(source)), model_(std::move(model)) {}
  // Appends the ids of one text segment (no added tokens matched yet in it).
  absl::Status EncodeSegment(std::string_view text, bool at_origin, bool specials_allowed,
                             std::vector<int64_t>* ids) const;
  // The added token with id `id`, or null.
  const hf::AddedToken* AddedById(int64_t id) const;

  hf::BpeModel model_;
  std::unique_ptr<hf::Normalizer> normalizer_;
  std::unique_ptr<hf::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<hf::Decoder> decoder_;
  std::optional<hf::AddedVocabulary> added_;
  absl::flat_hash_map<int64_t, size_t> added_by_id_;  // id -> index in added_->tokens()
  absl::flat_hash_map<std::string, int64_t> special_by_content_;
  bool clean_up_tokenization_spaces_ = false;
};

}  // namespace meft::worker
