#pragma once

// A ParamClient that forwards every call to another client: the base for decorators that observe,
// delay or fail some calls by overriding only those methods.

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/client/param_client.h"

namespace meft::worker {

// Forwards each of ParamClient's virtual methods, the ones with a default implementation
// included (LayerGradNorms, RestartStep), to `inner` unchanged and returns its answer unchanged.
// Does not own `inner`, which must not be null and must outlive this client. As thread-safe as
// `inner`; adds no state of its own.
class ForwardingParamClient : public ParamClient {
 public:
  explicit ForwardingParamClient(ParamClient* inner);

  absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override;
  absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override;
  absl::StatusOr<double> GradNorm(uint64_t step) override;
  absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) override;
  absl::Status Step(uint64_t step, double lr, double clip_factor) override;
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) override;
  absl::Status RestoreCheckpoint(const std::string& path) override;
  absl::StatusOr<ServerInfo> Describe() override;
  absl::StatusOr<uint64_t> RestartStep() override;

  // The client calls go to (never null).
  ParamClient* inner() const { return inner_; }

 private:
  ParamClient* const inner_;
};

}  // namespace meft::worker
