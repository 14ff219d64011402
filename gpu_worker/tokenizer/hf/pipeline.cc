#include "gpu_worker/tokenizer/hf/pipeline.h"

#include <unicode/errorcode.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/tokenizer/hf/regex.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker::hf {
namespace {

// GPT-2's pre-tokenizer regex, as tokenizers' ByteLevel uses it.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// tokenizers' NormalizedString::split over precomputed matches of a pattern in a text of
// `length` bytes: the ranges that remain, in order (empty ones included; callers drop them).
std::vector<MatchRange> SplitRanges(size_t length, const std::vector<MatchRange>& matches,
                                    bool invert, SplitBehavior behavior) {
  // Pattern::find_matches: the matches and the gaps between them, each flagged.
  std::vector<std::pair<MatchRange, bool>> splits;
  if (length == 0) {
    splits.push_back({{0, 0}, false});
  } else {
    size_t previous = 0;
    for (const auto& [start, end] : matches) {
      if (previous != start) splits.push_back({{previous, start}, false});
      splits.push_back({{start, end}, true});
      previous = end;
    }
    if (previous != length) splits.push_back({{previous, length}, false});
  }
  if (invert) {
    for (auto& split : splits) split.second = !split.second;
  }
  std::vector<MatchRange> kept;
  kept.reserve(splits.size());
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& [range, is_match] : splits) kept.push_back(range);
      break;
    case SplitBehavior::kRemoved:
      for (const auto& [range, is_match] : splits) {
        if (!is_match) kept.push_back(range);
      }
      break;
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const auto& [range, is_match] : splits) {
        if (is_match == previous_match && !kept.empty()) {
          kept.back().second = range.second;
        } else {
          kept.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& [range, is_match] : splits) {
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().second = range.second;
        } else {
          kept.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = splits.rbegin(); it != splits.rend(); ++it) {
        const auto& [range, is_match] = *it;
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().first = range.first;
        } else {
          kept.push_back(range);
        }
        previous_match = is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
  }
  return kept;
}

// Replaces `pieces` by the non-empty ranges of each piece that `split` returns.
template <typename SplitFn>
absl::Status SplitPieces(std::vector<Piece>* pieces, SplitFn split) {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  for (Piece& piece : *pieces) {
    MEFT_ASSIGN_OR_RETURN(const std::vector<MatchRange> ranges, split(piece.text));
    for (const auto& [begin, end] : ranges) {
      if (begin == end) continue;
      out.push_back(Piece{piece.text.substr(begin, end - begin), piece.at_origin && begin == 0});
    }
  }
  *pieces = std::move(out);
  return absl::OkStatus();
}

// A {"String": ...} or {"Regex": ...} pattern. Both are run as regular expressions, as in
// tokenizers (which compiles a String pattern as an escaped regex).
absl::StatusOr<Regex> ParsePattern(const JsonRef& json) {
  MEFT_RETURN_IF_ERROR(json.RequireObject());
  const JsonRef string = json["String"];
  const JsonRef regex = json["Regex"];
  if (string.is_missing() == regex.is_missing()) {
    return json.Invalid("expected {\"String\": ...} or {\"Regex\": ...}");
  }
  const JsonRef& field = string.is_missing() ? regex : string;
  MEFT_ASSIGN_OR_RETURN(const std::string text, field.String());
  absl::StatusOr<Regex> compiled =
      string.is_missing() ? Regex::Compile(text) : Regex::Literal(text);
  if (!compiled.ok()) {
    return absl::Status(compiled.status().code(),
                        absl::StrCat(field.Where(), compiled.status().message()));
  }
  return compiled;
}

// The literal text of a {"String": ...} pattern (decoders accept only these).
absl::StatusOr<std::string> ParseStringPattern(const JsonRef& json) {
  MEFT_RETURN_IF_ERROR(json.RequireObject());
  if (!json["Regex"].is_missing()) {
    return json["Regex"].Unsupported("regex patterns in decoders are not supported");
  }
  MEFT_ASSIGN_OR_RETURN(std::string text, json["String"].String());
  if (text.empty()) return json["String"].Unsupported("an empty pattern is not supported");
  return text;
}

