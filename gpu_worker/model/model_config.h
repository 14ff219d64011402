#pragma once

// The architecture hyper-parameters of a Hugging Face LLaMA or Mistral checkpoint, read from
// the model folder's config.json. Understands both the transformers 4.x spelling (top-level
// "rope_theta", "rope_scaling", "torch_dtype") and the transformers 5 one ("rope_parameters",
// "dtype").

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace meft::worker {

struct ModelConfig {
  // "llama" or "mistral" (config.json "model_type", else derived from "architectures").
  std::string architecture = "llama";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // d, the residual stream width.
  int64_t intermediate_size = 0;  // Width of the SwiGLU FFN.
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  // Grouped-query attention: query head n uses key/value head n / (heads / kv_heads).
  int64_t num_key_value_heads = 0;
  // Per-head width; hidden_size / num_attention_heads unless config.json says otherwise. Even.
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // Linear RoPE scaling: positions are divided by this factor. 1 = no scaling.
  double rope_scaling_factor = 1.0;
  int64_t max_position_embeddings = 2048;
  // Mistral: a query at position i attends to keys j with i - j < sliding_window. 0 = no window
  // (always 0 for llama, which has no window).
  int64_t sliding_window = 0;
  // If true the output head reuses model.embed_tokens.weight and lm_head.weight is not needed.
  bool tie_word_embeddings = false;
  // Special token ids; -1 where config.json has none (null or absent).
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;           // The first of eos_token_ids, or -1.
  std::vector<int64_t> eos_token_ids;  // All end-of-sequence ids (config.json may list several).
  int64_t pad_token_id = -1;
  // The checkpoint's storage dtype as config.json names it ("float32", "bfloat16", ...); empty if
  // absent. Informational: the loader converts to whatever dtype the caller asks for.
  std::string torch_dtype;
};

// Reads and validates `model_dir`/config.json.
//
// Errors name config.json (its path) and the offending field:
//   NOT_FOUND         the file does not exist;
//   INVALID_ARGUMENT  not JSON, a required field (vocab_size, hidden_size, intermediate_size,
//                     num_hidden_layers, num_attention_heads) missing, a field of the wrong type,
//                     a non-positive size, num_attention_heads not dividing hidden_size,
//                     num_key_value_heads not dividing num_attention_heads, an odd head_dim,
//                     a non-positive rms_norm_eps / rope_theta / scaling factor;
//   UNIMPLEMENTED     an architecture other than llama/mistral, a rope_scaling type other than
//                     "linear" (or "default"), hidden_act other than silu, attention or MLP
//                     biases.
// Thread-safe; reads only the file system.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Validates and parses config.json content already in memory; `path` is used in messages only.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& path);

}  // namespace meft::worker
