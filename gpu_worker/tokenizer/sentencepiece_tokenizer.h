#pragma once

// SentencePiece backend of Tokenizer (a model folder's `tokenizer.model`), with the special-token
// handling of Hugging Face's slow ("legacy") LlamaTokenizer:
//
//   Encode(text)  = sp.Encode(text), the text handed to SentencePiece as is;
//   prefix_ids()  = [bos] when add_bos_token (tokenizer_config.json, default true),
//   suffix_ids()  = [eos] when add_eos_token (default false).
//
// The special tokens are the model's BOS, EOS, unk and pad pieces. Inside trusted spans (see
// Tokenizer::Encode) their strings ("<s>", "</s>") become their ids and the text between them is
// encoded piece by piece, as the legacy LlamaTokenizer does; elsewhere they are ordinary text.
// SentencePiece's own normalisation (as stored in the model) applies; LLaMA's model uses the
// identity normalisation with a dummy prefix "▁" before the text. SentencePiece runs in a
// separately loaded module (see sentencepiece_bridge.h).

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

namespace spm_bridge {
class Processor;
}  // namespace spm_bridge

// What tokenizer_config.json says about a SentencePiece tokenizer.
struct SentencePieceOptions {
  bool add_bos_token = true;
  bool add_eos_token = false;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Parses the bytes of a model file; `name` is used in error messages. INVALID_ARGUMENT if it is
  // not a valid SentencePiece model or the model defines no BOS or no EOS piece.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> FromSerialized(
      std::string_view bytes, const std::string& name, const SentencePieceOptions& options = {});

  ~SentencePieceTokenizer() override;

  // Never fails: SentencePiece encodes any byte string, replacing malformed UTF-8 by U+FFFD;
  // characters without a piece become byte pieces (byte fallback) or unk.
  absl::StatusOr<std::vector<int64_t>> Encode(
      std::string_view text, std::span<const TextSpan> special_spans = {}) const override;

  // Without skip_special_tokens the four special ids appear as their literal pieces ("<s>",
  // "</s>", "<unk>", ...) between the decoded runs of ordinary ids (no extra spaces inserted, a
  // simplification of Hugging Face's legacy spacing); other control pieces decode to nothing, as
  // in SentencePiece.
  std::string Decode(std::span<const int64_t> ids, bool skip_special_tokens = true) const override;

  std::string IdToPiece(int64_t id) const override;
  int64_t SpecialTokenId(std::string_view content) const override;
  // True for bos, eos, unk and pad (the current pad id).
  bool IsSpecial(int64_t id) const override;

 private:
  SentencePieceTokenizer(std::unique_ptr<spm_bridge::Processor> processor, std::string source,
                         const SentencePieceOptions& options);
  // Appends sp.Encode(text) to `ids`.
  void EncodePlain(std::string_view text, std::vector<int64_t>* ids) const;

  std::unique_ptr<spm_bridge::Processor> processor_;
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