absl::StatusOr<std::string> TypeOf(const JsonRef& json) {
  MEFT_RETURN_IF_ERROR(json.RequireObject());
  return json["type"].String();
}

absl::Status UnsupportedType(const JsonRef& json, std::string_view type) {
  return json["type"].Unsupported(absl::StrCat("unsupported ", Quote(type)));
}

// Replaces every match of `pattern` in `text` by `content`.
absl::Status ReplaceAll(const Regex& pattern, std::string_view content, std::string* text) {
  std::vector<MatchRange> matches;
  MEFT_RETURN_IF_ERROR(pattern.FindAll(*text, &matches));
  if (matches.empty()) return absl::OkStatus();
  std::string out;
  out.reserve(text->size());
  size_t previous = 0;
  for (const auto& [start, end] : matches) {
    out.append(*text, previous, start - previous);
    out.append(content);
    previous = end;
  }
  out.append(*text, previous);
  *text = std::move(out);
  return absl::OkStatus();
}

void ReplaceLiteral(std::string_view pattern, std::string_view content, std::string* text) {
  size_t pos = text->find(pattern);
  if (pos == std::string::npos) return;
  std::string out;
  size_t previous = 0;
  while (pos != std::string::npos) {
    out.append(*text, previous, pos - previous);
    out.append(content);
    previous = pos + pattern.size();
    pos = text->find(pattern, previous);
  }
  out.append(*text, previous);
  *text = std::move(out);
}

// Prepend scheme of Metaspace.
enum class PrependScheme { kAlways, kFirst, kNever };

struct MetaspaceOptions {
  std::string replacement = "\xE2\x96\x81";  // U+2581 "▁"
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;
};

absl::StatusOr<MetaspaceOptions> ParseMetaspace(const JsonRef& json) {
  MetaspaceOptions options;
  if (!json["replacement"].is_null()) {
    MEFT_ASSIGN_OR_RETURN(options.replacement, json["replacement"].Char());
  }
  MEFT_ASSIGN_OR_RETURN(options.split, json["split"].BoolOr(true));
  const JsonRef scheme = json["prepend_scheme"];
  if (!scheme.is_null()) {
    MEFT_ASSIGN_OR_RETURN(const std::string name, scheme.String());
    if (name == "always") {
      options.prepend_scheme = PrependScheme::kAlways;
    } else if (name == "first") {
      options.prepend_scheme = PrependScheme::kFirst;
    } else if (name == "never") {
      options.prepend_scheme = PrependScheme::kNever;
    } else {
      return scheme.Invalid(
          absl::StrCat("expected \"always\", \"first\" or \"never\", got ", Quote(name)));
    }
  } else {
    // Files written before prepend_scheme existed say add_prefix_space.
    MEFT_ASSIGN_OR_RETURN(const bool add_prefix_space, json["add_prefix_space"].BoolOr(true));
    options.prepend_scheme = add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
  }
  return options;
}

