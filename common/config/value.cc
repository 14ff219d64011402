// Formatting, parsing and validation of one field's values (field.h).

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <set>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/config/field.h"
#include "common/status.h"

namespace meft::config::internal {

// Quotes a user-supplied value for an error message, escaping control characters and
// shortening very long values.
std::string Quote(absl::string_view text) {
  constexpr size_t kMaxShown = 80;
  if (text.size() > kMaxShown) {
    return absl::StrCat("\"", absl::Utf8SafeCEscape(text.substr(0, kMaxShown)), "\"...");
  }
  return absl::StrCat("\"", absl::Utf8SafeCEscape(text), "\"");
}

// Shortest text that parses back to the same double.
std::string FormatDouble(double value) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
  if (ec != std::errc()) return absl::StrCat(value);
  return std::string(buf, end);
}

// "0-3,5": ascending runs of consecutive values are written as inclusive ranges.
std::string FormatList(const std::vector<uint32_t>& list) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < list.size();) {
    size_t j = i;
    while (j + 1 < list.size() && list[j] != std::numeric_limits<uint32_t>::max() &&
           list[j + 1] == list[j] + 1) {
      ++j;
    }
    parts.push_back(j == i ? absl::StrCat(list[i]) : absl::StrCat(list[i], "-", list[j]));
    i = j + 1;
  }
  return absl::StrJoin(parts, ",");
}

// Human-readable current value of a field, as shown by HelpText.
std::string FormatCurrent(const Field& field) {
  return std::visit(
      [](auto* target) -> std::string {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, bool>) {
          return *target ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          return FormatDouble(*target);
        } else if constexpr (std::is_same_v<T, std::string>) {
          return Quote(*target);
        } else if constexpr (std::is_same_v<T, std::vector<uint32_t>>) {
          return Quote(FormatList(*target));
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          return Quote(absl::StrJoin(*target, ","));
        } else {
          return absl::StrCat(*target);
        }
      },
      field.target);
}

std::string TypeName(const Field& field) {
  switch (KindOf(field)) {
    case kBool:
      return "bool";
    case kInt32:
      return "int32";
    case kUint32:
      return "uint32";
    case kInt64:
      return "int64";
    case kUint64:
      return "uint64";
    case kDouble:
      return "double";
    case kString:
      if (!field.choices.empty()) {
        return absl::StrCat("{", absl::StrJoin(field.choices, ","), "}");
      }
      return "string";
    case kList:
      return "uint32 list";
    case kStringList:
      return "string list";
  }
  return "?";
}

std::string RangeText(const Field& field) {
  if (!field.has_range) return "";
  return absl::StrCat("[", FormatDouble(field.min), ", ", FormatDouble(field.max), "]");
}

// ---------------------------------------------------------------------------------------------
// Value parsing. Every function returns a message without location; callers prefix it.

absl::Status ValueError(std::string message) {
  return absl::InvalidArgumentError(std::move(message));
}

absl::StatusOr<bool> ParseBool(absl::string_view text) {
  if (text == "true") return true;
  if (text == "false") return false;
  return ValueError(absl::StrCat("expected true or false, got ", Quote(text)));
}

// Parses a decimal integer of type T (optional sign), rejecting anything else, values outside
// T's range and negative values for unsigned T.
template <typename T>
absl::StatusOr<T> ParseInteger(absl::string_view text, absl::string_view type_name) {
  absl::string_view digits = text;
  if (absl::ConsumePrefix(&digits, "+") && (digits.empty() || digits[0] == '-')) {
    digits = text;  // "+-1" and "+" are malformed; fall through to the error below.
  }
  constexpr bool kSigned = std::is_signed_v<T>;
  using Wide = std::conditional_t<kSigned, int64_t, uint64_t>;
  const std::string range_text = absl::StrCat(type_name, " [", std::numeric_limits<T>::min(), ", ",
                                              std::numeric_limits<T>::max(), "]");
  if (!kSigned && !digits.empty() && digits[0] == '-') {
    return ValueError(absl::StrCat("expected a non-negative integer, got ", Quote(text)));
  }
  Wide wide = 0;
  const char* begin = digits.data();
  const char* end = digits.data() + digits.size();
  auto [ptr, ec] = std::from_chars(begin, end, wide);
  if (digits.empty() || ptr != end || ec == std::errc::invalid_argument) {
    return ValueError(absl::StrCat("expected an integer, got ", Quote(text)));
  }
  bool out_of_range = ec == std::errc::result_out_of_range;
  if constexpr (!std::is_same_v<T, Wide>) {
    if constexpr (kSigned) {
      out_of_range = out_of_range || wide < static_cast<Wide>(std::numeric_limits<T>::min());
    }
    out_of_range = out_of_range || wide > static_cast<Wide>(std::numeric_limits<T>::max());
  }
  if (out_of_range) {
    return ValueError(absl::StrCat(Quote(text), " is out of range for ", range_text));
  }
  return static_cast<T>(wide);
}

