#include "gpu_worker/adapters/peft_format.h"

#include <algorithm>
#include <array>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace meft::worker {
namespace {

using nlohmann::json;

constexpr absl::string_view kPeftPrefix = "base_model.model.model.layers.";

// The projections LoraAdapter adapts and their module inside a LLaMA/Mistral decoder layer.
constexpr std::array<std::pair<absl::string_view, absl::string_view>, 7> kProjections = {{
    {"q_proj", "self_attn"},
    {"k_proj", "self_attn"},
    {"v_proj", "self_attn"},
    {"o_proj", "self_attn"},
    {"gate_proj", "mlp"},
    {"up_proj", "mlp"},
    {"down_proj", "mlp"},
}};

absl::string_view ModuleOf(absl::string_view projection) {
  for (const auto& [p, module] : kProjections) {
    if (p == projection) return module;
  }
  return {};
}

bool IsLayerIndex(absl::string_view s, int64_t* layer) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
         absl::SimpleAtoi(s, layer);
}

bool IsLoraMatrix(absl::string_view s) { return s == "lora_A" || s == "lora_B"; }

// LoraConfig fields meft does not implement, each with the values that mean "not used" (absent
// and null always do). A checkpoint that sets one of them to anything else is refused rather than
// loaded with different arithmetic.
bool IsUnused(const json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
         ((v.is_object() || v.is_array()) && v.empty());
}

struct UnsupportedField {
  const char* name;
  const char* expected;  // for the error message
};
constexpr UnsupportedField kUnsupported[] = {
    {"use_rslora", "false (meft scales by lora_alpha / r)"},
    {"use_dora", "false"},
    {"fan_in_fan_out", "false"},
    {"lora_bias", "false"},
    {"rank_pattern", "{} (one rank for every projection)"},
    {"alpha_pattern", "{} (one lora_alpha for every projection)"},
    {"modules_to_save", "null"},
    {"layer_replication", "null"},
    {"trainable_token_indices", "null"},
    {"target_parameters", "null"},
    {"use_qalora", "false"},
    {"alora_invocation_tokens", "null"},
    {"use_bdlora", "null"},
    {"arrow_config", "null"},
    {"kasa_config", "null"},
    {"monteclora_config", "null"},
    {"velora_config", "null"},
    {"megatron_config", "null"},
};

absl::Status Malformed(const std::string& path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field \"", field, "\" ", what));
}

absl::Status Mismatch(const std::string& path, absl::string_view field, const json& got,
                      absl::string_view want) {
  return absl::FailedPreconditionError(absl::StrCat(path, ": field \"", field, "\" is ", got.dump(),
                                                    " but this run's LoRA has ", want));
}

}  // namespace

absl::StatusOr<std::string> PeftLoraTensorName(absl::string_view meft_name) {
  // layers.<l>.<projection>.lora_<A|B>
  const std::vector<absl::string_view> parts = absl::StrSplit(meft_name, '.');
  int64_t layer = 0;
  if (parts.size() != 4 || parts[0] != "layers" || !IsLayerIndex(parts[1], &layer) ||
      ModuleOf(parts[2]).empty() || !IsLoraMatrix(parts[3])) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", meft_name, "\" is not a LoRA tensor (layers.<l>.<projection>.lora_A|B)"));
  }
  return absl::StrCat(kPeftPrefix, layer, ".", ModuleOf(parts[2]), ".", parts[2], ".", parts[3],
                      ".weight");
}

absl::StatusOr<std::string> MeftLoraTensorName(absl::string_view peft_name) {
  const auto refuse = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", peft_name, "\" is not a LoRA tensor of a LLaMA decoder layer (", kPeftPrefix,
        "<l>.self_attn.<q|k|v|o>_proj.lora_A|B.weight or ...<l>.mlp.<gate|up|down>_proj...)"));
  };
  if (!absl::StartsWith(peft_name, kPeftPrefix)) return refuse();
  // <l>.<module>.<projection>.lora_<A|B>.weight
  const std::vector<absl::string_view> parts =
      absl::StrSplit(peft_name.substr(kPeftPrefix.size()), '.');
  int64_t layer = 0;
  if (parts.size() != 5 || !IsLayerIndex(parts[0], &layer) || ModuleOf(parts[2]).empty() ||
      parts[1] != ModuleOf(parts[2]) || !IsLoraMatrix(parts[3]) || parts[4] != "weight") {
    return refuse();
  }
  return absl::StrCat("layers.", layer, ".", parts[2], ".", parts[3]);
}

absl::StatusOr<NamedTensors> ToPeftLoraTensors(const NamedTensors& named) {
  NamedTensors out;
  out.reserve(named.size());
  for (const auto& [name, t] : named) {
    MEFT_ASSIGN_OR_RETURN(std::string peft, PeftLoraTensorName(name));
    out.emplace_back(std::move(peft), t);
  }
  return out;
}

