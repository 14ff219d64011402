#include "gpu_worker/model/llama_tensors.h"

#include "absl/strings/str_cat.h"
#include "gpu_worker/model/model_config.h"

namespace meft::worker {

LlamaDims LlamaDimsOf(const ModelConfig& c) {
  return {.vocab_size = c.vocab_size,
          .hidden_size = c.hidden_size,
          .intermediate_size = c.intermediate_size,
          .num_layers = c.num_hidden_layers,
          .q_out = c.num_attention_heads * c.head_dim,
          .kv_out = c.num_key_value_heads * c.head_dim,
          .tie_word_embeddings = c.tie_word_embeddings};
}

bool LlamaTensorSpec::is_norm() const {
  return role == LlamaTensorRole::kInputLayernorm ||
         role == LlamaTensorRole::kPostAttentionLayernorm || role == LlamaTensorRole::kFinalNorm;
}

std::vector<LlamaTensorSpec> LlamaTensorSpecs(const LlamaDims& dims) {
  using R = LlamaTensorRole;
  const int64_t d = dims.hidden_size, f = dims.intermediate_size, v = dims.vocab_size;
  std::vector<LlamaTensorSpec> out;
  out.push_back({"model.embed_tokens.weight", R::kEmbedTokens, -1, {v, d}});
  for (int64_t i = 0; i < dims.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    out.push_back({p + "input_layernorm.weight", R::kInputLayernorm, i, {d}});
    out.push_back({p + "self_attn.q_proj.weight", R::kQProj, i, {dims.q_out, d}});
    out.push_back({p + "self_attn.k_proj.weight", R::kKProj, i, {dims.kv_out, d}});
    out.push_back({p + "self_attn.v_proj.weight", R::kVProj, i, {dims.kv_out, d}});
    out.push_back({p + "self_attn.o_proj.weight", R::kOProj, i, {d, dims.q_out}});
    out.push_back({p + "post_attention_layernorm.weight", R::kPostAttentionLayernorm, i, {d}});
    out.push_back({p + "mlp.gate_proj.weight", R::kGateProj, i, {f, d}});
    out.push_back({p + "mlp.up_proj.weight", R::kUpProj, i, {f, d}});
    out.push_back({p + "mlp.down_proj.weight", R::kDownProj, i, {d, f}});
  }
  out.push_back({"model.norm.weight", R::kFinalNorm, -1, {d}});
  if (!dims.tie_word_embeddings) out.push_back({"lm_head.weight", R::kLmHead, -1, {v, d}});
  return out;
}

}  // namespace meft::worker
