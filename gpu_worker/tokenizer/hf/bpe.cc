#include "gpu_worker/tokenizer/hf/bpe.h"

#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker::hf {
namespace {

// One symbol of a word being merged: a doubly linked list over the initial characters.
struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  // Bytes of the word this symbol covers; 0 marks a symbol merged into its left neighbour.
  int32_t length;
};

struct Candidate {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
  // Lowest rank first, then leftmost: tokenizers' order.
  bool operator<(const Candidate& other) const {
    if (rank != other.rank) return rank > other.rank;
    return pos > other.pos;
  }
};

absl::StatusOr<std::pair<std::string, std::string>> ParseMerge(const JsonRef& merge) {
  if (merge.json().is_string()) {
    const std::string& line = merge.json().get_ref<const std::string&>();
    const size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
      return merge.Invalid(
          absl::StrCat("a merge must be two tokens separated by one space, got ", Quote(line)));
    }
    return std::make_pair(line.substr(0, space), line.substr(space + 1));
  }
  if (merge.json().is_array() && merge.json().size() == 2 && merge.json()[0].is_string() &&
      merge.json()[1].is_string()) {
    return std::make_pair(merge.json()[0].get<std::string>(), merge.json()[1].get<std::string>());
  }
  return merge.Invalid("a merge must be a string \"a b\" or a pair [\"a\", \"b\"]");
}

// tokenizers' cache limits.
constexpr size_t kCacheCapacity = 10000;
constexpr size_t kCacheMaxWordLength = 256;

}  // namespace

BpeModel::BpeModel(BpeModel&& other) noexcept
    : vocab_(std::move(other.vocab_)),
      id_to_token_(std::move(other.id_to_token_)),
      id_limit_(other.id_limit_),
      merges_(std::move(other.merges_)),
      byte_ids_(std::move(other.byte_ids_)),
      unk_id_(other.unk_id_),
      fuse_unk_(other.fuse_unk_),
      byte_fallback_(other.byte_fallback_),
      ignore_merges_(other.ignore_merges_),
      continuing_subword_prefix_(std::move(other.continuing_subword_prefix_)),
      end_of_word_suffix_(std::move(other.end_of_word_suffix_)),
      char_ids_(std::move(other.char_ids_)) {
  std::lock_guard<std::mutex> lock(other.cache_mutex_);
  cache_ = std::move(other.cache_);
}

