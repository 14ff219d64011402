#include "gpu_worker/tokenizer/hf/added_vocabulary.h"

#include <algorithm>
#include <utility>

#include "common/status.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker::hf {

void AddedVocabulary::Trie::Insert(std::string_view key, int32_t token) {
  int32_t node = 0;
  for (const char c : key) {
    const uint8_t byte = static_cast<uint8_t>(c);
    auto& children = nodes[node].children;
    auto it = std::lower_bound(children.begin(), children.end(), byte,
                               [](const auto& child, uint8_t b) { return child.first < b; });
    if (it != children.end() && it->first == byte) {
      node = it->second;
      continue;
    }
    const int32_t next = static_cast<int32_t>(nodes.size());
    children.insert(it, {byte, next});
    nodes.emplace_back();
    node = next;
  }
  // Contents are distinct, so no key is inserted twice.
  nodes[node].token = token;
}

std::pair<int32_t, size_t> AddedVocabulary::Trie::LongestAt(std::string_view text,
                                                            size_t pos) const {
  std::pair<int32_t, size_t> best{-1, 0};
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const uint8_t byte = static_cast<uint8_t>(text[i]);
    const auto& children = nodes[node].children;
    auto it = std::lower_bound(children.begin(), children.end(), byte,
                               [](const auto& child, uint8_t b) { return child.first < b; });
    if (it == children.end() || it->first != byte) break;
    node = it->second;
    if (nodes[node].token >= 0) best = {nodes[node].token, i + 1 - pos};
  }
  return best;
}

absl::StatusOr<AddedVocabulary> AddedVocabulary::Create(std::vector<AddedToken> tokens,
                                                        const Normalizer* normalizer) {
  MEFT_ASSIGN_OR_RETURN(Regex space, Regex::Compile("\\p{White_Space}"));
  MEFT_ASSIGN_OR_RETURN(Regex word,
                        Regex::Compile("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]"));
  AddedVocabulary vocabulary(std::move(tokens), std::move(space), std::move(word));
  for (size_t i = 0; i < vocabulary.tokens_.size(); ++i) {
    const AddedToken& token = vocabulary.tokens_[i];
    if (!token.normalized) {
      vocabulary.raw_.Insert(token.content, static_cast<int32_t>(i));
      continue;
    }
    std::string key = token.content;
    if (normalizer != nullptr) MEFT_RETURN_IF_ERROR(normalizer->Normalize(&key));
    // tokenizers' trie cannot match an empty pattern either.
    if (!key.empty()) vocabulary.normalized_.Insert(key, static_cast<int32_t>(i));
  }
  return vocabulary;
}

absl::Status AddedVocabulary::Split(std::string_view text, bool normalized_pass,
                                    const SpecialFilter& accept,
                                    std::vector<Segment>* segments) const {
  const Trie& trie = normalized_pass ? normalized_ : raw_;
  auto is_word_at = [&](size_t pos) -> absl::StatusOr<bool> {
    MEFT_ASSIGN_OR_RETURN(const long n, word_.MatchAt(text, pos));
    return n > 0;
  };
  auto is_space_at = [&](size_t pos) -> absl::StatusOr<bool> {
    MEFT_ASSIGN_OR_RETURN(const long n, space_.MatchAt(text, pos));
    return n > 0;
  };
  size_t start_offset = 0;
  for (size_t pos = 0; pos < text.size();) {
    const auto [index, length] = trie.LongestAt(text, pos);
    if (index < 0) {
      pos += CharLength(text, pos);
      continue;
    }
    const AddedToken& token = tokens_[index];
    size_t start = pos;
    size_t stop = pos + length;
    // The search resumes after this match whether or not it is taken.
    pos = stop;
    if (token.single_word) {
      bool start_space = start == 0;
      if (!start_space) {
        MEFT_ASSIGN_OR_RETURN(const bool word, is_word_at(PreviousCharStart(text, start)));
        start_space = !word;
      }
      bool stop_space = stop == text.size();
      if (!stop_space) {
        MEFT_ASSIGN_OR_RETURN(const bool word, is_word_at(stop));
        stop_space = !word;
      }
      if (!start_space || !stop_space) continue;
    }
    if (token.special && !accept(start, stop)) continue;
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        const size_t previous = PreviousCharStart(text, new_start);
        MEFT_ASSIGN_OR_RETURN(const bool space, is_space_at(previous));
        if (!space) break;
        new_start = previous;
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        MEFT_ASSIGN_OR_RETURN(const bool space, is_space_at(stop));
        if (!space) break;
        stop += CharLength(text, stop);
      }
    }
    if (start_offset < start) segments->push_back(Segment{start_offset, start, -1});
    segments->push_back(Segment{start, stop, token.id});
    start_offset = stop;
  }
  if (start_offset < text.size()) segments->push_back(Segment{start_offset, text.size(), -1});
  return absl::OkStatus();
}

}  // namespace meft::worker::hf