// ---------------------------------------------------------------------------------------------
// Normalizers

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  absl::Status Normalize(std::string* text) const override {
    for (const auto& step : steps_) MEFT_RETURN_IF_ERROR(step->Normalize(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string* text) const override {
    if (!text->empty()) text->insert(0, prefix_);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Regex pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string* text) const override {
    return ReplaceAll(pattern_, content_, text);
  }

 private:
  Regex pattern_;
  std::string content_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  UnicodeNormalizer(const icu::Normalizer2* normalizer, std::string name)
      : normalizer_(normalizer), name_(std::move(name)) {}
  absl::Status Normalize(std::string* text) const override {
    const icu::UnicodeString input = icu::UnicodeString::fromUTF8(*text);
    icu::ErrorCode error;
    const icu::UnicodeString output = normalizer_->normalize(input, error);
    if (error.isFailure()) {
      return absl::InternalError(absl::StrCat(name_, " normalization failed: ", error.errorName()));
    }
    text->clear();
    output.toUTF8String(*text);
    return absl::OkStatus();
  }

 private:
  const icu::Normalizer2* normalizer_;  // ICU's singleton, never freed
  std::string name_;
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    for (const auto& step : steps_) MEFT_RETURN_IF_ERROR(step->PreTokenize(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

// Split, and Digits as the Split it amounts to.
class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Regex pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitPieces(pieces,
                       [&](const std::string& text) -> absl::StatusOr<std::vector<MatchRange>> {
                         std::vector<MatchRange> matches;
                         MEFT_RETURN_IF_ERROR(pattern_.FindAll(text, &matches));
                         return SplitRanges(text.size(), matches, invert_, behavior_);
                       });
  }

 private:
  Regex pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Regex> split)
      : add_prefix_space_(add_prefix_space), split_(std::move(split)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    if (add_prefix_space_) {
      for (Piece& piece : *pieces) {
        if (piece.text.empty() || piece.text[0] != ' ') piece.text.insert(0, " ");
      }
    }
    if (split_.has_value()) {
      MEFT_RETURN_IF_ERROR(SplitPieces(
          pieces, [&](const std::string& text) -> absl::StatusOr<std::vector<MatchRange>> {
            std::vector<MatchRange> matches;
            MEFT_RETURN_IF_ERROR(split_->FindAll(text, &matches));
            return SplitRanges(text.size(), matches, false, SplitBehavior::kIsolated);
          }));
    }
    for (Piece& piece : *pieces) {
      std::string mapped;
      mapped.reserve(piece.text.size() * 2);
      for (const char c : piece.text) mapped.append(ByteLevelChar(static_cast<uint8_t>(c)));
      piece.text = std::move(mapped);
    }
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::optional<Regex> split_;  // GPT-2's regex with use_regex
};

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(MetaspaceOptions options, Regex replacement)
      : options_(std::move(options)), replacement_(std::move(replacement)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    const std::string& r = options_.replacement;
    for (Piece& piece : *pieces) {
      ReplaceLiteral(" ", r, &piece.text);
      const bool starts = piece.text.compare(0, r.size(), r) == 0;
      if (!starts && (options_.prepend_scheme == PrependScheme::kAlways ||
                      (options_.prepend_scheme == PrependScheme::kFirst && piece.at_origin))) {
        piece.text.insert(0, r);
      }
    }
    if (!options_.split) return absl::OkStatus();
    return SplitPieces(
        pieces, [&](const std::string& text) -> absl::StatusOr<std::vector<MatchRange>> {
          std::vector<MatchRange> matches;
          MEFT_RETURN_IF_ERROR(replacement_.FindAll(text, &matches));
          return SplitRanges(text.size(), matches, false, SplitBehavior::kMergedWithNext);
        });
  }

 private:
  MetaspaceOptions options_;
  Regex replacement_;  // the replacement character as a literal pattern
};

// ---------------------------------------------------------------------------------------------
// Decoders

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps)
      : steps_(std::move(steps)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& step : steps_) step->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string bytes;
    for (const std::string& token : *tokens) {
      // A token whose characters are all in the byte-level alphabet becomes those bytes; any
      // other token (an added token such as "<|im_start|>" with a space) stays as it is.
      std::string mapped;
      bool all = IsValidUtf8(token);
      for (size_t pos = 0; all && pos < token.size(); pos += CharLength(token, pos)) {
        const int byte = ByteLevelByte(DecodeChar(token, pos));
        if (byte < 0) {
          all = false;
        } else {
          mapped.push_back(static_cast<char>(byte));
        }
      }
      bytes += all ? mapped : token;
    }
    tokens->assign(1, ToValidUtf8(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  explicit MetaspaceDecoder(MetaspaceOptions options) : options_(std::move(options)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      // In the first token every replacement character is dropped (unless the scheme is never);
      // elsewhere each becomes a space. This is tokenizers' behaviour.
      const bool drop = i == 0 && options_.prepend_scheme != PrependScheme::kNever;
      ReplaceLiteral(options_.replacement, drop ? "" : " ", &(*tokens)[i]);
    }
  }

 private:
  MetaspaceOptions options_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::string pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) ReplaceLiteral(pattern_, content_, &token);
  }

 private:
  std::string pattern_;
  std::string content_;
};

