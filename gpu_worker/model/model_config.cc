#include "gpu_worker/model/model_config.h"

#include <cmath>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace meft::worker {
namespace {

using json = nlohmann::json;

// Short description of a JSON value for messages; containers are not serialized.
std::string Describe(const json& value) {
  if (value.is_structured()) return value.type_name();
  std::string text = value.dump();
  if (text.size() > 64) text = text.substr(0, 64) + "...";
  return text;
}

// Reads fields of one JSON object and produces errors that name the file and the field.
class FieldReader {
 public:
  FieldReader(const json& object, std::string path, std::string prefix = "")
      : object_(object), path_(std::move(path)), prefix_(std::move(prefix)) {}

  absl::Status Error(const std::string& field, const std::string& message) const {
    return absl::InvalidArgumentError(
        absl::StrCat("model config '", path_, "': field \"", prefix_, field, "\" ", message));
  }

  // The value of `field`, or nullptr if absent or null.
  const json* Get(const std::string& field) const {
    auto it = object_.find(field);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::StatusOr<std::optional<int64_t>> OptionalInt(const std::string& field) const {
    const json* v = Get(field);
    if (v == nullptr) return std::optional<int64_t>();
    if (v->is_number_integer()) {
      if (v->is_number_unsigned() &&
          v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(field, absl::StrCat("is too large: ", Describe(*v)));
      }
      return std::optional<int64_t>(v->get<int64_t>());
    }
    return Error(field, absl::StrCat("must be an integer, got ", Describe(*v)));
  }

  absl::StatusOr<int64_t> PositiveInt(const std::string& field,
                                      std::optional<int64_t> default_value) const {
    MEFT_ASSIGN_OR_RETURN(std::optional<int64_t> v, OptionalInt(field));
    if (!v) {
      if (!default_value) return Error(field, "is missing (required)");
      return *default_value;
    }
    if (*v <= 0) return Error(field, absl::StrCat("must be positive, got ", *v));
    return *v;
  }

  absl::StatusOr<double> PositiveDouble(const std::string& field, double default_value) const {
    const json* v = Get(field);
    if (v == nullptr) return default_value;
    if (!v->is_number()) return Error(field, absl::StrCat("must be a number, got ", Describe(*v)));
    double d = v->get<double>();
    if (!std::isfinite(d) || d <= 0) {
      return Error(field, absl::StrCat("must be a positive finite number, got ", Describe(*v)));
    }
    return d;
  }

  absl::StatusOr<bool> Bool(const std::string& field, bool default_value) const {
    const json* v = Get(field);
    if (v == nullptr) return default_value;
    if (!v->is_boolean())
      return Error(field, absl::StrCat("must be a boolean, got ", Describe(*v)));
    return v->get<bool>();
  }

  absl::StatusOr<std::string> String(const std::string& field) const {
    const json* v = Get(field);
    if (v == nullptr) return std::string();
    if (!v->is_string()) return Error(field, absl::StrCat("must be a string, got ", Describe(*v)));
    return v->get<std::string>();
  }

  // A token id: null/absent -> -1; otherwise a non-negative integer.
  absl::StatusOr<int64_t> TokenId(const std::string& field) const {
    MEFT_ASSIGN_OR_RETURN(std::optional<int64_t> v, OptionalInt(field));
    if (!v) return int64_t{-1};
    if (*v < 0) return Error(field, absl::StrCat("must be a non-negative token id, got ", *v));
    return *v;
  }

  const std::string& path() const { return path_; }

 private:
  const json& object_;
  std::string path_;
  std::string prefix_;  // "rope_scaling." for nested objects.
};

// RoPE parameters from either "rope_scaling" (transformers 4.x, theta at top level) or
// "rope_parameters" (transformers 5, theta inside).
absl::Status ParseRope(const FieldReader& top, ModelConfig* config) {
  MEFT_ASSIGN_OR_RETURN(config->rope_theta, top.PositiveDouble("rope_theta", 10000.0));
  for (const char* field : {"rope_parameters", "rope_scaling"}) {
    const json* rope = top.Get(field);
    if (rope == nullptr) continue;
    if (!rope->is_object()) {
      return top.Error(field, absl::StrCat("must be an object or null, got ", Describe(*rope)));
    }
    FieldReader reader(*rope, top.path(), absl::StrCat(field, "."));
    if (std::string(field) == "rope_parameters") {
      MEFT_ASSIGN_OR_RETURN(config->rope_theta,
                            reader.PositiveDouble("rope_theta", config->rope_theta));
    }
    // "rope_type" is the newer key, "type" the older; HF accepts either.
    MEFT_ASSIGN_OR_RETURN(std::string type, reader.String("rope_type"));
    std::string type_field = "rope_type";
    if (type.empty()) {
      MEFT_ASSIGN_OR_RETURN(type, reader.String("type"));
      type_field = "type";
    }
    if (type.empty() || type == "default") continue;
    if (type != "linear") {
      return absl::UnimplementedError(
          absl::StrCat("model config '", top.path(), "': field \"", field, ".", type_field,
                       "\": RoPE scaling type \"", type, "\" is not supported (only \"linear\")"));
    }
    if (reader.Get("factor") == nullptr) return reader.Error("factor", "is missing (required)");
    MEFT_ASSIGN_OR_RETURN(config->rope_scaling_factor, reader.PositiveDouble("factor", 1.0));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseObject(const json& root, const std::string& path) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config '", path, "': must be a JSON object, got ", root.type_name()));
  }
  FieldReader r(root, path);
  ModelConfig c;

  MEFT_ASSIGN_OR_RETURN(std::string model_type, r.String("model_type"));
  if (model_type.empty()) {
    // Older exports may lack model_type; fall back to the class name.
    const json* archs = r.Get("architectures");
    if (archs != nullptr && archs->is_array() && !archs->empty() && (*archs)[0].is_string()) {
      const std::string arch = (*archs)[0].get<std::string>();
      if (arch.rfind("Llama", 0) == 0) model_type = "llama";
      if (arch.rfind("Mistral", 0) == 0) model_type = "mistral";
    }
    if (model_type.empty()) {
      return r.Error("model_type", "is missing and \"architectures\" names no LLaMA/Mistral model");
    }
  }
  if (model_type != "llama" && model_type != "mistral") {
    return absl::UnimplementedError(
        absl::StrCat("model config '", path, "': field \"model_type\": architecture \"", model_type,
                     "\" is not supported (only \"llama\" and \"mistral\")"));
  }
  c.architecture = model_type;

  MEFT_ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size", std::nullopt));
  MEFT_ASSIGN_OR_RETURN(c.hidden_size, r.PositiveInt("hidden_size", std::nullopt));
  MEFT_ASSIGN_OR_RETURN(c.intermediate_size, r.PositiveInt("intermediate_size", std::nullopt));
  MEFT_ASSIGN_OR_RETURN(c.num_hidden_layers, r.PositiveInt("num_hidden_layers", std::nullopt));
  MEFT_ASSIGN_OR_RETURN(c.num_attention_heads, r.PositiveInt("num_attention_heads", std::nullopt));
  MEFT_ASSIGN_OR_RETURN(c.num_key_value_heads,
                        r.PositiveInt("num_key_value_heads", c.num_attention_heads));
  if (c.hidden_size % c.num_attention_heads != 0) {
    return r.Error("num_attention_heads",
                   absl::StrCat("(", c.num_attention_heads, ") must divide hidden_size (",
                                c.hidden_size, ")"));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return r.Error("num_key_value_heads",
                   absl::StrCat("(", c.num_key_value_heads, ") must divide num_attention_heads (",
                                c.num_attention_heads, ")"));
  }
  MEFT_ASSIGN_OR_RETURN(c.head_dim,
                        r.PositiveInt("head_dim", c.hidden_size / c.num_attention_heads));
  if (c.head_dim % 2 != 0) {
    return r.Error("head_dim",
                   absl::StrCat("must be even for rotary embeddings, got ", c.head_dim));
  }
  MEFT_ASSIGN_OR_RETURN(c.rms_norm_eps, r.PositiveDouble("rms_norm_eps", 1e-6));
  MEFT_RETURN_IF_ERROR(ParseRope(r, &c));
  MEFT_ASSIGN_OR_RETURN(c.max_position_embeddings,
                        r.PositiveInt("max_position_embeddings", int64_t{2048}));
  if (c.architecture == "mistral") {
    MEFT_ASSIGN_OR_RETURN(std::optional<int64_t> window, r.OptionalInt("sliding_window"));
    if (window && *window <= 0) {
      return r.Error("sliding_window", absl::StrCat("must be positive or null, got ", *window));
    }
    c.sliding_window = window.value_or(0);
  }
  MEFT_ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", false));

  MEFT_ASSIGN_OR_RETURN(c.bos_token_id, r.TokenId("bos_token_id"));
  MEFT_ASSIGN_OR_RETURN(c.pad_token_id, r.TokenId("pad_token_id"));
  if (const json* eos = r.Get("eos_token_id"); eos != nullptr && eos->is_array()) {
    for (const json& id : *eos) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0) {
        return r.Error("eos_token_id",
                       absl::StrCat("must hold non-negative token ids, got ", Describe(id)));
      }
      c.eos_token_ids.push_back(id.get<int64_t>());
    }
  } else {
    MEFT_ASSIGN_OR_RETURN(int64_t id, r.TokenId("eos_token_id"));
    if (id >= 0) c.eos_token_ids.push_back(id);
  }
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids.front();

