#pragma once

// The LoRA baseline in Hugging Face PEFT's checkpoint layout (DESIGN §5), so that
// `PeftModel.from_pretrained(model, "checkpoint-<step>")` loads what meft trained:
//
//   adapter_model.safetensors  "base_model.model.model.layers.<l>.self_attn.<q|k|v|o>_proj.
//                              lora_<A|B>.weight" and "...layers.<l>.mlp.<gate|up|down>_proj.
//                              lora_<A|B>.weight", fp32; A is [rank, in], B is [out, rank]
//   adapter_config.json        a LoraConfig: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
//                              target_modules, layers_to_transform (only when a subset of the
//                              layers carries the LoRA), base_model_name_or_path, ...
//
// PEFT scales the update by lora_alpha / r (use_rslora false), as LoraAdapter does. meft's own
// names ("layers.<l>.<proj>.lora_A", LoraAdapter::named_parameters) stay in memory, in
// optimizer.safetensors and in checkpoints written before this layout, whose adapter_config.json
// is {"adapter": "lora"} (no "peft_type").

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gpu_worker/adapters/baselines.h"
#include "nlohmann/json.hpp"

namespace meft::worker {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// PEFT's name for a LoraAdapter tensor name ("layers.3.v_proj.lora_B" ->
// "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"). INVALID_ARGUMENT for a name
// that is not one of LoraAdapter's.
absl::StatusOr<std::string> PeftLoraTensorName(absl::string_view meft_name);

// The inverse of PeftLoraTensorName. INVALID_ARGUMENT for any other name (another model layout,
// a projection LoraAdapter does not adapt, PEFT's "lora_embedding_A", a bias, ...).
absl::StatusOr<std::string> MeftLoraTensorName(absl::string_view peft_name);

// `named` (LoraAdapter's names) under PEFT's names, in the same order; the tensors are shared.
absl::StatusOr<NamedTensors> ToPeftLoraTensors(const NamedTensors& named);

// adapter_config.json for a LoraAdapter built with `options` on a model of `num_layers` decoder
// layers. `base_model` becomes base_model_name_or_path ("" = null).
nlohmann::json PeftLoraConfig(const LoraOptions& options, int64_t num_layers,
                              const std::string& base_model);

// Checks that a PEFT adapter_config.json describes the LoRA that `options` builds: peft_type
// LORA, task_type CAUSAL_LM or null, r == rank, lora_alpha == alpha, target_modules the same
// projections (a list; a regular expression is refused), layers_to_transform the same layers when
// present, and every option meft does not implement (use_rslora, use_dora, fan_in_fan_out,
// biases, rank_pattern, alpha_pattern, modules_to_save, ...) absent or at PEFT's default. Errors
// are INVALID_ARGUMENT (malformed) or FAILED_PRECONDITION (a different LoRA) and name `path` and
// the field.
absl::Status CheckPeftLoraConfig(const nlohmann::json& config, const LoraOptions& options,
                                 const std::string& path);

// The tensors of a LoRA checkpoint folder under LoraAdapter's names, given its
// adapter_config.json (`config_text`, read from `config_path`) and the tensors of its
// adapter_model.safetensors (read from `tensors_path`). PEFT's layout when the config has
// "peft_type": the config is checked with CheckPeftLoraConfig and the tensors renamed; meft's
// older layout otherwise ({"adapter": "lora"}, tensors under LoraAdapter's names). Errors name the
// file and the field or tensor. Which tensors `options` needs is the caller's check.
absl::StatusOr<NamedTensors> LoraTensorsFromCheckpoint(const std::string& config_text,
                                                       const std::string& config_path,
                                                       NamedTensors tensors,
                                                       const std::string& tensors_path,
                                                       const LoraOptions& options);

}  // namespace meft::worker
