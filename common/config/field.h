#pragma once

// Internals of the configuration module (config.h), shared by its parts: value.cc (formatting,
// parsing and validating one field's values), yaml.cc (YAML loading and dumping), flags.cc
// (command-line flags and help text) and config.cc (registration). Not for other code.

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace CLI {
class Option;
}  // namespace CLI

namespace meft::config::internal {

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

inline constexpr size_t kMaxListElements = size_t{1} << 20;

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

inline Kind KindOf(const Field& field) { return static_cast<Kind>(field.target.index()); }

inline bool IsNumeric(Kind kind) {
  return kind != kBool && kind != kString && kind != kStringList;
}

// Quotes a user-supplied value for an error message, escaping control characters and
// shortening very long values.
std::string Quote(absl::string_view text);
// Shortest text that parses back to the same double.
std::string FormatDouble(double value);
// The field's current value as HelpText and error messages show it.
std::string FormatCurrent(const Field& field);
// The field's type as help text shows it (or its choices).
std::string TypeName(const Field& field);
// The field's range as help text shows it.
std::string RangeText(const Field& field);
// A decimal uint32 (YAML list elements).
absl::StatusOr<uint32_t> ParseUint32(absl::string_view text);
// The field's range, choices and list rules checked against `value`.
absl::Status Validate(const Field& field, const Value& value);
// `text` (a YAML scalar or a flag's argument) parsed and validated for `field`.
absl::StatusOr<Value> ParseText(const Field& field, absl::string_view text);
// Stores `value` (of the field's alternative) into the field's target.
void Assign(const Field& field, Value value);
// What the field accepts, for "expected ..., got ..." messages.
std::string ExpectedText(const Field& field);
// Edit distance, for "did you mean" suggestions.
size_t EditDistance(absl::string_view a, absl::string_view b);
// A dotted name of [A-Za-z0-9_] segments.
bool IsValidName(absl::string_view name);

}  // namespace meft::config::internal