  MEFT_ASSIGN_OR_RETURN(c.torch_dtype, r.String("torch_dtype"));
  if (c.torch_dtype.empty()) {
    MEFT_ASSIGN_OR_RETURN(c.torch_dtype, r.String("dtype"));
  }

  // Features of the HF classes this decoder does not implement: refuse rather than compute
  // something else.
  MEFT_ASSIGN_OR_RETURN(std::string act, r.String("hidden_act"));
  if (!act.empty() && act != "silu") {
    return absl::UnimplementedError(absl::StrCat("model config '", path,
                                                 "': field \"hidden_act\": activation \"", act,
                                                 "\" is not supported (only \"silu\")"));
  }
  for (const char* field : {"attention_bias", "mlp_bias"}) {
    MEFT_ASSIGN_OR_RETURN(bool bias, r.Bool(field, false));
    if (bias) {
      return absl::UnimplementedError(absl::StrCat("model config '", path, "': field \"", field,
                                                   "\": projection biases are not supported"));
    }
  }
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& path) {
  json root = json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat("model config '", path, "': not valid JSON"));
  }
  try {
    return ParseObject(root, path);
  } catch (const std::exception& e) {
    // Not expected: every access is type-checked first.
    return absl::InternalError(absl::StrCat("model config '", path, "': ", e.what()));
  }
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  absl::StatusOr<std::string> text = io::ReadFile(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("model config '", path, "': ", text.status().message()));
  }
  return ParseModelConfig(*text, path);
}

}  // namespace meft::worker
