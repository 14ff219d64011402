#include "common/config/config.h"

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/config/field.h"
#include "common/status.h"

namespace meft::config {

using internal::Field;
using internal::FormatCurrent;
using internal::FormatDouble;
using internal::IsNumeric;
using internal::IsValidName;
using internal::KindOf;
using internal::Quote;
using internal::Validate;
using internal::Value;

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

bool AllocatorTunedByEnvironment() {
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

}  // namespace meft::config
