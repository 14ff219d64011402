#pragma once

// The baselines that live beside MEFT in the worker, so a comparison is one flag
// (DESIGN §2): `parallel`, MEFT's adapter kept dense on the device (all r rows, ReLU), and
// `lora` on chosen projections. Both are trained by a device optimizer over parameters().

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/model/adapter_hooks.h"

namespace meft::worker {

struct ParallelAdapterOptions {
  int64_t rows = 4096;          // r: key-value pairs per layer
  std::vector<int64_t> layers;  // layers that carry the adapter
  double init_std = 0.02;       // K ~ N(0, init_std); V = 0 (as MEFT)
  uint64_t seed = 0;
};

// y_t = sum_i ReLU(k_i . x_t) v_i = ReLU(x K^T) V over all r rows of the layer.
class ParallelAdapter : public AdapterHooks {
 public:
  static absl::StatusOr<std::unique_ptr<ParallelAdapter>> Create(
      const ParallelAdapterOptions& options, int64_t dim, torch::Device device);
  torch::Tensor FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                         const torch::Tensor& token_mask) override;
  // K and V of every layer, in layer order (keys then values); trainable leaves.
  std::vector<torch::Tensor> parameters() const;
  // Name -> tensor for checkpoints: "layers.<l>.keys" / "layers.<l>.values".
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

 private:
  std::map<int64_t, std::pair<torch::Tensor, torch::Tensor>> kv_;  // layer -> (K [r,d], V [r,d])
};

struct LoraOptions {
  int64_t rank = 8;
  double alpha = 16.0;                                      // output scaled by alpha / rank
  std::vector<std::string> targets = {"q_proj", "v_proj"};  // or add gate_proj, up_proj, down_proj
  std::vector<int64_t> layers;
  uint64_t seed = 0;
};

// delta = (alpha / rank) * x A^T B^T with A [rank, in] ~ Kaiming-uniform(a = sqrt(5)) and B = 0
// (as Hugging Face peft initialises it), so training starts from the base model.
class LoraAdapter : public AdapterHooks {
 public:
  // `shapes`: projection name -> (in_features, out_features) of the model.
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Create(
      const LoraOptions& options, const std::map<std::string, std::pair<int64_t, int64_t>>& shapes,
      torch::Device device);
  torch::Tensor ProjectionDelta(int64_t layer, const std::string& projection,
                                const torch::Tensor& input) override;
  std::vector<torch::Tensor> parameters() const;
  // "layers.<l>.<projection>.lora_A" / "lora_B".
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;
  // What Create was given (rank, alpha, targets, layers), for PEFT's adapter_config.json.
  const LoraOptions& options() const { return options_; }

 private:
  LoraOptions options_;
  double scale_ = 1.0;
  std::map<std::pair<int64_t, std::string>, std::pair<torch::Tensor, torch::Tensor>> ab_;
};

}  // namespace meft::worker