absl::StatusOr<double> ParseDouble(absl::string_view text) {
  absl::string_view digits = text;
  if (absl::ConsumePrefix(&digits, "+") && (digits.empty() || digits[0] == '-')) {
    digits = text;
  }
  double value = 0;
  const char* end = digits.data() + digits.size();
  auto [ptr, ec] = std::from_chars(digits.data(), end, value);
  if (digits.empty() || ptr != end || ec == std::errc::invalid_argument) {
    return ValueError(absl::StrCat("expected a number, got ", Quote(text)));
  }
  if (ec == std::errc::result_out_of_range) {
    return ValueError(absl::StrCat(Quote(text), " is out of range for double"));
  }
  if (!std::isfinite(value)) {
    return ValueError(absl::StrCat("expected a finite number, got ", Quote(text)));
  }
  return value;
}

// "0-3,5" -> {0, 1, 2, 3, 5}. Whitespace around elements is ignored; an empty or blank string
// is the empty list.
absl::StatusOr<std::vector<uint32_t>> ParseRangeList(absl::string_view text) {
  std::vector<uint32_t> out;
  if (absl::StripAsciiWhitespace(text).empty()) return out;
  for (absl::string_view piece : absl::StrSplit(text, ',')) {
    piece = absl::StripAsciiWhitespace(piece);
    if (piece.empty()) {
      return ValueError(absl::StrCat("empty element in range list ", Quote(text)));
    }
    size_t dash = piece.find('-', 1);  // A leading '-' is a sign, reported as negative.
    if (dash == absl::string_view::npos) {
      MEFT_ASSIGN_OR_RETURN(uint32_t value, ParseInteger<uint32_t>(piece, "uint32"));
      out.push_back(value);
    } else {
      absl::string_view first_text = absl::StripAsciiWhitespace(piece.substr(0, dash));
      absl::string_view last_text = absl::StripAsciiWhitespace(piece.substr(dash + 1));
      auto first = ParseInteger<uint32_t>(first_text, "uint32");
      auto last = ParseInteger<uint32_t>(last_text, "uint32");
      const std::string where = absl::StrCat(
          "bad range ", Quote(piece), piece == text ? "" : absl::StrCat(" in ", Quote(text)));
      if (!first.ok() || !last.ok()) {
        return ValueError(
            absl::StrCat(where, ": ", (first.ok() ? last.status() : first.status()).message()));
      }
      if (*first > *last) {
        return ValueError(absl::StrCat(where, ": start ", *first, " is greater than end ", *last));
      }
      if (uint64_t{*last} - *first + 1 > kMaxListElements - out.size()) {
        return ValueError(absl::StrCat("range list ", Quote(text), " has more than ",
                                       kMaxListElements, " elements"));
      }
      for (uint64_t v = *first; v <= *last; ++v) out.push_back(static_cast<uint32_t>(v));
    }
    if (out.size() > kMaxListElements) {
      return ValueError(absl::StrCat("range list ", Quote(text), " has more than ",
                                     kMaxListElements, " elements"));
    }
  }
  return out;
}

absl::Status CheckRange(const Field& field, double value, absl::string_view shown) {
  if (field.has_range && (value < field.min || value > field.max)) {
    return ValueError(absl::StrCat(shown, " is out of range ", RangeText(field)));
  }
  return absl::OkStatus();
}

