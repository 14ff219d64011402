#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "gpu_worker/tokenizer/sentencepiece_bridge.h"

namespace meft::worker {

SentencePieceTokenizer::SentencePieceTokenizer(std::unique_ptr<spm_bridge::Processor> processor,
                                               std::string source,
                                               const SentencePieceOptions& options)
    : Tokenizer(std::move(source)), processor_(std::move(processor)) {
  vocab_size_ = processor_->piece_size();
  bos_id_ = processor_->bos_id();
  eos_id_ = processor_->eos_id();
  unk_id_ = processor_->unk_id();
  const int64_t model_pad = processor_->pad_id();
  pad_id_ = model_pad >= 0 ? model_pad : (unk_id_ >= 0 ? unk_id_ : eos_id_);
  if (options.add_bos_token) prefix_ids_.push_back(bos_id_);
  if (options.add_eos_token) suffix_ids_.push_back(eos_id_);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::FromSerialized(
    std::string_view bytes, const std::string& name, const SentencePieceOptions& options) {
  if (bytes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": not a valid SentencePiece model: the file is empty"));
  }
  auto processor = std::make_unique<spm_bridge::Processor>();
  const std::string error = processor->LoadFromSerialized(bytes);
  if (!error.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": not a valid SentencePiece model: ", error));
  }
  if (processor->piece_size() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": SentencePiece model has no pieces"));
  }
  if (processor->bos_id() < 0 || processor->eos_id() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": SentencePiece model defines no ",
                                                   processor->bos_id() < 0 ? "BOS" : "EOS",
                                                   " piece; a LLaMA-style tokenizer needs both"));
  }
  return std::unique_ptr<SentencePieceTokenizer>(
      new SentencePieceTokenizer(std::move(processor), name, options));
}

void SentencePieceTokenizer::EncodePlain(std::string_view text, std::vector<int64_t>* ids) const {
  std::vector<int> pieces;
  // SentencePiece fails only for an unloaded model, which a tokenizer never has.
  if (processor_->Encode(text, &pieces).empty())
    ids->insert(ids->end(), pieces.begin(), pieces.end());
}

absl::StatusOr<std::vector<int64_t>> SentencePieceTokenizer::Encode(
    std::string_view text, std::span<const TextSpan> special_spans) const {
  std::vector<int64_t> ids;
  // The special pieces, longest first so that the leftmost match is also the longest.
  std::vector<std::pair<std::string, int64_t>> specials;
  if (!special_spans.empty()) {
    for (const int64_t id : {bos_id_, eos_id_, unk_id_, pad_id_}) {
      if (id >= 0) specials.emplace_back(IdToPiece(id), id);
    }
    std::stable_sort(specials.begin(), specials.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  }
  auto inside_span = [&](size_t begin, size_t end) {
    return std::any_of(special_spans.begin(), special_spans.end(),
                       [&](const TextSpan& s) { return s.begin <= begin && end <= s.end; });
  };
  size_t segment_start = 0;
  for (size_t pos = 0; !specials.empty() && pos < text.size(); ++pos) {
    for (const auto& [piece, id] : specials) {
      if (piece.empty() || text.compare(pos, piece.size(), piece) != 0 ||
          !inside_span(pos, pos + piece.size())) {
        continue;
      }
      if (segment_start < pos) EncodePlain(text.substr(segment_start, pos - segment_start), &ids);
      ids.push_back(id);
      segment_start = pos + piece.size();
      pos = segment_start - 1;
      break;
    }
  }
  if (segment_start < text.size()) EncodePlain(text.substr(segment_start), &ids);
  return ids;
}

bool SentencePieceTokenizer::IsSpecial(int64_t id) const {
  return id == bos_id_ || id == eos_id_ || id == unk_id_ || id == pad_id_;
}

int64_t SentencePieceTokenizer::SpecialTokenId(std::string_view content) const {
  for (const int64_t id : {bos_id_, eos_id_, unk_id_, pad_id_}) {
    if (id >= 0 && IdToPiece(id) == content) return id;
  }
  return -1;
}

std::string SentencePieceTokenizer::Decode(std::span<const int64_t> ids,
                                           bool skip_special_tokens) const {
  std::string out;
  std::vector<int> run;
  auto flush = [&] {
    if (run.empty()) return;
    std::string text;
    if (processor_->Decode(run, &text).empty()) out += text;
    run.clear();
  };
  for (const int64_t id : ids) {
    if (id < 0 || id >= vocab_size_) continue;
    if (IsSpecial(id)) {
      if (skip_special_tokens) continue;
      flush();
      out += processor_->IdToPiece(static_cast<int>(id));
      continue;
    }
    run.push_back(static_cast<int>(id));
  }
  flush();
  return out;
}

std::string SentencePieceTokenizer::IdToPiece(int64_t id) const {
  if (id < 0 || id >= vocab_size_) return "";
  return processor_->IdToPiece(static_cast<int>(id));
}

absl::Status TrainTokenizer(const std::vector<std::string>& sentences,
                            const std::string& model_prefix, int vocab_size,
                            const TokenizerTrainOptions& options) {
  if (model_prefix.empty()) return absl::InvalidArgumentError("TrainTokenizer: empty model_prefix");
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TrainTokenizer: vocab_size must be positive, got ", vocab_size));
  }
  if (options.model_type != "bpe" && options.model_type != "unigram") {
    return absl::InvalidArgumentError(
        absl::StrCat("TrainTokenizer: model_type must be \"bpe\" or \"unigram\", got \"",
                     options.model_type, "\""));
  }
  if (options.pad_id != -1 && (options.pad_id < 3 || options.pad_id >= vocab_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TrainTokenizer: pad_id must be -1 or in [3, vocab_size), got ", options.pad_id));
  }
  bool any = false;
  for (const std::string& s : sentences) any = any || !s.empty();
  if (!any) return absl::InvalidArgumentError("TrainTokenizer: no non-empty training sentence");

  const std::vector<std::pair<std::string, std::string>> flags = {
      {"model_type", options.model_type},
      {"vocab_size", absl::StrCat(vocab_size)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", absl::StrCat(options.pad_id)},
      {"unk_piece", "<unk>"},
      {"bos_piece", "<s>"},
      {"eos_piece", "</s>"},
      {"pad_piece", "<pad>"},
      {"byte_fallback", "true"},
      {"character_coverage", absl::StrCat(options.character_coverage)},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "true"},
      {"remove_extra_whitespaces", "false"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", absl::StrCat(options.max_sentence_length)},
      {"num_threads", "1"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
  };
  std::string model;
  const std::string error = spm_bridge::Train(flags, sentences, options.seed, &model);
  if (!error.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("training SentencePiece model ", model_prefix, ".model failed: ", error));
  }
  return io::WriteFileDurably(model_prefix + ".model", {std::string_view(model)});
}

absl::Status TrainTokenizerFromFile(const std::string& corpus_path, const std::string& model_prefix,
                                    int vocab_size, const TokenizerTrainOptions& options) {
  MEFT_ASSIGN_OR_RETURN(const std::string content, io::ReadFile(corpus_path));
  std::vector<std::string> sentences;
  size_t begin = 0;
  while (begin <= content.size()) {
    size_t end = content.find('\n', begin);
    if (end == std::string::npos) end = content.size();
    std::string line = content.substr(begin, end - begin);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) sentences.push_back(std::move(line));
    begin = end + 1;
  }
  if (sentences.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(corpus_path, ": corpus has no sentences"));
  }
  return TrainTokenizer(sentences, model_prefix, vocab_size, options);
}

}  // namespace meft::worker
