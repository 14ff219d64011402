#pragma once

// Extension points of the frozen decoder (llama.h) through which adapters (MEFT's sparse
// adapter, the dense `parallel` baseline, LoRA) add their contribution. The decoder calls the
// hooks synchronously from Forward on the caller's thread; whatever a hook returns stays in the
// autograd graph, so gradients from the logits reach the adapter's parameters and, through the
// hook's inputs, earlier layers.
//
// Hooks may throw, and Forward (or autograd's backward, for what a hook put in the graph) passes
// the exception on unchanged: c10::Error from LibTorch, std::bad_alloc, and StatusError
// (status_error.h) for a failed call whose absl::Status the caller should see, such as a
// parameter-server call that found the server UNAVAILABLE. Whoever runs Forward or backward on
// an adapter turns them back into a Status (StatusFromCurrentException).

#include <torch/types.h>

#include <cstdint>
#include <string>

namespace meft::worker {

class AdapterHooks {
 public:
  virtual ~AdapterHooks() = default;

  // Called with the same ffn_input and token_mask as FfnDelta (see there) before the base FFN of
  // `layer` runs, so that an adapter can start work (MEFT: the server lookup) that overlaps the
  // base FFN and later layers. The decoder calls it for every layer, in ascending order, once per
  // Forward; FfnDelta(layer) follows it. Adapters must also work when it is not called.
  virtual void FfnInputReady(int64_t /*layer*/, const torch::Tensor& /*ffn_input*/,
                             const torch::Tensor& /*token_mask*/) {}

  // ffn_input: the post-attention RMSNorm output of `layer`, [B, T, d] in the model's dtype;
  // token_mask: [B, T] int64 on the model's device (1 = real token, 0 = padding).
  // Returns a tensor broadcastable to [B, T, d] that is added to the FFN output before the
  // residual add, or an undefined tensor for "no contribution".
  virtual torch::Tensor FfnDelta(int64_t /*layer*/, const torch::Tensor& /*ffn_input*/,
                                 const torch::Tensor& /*token_mask*/) {
    return {};
  }

  // For LoRA: called for each projection ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
  // "up_proj", "down_proj") of `layer` with its input [B, T, in_features]; the result (shape of
  // the projection's output, [B, T, out_features]) or an undefined tensor is added to the
  // projection's output.
  virtual torch::Tensor ProjectionDelta(int64_t /*layer*/, const std::string& /*projection*/,
                                        const torch::Tensor& /*input*/) {
    return {};
  }
};

}  // namespace meft::worker
