#include "gpu_worker/tokenizer/hf/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "gpu_worker/tokenizer/hf/json_ref.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker::hf {
namespace {

constexpr std::string_view kWordClass = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
constexpr std::string_view kHexClass = "0-9a-fA-F";

// Limits of one pcre2_match call. PCRE2's defaults (10 million backtracking points, 20 MB of
// interpreter frames) fail on texts with a few million consecutive spaces, which the
// pre-tokenizer regexes of real tokenizers (e.g. Llama 3's \s*[\r\n]+) walk back over once;
// these are ten times larger, and still stop a catastrophically backtracking pattern from a
// hostile tokenizer.json within about a second with RESOURCE_EXHAUSTED.
constexpr uint32_t kHeapLimitKib = 256u << 10;
constexpr uint32_t kMatchLimit = 100000000u;

absl::Status Unsupported(std::string_view pattern, size_t offset, std::string_view what) {
  return absl::UnimplementedError(absl::StrCat("regex \"", AsAbsl(pattern), "\" at offset ", offset,
                                               ": ", AsAbsl(what), " is not supported"));
}

// Rewrites an Oniguruma (Ruby syntax) pattern into PCRE2 syntax with the same meaning; see the
// header for what changes.
absl::StatusOr<std::string> Translate(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  size_t class_start = 0;  // offset of the first member of the current class
  for (size_t i = 0; i < pattern.size();) {
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 >= pattern.size()) {
        out.push_back(c);
        ++i;
        continue;
      }
      const char e = pattern[i + 1];
      switch (e) {
        case 's':
          out += "\\p{White_Space}";
          break;
        case 'S':
          out += "\\P{White_Space}";
          break;
        case 'w':
          out += in_class ? std::string(kWordClass) : absl::StrCat("[", AsAbsl(kWordClass), "]");
          break;
        case 'W':
          if (in_class) return Unsupported(pattern, i, "\\W inside a character class");
          out += absl::StrCat("[^", AsAbsl(kWordClass), "]");
          break;
        case 'h':
          out += in_class ? std::string(kHexClass) : absl::StrCat("[", AsAbsl(kHexClass), "]");
          break;
        case 'H':
          if (in_class) return Unsupported(pattern, i, "\\H inside a character class");
          out += absl::StrCat("[^", AsAbsl(kHexClass), "]");
          break;
        case 'Q': {
          // Quoted text up to \E is literal in both engines: copy it untouched.
          const size_t end = pattern.find("\\E", i + 2);
          const size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
          out.append(pattern.substr(i, stop - i));
          i = stop;
          continue;
        }
        default: {
          // Any other escape means the same in both; copy it with its whole (UTF-8) character.
          const size_t n = 1 + CharLength(pattern, i + 1);
          out.append(pattern.substr(i, n));
          i += n;
          continue;
        }
      }
      i += 2;
      continue;
    }
    if (in_class) {
      if (c == ']' && i > class_start) {
        in_class = false;
      } else if (c == '[') {
        if (i + 1 < pattern.size() && pattern[i + 1] == ':') {
          // A POSIX class "[:alpha:]": copy through its closing ":]".
          const size_t end = pattern.find(":]", i + 2);
          if (end == std::string_view::npos) return Unsupported(pattern, i, "an unclosed \"[:\"");
          out.append(pattern.substr(i, end + 2 - i));
          i = end + 2;
          continue;
        }
        return Unsupported(pattern, i, "a nested character class");
      } else if (c == '&' && i + 1 < pattern.size() && pattern[i + 1] == '&') {
        return Unsupported(pattern, i, "character class intersection (&&)");
      }
    } else if (c == '[') {
      in_class = true;
      class_start = i + 1;
      if (class_start < pattern.size() && pattern[class_start] == '^') ++class_start;
      out.push_back(c);
      if (class_start > i + 1) out.push_back('^');
      i = class_start;
      // A ']' right after "[" or "[^" is a literal member.
      if (i < pattern.size() && pattern[i] == ']') {
        out.push_back(']');
        ++i;
      }
      continue;
    }
    const size_t n = CharLength(pattern, i);
    out.append(pattern.substr(i, n));
    i += n;
  }
  return out;
}

}  // namespace

struct Regex::Compiled {
  pcre2_code* code = nullptr;
  pcre2_match_context* context = nullptr;
  ~Compiled() {
    pcre2_match_context_free(context);
    pcre2_code_free(code);
  }
};

