#include "common/config/config.h"

#include <fcntl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <set>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/status.h"

namespace meft::config {
namespace internal {

// The alternatives of Target and Value are in the same order: a value parsed for a field holds
// the alternative whose index equals the field's target index.
using Target = std::variant<bool*, int32_t*, uint32_t*, int64_t*, uint64_t*, double*, std::string*,
                            std::vector<uint32_t>*, std::vector<std::string>*>;
using Value = std::variant<bool, int32_t, uint32_t, int64_t, uint64_t, double, std::string,
                           std::vector<uint32_t>, std::vector<std::string>>;

struct Field {
  std::string name;  // "optimizer.beta1"
  std::string flag;  // "--optimizer-beta1"
  std::string doc;
  Target target;
  std::string default_text;          // The value at registration, formatted for HelpText.
  std::vector<std::string> choices;  // Non-empty only for AddChoice fields.
  bool has_range = false;
  double min = 0;
  double max = 0;
  CLI::Option* option = nullptr;  // Owned by the CLI::App given to BindCli.
};

}  // namespace internal

namespace {

using internal::Field;
using internal::Target;
using internal::Value;

constexpr size_t kMaxListElements = size_t{1} << 20;

enum Kind : size_t {
  kBool = 0,
  kInt32,
  kUint32,
  kInt64,
  kUint64,
  kDouble,
  kString,
  kList,
  kStringList,
};
static_assert(std::variant_size_v<Target> == std::variant_size_v<Value>);
static_assert(std::is_same_v<std::variant_alternative_t<kList, Value>, std::vector<uint32_t>>);
static_assert(
    std::is_same_v<std::variant_alternative_t<kStringList, Value>, std::vector<std::string>>);

Kind KindOf(const Field& field) { return static_cast<Kind>(field.target.index()); }

bool IsNumeric(Kind kind) { return kind != kBool && kind != kString && kind != kStringList; }

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

// ---------------------------------------------------------------------------------------------
// YAML loading.

struct Pending {
  const Field* field;
  Value value;
  int line;  // 1-based; 0 if unknown.
};

class YamlLoader {
 public:
  YamlLoader(const std::vector<std::unique_ptr<Field>>& fields, absl::string_view source)
      : fields_(fields), source_(source) {}

  absl::Status Load(absl::string_view text) {
    std::vector<YAML::Node> documents = YAML::LoadAll(std::string(text));
    if (documents.size() > 1) {
      return Error(documents[1].Mark(),
                   absl::StrCat("expected one YAML document, found ", documents.size()));
    }
    if (documents.empty() || documents[0].IsNull()) return absl::OkStatus();
    const YAML::Node& root = documents[0];
    if (!root.IsMap()) {
      return Error(root.Mark(),
                   absl::StrCat("expected a map at the top level, got ", Describe(root)));
    }
    MEFT_RETURN_IF_ERROR(WalkMap(root, ""));
    for (Pending& p : pending_) Assign(*p.field, std::move(p.value));
    return absl::OkStatus();
  }

  absl::Status Error(const YAML::Mark& mark, absl::string_view message) const {
    if (mark.is_null()) return absl::InvalidArgumentError(absl::StrCat(source_, ": ", message));
    return absl::InvalidArgumentError(absl::StrCat(source_, ":", mark.line + 1, ": ", message));
  }

 private:
  static std::string Describe(const YAML::Node& node) {
    switch (node.Type()) {
      case YAML::NodeType::Null:
        return "null";
      case YAML::NodeType::Sequence:
        return "a list";
      case YAML::NodeType::Map:
        return "a map";
      case YAML::NodeType::Scalar:
        return Quote(node.Scalar());
      case YAML::NodeType::Undefined:
        break;
    }
    return "nothing";
  }

  // The mark of `value`, or of its key where yaml-cpp has none for the value.
  static YAML::Mark MarkOf(const YAML::Node& value, const YAML::Node& key) {
    YAML::Mark mark = value.Mark();
    return mark.is_null() ? key.Mark() : mark;
  }

  const Field* FindField(absl::string_view name) const {
    for (const auto& f : fields_) {
      if (f->name == name) return f.get();
    }
    return nullptr;
  }

