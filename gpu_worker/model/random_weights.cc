#include "gpu_worker/model/random_weights.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <vector>

namespace meft::worker {

std::map<std::string, torch::Tensor> RandomLlamaWeights(const ModelConfig& c, uint64_t seed,
                                                        double std) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  auto normal = [&](std::vector<int64_t> shape) {
    return torch::normal(0.0, std, shape, gen, torch::TensorOptions().dtype(torch::kFloat32));
  };
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  std::map<std::string, torch::Tensor> w;
  w["model.embed_tokens.weight"] = normal({c.vocab_size, d});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    w[p + "input_layernorm.weight"] = torch::ones({d});
    w[p + "post_attention_layernorm.weight"] = torch::ones({d});
    w[p + "self_attn.q_proj.weight"] = normal({q, d});
    w[p + "self_attn.k_proj.weight"] = normal({kv, d});
    w[p + "self_attn.v_proj.weight"] = normal({kv, d});
    w[p + "self_attn.o_proj.weight"] = normal({d, q});
    w[p + "mlp.gate_proj.weight"] = normal({f, d});
    w[p + "mlp.up_proj.weight"] = normal({f, d});
    w[p + "mlp.down_proj.weight"] = normal({d, f});
  }
  w["model.norm.weight"] = torch::ones({d});
  if (!c.tie_word_embeddings) w["lm_head.weight"] = normal({c.vocab_size, d});
  return w;
}

}  // namespace meft::worker
