#include "gpu_worker/train/adamw.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace meft::worker {

DeviceAdamW::DeviceAdamW(std::vector<std::pair<std::string, torch::Tensor>> params,
                         AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
    exp_avg_sq_.push_back(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
  }
}

void DeviceAdamW::Step(double lr, double grad_scale) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bias_correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bias_correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor p = params_[i].second;
    torch::Tensor grad = p.grad();
    if (!grad.defined()) continue;
    if (grad_scale != 1.0) grad = grad * grad_scale;
    p.mul_(1.0 - lr * options_.weight_decay);
    exp_avg_[i].mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
    exp_avg_sq_[i].mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
    const torch::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(options_.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_size);
    p.mutable_grad().zero_();
  }
}

double DeviceAdamW::SquaredGradNorm() const {
  double total = 0.0;
  for (const auto& [name, p] : params_) {
    if (p.grad().defined()) total += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
  }
  return total;
}

std::vector<std::pair<std::string, torch::Tensor>> DeviceAdamW::State() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back(params_[i].first + ".exp_avg", exp_avg_[i].to(torch::kCPU));
    out.emplace_back(params_[i].first + ".exp_avg_sq", exp_avg_sq_[i].to(torch::kCPU));
  }
  return out;
}

bool DeviceAdamW::Restore(const std::vector<std::pair<std::string, torch::Tensor>>& state,
                          int64_t step) {
  auto find = [&](const std::string& name) -> torch::Tensor {
    for (const auto& [n, t] : state) {
      if (n == name) return t;
    }
    return {};
  };
  std::vector<torch::Tensor> m, v;
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor a = find(params_[i].first + ".exp_avg");
    const torch::Tensor b = find(params_[i].first + ".exp_avg_sq");
    if (!a.defined() || !b.defined() || a.sizes() != params_[i].second.sizes() ||
        b.sizes() != params_[i].second.sizes()) {
      return false;
    }
    m.push_back(a.to(params_[i].second.options()).clone());
    v.push_back(b.to(params_[i].second.options()).clone());
  }
  exp_avg_ = std::move(m);
  exp_avg_sq_ = std::move(v);
  step_ = step;
  return true;
}

double LinearScheduleLr(double base_lr, int64_t step, int64_t warmup_steps, int64_t total_steps) {
  if (step < warmup_steps) {
    return base_lr * static_cast<double>(step) /
           static_cast<double>(std::max<int64_t>(1, warmup_steps));
  }
  return base_lr *
         std::max(0.0, static_cast<double>(total_steps - step) /
                           static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps)));
}

}  // namespace meft::worker
