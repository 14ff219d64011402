// FieldSet's command-line side: BindCli, ApplyCli and HelpText (config.h).

#include <CLI/CLI.hpp>
#include <exception>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/config/config.h"
#include "common/config/field.h"
#include "common/status.h"

namespace meft::config {

using internal::Assign;
using internal::Field;
using internal::kBool;
using internal::KindOf;
using internal::ParseText;
using internal::RangeText;
using internal::TypeName;
using internal::Value;

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

}  // namespace meft::config