// Constraints that apply however a value was written: range, choices, list invariants.
absl::Status Validate(const Field& field, const Value& value) {
  return std::visit(
      [&field](const auto& v) -> absl::Status {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>) {
          return absl::OkStatus();
        } else if constexpr (std::is_same_v<T, std::string>) {
          if (!field.choices.empty() &&
              std::find(field.choices.begin(), field.choices.end(), v) == field.choices.end()) {
            std::vector<std::string> quoted;
            for (const std::string& c : field.choices) quoted.push_back(Quote(c));
            return ValueError(
                absl::StrCat(Quote(v), " is not one of {", absl::StrJoin(quoted, ", "), "}"));
          }
          return absl::OkStatus();
        } else if constexpr (std::is_same_v<T, std::vector<uint32_t>>) {
          std::set<uint32_t> seen;
          for (uint32_t element : v) {
            if (!seen.insert(element).second) {
              return ValueError(absl::StrCat("element ", element, " is listed twice"));
            }
            MEFT_RETURN_IF_ERROR(CheckRange(field, element, absl::StrCat("element ", element)));
          }
          return absl::OkStatus();
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          std::set<std::string> seen;
          for (const std::string& element : v) {
            if (element.empty()) return ValueError("empty element in string list");
            if (!seen.insert(element).second) {
              return ValueError(absl::StrCat("element ", Quote(element), " is listed twice"));
            }
          }
          return absl::OkStatus();
        } else if constexpr (std::is_same_v<T, double>) {
          return CheckRange(field, v, FormatDouble(v));
        } else {
          return CheckRange(field, static_cast<double>(v), absl::StrCat(v));
        }
      },
      value);
}

// Parses the text form of a value (a YAML scalar or a flag's argument) for `field`.
absl::StatusOr<Value> ParseText(const Field& field, absl::string_view text) {
  Value value;
  switch (KindOf(field)) {
    case kBool: {
      MEFT_ASSIGN_OR_RETURN(value, ParseBool(text));
      break;
    }
    case kInt32: {
      MEFT_ASSIGN_OR_RETURN(value, ParseInteger<int32_t>(text, "int32"));
      break;
    }
    case kUint32: {
      MEFT_ASSIGN_OR_RETURN(value, ParseInteger<uint32_t>(text, "uint32"));
      break;
    }
    case kInt64: {
      MEFT_ASSIGN_OR_RETURN(value, ParseInteger<int64_t>(text, "int64"));
      break;
    }
    case kUint64: {
      MEFT_ASSIGN_OR_RETURN(value, ParseInteger<uint64_t>(text, "uint64"));
      break;
    }
    case kDouble: {
      MEFT_ASSIGN_OR_RETURN(value, ParseDouble(text));
      break;
    }
    case kString:
      value = std::string(text);
      break;
    case kList: {
      MEFT_ASSIGN_OR_RETURN(value, ParseRangeList(text));
      break;
    }
    case kStringList: {
      std::vector<std::string> list;
      if (!absl::StripAsciiWhitespace(text).empty()) {
        for (absl::string_view piece : absl::StrSplit(text, ',')) {
          list.emplace_back(absl::StripAsciiWhitespace(piece));
        }
      }
      value = std::move(list);
      break;
    }
  }
  MEFT_RETURN_IF_ERROR(Validate(field, value));
  return value;
}

void Assign(const Field& field, Value value) {
  std::visit(
      [&value](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        *target = std::get<T>(std::move(value));
      },
      field.target);
}

// What kind of value a field expects, for "expected X, got a map" messages.
std::string ExpectedText(const Field& field) {
  switch (KindOf(field)) {
    case kBool:
      return "true or false";
    case kInt32:
    case kInt64:
      return "an integer";
    case kUint32:
    case kUint64:
      return "a non-negative integer";
    case kDouble:
      return "a number";
    case kString:
      return "a string";
    case kList:
      return "a list of non-negative integers or a range string like \"0-3,5\"";
    case kStringList:
      return "a list of strings or a comma-separated string";
  }
  return "a value";
}

// Levenshtein distance, for "did you mean" suggestions.
size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
      diagonal = above;
    }
  }
  return row[b.size()];
}

bool IsValidName(absl::string_view name) {
  if (name.empty()) return false;
  for (absl::string_view segment : absl::StrSplit(name, '.')) {
    if (segment.empty()) return false;
    for (char c : segment) {
      bool ok =
          (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
      if (!ok) return false;
    }
  }
  return true;
}

absl::StatusOr<uint32_t> ParseUint32(absl::string_view text) {
  return ParseInteger<uint32_t>(text, "uint32");
}

}  // namespace meft::config::internal
