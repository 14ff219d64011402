#pragma once

// The frozen LLaMA / Mistral decoder (Hugging Face LlamaForCausalLM / MistralForCausalLM
// semantics, eager attention): token embedding, per layer RMSNorm -> grouped-query attention
// with rotary embeddings (causal, padded keys removed, Mistral's sliding window) -> residual ->
// RMSNorm -> SwiGLU FFN (+ adapter delta) -> residual, final RMSNorm, tied or untied output head.
//
// The base weights never require gradients; activations keep the autograd graph whenever grad
// mode is on, so gradients flow from the logits into whatever the AdapterHooks return.

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama_tensors.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/model/weights.h"

namespace meft::worker {

// Keys and values of all layers for incremental decoding. Empty on construction; the first
// Forward with a cache fills it, later ones append their tokens. A cache belongs to one model
// and one batch layout: reorder it with ReorderBatch when the batch changes (beam search).
// Holds the autograd graph of the tokens it caches if they were computed with grad mode on;
// decoding normally runs under torch::NoGradGuard.
// Not thread-safe; one decoding loop owns it.
class KvCache {
 public:
  KvCache() = default;

  // Number of cached positions, including padding; 0 when empty.
  int64_t length() const;
  // Rows of the cached batch; 0 when empty.
  int64_t batch_size() const;
  bool empty() const { return length() == 0; }

  // Replaces the cached batch by rows `indices` of it (1-D int64, any device, values in
  // [0, batch_size()); rows may repeat, and the new batch size is indices.size(0)). Used by beam
  // search to follow the surviving beams. A no-op on an empty cache. Throws c10::Error on bad
  // indices (a programming error).
  void ReorderBatch(const torch::Tensor& indices);

  void Clear();

 private:
  friend class LlamaModel;
  // Per layer [B, num_key_value_heads, S, head_dim], after RoPE, in the model's dtype.
  std::vector<torch::Tensor> keys_;
  std::vector<torch::Tensor> values_;
  torch::Tensor key_mask_;  // [B, S] bool: true = real token.
  torch::Tensor num_real_;  // [B] int64: real tokens cached per row (= next position id).
};

class LlamaModel {
 public:
  // Reads config.json and the weights (single file or sharded) of the Hugging Face model folder
  // `model_dir`, converts them to `dtype` (kFloat32, kBFloat16 or kFloat16) and moves them to
  // `device`. Errors name the file and the tensor or field: see LoadModelConfig and LoadWeights;
  // additionally NOT_FOUND for a missing tensor and INVALID_ARGUMENT for a tensor of the wrong
  // shape (expected and actual shape in the message) or an unexpected extra tensor (rotary
  // "inv_freq" buffers and, with tied embeddings, "lm_head.weight" are ignored). Never throws.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& model_dir,
                                                          torch::Device device,
                                                          torch::ScalarType dtype);

  // As Load, from a config and a weights map with Hugging Face tensor names (taken over; the
  // tensors are detached, converted and moved). `sources`, if given, names each tensor's file in
  // error messages.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromWeights(
      const ModelConfig& config, std::map<std::string, torch::Tensor> weights, torch::Device device,
      torch::ScalarType dtype, const WeightSources* sources = nullptr);

  // Logits [B, T, vocab_size] in fp32 for `input_ids` [B, T] (int64, values in
  // [0, vocab_size)).
  //
  // `attention_mask` [B, T] (1 = token, 0 = padding; any integer or bool dtype) covers the new
  // tokens only; undefined means all ones. Position ids are cumsum(mask) - 1 clamped at 0,
  // counted from the real tokens already in `cache`, so left padding works for generation.
  // Padded keys are masked out of attention; logits at padded positions are meaningless.
  //
  // With `cache`, attention also covers the cached positions and the new keys/values are
  // appended to it (only if Forward returns normally). Without, the call is stateless.
  // `hooks`, if given, is called for every layer (see AdapterHooks). Runs on the model's device;
  // inputs on another device are copied there.
  //
  // Throws c10::Error only on caller errors (shapes, dtypes, out-of-range ids, a cache of
  // another batch size or model); entry points that handle requests validate before calling.
  // Thread-safe for concurrent calls with distinct caches and hooks: the model is immutable.
  torch::Tensor Forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        KvCache* cache = nullptr, AdapterHooks* hooks = nullptr) const;

  // Number of base-model parameters (a tied head counted once).
  int64_t NumParameters() const;

  // The frozen weights under their Hugging Face names (shared, not copies; requires_grad false).
  // With tied embeddings there is no "lm_head.weight" entry.
  std::map<std::string, torch::Tensor> NamedParameters() const;

  const ModelConfig& config() const { return config_; }
  torch::Device device() const { return device_; }
  torch::ScalarType dtype() const { return dtype_; }

 private:
  struct Layer {
    torch::Tensor input_layernorm;
    torch::Tensor q_proj, k_proj, v_proj, o_proj;
    torch::Tensor post_attention_layernorm;
    torch::Tensor gate_proj, up_proj, down_proj;
  };

  LlamaModel(ModelConfig config, torch::Device device, torch::ScalarType dtype)
      : config_(std::move(config)), device_(device), dtype_(dtype) {}

  // The member that holds tensor `t` (layers_ must already have t.layer + 1 entries).
  torch::Tensor* Slot(const LlamaTensorSpec& t);
  const torch::Tensor& Slot(const LlamaTensorSpec& t) const {
    return *const_cast<LlamaModel*>(this)->Slot(t);
  }

  ModelConfig config_;
  torch::Device device_;
  torch::ScalarType dtype_;
  torch::Tensor embed_tokens_;  // [vocab, d]
  std::vector<Layer> layers_;
  torch::Tensor norm_;      // [d]
  torch::Tensor lm_head_;   // [vocab, d]; the same tensor as embed_tokens_ when tied.
  torch::Tensor inv_freq_;  // [head_dim / 2] fp32, already divided by the scaling factor.
};

}  // namespace meft::worker
