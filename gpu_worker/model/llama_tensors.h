#pragma once

// The tensors of a LLaMA/Mistral decoder under their Hugging Face names, in the order
// transformers lists them: the one table the loader (llama.cc), the random weights
// (random_weights.cc) and the synthetic benchmark's model (make_facts.cc) share.

#include <cstdint>
#include <string>
#include <vector>

namespace meft::worker {

struct ModelConfig;

// The sizes that decide the tensors' shapes.
struct LlamaDims {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // d
  int64_t intermediate_size = 0;  // the FFN's width
  int64_t num_layers = 0;
  int64_t q_out = 0;   // num_attention_heads * head_dim
  int64_t kv_out = 0;  // num_key_value_heads * head_dim
  bool tie_word_embeddings = false;  // no lm_head.weight: the head is the embedding
};

LlamaDims LlamaDimsOf(const ModelConfig& config);

enum class LlamaTensorRole {
  kEmbedTokens,
  kInputLayernorm,
  kQProj,
  kKProj,
  kVProj,
  kOProj,
  kPostAttentionLayernorm,
  kGateProj,
  kUpProj,
  kDownProj,
  kFinalNorm,
  kLmHead,
};

struct LlamaTensorSpec {
  std::string name;  // e.g. "model.layers.3.self_attn.q_proj.weight"
  LlamaTensorRole role;
  int64_t layer = -1;  // -1 for the embedding, the final norm and the head
  std::vector<int64_t> shape;
  // RMSNorm weights (initialised to ones); every other tensor is a matrix.
  bool is_norm() const;
};

// Every tensor of a model with `dims`: model.embed_tokens.weight, then per layer
// input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj,
// then model.norm.weight and, unless tied, lm_head.weight.
std::vector<LlamaTensorSpec> LlamaTensorSpecs(const LlamaDims& dims);

}  // namespace meft::worker
