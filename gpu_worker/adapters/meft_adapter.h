#pragma once

// The MEFT adapter on the worker side (DESIGN §2): per decoder layer, sends the FFN input (or
// the prefetch query) to the parameter server, receives the selected rows, computes
//   per_token: y_t = sum_{i in I_t} ReLU(g_t[e(i)] * k_i . x_t) v_i   (g = 1 when ungated)
//   union:     y_t = sum_{i in S} ReLU(k_i . x_t) v_i
// and in backward sends dK[S], dV[S] and the gate gradients, returning dx (and the gradient
// into the prefetch query through the gate). Holds no adapter state beyond the rows of the
// current micro-batch.

#include <torch/types.h>

#include <cstdint>
#include <deque>
#include <vector>

#include "gpu_worker/client/param_client.h"
#include "gpu_worker/model/adapter_hooks.h"

namespace meft::worker {

struct MeftAdapterOptions {
  // p: the lookup for layer l uses the FFN input of layer l - p as its query (layers below p
  // use their own input). Must be the same in training and evaluation.
  int64_t prefetch_layers = 0;
  // Re-send the lookup in backward (the server replays its cached selection) instead of
  // keeping the rows on the device between forward and backward.
  bool refetch_in_backward = false;
};

class MeftAdapter : public AdapterHooks {
 public:
  // `client` must outlive the adapter. `server` describes the server's mode and layers; the
  // adapter applies to exactly the layers the server owns.
  MeftAdapter(ParamClient* client, const ServerDescription& server,
              const MeftAdapterOptions& options);

  // Sets the header of the following lookups. training = true keeps lookups for gradients and
  // builds the autograd graph; false (evaluation) does neither.
  void BeginMicroBatch(uint64_t step, uint32_t micro_step, bool training);

  // AdapterHooks. Throws c10::Error (with the server's message) when a lookup or gradient
  // call fails; the worker's entry points turn it into a Status.
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& token_mask) override;

  // Called by the autograd function; not for other callers.
  ParamClient* client() const { return client_; }
  const MeftAdapterOptions& options() const { return options_; }
  const ServerDescription& server() const { return server_; }
  StepHeader header(int64_t layer) const {
    return {step_, micro_step_, static_cast<uint32_t>(layer)};
  }

 private:
  ParamClient* client_;
  ServerDescription server_;
  MeftAdapterOptions options_;
  uint64_t step_ = 0;
  uint32_t micro_step_ = 0;
  bool training_ = false;
  // Requires grad so the autograd function's backward always runs (see MeftFunction).
  torch::Tensor anchor_;
  // FFN inputs of the last prefetch_layers layers of this forward pass, oldest first.
  std::deque<std::pair<int64_t, torch::Tensor>> recent_inputs_;
};

// The adapter output for fetched rows, differentiable in x, q and the rows through plain LibTorch
// autograd: the obviously-correct reference the custom backward is tested against, and the
// computation used when no gradients are needed. x, q: [N, d]; mask: [N] bool.
torch::Tensor MeftOutputReference(const LookupResult& rows, const torch::Tensor& x,
                                  const torch::Tensor& q, const torch::Tensor& mask, bool per_token,
                                  bool gated, const torch::Tensor& keys,
                                  const torch::Tensor& values, const torch::Tensor& router);

}  // namespace meft::worker
