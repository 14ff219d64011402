#include "gpu_worker/data/jsonl.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"

namespace meft::worker {
namespace {

using Json = nlohmann::json;

std::string JsonTypeName(const Json& value) { return value.type_name(); }

std::string LineRef(const std::string& source, int64_t line) {
  return absl::StrCat(source, ":", line);
}

bool IsBlank(std::string_view line) {
  return std::all_of(line.begin(), line.end(), [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
  });
}

// Reads the required or optional string field `name` of `object` into `*out`.
absl::Status GetStringField(const Json& object, const char* name, bool required, bool allow_null,
                            const std::string& where, std::string* out) {
  auto it = object.find(name);
  if (it == object.end() || (allow_null && it->is_null())) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat(where, ": field \"", name, "\" is missing"));
    return absl::OkStatus();
  }
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": field \"", name, "\" must be a string, got ", JsonTypeName(*it)));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status ParseLine(std::string_view text, const std::string& where, Example* example) {
  Json object;
  try {
    object = Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not valid JSON: ", e.what()));
  }
  if (!object.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected a JSON object, got ", JsonTypeName(object)));
  }
  MEFT_RETURN_IF_ERROR(GetStringField(object, "instruction", /*required=*/true,
                                      /*allow_null=*/false, where, &example->instruction));
  MEFT_RETURN_IF_ERROR(GetStringField(object, "input", /*required=*/false, /*allow_null=*/true,
                                      where, &example->input));
  MEFT_RETURN_IF_ERROR(GetStringField(object, "output", /*required=*/true, /*allow_null=*/false,
                                      where, &example->output));
  if (auto it = object.find("id"); it != object.end()) {
    if (it->is_string()) {
      example->id = it->get<std::string>();
    } else if (it->is_number_integer()) {
      example->id = it->dump();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": field \"id\" must be a string or an integer, got ", JsonTypeName(*it)));
    }
  }
  if (auto it = object.find("answers"); it != object.end()) {
    if (!it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": field \"answers\" must be an array of strings, got ", JsonTypeName(*it)));
    }
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& answer = (*it)[i];
      if (!answer.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": field \"answers\"[", i, "] must be a string, got ", JsonTypeName(answer)));
      }
      example->answers.push_back(answer.get<std::string>());
    }
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<std::vector<Example>> ParseJsonl(std::string_view content,
                                                const std::string& source) {
  std::vector<Example> examples;
  int64_t line_number = 0;
  size_t begin = 0;
  while (begin < content.size()) {
    size_t end = content.find('\n', begin);
    if (end == std::string_view::npos) end = content.size();
    std::string_view line = content.substr(begin, end - begin);
    begin = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (IsBlank(line)) continue;
    Example example;
    example.line = line_number;
    MEFT_RETURN_IF_ERROR(ParseLine(line, LineRef(source, line_number), &example));
    if (example.id.empty()) example.id = absl::StrCat(examples.size());
    examples.push_back(std::move(example));
  }
  if (examples.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no examples"));
  }
  return examples;
}

absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(const std::string content, io::ReadFile(path));
  return ParseJsonl(content, path);
}

std::vector<std::string> References(const Example& example) {
  if (!example.answers.empty()) return example.answers;
  return {example.output};
}

}  // namespace meft::worker