absl::StatusOr<BpeModel> BpeModel::FromJson(const JsonRef& model) {
  MEFT_RETURN_IF_ERROR(model.RequireObject());
  if (!model["type"].is_missing()) {
    MEFT_ASSIGN_OR_RETURN(const std::string type, model["type"].String());
    if (type != "BPE") {
      return model["type"].Unsupported(
          absl::StrCat("unsupported ", Quote(type), " (only BPE models are supported)"));
    }
  }
  const JsonRef dropout = model["dropout"];
  if (!dropout.is_null() && !(dropout.json().is_number() && dropout.json().get<double>() == 0.0)) {
    return dropout.Unsupported("BPE dropout is a training option and is not supported");
  }

  BpeModel bpe;
  MEFT_ASSIGN_OR_RETURN(bpe.fuse_unk_, model["fuse_unk"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(bpe.byte_fallback_, model["byte_fallback"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(bpe.ignore_merges_, model["ignore_merges"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(bpe.continuing_subword_prefix_,
                        model["continuing_subword_prefix"].StringOr(""));
  MEFT_ASSIGN_OR_RETURN(bpe.end_of_word_suffix_, model["end_of_word_suffix"].StringOr(""));

  const JsonRef vocab = model["vocab"];
  MEFT_RETURN_IF_ERROR(vocab.RequireObject());
  bpe.vocab_.reserve(vocab.json().size());
  int64_t limit = 0;
  for (const auto& [token, value] : vocab.json().items()) {
    if (!value.is_number_integer()) {
      return vocab[token].Invalid(absl::StrCat("expected an integer id, got ", value.type_name()));
    }
    const int64_t id = value.get<int64_t>();
    if (id < 0 || id > kMaxTokenId) {
      return vocab[token].Invalid(absl::StrCat("id ", id, " is outside [0, ", kMaxTokenId, "]"));
    }
    bpe.vocab_.emplace(token, static_cast<int32_t>(id));
    limit = std::max(limit, id + 1);
  }
  bpe.id_limit_ = limit;
  bpe.id_to_token_.reserve(bpe.vocab_.size());
  for (const auto& [token, id] : bpe.vocab_) {
    auto [it, inserted] = bpe.id_to_token_.emplace(id, token);
    if (!inserted) {
      return vocab.Invalid(
          absl::StrCat("id ", id, " is used by both ", Quote(it->second), " and ", Quote(token)));
    }
    if (!token.empty() && IsValidUtf8(token) && CharLength(token, 0) == token.size()) {
      bpe.char_ids_[DecodeChar(token, 0)] = id;
    }
  }

  const JsonRef unk = model["unk_token"];
  if (!unk.is_null()) {
    MEFT_ASSIGN_OR_RETURN(const std::string unk_token, unk.String());
    bpe.unk_id_ = bpe.TokenToId(unk_token);
    if (bpe.unk_id_ < 0) {
      return unk.Invalid(absl::StrCat(Quote(unk_token), " is not in model.vocab"));
    }
  }
  bpe.byte_ids_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    bpe.byte_ids_[b] = bpe.TokenToId(absl::StrFormat("<0x%02X>", b));
  }

  const JsonRef merges = model["merges"];
  MEFT_ASSIGN_OR_RETURN(const size_t num_merges, merges.ArraySize());
  bpe.merges_.reserve(num_merges);
  const size_t prefix_length = bpe.continuing_subword_prefix_.size();
  for (size_t i = 0; i < num_merges; ++i) {
    const JsonRef merge = merges.At(i);
    MEFT_ASSIGN_OR_RETURN(const auto parts, ParseMerge(merge));
    const auto& [left, right] = parts;
    const int32_t left_id = bpe.TokenToId(left);
    const int32_t right_id = bpe.TokenToId(right);
    if (left_id < 0 || right_id < 0) {
      return merge.Invalid(
          absl::StrCat(Quote(left_id < 0 ? left : right), " is not in model.vocab"));
    }
    if (right.size() < prefix_length) {
      return merge.Invalid(
          absl::StrCat(Quote(right), " is shorter than the continuing_subword_prefix"));
    }
    const std::string merged = left + right.substr(prefix_length);
    const int32_t new_id = bpe.TokenToId(merged);
    if (new_id < 0) {
      return merge.Invalid(
          absl::StrCat("the merged token ", Quote(merged), " is not in model.vocab"));
    }
    // A repeated pair keeps its last rank, as in tokenizers.
    bpe.merges_[PairKey(left_id, right_id)] = MergeTarget{static_cast<int32_t>(i), new_id};
  }
  return bpe;
}

int32_t BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(AsAbsl(token));
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::IdToToken(int64_t id) const {
  if (id < 0 || id >= id_limit_) return nullptr;
  auto it = id_to_token_.find(static_cast<int32_t>(id));
  return it == id_to_token_.end() ? nullptr : &it->second;
}

int32_t BpeModel::CharId(std::string_view text) const {
  auto it = char_ids_.find(DecodeChar(text, 0));
  return it == char_ids_.end() ? -1 : it->second;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  const bool cacheable = word.size() < kCacheMaxWordLength;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(AsAbsl(word));
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids->size();
  Merge(word, ids);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity) {
      cache_.emplace(std::string(word), std::vector<int32_t>(ids->begin() + first, ids->end()));
    }
  }
}

void BpeModel::Merge(std::string_view word, std::vector<int32_t>* ids) const {
  if (ignore_merges_) {
    if (const int32_t id = TokenToId(word); id >= 0) {
      ids->push_back(id);
      return;
    }
  }
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id, int32_t length) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{id, index - 1, index + 1, length});
  };
  // Bytes covered by the unk not yet added (0: none); added before the next known character.
  int32_t pending_unk_length = 0;
  std::string key;
  for (size_t pos = 0; pos < word.size();) {
    const size_t n = CharLength(word, pos);
    const bool first = pos == 0;
    const bool last = pos + n == word.size();
    key.clear();
    if (!first) key += continuing_subword_prefix_;
    key.append(word.substr(pos, n));
    if (last) key += end_of_word_suffix_;
    pos += n;
    const bool plain = key.size() == n;  // no prefix or suffix: one character
    if (const int32_t id = plain ? CharId(key) : TokenToId(key); id >= 0) {
      if (pending_unk_length > 0) {
        add(unk_id_, pending_unk_length);
        pending_unk_length = 0;
      }
      add(id, static_cast<int32_t>(n));
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (const char c : key) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        // tokenizers keeps a pending unk pending across byte tokens.
        for (const char c : key) add(byte_ids_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk_length > 0 && !fuse_unk_) {
        add(unk_id_, pending_unk_length);
        pending_unk_length = 0;
      }
      pending_unk_length += static_cast<int32_t>(n);
    }
  }
  if (pending_unk_length > 0) add(unk_id_, pending_unk_length);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  std::priority_queue<Candidate> queue;
  auto push_pair = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    auto it = merges_.find(PairKey(symbols[pos].id, symbols[next].id));
    if (it != merges_.end()) queue.push(Candidate{it->second.rank, pos, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.length == 0 || left.next < 0) continue;
    const int32_t right_pos = left.next;
    const Symbol right = symbols[right_pos];
    // Skip entries made stale by an earlier merge of either symbol.
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    left.length += right.length;
    left.next = right.next;
    symbols[right_pos].length = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  for (const Symbol& s : symbols) {
    if (s.length != 0) ids->push_back(s.id);
  }
}

}  // namespace meft::worker::hf