// "<0xAB>" -> 0xAB, as tokenizers parses it (u8::from_str_radix of the two characters, which
// also accepts a leading '+'); -1 for anything else.
int ParseByteToken(const std::string& token) {
  if (token.size() != 6 || token.compare(0, 3, "<0x") != 0 || token[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int high = hex(token[3]);
  const int low = hex(token[4]);
  if (token[3] == '+' && low >= 0) return low;
  if (high < 0 || low < 0) return -1;
  return high * 16 + low;
}

class ByteFallbackDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    size_t byte_tokens = 0;
    auto flush = [&] {
      if (byte_tokens == 0) return;
      // A run of byte tokens that is not valid UTF-8 becomes one U+FFFD per token.
      if (IsValidUtf8(bytes)) {
        out.push_back(bytes);
      } else {
        std::string replaced;
        for (size_t k = 0; k < byte_tokens; ++k) replaced.append(kReplacementCharacter);
        out.push_back(std::move(replaced));
      }
      bytes.clear();
      byte_tokens = 0;
    };
    for (std::string& token : *tokens) {
      const int byte = ParseByteToken(token);
      if (byte >= 0) {
        bytes.push_back(static_cast<char>(byte));
        ++byte_tokens;
        continue;
      }
      flush();
      out.push_back(std::move(token));
    }
    flush();
    *tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string joined;
    for (const std::string& token : *tokens) joined += token;
    tokens->assign(1, std::move(joined));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) {
      size_t begin = 0;
      for (size_t k = 0; k < start_ && token.compare(begin, content_.size(), content_) == 0 &&
                         begin < token.size();
           ++k) {
        begin += content_.size();
      }
      size_t end = token.size();
      for (size_t k = 0; k < stop_ && end >= begin + content_.size() &&
                         token.compare(end - content_.size(), content_.size(), content_) == 0;
           ++k) {
        end -= content_.size();
      }
      token = token.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;  // one character
  size_t start_;
  size_t stop_;
};

absl::StatusOr<SplitBehavior> ParseBehavior(const JsonRef& json) {
  MEFT_ASSIGN_OR_RETURN(const std::string name, json.String());
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return json.Invalid(absl::StrCat("unknown split behavior ", Quote(name)));
}

absl::StatusOr<int64_t> NonNegative(const JsonRef& json) {
  MEFT_ASSIGN_OR_RETURN(const int64_t value, json.Int());
  if (value < 0) return json.Invalid(absl::StrCat("must not be negative, got ", value));
  return value;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const JsonRef& json) {
  if (json.is_null()) return nullptr;
  MEFT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json));
  if (type == "Sequence") {
    const JsonRef list = json["normalizers"];
    MEFT_ASSIGN_OR_RETURN(const size_t n, list.ArraySize());
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (size_t i = 0; i < n; ++i) {
      if (list.At(i).is_null()) return list.At(i).Invalid("expected a normalizer, got null");
      MEFT_ASSIGN_OR_RETURN(auto step, ParseNormalizer(list.At(i)));
      steps.push_back(std::move(step));
    }
    return std::make_unique<SequenceNormalizer>(std::move(steps));
  }
  if (type == "Prepend") {
    MEFT_ASSIGN_OR_RETURN(std::string prefix, json["prepend"].String());
    return std::make_unique<PrependNormalizer>(std::move(prefix));
  }
  if (type == "Replace") {
    MEFT_ASSIGN_OR_RETURN(Regex pattern, ParsePattern(json["pattern"]));
    MEFT_ASSIGN_OR_RETURN(std::string content, json["content"].String());
    return std::make_unique<ReplaceNormalizer>(std::move(pattern), std::move(content));
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    icu::ErrorCode error;
    const icu::Normalizer2* normalizer = type == "NFC"   ? icu::Normalizer2::getNFCInstance(error)
                                         : type == "NFD" ? icu::Normalizer2::getNFDInstance(error)
                                         : type == "NFKC"
                                             ? icu::Normalizer2::getNFKCInstance(error)
                                             : icu::Normalizer2::getNFKDInstance(error);
    if (error.isFailure() || normalizer == nullptr) {
      return absl::InternalError(
          absl::StrCat(json.Where(), "ICU has no ", type, " normalizer: ", error.errorName()));
    }
    return std::make_unique<UnicodeNormalizer>(normalizer, type);
  }
  return UnsupportedType(json, type);
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const JsonRef& json) {
  if (json.is_null()) return nullptr;
  MEFT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json));
  if (type == "Sequence") {
    const JsonRef list = json["pretokenizers"];
    MEFT_ASSIGN_OR_RETURN(const size_t n, list.ArraySize());
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (size_t i = 0; i < n; ++i) {
      if (list.At(i).is_null()) return list.At(i).Invalid("expected a pre-tokenizer, got null");
      MEFT_ASSIGN_OR_RETURN(auto step, ParsePreTokenizer(list.At(i)));
      steps.push_back(std::move(step));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(steps));
  }
  if (type == "ByteLevel") {
    MEFT_ASSIGN_OR_RETURN(const bool add_prefix_space, json["add_prefix_space"].BoolOr(true));
    MEFT_ASSIGN_OR_RETURN(const bool use_regex, json["use_regex"].BoolOr(true));
    std::optional<Regex> split;
    if (use_regex) {
      MEFT_ASSIGN_OR_RETURN(split, Regex::Compile(kGpt2Pattern));
    }
    return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(split));
  }
  if (type == "Split") {
    MEFT_ASSIGN_OR_RETURN(Regex pattern, ParsePattern(json["pattern"]));
    MEFT_ASSIGN_OR_RETURN(const SplitBehavior behavior, ParseBehavior(json["behavior"]));
    MEFT_ASSIGN_OR_RETURN(const bool invert, json["invert"].BoolOr(false));
    return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert);
  }
  if (type == "Digits") {
    // tokenizers splits on char::is_numeric (Unicode N*): each digit alone, or runs of them.
    MEFT_ASSIGN_OR_RETURN(const bool individual, json["individual_digits"].BoolOr(false));
    MEFT_ASSIGN_OR_RETURN(Regex pattern, Regex::Compile(individual ? "\\p{N}" : "\\p{N}+"));
    return std::make_unique<SplitPreTokenizer>(std::move(pattern), SplitBehavior::kIsolated,
                                               /*invert=*/false);
  }
  if (type == "Metaspace") {
    MEFT_ASSIGN_OR_RETURN(MetaspaceOptions options, ParseMetaspace(json));
    MEFT_ASSIGN_OR_RETURN(Regex replacement, Regex::Literal(options.replacement));
    return std::make_unique<MetaspacePreTokenizer>(std::move(options), std::move(replacement));
  }
  return UnsupportedType(json, type);
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const JsonRef& json) {
  if (json.is_null()) return nullptr;
  MEFT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json));
  if (type == "Sequence") {
    const JsonRef list = json["decoders"];
    MEFT_ASSIGN_OR_RETURN(const size_t n, list.ArraySize());
    std::vector<std::unique_ptr<Decoder>> steps;
    for (size_t i = 0; i < n; ++i) {
      if (list.At(i).is_null()) return list.At(i).Invalid("expected a decoder, got null");
      MEFT_ASSIGN_OR_RETURN(auto step, ParseDecoder(list.At(i)));
      steps.push_back(std::move(step));
    }
    return std::make_unique<SequenceDecoder>(std::move(steps));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    MEFT_ASSIGN_OR_RETURN(MetaspaceOptions options, ParseMetaspace(json));
    return std::make_unique<MetaspaceDecoder>(std::move(options));
  }
  if (type == "Replace") {
    MEFT_ASSIGN_OR_RETURN(std::string pattern, ParseStringPattern(json["pattern"]));
    MEFT_ASSIGN_OR_RETURN(std::string content, json["content"].String());
    return std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    MEFT_ASSIGN_OR_RETURN(std::string content, json["content"].Char());
    MEFT_ASSIGN_OR_RETURN(const int64_t start, NonNegative(json["start"]));
    MEFT_ASSIGN_OR_RETURN(const int64_t stop, NonNegative(json["stop"]));
    return std::make_unique<StripDecoder>(std::move(content), static_cast<size_t>(start),
                                          static_cast<size_t>(stop));
  }
  return UnsupportedType(json, type);
}

