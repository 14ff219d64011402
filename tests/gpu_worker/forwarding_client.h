#pragma once

// A ParamClient that forwards every call to another client, for tests that observe or break
// some of the calls by overriding them.

#include <string>

#include "gpu_worker/client/param_client.h"

namespace meft::worker {

class ForwardingClient : public ParamClient {
 public:
  // `inner` must outlive this client.
  explicit ForwardingClient(ParamClient* inner) : inner_(inner) {}
  absl::StatusOr<LookupResult> Lookup(const StepHeader& h, const torch::Tensor& x,
                                      const torch::Tensor& mask, bool training) override {
    return inner_->Lookup(h, x, mask, training);
  }
  absl::Status Gradients(const StepHeader& h, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& g) override {
    return inner_->Gradients(h, k, v, g);
  }
  absl::StatusOr<double> GradNorm(uint64_t step) override { return inner_->GradNorm(step); }
  absl::Status Step(uint64_t step, double lr, double clip) override {
    return inner_->Step(step, lr, clip);
  }
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& d) override {
    return inner_->SaveCheckpoint(d);
  }
  absl::Status RestoreCheckpoint(const std::string& p) override {
    return inner_->RestoreCheckpoint(p);
  }
  absl::StatusOr<ServerDescription> Describe() override { return inner_->Describe(); }

 protected:
  ParamClient* inner_;
};

}  // namespace meft::worker
