#include "gpu_worker/adapters/baselines.h"

#include <torch/torch.h>

#include <cmath>

#include "absl/strings/str_cat.h"

namespace meft::worker {

absl::StatusOr<std::unique_ptr<ParallelAdapter>> ParallelAdapter::Create(
    const ParallelAdapterOptions& options, int64_t dim, torch::Device device) {
  if (options.rows <= 0) return absl::InvalidArgumentError("adapter.rows: must be positive");
  if (options.layers.empty()) return absl::InvalidArgumentError("adapter.layers: empty");
  try {
    auto a = std::unique_ptr<ParallelAdapter>(new ParallelAdapter());
    torch::manual_seed(options.seed);
    for (int64_t l : options.layers) {
      torch::Tensor k = (torch::randn({options.rows, dim}) * options.init_std).to(device);
      torch::Tensor v = torch::zeros({options.rows, dim}, torch::TensorOptions().device(device));
      a->kv_[l] = {k.requires_grad_(), v.requires_grad_()};
    }
    return a;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("parallel adapter: ", e.what_without_backtrace()));
  }
}

torch::Tensor ParallelAdapter::FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                                        const torch::Tensor& token_mask) {
  auto it = kv_.find(layer);
  if (it == kv_.end()) return {};
  const auto& [k, v] = it->second;
  const torch::Tensor x = ffn_input.to(torch::kFloat32);
  torch::Tensor y = torch::relu(x.matmul(k.t())).matmul(v);
  if (token_mask.defined()) y = y * token_mask.unsqueeze(-1).to(y.scalar_type());
  return y.to(ffn_input.scalar_type());
}

std::vector<torch::Tensor> ParallelAdapter::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& [l, kv] : kv_) {
    out.push_back(kv.first);
    out.push_back(kv.second);
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> ParallelAdapter::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [l, kv] : kv_) {
    out.emplace_back(absl::StrCat("layers.", l, ".keys"), kv.first);
    out.emplace_back(absl::StrCat("layers.", l, ".values"), kv.second);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Create(
    const LoraOptions& options, const std::map<std::string, std::pair<int64_t, int64_t>>& shapes,
    torch::Device device) {
  if (options.rank <= 0) return absl::InvalidArgumentError("lora.rank: must be positive");
  if (options.targets.empty()) return absl::InvalidArgumentError("lora.targets: empty");
  if (options.layers.empty()) return absl::InvalidArgumentError("lora.layers: empty");
  try {
    auto a = std::unique_ptr<LoraAdapter>(new LoraAdapter());
    a->options_ = options;
    a->scale_ = options.alpha / static_cast<double>(options.rank);
    torch::manual_seed(options.seed);
    for (int64_t l : options.layers) {
      for (const std::string& target : options.targets) {
        auto shape = shapes.find(target);
        if (shape == shapes.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("lora.targets: unknown projection \"", target, "\""));
        }
        const auto [in, out] = shape->second;
        // kaiming_uniform_(a = sqrt(5)) on [rank, in]: bound = 1 / sqrt(in).
        const double bound = 1.0 / std::sqrt(static_cast<double>(in));
        torch::Tensor lora_a = (torch::rand({options.rank, in}) * 2 - 1) * bound;
        torch::Tensor lora_b = torch::zeros({out, options.rank});
        a->ab_[{l, target}] = {lora_a.to(device).requires_grad_(),
                               lora_b.to(device).requires_grad_()};
      }
    }
    return a;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("lora: ", e.what_without_backtrace()));
  }
}

torch::Tensor LoraAdapter::ProjectionDelta(int64_t layer, const std::string& projection,
                                           const torch::Tensor& input) {
  auto it = ab_.find({layer, projection});
  if (it == ab_.end()) return {};
  const auto& [a, b] = it->second;
  const torch::Tensor x = input.to(torch::kFloat32);
  return (x.matmul(a.t()).matmul(b.t()) * scale_).to(input.scalar_type());
}

std::vector<torch::Tensor> LoraAdapter::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& [key, ab] : ab_) {
    out.push_back(ab.first);
    out.push_back(ab.second);
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> LoraAdapter::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [key, ab] : ab_) {
    out.emplace_back(absl::StrCat("layers.", key.first, ".", key.second, ".lora_A"), ab.first);
    out.emplace_back(absl::StrCat("layers.", key.first, ".", key.second, ".lora_B"), ab.second);
  }
  return out;
}

}  // namespace meft::worker
