#pragma once

// A position inside a parsed JSON file that knows its own path, so that every error about a
// tokenizer file names the file and the JSON path, e.g.
//   /models/x/tokenizer.json: pre_tokenizer.pretokenizers[1].type: unsupported "Whitespace"
// A JsonRef does not own the document; the document must outlive it.

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace meft::worker::hf {

// Debian's abseil has its own string_view type: the bridge for StrCat arguments and lookups in
// string-keyed hash maps.
inline absl::string_view AsAbsl(std::string_view text) {
  return absl::string_view(text.data(), text.size());
}

// `text` as a JSON string literal, for messages ("Whitespace" with its quotes); ill-formed UTF-8
// shows as U+FFFD.
std::string Quote(std::string_view text);

class JsonRef {
 public:
  // The root of `document`, which was read from `file` (used in messages only).
  JsonRef(const nlohmann::json& document, std::string_view file);

  // True when the value is absent (a missing key) or JSON null.
  bool is_null() const { return value_ == nullptr || value_->is_null(); }
  bool is_missing() const { return value_ == nullptr; }
  // The value; requires !is_missing().
  const nlohmann::json& json() const { return *value_; }

  // The member `key` of an object (missing when this is not an object or has no such key).
  JsonRef operator[](std::string_view key) const;
  // Element `index` of an array (missing when out of range or not an array).
  JsonRef At(size_t index) const;

  // "pre_tokenizer.pretokenizers[1]"; "" for the root.
  const std::string& path() const { return path_; }
  // "<file>: <path>: " (or "<file>: " for the root), the prefix of every message.
  std::string Where() const;

  // INVALID_ARGUMENT "<file>: <path>: <message>".
  absl::Status Invalid(std::string_view message) const;
  // UNIMPLEMENTED "<file>: <path>: <message>".
  absl::Status Unsupported(std::string_view message) const;

  // Typed reads. Each fails with INVALID_ARGUMENT naming the path when the value has another
  // type; the *Or variants return `fallback` when the value is missing or null.
  absl::StatusOr<std::string> String() const;
  absl::StatusOr<std::string> StringOr(std::string_view fallback) const;
  absl::StatusOr<bool> BoolOr(bool fallback) const;
  absl::StatusOr<int64_t> Int() const;
  // A string of exactly one Unicode character (Metaspace's replacement, Strip's content).
  absl::StatusOr<std::string> Char() const;
  // Requires an array / object (INVALID_ARGUMENT otherwise); returns its size.
  absl::StatusOr<size_t> ArraySize() const;
  absl::Status RequireObject() const;

 private:
  JsonRef(const nlohmann::json* value, std::string path, std::string_view file)
      : value_(value), path_(std::move(path)), file_(file) {}
  std::string TypeName() const;

  const nlohmann::json* value_;  // null when missing
  std::string path_;
  std::string_view file_;
};

}  // namespace meft::worker::hf
