#pragma once

// The MEFT adapter on the worker side (DESIGN §2): per decoder layer, sends the FFN input (or
// the prefetch query) to the parameter server, receives the selected rows, computes
//   per_token: y_t = sum_{i in I_t} ReLU(g_t[e(i)] * k_i . x_t) v_i   (g = 1 when ungated)
//   union:     y_t = sum_{i in S} ReLU(k_i . x_t) v_i
// and in backward sends dK[S], dV[S] and the gate gradients, returning dx (and the gradient
// into the prefetch query through the gate). Holds no adapter state beyond the rows of the
// current micro-batch.
//
// Overlap (options.overlap, DESIGN §3): the lookup of a layer starts on a background thread at
// FfnInputReady, so the base FFN (and with prefetch p, the p layers in between) computes while the
// server selects; gradients go out in the background during backward; Step returns at once and
// the next micro-batch starts while the server runs Adam layer by layer (its ordering rule makes
// each layer's next lookup wait for that layer's update). The results are bit-identical to the
// synchronous path.

#include <torch/types.h>

#include <cstdint>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <optional>
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
  // Overlap server calls with compute (see the file comment); false = every server call is
  // synchronous on the training thread.
  bool overlap = true;
};

// Where the training thread's time went on the server's account since the last TakeTimings.
struct MeftTimings {
  // Blocked on the server: synchronous calls, and waits for background lookups, gradient sends,
  // GradNorm and Step replies.
  double wait_seconds = 0.0;
  // Moving fetched rows to the model's device and dtype (on the training thread).
  double transfer_seconds = 0.0;
  // Summed duration of every server call made for the adapter, foreground or background; with
  // overlap, call_seconds - wait_seconds is roughly the server time hidden behind compute.
  double call_seconds = 0.0;
  int64_t lookups = 0;
  int64_t gradient_sends = 0;
  int64_t steps = 0;
};

// Thread safety: one training thread calls every public method; background calls touch only the
// client (which must allow concurrent calls, see ParamClient) and the timings (guarded).
class MeftAdapter : public AdapterHooks {
 public:
  // `client` must outlive the adapter. `server` describes the server's mode and layers; the
  // adapter applies to exactly the layers the server owns.
  MeftAdapter(ParamClient* client, const ServerInfo& server,
              const MeftAdapterOptions& options);
  // Waits for every background call (their results are dropped).
  ~MeftAdapter() override;
  MeftAdapter(const MeftAdapter&) = delete;
  MeftAdapter& operator=(const MeftAdapter&) = delete;

  // Sets the header of the following lookups. training = true keeps lookups for gradients and
  // builds the autograd graph; false (evaluation) does neither, and first waits for a pending
  // Step so evaluation sees whole optimizer steps. Drops lookups a failed forward left running.
  void BeginMicroBatch(uint64_t step, uint32_t micro_step, bool training);