json PeftLoraConfig(const LoraOptions& options, int64_t num_layers, const std::string& base_model) {
  std::set<int64_t> layers(options.layers.begin(), options.layers.end());
  const bool every_layer = static_cast<int64_t>(layers.size()) == num_layers && !layers.empty() &&
                           *layers.begin() == 0 && *layers.rbegin() == num_layers - 1;
  json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model.empty() ? json(nullptr) : json(base_model)},
      {"r", options.rank},
      {"target_modules", options.targets},
      {"lora_dropout", 0.0},
      {"fan_in_fan_out", false},
      {"bias", "none"},
      {"use_rslora", false},
      {"use_dora", false},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"layers_to_transform", every_layer ? json(nullptr) : json(layers)},
      {"layers_pattern", every_layer ? json(nullptr) : json("layers")},
  };
  // PEFT declares lora_alpha an int; write one when alpha is whole.
  if (options.alpha == static_cast<double>(static_cast<int64_t>(options.alpha))) {
    config["lora_alpha"] = static_cast<int64_t>(options.alpha);
  } else {
    config["lora_alpha"] = options.alpha;
  }
  return config;
}

absl::Status CheckPeftLoraConfig(const json& config, const LoraOptions& options,
                                 const std::string& path) {
  if (!config.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  const json& type = config.value("peft_type", json());
  if (type != "LORA") {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": field \"peft_type\" is ", type.dump(), " but meft loads only \"LORA\""));
  }
  const json& task = config.value("task_type", json());
  if (!task.is_null() && task != "CAUSAL_LM") {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": field \"task_type\" is ", task.dump(), " but meft loads \"CAUSAL_LM\" (or null)"));
  }
  if (!config.contains("r") || !config["r"].is_number_integer()) {
    return Malformed(path, "r", "is missing or not an integer");
  }
  if (config["r"].get<int64_t>() != options.rank) {
    return Mismatch(path, "r", config["r"],
                    absl::StrCat("rank ", options.rank, " (adapter.lora_rank)"));
  }
  if (!config.contains("lora_alpha") || !config["lora_alpha"].is_number()) {
    return Malformed(path, "lora_alpha", "is missing or not a number");
  }
  if (config["lora_alpha"].get<double>() != options.alpha) {
    return Mismatch(path, "lora_alpha", config["lora_alpha"],
                    absl::StrCat("alpha ", options.alpha, " (adapter.lora_alpha)"));
  }
  const json& targets = config.value("target_modules", json());
  if (targets.is_string()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": field \"target_modules\" is a regular expression (", targets.dump(),
                     "); meft loads a list of projection names"));
  }
  std::set<std::string> listed;
  for (const json& t : targets.is_array() ? targets : json::array()) {
    if (!t.is_string()) return Malformed(path, "target_modules", "holds a non-string");
    listed.insert(t.get<std::string>());
  }
  if (!targets.is_array() || listed.empty()) {
    return Malformed(path, "target_modules", "is missing or not a non-empty list of names");
  }
  const std::set<std::string> wanted(options.targets.begin(), options.targets.end());
  if (listed != wanted) {
    return Mismatch(path, "target_modules", targets,
                    absl::StrCat("[", absl::StrJoin(wanted, ", "), "] (adapter.lora_targets)"));
  }
  if (config.contains("layers_to_transform") && !config["layers_to_transform"].is_null()) {
    const json& field = config["layers_to_transform"];
    std::set<int64_t> layers;
    for (const json& l : field.is_array() ? field : json::array({field})) {
      if (!l.is_number_integer() || l.get<int64_t>() < 0) {
        return Malformed(path, "layers_to_transform", "is not a layer index or a list of them");
      }
      layers.insert(l.get<int64_t>());
    }
    if (layers != std::set<int64_t>(options.layers.begin(), options.layers.end())) {
      return Mismatch(
          path, "layers_to_transform", field,
          absl::StrCat("layers [", absl::StrJoin(options.layers, ", "), "] (adapter.layers)"));
    }
    const json& pattern = config.value("layers_pattern", json());
    if (!pattern.is_null() && pattern != "layers" && pattern != json::array({"layers"})) {
      return Mismatch(path, "layers_pattern", pattern, "\"layers\" (model.layers.<l>)");
    }
  }
  const json& bias = config.value("bias", json("none"));
  if (bias != "none") return Mismatch(path, "bias", bias, "no biases (\"none\")");
  for (const UnsupportedField& f : kUnsupported) {
    if (config.contains(f.name) && !IsUnused(config[f.name])) {
      return absl::FailedPreconditionError(absl::StrCat(path, ": field \"", f.name, "\" is ",
                                                        config[f.name].dump(),
                                                        "; meft supports only ", f.expected));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<NamedTensors> LoraTensorsFromCheckpoint(const std::string& config_text,
                                                       const std::string& config_path,
                                                       NamedTensors tensors,
                                                       const std::string& tensors_path,
                                                       const LoraOptions& options) {
  const json config = json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
  }
  const bool peft_layout = config.contains("peft_type");
  if (peft_layout) {
    MEFT_RETURN_IF_ERROR(CheckPeftLoraConfig(config, options, config_path));
  } else if (config.value("adapter", json()) != "lora") {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path,
                     ": neither PEFT's LoRA (no field \"peft_type\") nor meft's older "
                     "{\"adapter\": \"lora\"}"));
  }
  for (auto& [name, t] : tensors) {
    absl::StatusOr<std::string> meft_name = MeftLoraTensorName(name);
    if (!peft_layout) {
      // The older layout stored LoraAdapter's names; a round trip checks them.
      absl::StatusOr<std::string> peft = PeftLoraTensorName(name);
      meft_name = peft.ok() ? absl::StatusOr<std::string>(name) : peft.status();
    }
    if (!meft_name.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(tensors_path, ": tensor ", meft_name.status().message()));
    }
    name = *std::move(meft_name);
  }
  return tensors;
}

}  // namespace meft::worker
