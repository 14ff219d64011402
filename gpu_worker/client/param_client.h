#pragma once

// The worker's view of the parameter server (DESIGN §3), on LibTorch tensors. The gRPC
// implementation lives in gpu_worker/rpc/; tests may substitute their own.

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace meft::worker {

struct RequestHeader {
  uint64_t step = 0;
  uint32_t micro_step = 0;
  uint32_t layer = 0;
};

// A lookup's answer. All tensors live on the CPU; ids are int64.
struct LookupReply {
  torch::Tensor row_ids;        // [S]
  torch::Tensor keys;           // [S, d] fp32 or bf16
  torch::Tensor values;         // [S, d]
  torch::Tensor token_rows;     // [T, k] positions in row_ids, -1 = empty (per_token only)
  torch::Tensor token_gates;    // [T, k] fp32 (per_token only)
  torch::Tensor token_experts;  // [T, k] positions in expert_ids, -1 = empty (gated per_token)
  torch::Tensor expert_ids;     // [n_e] (gated per_token)
  torch::Tensor router_rows;    // [n_e, d] (gated per_token)
  bool replayed = false;
};

struct ServerInfo {
  std::vector<uint32_t> layers;
  int64_t rows = 0, dim = 0, experts = 0, n_probe = 0, top_k = 0, max_rows = 0, max_tokens = 0;
  bool per_token = true;  // false: union mode
  bool gated = true;
  uint64_t step = 0;
};

// Thread safety: implementations must allow concurrent calls (the MEFT adapter's overlap issues
// Lookup and Gradients for different layers, and Step, from background threads).
class ParamClient {
 public:
  virtual ~ParamClient() = default;
  // x: [T, d] float tensor (any device; copied to the CPU); token_mask: [T] (nonzero = real
  // token) or undefined for all real. `training` keeps the lookup for Gradients.
  virtual absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                              const torch::Tensor& token_mask, bool training) = 0;
  // Gradients of the lookup `header`, rows in its row_ids order; gate_grads [T, k] or undefined.
  virtual absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                                 const torch::Tensor& value_grads,
                                 const torch::Tensor& gate_grads) = 0;
  // Squared norm of the gradients accumulated for `step` over every layer the server owns.
  virtual absl::StatusOr<double> GradNorm(uint64_t step) = 0;
  // The same per owned layer, ascending layer id: a client over several servers adds these in
  // layer order so its total is bit-identical to one server owning every layer. The default
  // answers UNIMPLEMENTED.
  virtual absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) {
    (void)step;
    return absl::UnimplementedError("LayerGradNorms: not supported by this client");
  }
  virtual absl::Status Step(uint64_t step, double lr, double clip_factor) = 0;
  // Returns the checkpoint folder written.
  virtual absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) = 0;
  virtual absl::Status RestoreCheckpoint(const std::string& path) = 0;
  virtual absl::StatusOr<ServerInfo> Describe() = 0;
  // The optimizer step training can continue from after a server restarted from its last
  // checkpoint: the server's step (over several servers, the lowest; the others are then rolled
  // back by RestoreCheckpoint). UNAVAILABLE while a server cannot be reached or is loading.
  virtual absl::StatusOr<uint64_t> RestartStep() {
    absl::StatusOr<ServerInfo> d = Describe();
    if (!d.ok()) return d.status();
    return d->step;
  }
};

}  // namespace meft::worker