namespace {

absl::StatusOr<std::shared_ptr<const Regex::Compiled>> CompileRaw(std::string_view original,
                                                                  std::string_view pcre_pattern,
                                                                  uint32_t options) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre_pattern.data()),
                                   pcre_pattern.size(), options, &error, &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(
        absl::StrCat("regex \"", AsAbsl(original), "\" does not compile: ",
                     reinterpret_cast<const char*>(message), " (offset ", error_offset, ")"));
  }
  auto compiled = std::make_shared<Regex::Compiled>();
  compiled->code = code;
  // Without JIT support PCRE2 falls back to its interpreter; both give the same matches.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  compiled->context = pcre2_match_context_create(nullptr);
  if (compiled->context == nullptr) return absl::ResourceExhaustedError("pcre2: out of memory");
  pcre2_set_heap_limit(compiled->context, kHeapLimitKib);
  pcre2_set_match_limit(compiled->context, kMatchLimit);
  return std::shared_ptr<const Regex::Compiled>(std::move(compiled));
}

// One pcre2_match at `start`; returns the match or nullopt-equivalent {npos, npos}.
absl::StatusOr<MatchRange> MatchOnce(const Regex::Compiled& c, pcre2_match_data* data,
                                     std::string_view text, size_t start, uint32_t options,
                                     const std::string& pattern) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  int rc = pcre2_match(c.code, subject, text.size(), start, options | PCRE2_NO_UTF_CHECK, data,
                       c.context);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    // The JIT's machine stack is small; the interpreter uses the heap and finds the same match.
    rc = pcre2_match(c.code, subject, text.size(), start,
                     options | PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, data, c.context);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return MatchRange{std::string_view::npos, std::string_view::npos};
  if (rc < 0) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(rc, message, sizeof(message));
    return absl::ResourceExhaustedError(
        absl::StrCat("regex \"", pattern, "\" failed on a text of ", text.size(),
                     " bytes: ", reinterpret_cast<const char*>(message)));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
  return MatchRange{ovector[0], ovector[1]};
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

}  // namespace

absl::StatusOr<Regex> Regex::Compile(std::string_view pattern) {
  if (!IsValidUtf8(pattern)) {
    return absl::InvalidArgumentError("regex pattern is not valid UTF-8");
  }
  auto translated = Translate(pattern);
  if (!translated.ok()) return translated.status();
  // Ruby's ^ and $ are line anchors: PCRE2_MULTILINE.
  auto compiled = CompileRaw(pattern, *translated, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE);
  if (!compiled.ok()) return compiled.status();
  return Regex(*std::move(compiled), std::string(pattern));
}

absl::StatusOr<Regex> Regex::Literal(std::string_view text) {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("literal pattern is not valid UTF-8");
  auto compiled = CompileRaw(text, text, PCRE2_UTF | PCRE2_LITERAL);
  if (!compiled.ok()) return compiled.status();
  return Regex(*std::move(compiled), std::string(text));
}

absl::Status Regex::FindAll(std::string_view text, std::vector<MatchRange>* matches) const {
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create_from_pattern(compiled_->code, nullptr));
  if (data == nullptr) return absl::ResourceExhaustedError("pcre2: out of memory");
  size_t search_from = 0;
  size_t last_match_end = std::string_view::npos;
  while (search_from <= text.size()) {
    auto found = MatchOnce(*compiled_, data.get(), text, search_from, 0, pattern_);
    if (!found.ok()) return found.status();
    const auto [start, end] = *found;
    if (start == std::string_view::npos) break;
    if (start == end && end == last_match_end) {
      // An empty match where the previous one ended: move on by one character.
      search_from = end < text.size() ? end + CharLength(text, end) : end + 1;
      continue;
    }
    matches->emplace_back(start, end);
    search_from = end;
    last_match_end = end;
  }
  return absl::OkStatus();
}

absl::StatusOr<long> Regex::MatchAt(std::string_view text, size_t pos) const {
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create_from_pattern(compiled_->code, nullptr));
  if (data == nullptr) return absl::ResourceExhaustedError("pcre2: out of memory");
  auto found = MatchOnce(*compiled_, data.get(), text, pos, PCRE2_ANCHORED, pattern_);
  if (!found.ok()) return found.status();
  if (found->first == std::string_view::npos) return -1;
  return static_cast<long>(found->second - found->first);
}

}  // namespace meft::worker::hf