namespace {

absl::Status ParseTemplate(const JsonRef& json, PostProcessor* out) {
  const JsonRef single = json["single"];
  MEFT_ASSIGN_OR_RETURN(const size_t n, single.ArraySize());
  const JsonRef specials = json["special_tokens"];
  MEFT_RETURN_IF_ERROR(specials.RequireObject());
  PostProcessor added;
  bool seen_sequence = false;
  for (size_t i = 0; i < n; ++i) {
    const JsonRef item = single.At(i);
    MEFT_RETURN_IF_ERROR(item.RequireObject());
    if (!item["Sequence"].is_missing()) {
      MEFT_ASSIGN_OR_RETURN(const std::string id, item["Sequence"]["id"].String());
      if (id != "A" || seen_sequence) {
        return item["Sequence"]["id"].Invalid(absl::StrCat(
            "the single-sequence template must contain sequence \"A\" once, got ", Quote(id)));
      }
      seen_sequence = true;
      continue;
    }
    if (item["SpecialToken"].is_missing()) {
      return item.Invalid("expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    }
    MEFT_ASSIGN_OR_RETURN(const std::string name, item["SpecialToken"]["id"].String());
    const JsonRef entry = specials[name];
    if (entry.is_missing()) {
      return item["SpecialToken"]["id"].Invalid(
          absl::StrCat(Quote(name), " is not in ", specials.path()));
    }
    const JsonRef ids = entry["ids"];
    MEFT_ASSIGN_OR_RETURN(const size_t count, ids.ArraySize());
    for (size_t k = 0; k < count; ++k) {
      MEFT_ASSIGN_OR_RETURN(const int64_t id, NonNegative(ids.At(k)));
      (seen_sequence ? added.suffix : added.prefix).push_back(id);
    }
  }
  if (!seen_sequence) return single.Invalid("the template has no sequence \"A\"");
  out->prefix.insert(out->prefix.begin(), added.prefix.begin(), added.prefix.end());
  out->suffix.insert(out->suffix.end(), added.suffix.begin(), added.suffix.end());
  return absl::OkStatus();
}

absl::Status ApplyPostProcessor(const JsonRef& json, PostProcessor* out) {
  MEFT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json));
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (type == "TemplateProcessing") return ParseTemplate(json, out);
  if (type == "Sequence") {
    const JsonRef list = json["processors"];
    MEFT_ASSIGN_OR_RETURN(const size_t n, list.ArraySize());
    for (size_t i = 0; i < n; ++i) MEFT_RETURN_IF_ERROR(ApplyPostProcessor(list.At(i), out));
    return absl::OkStatus();
  }
  return UnsupportedType(json, type);
}

}  // namespace

absl::StatusOr<PostProcessor> ParsePostProcessor(const JsonRef& json) {
  PostProcessor out;
  if (json.is_null()) return out;
  MEFT_RETURN_IF_ERROR(ApplyPostProcessor(json, &out));
  return out;
}

}  // namespace meft::worker::hf
