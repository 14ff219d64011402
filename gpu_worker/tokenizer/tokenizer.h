#pragma once

// SentencePiece tokenizer of a LLaMA/Mistral model folder (its `tokenizer.model`), with the
// special-token handling of Hugging Face's slow ("legacy") LlamaTokenizer:
//
//   Encode(text, add_bos, add_eos) = [bos if add_bos] + sp.Encode(text) + [eos if add_eos]
//
// The text is handed to SentencePiece as is. Unlike Hugging Face, literal special-token strings
// inside the text ("<s>", "</s>") are not turned into special ids: they are ordinary text, so data
// can never inject a BOS/EOS. SentencePiece's own normalisation (as stored in the model) applies;
// LLaMA's model uses the identity normalisation with a dummy prefix "▁" before the text.
//
// No torch here: ids are int64_t to match the model's input tensors. Nothing here throws.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::worker {

namespace spm_bridge {
class Processor;
}  // namespace spm_bridge

// Thread-safety: immutable after Load except for set_pad_id; the const methods may be called
// concurrently. Call set_pad_id before sharing the tokenizer between threads.
class Tokenizer {
 public:
  // Loads `path`, which is either a SentencePiece model file or a model folder containing
  // `tokenizer.model`. NOT_FOUND if the file is missing; INVALID_ARGUMENT if it is not a valid
  // SentencePiece model or the model defines no BOS or no EOS piece. Messages name the file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);

  // Same, from the bytes of a model file; `name` is used in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromSerialized(std::string_view bytes,
                                                                       const std::string& name);

  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  ~Tokenizer();

  // Token ids of `text`: BOS first when `add_bos`, EOS last when `add_eos`. Every id lies in
  // [0, vocab_size()). An empty text gives just the requested special tokens. Never fails for a
  // loaded model: SentencePiece encodes any byte string, replacing malformed UTF-8 by U+FFFD;
  // characters without a piece become byte pieces (byte fallback) or unk.
  std::vector<int64_t> Encode(std::string_view text, bool add_bos = true,
                              bool add_eos = false) const;

  // Text of `ids`. With `skip_special_tokens` (Hugging Face's flag of the same name) the BOS,
  // EOS, unk and pad ids are dropped before decoding, so generation output reads as plain text;
  // other control pieces decode to nothing, as in SentencePiece. Without it, those four special
  // ids appear as their literal pieces ("<s>", "</s>", "<unk>", ...) between the decoded runs of
  // ordinary ids (no extra spaces inserted, a simplification of Hugging Face's legacy spacing).
  // Ids outside [0, vocab_size()) are dropped: a model's embedding table may be larger than the
  // tokenizer's vocabulary, and those rows carry no text. Byte-fallback pieces that do not form
  // valid UTF-8 decode to U+FFFD, as in SentencePiece.
  std::string Decode(std::span<const int64_t> ids, bool skip_special_tokens = true) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t unk_id() const { return unk_id_; }

  // The id used to pad batches. Default: the model's own pad piece if it defines one, otherwise
  // the unk id (0 for LLaMA, whose tokenizer.model has no pad piece); this is what Alpaca-style
  // LLaMA fine-tuning (pad_token_id = 0) uses, and padded positions are masked out of attention
  // and loss anyway. config.json's pad_token_id overrides it through set_pad_id.
  int64_t pad_id() const { return pad_id_; }

  // Overrides the pad id. INVALID_ARGUMENT unless 0 <= id < vocab_size().
  absl::Status set_pad_id(int64_t id);

  // Number of pieces in the model; valid ids are [0, vocab_size()).
  int64_t vocab_size() const { return vocab_size_; }

  // The piece string of `id` ("▁the", "<0x0A>", "<s>"); empty for an id out of range.
  std::string IdToPiece(int64_t id) const;

  // True for the ids Decode drops with skip_special_tokens: bos, eos, unk and pad.
  bool IsSpecial(int64_t id) const;

  // The file the model was loaded from (or the `name` given to LoadFromSerialized).
  const std::string& source() const { return source_; }

 private:
  Tokenizer(std::unique_ptr<spm_bridge::Processor> processor, std::string source);

  std::unique_ptr<spm_bridge::Processor> processor_;
  std::string source_;
  int64_t vocab_size_ = 0;
  int64_t bos_id_ = -1;
  int64_t eos_id_ = -1;
  int64_t unk_id_ = -1;
  int64_t pad_id_ = -1;
};

// How TrainTokenizer builds a model. The defaults give a LLaMA-like tokenizer: ids unk = 0
// ("<unk>"), bos = 1 ("<s>"), eos = 2 ("</s>"), no pad piece (pad_id = -1, so Tokenizer pads
// with unk as for LLaMA), identity normalisation, dummy prefix, digits split, byte fallback (every
// byte string round-trips), whitespace-only pieces allowed.
//
// Determinism: the trainer is fed the sentences in order through an iterator (no input file, no
// sampling: input_sentence_size = 0, shuffle_input_sentence = false), runs single-threaded
// (num_threads = 1) with SentencePiece's random generator seeded with `seed`, and no file path or
// model prefix is recorded in the model. Training twice on the same input therefore gives
// byte-identical .model files.
struct TokenizerTrainOptions {
  // "bpe" (as LLaMA) or "unigram".
  std::string model_type = "bpe";
  // -1: no pad piece (LLaMA); otherwise the id of a "<pad>" piece, e.g. 3.
  int pad_id = -1;
  // Fraction of the corpus's characters that get their own piece; 1.0 keeps all of them (rare
  // characters otherwise go through byte fallback).
  double character_coverage = 1.0;
  // Seed of SentencePiece's global random generator during training.
  uint32_t seed = 20240101;
  // Longest sentence, in bytes, the trainer reads; longer ones are skipped by SentencePiece.
  int max_sentence_length = 16384;
};

// Trains a SentencePiece model of `vocab_size` pieces on `sentences` and writes it to
// `<model_prefix>.model` (fsynced; no .vocab file). With byte fallback the vocabulary must have
// room for the 3 special pieces and the 256 byte pieces plus the corpus's characters, and a small
// corpus caps the number of merges: SentencePiece's messages ("Vocabulary size too high ... <=
// N") come back as INVALID_ARGUMENT. SentencePiece's progress log is not shown. Not thread-safe
// (SentencePiece's random seed is process-wide).
absl::Status TrainTokenizer(const std::vector<std::string>& sentences,
                            const std::string& model_prefix, int vocab_size,
                            const TokenizerTrainOptions& options = {});

// Same, with the sentences read from `corpus_path`, one per line (blank lines skipped).
absl::Status TrainTokenizerFromFile(const std::string& corpus_path, const std::string& model_prefix,
                                    int vocab_size, const TokenizerTrainOptions& options = {});

}  // namespace meft::worker