  // Names of the keys allowed directly below `prefix` ("" for the top level).
  std::vector<std::string> ChildrenOf(absl::string_view prefix) const {
    std::vector<std::string> children;
    for (const auto& f : fields_) {
      absl::string_view rest = f->name;
      if (!prefix.empty() &&
          !(absl::ConsumePrefix(&rest, prefix) && absl::ConsumePrefix(&rest, "."))) {
        continue;
      }
      std::string child(rest.substr(0, rest.find('.')));
      if (std::find(children.begin(), children.end(), child) == children.end()) {
        children.push_back(std::move(child));
      }
    }
    return children;
  }

  bool IsGroup(absl::string_view name) const {
    for (const auto& f : fields_) {
      absl::string_view rest = f->name;
      if (absl::ConsumePrefix(&rest, name) && absl::ConsumePrefix(&rest, ".")) return true;
    }
    return false;
  }

  std::string UnknownKeyMessage(absl::string_view prefix, absl::string_view key) const {
    std::string full = prefix.empty() ? std::string(key) : absl::StrCat(prefix, ".", key);
    std::string message = absl::StrCat("unknown key ", Quote(full));
    std::string best;
    size_t best_distance = std::numeric_limits<size_t>::max();
    for (const std::string& child : ChildrenOf(prefix)) {
      size_t distance = EditDistance(key, child);
      if (distance < best_distance) {
        best_distance = distance;
        best = child;
      }
    }
    if (!best.empty() && best_distance <= 2 && best_distance < key.size()) {
      std::string suggestion = prefix.empty() ? best : absl::StrCat(prefix, ".", best);
      absl::StrAppend(&message, " (did you mean ", Quote(suggestion), "?)");
    }
    return message;
  }

