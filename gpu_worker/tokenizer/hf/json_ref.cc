#include "gpu_worker/tokenizer/hf/json_ref.h"

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker::hf {
namespace {

bool IsIdentifier(std::string_view key) {
  if (key.empty()) return false;
  for (const char c : key) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) {
      return false;
    }
  }
  return true;
}

}  // namespace

std::string Quote(std::string_view text) {
  return nlohmann::json(std::string(text))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

JsonRef::JsonRef(const nlohmann::json& document, std::string_view file)
    : value_(&document), file_(file) {}

JsonRef JsonRef::operator[](std::string_view key) const {
  std::string path;
  if (IsIdentifier(key)) {
    path = path_.empty() ? std::string(key) : absl::StrCat(path_, ".", AsAbsl(key));
  } else {
    // Keys such as vocabulary entries are quoted: model.vocab["Ġt"].
    path = absl::StrCat(path_, "[", Quote(key), "]");
  }
  const nlohmann::json* child = nullptr;
  if (value_ != nullptr && value_->is_object()) {
    auto it = value_->find(std::string(key));
    if (it != value_->end()) child = &*it;
  }
  return JsonRef(child, std::move(path), file_);
}

JsonRef JsonRef::At(size_t index) const {
  const nlohmann::json* child = nullptr;
  if (value_ != nullptr && value_->is_array() && index < value_->size()) child = &(*value_)[index];
  return JsonRef(child, absl::StrCat(path_, "[", index, "]"), file_);
}

std::string JsonRef::Where() const {
  if (path_.empty()) return absl::StrCat(AsAbsl(file_), ": ");
  return absl::StrCat(AsAbsl(file_), ": ", path_, ": ");
}

absl::Status JsonRef::Invalid(std::string_view message) const {
  return absl::InvalidArgumentError(absl::StrCat(Where(), AsAbsl(message)));
}

absl::Status JsonRef::Unsupported(std::string_view message) const {
  return absl::UnimplementedError(absl::StrCat(Where(), AsAbsl(message)));
}

std::string JsonRef::TypeName() const {
  return value_ == nullptr ? "nothing" : value_->type_name();
}

absl::StatusOr<std::string> JsonRef::String() const {
  if (value_ == nullptr) return Invalid("missing (expected a string)");
  if (!value_->is_string()) return Invalid(absl::StrCat("expected a string, got ", TypeName()));
  return value_->get<std::string>();
}

absl::StatusOr<std::string> JsonRef::StringOr(std::string_view fallback) const {
  if (is_null()) return std::string(fallback);
  return String();
}

absl::StatusOr<bool> JsonRef::BoolOr(bool fallback) const {
  if (is_null()) return fallback;
  if (!value_->is_boolean())
    return Invalid(absl::StrCat("expected true or false, got ", TypeName()));
  return value_->get<bool>();
}

absl::StatusOr<int64_t> JsonRef::Int() const {
  if (value_ == nullptr) return Invalid("missing (expected an integer)");
  if (value_->is_number_unsigned()) {
    const uint64_t v = value_->get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) return Invalid("integer out of range");
    return static_cast<int64_t>(v);
  }
  if (!value_->is_number_integer()) {
    return Invalid(absl::StrCat("expected an integer, got ", TypeName()));
  }
  return value_->get<int64_t>();
}

absl::StatusOr<std::string> JsonRef::Char() const {
  auto s = String();
  if (!s.ok()) return s.status();
  if (s->empty() || !IsValidUtf8(*s) || CharLength(*s, 0) != s->size()) {
    return Invalid(absl::StrCat("expected exactly one character, got ", Quote(*s)));
  }
  return s;
}

absl::StatusOr<size_t> JsonRef::ArraySize() const {
  if (value_ == nullptr) return Invalid("missing (expected an array)");
  if (!value_->is_array()) return Invalid(absl::StrCat("expected an array, got ", TypeName()));
  return value_->size();
}

absl::Status JsonRef::RequireObject() const {
  if (value_ == nullptr) return Invalid("missing (expected an object)");
  if (!value_->is_object()) return Invalid(absl::StrCat("expected an object, got ", TypeName()));
  return absl::OkStatus();
}

}  // namespace meft::worker::hf