  // AdapterHooks. Throw c10::Error (with the server's message) when a lookup or a synchronous
  // gradient call fails; the worker's entry points turn it into a Status.
  void FfnInputReady(int64_t layer, const torch::Tensor& ffn_input,
                     const torch::Tensor& token_mask) override;
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& token_mask) override;

  // Waits until every gradient sent in backward since the last call has been acknowledged;
  // returns the first failure (the server's message), OK without overlap. Call after the last
  // backward of an optimizer step, before GradNorm.
  absl::Status FinishBackward();
  // The server's squared gradient norm of `step`, after the previous Step's reply (its error, if
  // it failed).
  absl::StatusOr<double> GradNorm(uint64_t step);
  // Sends Step(step, lr, clip_factor). With overlap it returns at once (OK) and the reply is
  // awaited by the next GradNorm, WaitForStep or evaluation BeginMicroBatch; the next micro-batch
  // may start meanwhile. Without overlap it returns the server's reply.
  absl::Status Step(uint64_t step, double lr, double clip_factor);
  // Waits for the reply of a Step sent with overlap and returns it (OK when none is pending).
  // Needed before anything that reads the whole step: checkpoints, the end of training.
  absl::Status WaitForStep();

  // Returns the timings gathered since the last call and resets them.
  MeftTimings TakeTimings();

  // Called by the autograd function; not for other callers.
  const MeftAdapterOptions& options() const { return options_; }
  const ServerInfo& server() const { return server_; }
  RequestHeader header(int64_t layer) const {
    return {step_, micro_step_, static_cast<uint32_t>(layer)};
  }
  // A synchronous lookup (timed); throws StatusError with the server's Status.
  LookupReply Fetch(const RequestHeader& header, const torch::Tensor& q, const torch::Tensor& mask,
                     bool training);
  // Sends one layer's gradients: synchronously (throws StatusError on failure), or with overlap in
  // the background after the previous send of the same layer (so the server accumulates in the
  // same order), for FinishBackward to collect.
  void SendGradients(const RequestHeader& header, const torch::Tensor& key_grads,
                     const torch::Tensor& value_grads, const torch::Tensor& gate_grads);
  void AddTransferSeconds(double seconds);

 private:
  // A lookup running in the background for a layer of the current forward pass.
  struct PendingLookup {
    torch::Tensor query;  // [N, d], in the autograd graph (the gate's gradient flows into it)
    torch::Tensor mask;   // [N] bool
    std::shared_future<absl::StatusOr<LookupReply>> result;
  };
  struct SentGradients {
    RequestHeader header;
    std::shared_future<absl::Status> done;
  };
  // ffn_input [B, T, d] as [N, d] with its [N] bool mask; the same tensors for FfnInputReady and
  // FfnDelta of one layer, so both paths build the same autograd graph.
  std::pair<torch::Tensor, torch::Tensor> Flatten(int64_t layer, const torch::Tensor& ffn_input,
                                                  const torch::Tensor& token_mask);
  bool Owns(int64_t layer) const;
  void Launch(int64_t layer, const torch::Tensor& q, const torch::Tensor& mask);
  void DropPendingLookups();
  void RecordCall(double seconds);
  void RecordWait(double seconds);

  ParamClient* client_;
  ServerInfo server_;
  MeftAdapterOptions options_;
  uint64_t step_ = 0;
  uint32_t micro_step_ = 0;
  bool training_ = false;
  // Requires grad so the autograd function's backward always runs (see MeftFunction).
  torch::Tensor anchor_;
  // FFN inputs of the last prefetch_layers layers of this forward pass, oldest first.
  std::deque<std::pair<int64_t, torch::Tensor>> recent_inputs_;
  // The last FfnInputReady: layer, its ffn_input, and the flattened input and mask.
  int64_t ready_layer_ = -1;
  torch::Tensor ready_input_, ready_token_mask_, ready_x_, ready_mask_;
  // Background work (training thread only).
  std::map<int64_t, PendingLookup> pending_lookups_;                // by the layer they are for
  std::vector<SentGradients> sent_gradients_;                       // since the last FinishBackward
  std::map<uint32_t, std::shared_future<absl::Status>> last_send_;  // per layer, for ordering
  std::optional<std::shared_future<absl::Status>> pending_step_;

  std::mutex timings_mu_;
  MeftTimings timings_;  // guarded by timings_mu_
};

// The adapter output for fetched rows, differentiable in x, q and the rows through plain LibTorch
// autograd: the obviously-correct reference the custom backward is tested against, and the
// computation used when no gradients are needed. x, q: [N, d]; mask: [N] bool.
torch::Tensor MeftOutputReference(const LookupReply& rows, const torch::Tensor& x,
                                  const torch::Tensor& q, const torch::Tensor& mask, bool per_token,
                                  bool gated, const torch::Tensor& keys,
                                  const torch::Tensor& values, const torch::Tensor& router);

}  // namespace meft::worker
