#pragma once

// AdamW on device tensors with torch.optim.AdamW's single-tensor arithmetic (decoupled weight
// decay, bias corrections, eps added after the bias-corrected sqrt). Written out rather than
// using torch::optim::AdamW so that its state can be saved and restored exactly, the same way on
// LibTorch 1.13 and 2.x.

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace meft::worker {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class DeviceAdamW {
 public:
  // `params`: named trainable leaves; their .grad() is read at Step.
  DeviceAdamW(std::vector<std::pair<std::string, torch::Tensor>> params, AdamWOptions options);

  // One update with learning rate `lr`, gradients first multiplied by `grad_scale` (the clip
  // factor). Parameters without a gradient are skipped. Zeroes the gradients afterwards.
  void Step(double lr, double grad_scale);
  // Sum of squares of every parameter's gradient.
  double SquaredGradNorm() const;

  int64_t step() const { return step_; }
  // State for checkpoints: "<name>.exp_avg", "<name>.exp_avg_sq" (CPU copies) and the step.
  std::vector<std::pair<std::string, torch::Tensor>> State() const;
  // Restores what State() returned; false if a tensor is missing or has the wrong shape.
  bool Restore(const std::vector<std::pair<std::string, torch::Tensor>>& state, int64_t step);

 private:
  std::vector<std::pair<std::string, torch::Tensor>> params_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_;
  AdamWOptions options_;
  int64_t step_ = 0;
};

// Learning rate of optimizer step `step` (0-based) for a linear warmup over `warmup_steps` then
// a linear decay to 0 at `total_steps`: Hugging Face's get_linear_schedule_with_warmup.
double LinearScheduleLr(double base_lr, int64_t step, int64_t warmup_steps, int64_t total_steps);

}  // namespace meft::worker
