#include "gpu_worker/client/forwarding_param_client.h"

namespace meft::worker {

ForwardingParamClient::ForwardingParamClient(ParamClient* inner) : inner_(inner) {}

absl::StatusOr<LookupReply> ForwardingParamClient::Lookup(const RequestHeader& header,
                                                           const torch::Tensor& x,
                                                           const torch::Tensor& token_mask,
                                                           bool training) {
  return inner_->Lookup(header, x, token_mask, training);
}

absl::Status ForwardingParamClient::Gradients(const RequestHeader& header,
                                              const torch::Tensor& key_grads,
                                              const torch::Tensor& value_grads,
                                              const torch::Tensor& gate_grads) {
  return inner_->Gradients(header, key_grads, value_grads, gate_grads);
}

absl::StatusOr<double> ForwardingParamClient::GradNorm(uint64_t step) {
  return inner_->GradNorm(step);
}

absl::StatusOr<std::vector<std::pair<uint32_t, double>>> ForwardingParamClient::LayerGradNorms(
    uint64_t step) {
  return inner_->LayerGradNorms(step);
}

absl::Status ForwardingParamClient::Step(uint64_t step, double lr, double clip_factor) {
  return inner_->Step(step, lr, clip_factor);
}

absl::StatusOr<std::string> ForwardingParamClient::SaveCheckpoint(const std::string& directory) {
  return inner_->SaveCheckpoint(directory);
}

absl::Status ForwardingParamClient::RestoreCheckpoint(const std::string& path) {
  return inner_->RestoreCheckpoint(path);
}

absl::StatusOr<ServerInfo> ForwardingParamClient::Describe() { return inner_->Describe(); }

absl::StatusOr<uint64_t> ForwardingParamClient::RestartStep() { return inner_->RestartStep(); }

}  // namespace meft::worker
