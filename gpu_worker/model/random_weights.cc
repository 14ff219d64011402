#include "gpu_worker/model/random_weights.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <vector>

namespace meft::worker {
namespace {

// The weights of `c` under their Hugging Face names: `normal(shape)` draws each projection and
// embedding, norm weights are ones made with `options`.
template <typename Normal>
std::map<std::string, torch::Tensor> Build(const ModelConfig& c, Normal normal,
                                           const torch::TensorOptions& options) {
  auto ones = [&](int64_t n) { return torch::ones({n}, options); };
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  std::map<std::string, torch::Tensor> w;
  w["model.embed_tokens.weight"] = normal({c.vocab_size, d});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    w[p + "input_layernorm.weight"] = ones(d);
    w[p + "post_attention_layernorm.weight"] = ones(d);
    w[p + "self_attn.q_proj.weight"] = normal({q, d});
    w[p + "self_attn.k_proj.weight"] = normal({kv, d});
    w[p + "self_attn.v_proj.weight"] = normal({kv, d});
    w[p + "self_attn.o_proj.weight"] = normal({d, q});
    w[p + "mlp.gate_proj.weight"] = normal({f, d});
    w[p + "mlp.up_proj.weight"] = normal({f, d});
    w[p + "mlp.down_proj.weight"] = normal({d, f});
  }
  w["model.norm.weight"] = ones(d);
  if (!c.tie_word_embeddings) w["lm_head.weight"] = normal({c.vocab_size, d});
  return w;
}

}  // namespace

std::map<std::string, torch::Tensor> RandomLlamaWeights(const ModelConfig& c, uint64_t seed,
                                                        double std) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  auto normal = [&](std::vector<int64_t> shape) {
    return torch::normal(0.0, std, shape, gen, options);
  };
  return Build(c, normal, options);
}

std::map<std::string, torch::Tensor> RandomLlamaWeightsOn(const ModelConfig& c, uint64_t seed,
                                                          torch::Device device,
                                                          torch::ScalarType dtype, double std) {
  torch::manual_seed(seed);
  const auto options = torch::TensorOptions().device(device).dtype(dtype);
  // normal_ fills in place in `dtype`: no fp32 temporary of the tensor's size.
  auto normal = [&](std::vector<int64_t> shape) {
    return torch::empty(shape, options).normal_(0.0, std);
  };
  return Build(c, normal, options);
}

}  // namespace meft::worker
