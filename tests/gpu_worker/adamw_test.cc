// DeviceAdamW against torch.optim.AdamW, and the learning-rate schedule against Hugging Face's
// get_linear_schedule_with_warmup.

#include "gpu_worker/train/adamw.h"

#include <torch/torch.h>

#include "gtest/gtest.h"

namespace meft::worker {
namespace {

TEST(AdamWTest, EqualsTorchOptimAdamW) {
  torch::manual_seed(1);
  torch::Tensor a = torch::randn({5, 3}, torch::requires_grad());
  torch::Tensor b = a.detach().clone().requires_grad_();
  torch::optim::AdamW reference({b}, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  DeviceAdamW mine({{"a", a}}, {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1});
  for (int step = 0; step < 6; ++step) {
    const torch::Tensor g = torch::randn({5, 3});
    a.mutable_grad() = g.clone();
    b.mutable_grad() = g.clone();
    mine.Step(0.01, 1.0);
    reference.step();
    ASSERT_TRUE(torch::equal(a, b)) << "step " << step << "\n" << a - b;
  }
  EXPECT_EQ(mine.step(), 6);
}

TEST(ScheduleTest, MatchesHuggingFaceLinearWithWarmup) {
  // get_linear_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10), base 1.0.
  const double want[] = {0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125};
  for (int s = 0; s < 10; ++s) EXPECT_DOUBLE_EQ(LinearScheduleLr(1.0, s, 2, 10), want[s]) << s;
  EXPECT_DOUBLE_EQ(LinearScheduleLr(1.0, 0, 0, 4), 1.0);
}

}  // namespace
}  // namespace meft::worker