  absl::Status WalkMap(const YAML::Node& map, const std::string& prefix) {
    for (const auto& entry : map) {
      // Copies: yaml-cpp nodes are handles, and its iterators' operator-> returns a temporary.
      const YAML::Node key = entry.first;
      const YAML::Node value = entry.second;
      if (!key.IsScalar()) {
        return Error(key.Mark(), absl::StrCat("keys must be strings, got ", Describe(key)));
      }
      const std::string full =
          prefix.empty() ? key.Scalar() : absl::StrCat(prefix, ".", key.Scalar());
      if (const Field* field = FindField(full)) {
        MEFT_RETURN_IF_ERROR(SetField(*field, key, value));
      } else if (IsGroup(full)) {
        if (value.IsMap()) {
          MEFT_RETURN_IF_ERROR(WalkMap(value, full));
        } else if (!value.IsNull()) {  // An empty group (all children commented out) is fine.
          return Error(MarkOf(value, key), absl::StrCat(full, ": expected a map with keys {",
                                                        absl::StrJoin(ChildrenOf(full), ", "),
                                                        "}, got ", Describe(value)));
        }
      } else {
        return Error(key.Mark(), UnknownKeyMessage(prefix, key.Scalar()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status SetField(const Field& field, const YAML::Node& key, const YAML::Node& value) {
    const YAML::Mark mark = MarkOf(value, key);
    for (const Pending& p : pending_) {
      if (p.field == &field) {
        return Error(key.Mark(),
                     absl::StrCat(field.name, ": set twice (first on line ", p.line, ")"));
      }
    }
    auto fail = [&](const YAML::Mark& at, absl::string_view message) {
      return Error(at, absl::StrCat(field.name, ": ", message));
    };
    Value parsed;
    if (value.IsScalar()) {
      absl::StatusOr<Value> v = ParseText(field, value.Scalar());
      if (!v.ok()) return fail(mark, v.status().message());
      parsed = *std::move(v);
    } else if (value.IsSequence() && KindOf(field) == kList) {
      std::vector<uint32_t> list;
      for (const YAML::Node& element : value) {
        if (!element.IsScalar()) {
          return fail(MarkOf(element, value),
                      absl::StrCat("expected a non-negative integer as list element, got ",
                                   Describe(element)));
        }
        absl::StatusOr<uint32_t> v = ParseInteger<uint32_t>(element.Scalar(), "uint32");
        if (!v.ok()) return fail(MarkOf(element, value), v.status().message());
        list.push_back(*v);
        if (list.size() > kMaxListElements) {
          return fail(mark, absl::StrCat("more than ", kMaxListElements, " elements"));
        }
      }
      parsed = std::move(list);
      absl::Status valid = Validate(field, parsed);
      if (!valid.ok()) return fail(mark, valid.message());
    } else if (value.IsSequence() && KindOf(field) == kStringList) {
      std::vector<std::string> list;
      for (const YAML::Node& element : value) {
        if (!element.IsScalar()) {
          return fail(MarkOf(element, value),
                      absl::StrCat("expected a string as list element, got ", Describe(element)));
        }
        list.push_back(element.Scalar());
        if (list.size() > kMaxListElements) {
          return fail(mark, absl::StrCat("more than ", kMaxListElements, " elements"));
        }
      }
      parsed = std::move(list);
      absl::Status valid = Validate(field, parsed);
      if (!valid.ok()) return fail(mark, valid.message());
    } else {
      return fail(mark, absl::StrCat("expected ", ExpectedText(field), ", got ", Describe(value)));
    }
    pending_.push_back(Pending{&field, std::move(parsed), mark.is_null() ? 0 : mark.line + 1});
    return absl::OkStatus();
  }

  const std::vector<std::unique_ptr<Field>>& fields_;
  const absl::string_view source_;
  std::vector<Pending> pending_;
};

// Nested view of the dotted names, in registration order, for DumpYaml.
struct DumpTree {
  std::vector<std::pair<std::string, DumpTree>> children;
  const Field* field = nullptr;

  DumpTree& Child(absl::string_view name) {
    for (auto& [child_name, child] : children) {
      if (child_name == name) return child;
    }
    children.emplace_back(std::string(name), DumpTree{});
    return children.back().second;
  }
};

void EmitValue(YAML::Emitter& out, const Field& field) {
  std::visit(
      [&out](const auto* target) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(target)>>;
        if constexpr (std::is_same_v<T, bool>) {
          out << (*target ? "true" : "false");
        } else if constexpr (std::is_same_v<T, double>) {
          out << FormatDouble(*target);
        } else if constexpr (std::is_same_v<T, std::string>) {
          out << YAML::DoubleQuoted << *target;
        } else if constexpr (std::is_same_v<T, std::vector<uint32_t>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (uint32_t v : *target) out << absl::StrCat(v);
          out << YAML::EndSeq;
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (const std::string& v : *target) out << YAML::DoubleQuoted << v;
          out << YAML::EndSeq;
        } else {
          out << absl::StrCat(*target);
        }
      },
      field.target);
}

void EmitTree(YAML::Emitter& out, const DumpTree& tree) {
  out << YAML::BeginMap;
  for (const auto& [name, child] : tree.children) {
    out << YAML::Key << name << YAML::Value;
    if (child.field != nullptr) {
      EmitValue(out, *child.field);
    } else {
      EmitTree(out, child);
    }
  }
  out << YAML::EndMap;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// FieldSet

FieldSet::FieldSet() = default;
FieldSet::~FieldSet() = default;

void FieldSet::RecordError(std::string message) {
  if (registration_status_.ok()) {
    registration_status_ = absl::InternalError(absl::StrCat("config registration: ", message));
  }
}

Field* FieldSet::Find(std::string_view name) const {
  for (const auto& f : fields_) {
    if (f->name == name) return f.get();
  }
  return nullptr;
}

void FieldSet::AddField(std::unique_ptr<Field> field) {
  if (std::visit([](auto* target) { return target == nullptr; }, field->target)) {
    RecordError(absl::StrCat("field ", Quote(field->name), " has a null target"));
    return;
  }
  if (!IsValidName(field->name)) {
    RecordError(absl::StrCat("field name ", Quote(field->name),
                             " is not a dotted path of [A-Za-z0-9_] segments"));
    return;
  }
  field->flag = "--" + field->name;
  std::replace(field->flag.begin(), field->flag.end(), '.', '-');
  std::replace(field->flag.begin(), field->flag.end(), '_', '-');
  for (const auto& other : fields_) {
    absl::string_view longer = field->name;
    absl::string_view shorter = other->name;
    if (longer.size() < shorter.size()) std::swap(longer, shorter);
    if (other->name == field->name) {
      RecordError(absl::StrCat("field ", Quote(field->name), " registered twice"));
      return;
    }
    if (absl::ConsumePrefix(&longer, shorter) && absl::StartsWith(longer, ".")) {
      RecordError(
          absl::StrCat("field ", Quote(shorter), " is also a group containing ",
                       Quote(field->name.size() > other->name.size() ? field->name : other->name)));
      return;
    }
    if (other->flag == field->flag) {
      RecordError(absl::StrCat("fields ", Quote(other->name), " and ", Quote(field->name),
                               " both map to flag ", field->flag));
      return;
    }
  }
  field->default_text = FormatCurrent(*field);
  fields_.push_back(std::move(field));
}

namespace {
template <typename T>
std::unique_ptr<Field> MakeField(std::string name, T* target, std::string doc) {
  auto field = std::make_unique<Field>();
  field->name = std::move(name);
  field->doc = std::move(doc);
  field->target = target;
  return field;
}
}  // namespace

void FieldSet::Add(std::string name, bool* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, int32_t* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, uint32_t* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, int64_t* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, uint64_t* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, double* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}
void FieldSet::Add(std::string name, std::string* target, std::string doc) {
  AddField(MakeField(std::move(name), target, std::move(doc)));
}

namespace {
// OK when a list field's default (its value at registration) satisfies the list invariants.
template <typename T>
absl::Status ValidateListDefault(const std::string& name, std::vector<T>* target) {
  if (target == nullptr) return absl::OkStatus();
  absl::Status valid = Validate(*MakeField(name, target, ""), *target);
  if (valid.ok()) return valid;
  return absl::InternalError(absl::StrCat("default of ", Quote(name), ": ", valid.message()));
}
}  // namespace

void FieldSet::Add(std::string name, std::vector<uint32_t>* target, std::string doc) {
  if (absl::Status s = ValidateListDefault(name, target); !s.ok()) {
    RecordError(std::string(s.message()));
    return;
  }
  AddField(MakeField(std::move(name), target, std::move(doc)));
}

void FieldSet::Add(std::string name, std::vector<std::string>* target, std::string doc) {
  if (absl::Status s = ValidateListDefault(name, target); !s.ok()) {
    RecordError(std::string(s.message()));
    return;
  }
  AddField(MakeField(std::move(name), target, std::move(doc)));
}

void FieldSet::AddChoice(std::string name, std::string* target, std::vector<std::string> choices,
                         std::string doc) {
  if (choices.empty()) {
    RecordError(absl::StrCat("field ", Quote(name), " has no choices"));
    return;
  }
  auto field = MakeField(std::move(name), target, std::move(doc));
  field->choices = std::move(choices);
  if (target != nullptr) {
    absl::Status valid = Validate(*field, *target);
    if (!valid.ok()) {
      RecordError(absl::StrCat("default of ", Quote(field->name), ": ", valid.message()));
      return;
    }
  }
  AddField(std::move(field));
}

void FieldSet::SetRange(std::string_view std_name, double min, double max) {
  const absl::string_view name(std_name.data(), std_name.size());
  Field* field = Find(std_name);
  if (field == nullptr) {
    RecordError(absl::StrCat("SetRange on unknown field ", Quote(name)));
    return;
  }
  if (!IsNumeric(KindOf(*field))) {
    RecordError(absl::StrCat("SetRange on non-numeric field ", Quote(name)));
    return;
  }
  if (!(min <= max)) {  // Also rejects NaN bounds.
    RecordError(absl::StrCat("SetRange on ", Quote(name), ": empty range [", FormatDouble(min),
                             ", ", FormatDouble(max), "]"));
    return;
  }
  Field candidate = *field;
  candidate.has_range = true;
  candidate.min = min;
  candidate.max = max;
  Value current = std::visit(
      [](auto* target) -> Value {
        using T = std::remove_pointer_t<decltype(target)>;
        return Value(std::in_place_type<T>, *target);
      },
      field->target);
  absl::Status valid = Validate(candidate, current);
  if (!valid.ok()) {
    RecordError(absl::StrCat("default of ", Quote(name), ": ", valid.message()));
    return;
  }
  field->has_range = true;
  field->min = min;
  field->max = max;
}

absl::Status FieldSet::LoadYamlFile(const std::string& path) {
  MEFT_RETURN_IF_ERROR(registration_status_);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int error = errno;
    if (error == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot open"));
  }
  std::string text;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int error = errno;
      ::close(fd);
      return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot read"));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return LoadYamlString(text, path);
}

absl::Status FieldSet::LoadYamlString(std::string_view std_text, std::string_view std_source_name) {
  MEFT_RETURN_IF_ERROR(registration_status_);
  const absl::string_view text(std_text.data(), std_text.size());
  const absl::string_view source_name(std_source_name.data(), std_source_name.size());
  YamlLoader loader(fields_, source_name);
  try {
    return loader.Load(text);
  } catch (const YAML::ParserException& e) {
    return loader.Error(e.mark, absl::StrCat("YAML syntax error: ", e.msg));
  } catch (const YAML::Exception& e) {
    return loader.Error(e.mark, absl::StrCat("YAML error: ", e.msg));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(source_name, ": ", e.what()));
  }
}

void FieldSet::BindCli(CLI::App& app) {
  try {
    for (const auto& field : fields_) {
      std::string description = field->doc;
      absl::StrAppend(&description, " (default: ", field->default_text);
      if (field->has_range) absl::StrAppend(&description, ", range: ", RangeText(*field));
      absl::StrAppend(&description, ")");
      CLI::Option* option = app.add_option(field->flag);
      option->description(description);
      // Choices are case-sensitive, so only the plain type names are upper-cased.
      option->type_name(field->choices.empty() ? absl::AsciiStrToUpper(TypeName(*field))
                                               : TypeName(*field));
      option->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
      if (KindOf(*field) == kBool) option->expected(0, 1);
      field->option = option;
    }
  } catch (const CLI::Error& e) {
    RecordError(absl::StrCat("cannot bind command-line flags: ", e.what()));
  } catch (const std::exception& e) {
    RecordError(absl::StrCat("cannot bind command-line flags: ", e.what()));
  }
}

absl::Status FieldSet::ApplyCli() {
  MEFT_RETURN_IF_ERROR(registration_status_);
  std::vector<std::pair<const Field*, Value>> pending;
  for (const auto& field : fields_) {
    if (field->option == nullptr || field->option->count() == 0) continue;
    const std::vector<std::string>& results = field->option->results();
    std::string text = results.empty() ? std::string() : results.back();
    if (KindOf(*field) == kBool && text.empty()) text = "true";  // A bare --flag.
    absl::StatusOr<Value> value = ParseText(*field, text);
    if (!value.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(field->flag, ": ", value.status().message()));
    }
    pending.emplace_back(field.get(), *std::move(value));
  }
  for (auto& [field, value] : pending) Assign(*field, std::move(value));
  return absl::OkStatus();
}

std::string FieldSet::HelpText() const {
  std::string out;
  for (const auto& field : fields_) {
    absl::StrAppend(&out, field->name, " (", field->flag, ", ", TypeName(*field));
    if (field->has_range) absl::StrAppend(&out, " in ", RangeText(*field));
    absl::StrAppend(&out, ", default ", field->default_text, "): ", field->doc, "\n");
  }
  return out;
}

std::string FieldSet::DumpYaml() const {
  DumpTree root;
  for (const auto& field : fields_) {
    DumpTree* node = &root;
    for (absl::string_view segment : absl::StrSplit(field->name, '.')) {
      node = &node->Child(segment);
    }
    node->field = field.get();
  }
  YAML::Emitter out;
  EmitTree(out, root);
  return absl::StrCat(out.c_str(), "\n");
}

bool AllocatorTunedByEnvironment() {
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

}  // namespace meft::config
