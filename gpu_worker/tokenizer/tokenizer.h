#pragma once

// The tokenizer of a Hugging Face model folder, with transformers' semantics:
//
//   tokenizer.json (preferred when present)  byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) and
//                                            Metaspace / byte-fallback BPE (Llama 2, Mistral),
//                                            see hf_tokenizer.h;
//   tokenizer.model                          SentencePiece, as transformers' slow ("legacy")
//                                            LlamaTokenizer, see sentencepiece_tokenizer.h.
//
// Which special tokens exist and which ids BOS, EOS and pad have come from tokenizer_config.json
// (special_tokens_map.json, config.json) as transformers reads them.
//
// Special tokens and data. Encode turns special-token strings ("<|im_start|>", "<s>") into
// their ids only inside the byte ranges the caller marks as trusted (a prompt template's own
// text); everywhere else they are ordinary text. Instruction, input and output fields of the
// data therefore can never inject a special token, while a chat template's markers are real
// special tokens. Encode never adds BOS/EOS itself: prefix_ids()/suffix_ids() say what
// transformers' add_special_tokens=True puts around a sequence, and the caller places them.
//
// No torch here: ids are int64_t to match the model's input tensors. Nothing here throws.
// Thread-safety: immutable after Load except for set_pad_id; the const methods may be called
// concurrently. Call set_pad_id before sharing the tokenizer between threads.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::worker {

// A byte range [begin, end) of a text.
struct TextSpan {
  size_t begin = 0;
  size_t end = 0;
};

class Tokenizer {
 public:
  // Loads `path`: a model folder (its tokenizer.json when present, else its tokenizer.model,
  // with tokenizer_config.json, special_tokens_map.json and config.json next to it where they
  // exist), a tokenizer.json file (the same side files from its folder), or a SentencePiece
  // model file. NOT_FOUND when there is no tokenizer; INVALID_ARGUMENT / UNIMPLEMENTED for a
  // malformed or unsupported one, naming the file and, for JSON, the path inside it
  // ("tokenizer.json: pre_tokenizer.pretokenizers[1].type: unsupported \"Whitespace\"").
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);

  virtual ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`, nothing added around them. Special-token strings are matched (turned
  // into their ids) only where they lie wholly inside one of `special_spans` (byte ranges of
  // `text`, in any order; ranges past the end are clipped); elsewhere they are encoded as
  // ordinary text, as transformers does with split_special_tokens=True. Ill-formed UTF-8 is
  // first replaced by U+FFFD. Every id lies in [0, vocab_size()). Fails only for resource
  // exhaustion of the regular-expression engine on enormous inputs (RESOURCE_EXHAUSTED, naming
  // the tokenizer file).
  virtual absl::StatusOr<std::vector<int64_t>> Encode(
      std::string_view text, std::span<const TextSpan> special_spans = {}) const = 0;

  // Encode with special tokens matched anywhere in `text`: transformers'
  // tokenizer(text, add_special_tokens=False). For trusted text only.
  absl::StatusOr<std::vector<int64_t>> EncodeTrusted(std::string_view text) const;

  // Text of `ids`, transformers' decode(ids, skip_special_tokens=...). With
  // `skip_special_tokens` the special tokens (IsSpecial) are dropped first. Ids outside
  // [0, vocab_size()) are dropped: a model's embedding table may be larger than the tokenizer's
  // vocabulary, and those rows carry no text. Bytes that do not form UTF-8 decode to U+FFFD.
  virtual std::string Decode(std::span<const int64_t> ids,
                             bool skip_special_tokens = true) const = 0;

  // What transformers' add_special_tokens=True puts before / after one sequence: [BOS] for
  // Llama tokenizers (tokenizer_config.json add_bos_token, default true), nothing for GPT-2
  // style ones such as SmolLM2's; otherwise what tokenizer.json's post_processor says.
  const std::vector<int64_t>& prefix_ids() const { return prefix_ids_; }
  const std::vector<int64_t>& suffix_ids() const { return suffix_ids_; }

  // Special ids; -1 where the tokenizer has none. eos_id() always exists (Load requires it).
  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t unk_id() const { return unk_id_; }

  // The id used to pad batches: the tokenizer's pad token if it has one, otherwise unk, otherwise
  // eos (padded positions are masked out of attention and loss). config.json's pad_token_id
  // overrides it through set_pad_id.
  int64_t pad_id() const { return pad_id_; }

  // Overrides the pad id. INVALID_ARGUMENT unless 0 <= id < vocab_size().
  absl::Status set_pad_id(int64_t id);

  // Valid ids are [0, vocab_size()).
  int64_t vocab_size() const { return vocab_size_; }

  // The token string of `id` as the tokenizer stores it ("▁the", "Ġthe", "<0x0A>", "<s>"); empty
  // for an id out of range or unused.
  virtual std::string IdToPiece(int64_t id) const = 0;

  // The id of the special token whose text is `content` ("<|im_start|>"), or -1 when `content`
  // is not one of this tokenizer's special tokens.
  virtual int64_t SpecialTokenId(std::string_view content) const = 0;

  // True for the ids Decode drops with skip_special_tokens.
  virtual bool IsSpecial(int64_t id) const = 0;

  // The file the tokenizer was loaded from.
  const std::string& source() const { return source_; }

 protected:
  explicit Tokenizer(std::string source) : source_(std::move(source)) {}

  std::string source_;
  int64_t vocab_size_ = 0;
  int64_t bos_id_ = -1;
  int64_t eos_id_ = -1;
  int64_t unk_id_ = -1;
  int64_t pad_id_ = -1;
  std::vector<int64_t> prefix_ids_;
  std::vector<int64_t> suffix_ids_;
};

}  // namespace meft::worker
