#include "param_server/optim/sparse_adam.h"

#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace meft::optim {
namespace {

using store::ParamBlock;

// Textbook lazy Adam in double, written from the definition of torch.optim.SparseAdam:
// m, v and the parameter change only on rows with a gradient; the step count is per tensor;
// p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
struct ReferenceAdam {
  int64_t rows, dim;
  std::vector<double> p, m, v, g;
  std::vector<bool> touched;
  int64_t t = 0;

  void Accumulate(const std::vector<int32_t>& ids, const std::vector<float>& grads) {
    for (size_t i = 0; i < ids.size(); ++i) {
      touched[ids[i]] = true;
      for (int64_t j = 0; j < dim; ++j) g[ids[i] * dim + j] += grads[i * dim + j];
    }
  }
  void Step(double lr, double clip, const AdamOptions& o) {
    bool any = false;
    for (bool b : touched) any = any || b;
    if (!any) return;
    ++t;
    const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
    for (int64_t r = 0; r < rows; ++r) {
      if (!touched[r]) continue;
      for (int64_t j = 0; j < dim; ++j) {
        const size_t k = r * dim + j;
        const double grad = g[k] * clip;
        p[k] *= 1 - lr * o.weight_decay;
        m[k] = o.beta1 * m[k] + (1 - o.beta1) * grad;
        v[k] = o.beta2 * v[k] + (1 - o.beta2) * grad * grad;
        p[k] -= lr * std::sqrt(bc2) / bc1 * m[k] / (std::sqrt(v[k]) + o.eps);
        g[k] = 0;
      }
      touched[r] = false;
    }
  }
};

TEST(SparseAdamTest, MatchesTextbookReferenceWithAccumulationClippingAndDecay) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  const int64_t rows = 30, dim = 13;
  ParamBlock block;
  block.Allocate(rows, dim);
  ReferenceAdam ref{rows, dim, {}, {}, {}, {}, {}};
  ref.p.resize(rows * dim);
  for (int64_t i = 0; i < rows * dim; ++i) ref.p[i] = block.param[i] = normal(rng) * 0.1f;
  ref.m.assign(rows * dim, 0);
  ref.v.assign(rows * dim, 0);
  ref.g.assign(rows * dim, 0);
  ref.touched.assign(rows, false);
  AdamOptions options;
  options.weight_decay = 0.01;
  for (int step = 0; step < 8; ++step) {
    const int micro_batches = 1 + step % 3;
    for (int mb = 0; mb < micro_batches; ++mb) {
      // A random set of unique rows, overlapping across micro-batches.
      std::vector<int32_t> ids;
      for (int32_t r = 0; r < rows; ++r) {
        if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) ids.push_back(r);
      }
      std::shuffle(ids.begin(), ids.end(), rng);
      std::vector<float> grads(ids.size() * dim);
      for (auto& x : grads) x = normal(rng);
      AccumulateRows(&block, ids, grads.data());
      ref.Accumulate(ids, grads);
    }
    double ref_norm = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (!ref.touched[r]) continue;
      for (int64_t j = 0; j < dim; ++j) ref_norm += ref.g[r * dim + j] * ref.g[r * dim + j];
    }
    EXPECT_NEAR(SquaredNorm(block), ref_norm, 1e-5 * ref_norm);
    const double lr = 1e-2 * (1 + step);
    const double clip = step % 2 ? 0.5 : 1.0;
    int64_t touched = 0;
    for (bool b : ref.touched) touched += b;
    EXPECT_EQ(SparseAdamStep(&block, lr, clip, options), touched);
    ref.Step(lr, clip, options);
    for (int64_t i = 0; i < rows * dim; ++i) {
      ASSERT_NEAR(block.param[i], ref.p[i], 1e-6 + 1e-5 * std::fabs(ref.p[i]))
          << "step " << step << " i " << i;
      ASSERT_NEAR(block.exp_avg[i], ref.m[i], 1e-6 + 1e-5 * std::fabs(ref.m[i]));
      ASSERT_NEAR(block.exp_avg_sq[i], ref.v[i], 1e-7 + 1e-5 * std::fabs(ref.v[i]));
    }
    EXPECT_EQ(block.adam_step, ref.t);
    EXPECT_TRUE(block.touched_rows.empty());
    EXPECT_EQ(SquaredNorm(block), 0.0);
  }
}

TEST(SparseAdamTest, UntouchedRowsAndEmptyStepsChangeNothing) {
  ParamBlock block;
  block.Allocate(4, 3);
  for (size_t i = 0; i < block.param.size(); ++i) block.param[i] = static_cast<float>(i);
  const std::vector<float> before = block.param;
  EXPECT_EQ(SparseAdamStep(&block, 0.1, 1.0, {}), 0);
  EXPECT_EQ(block.adam_step, 0);  // SparseAdam counts only steps with a gradient
  EXPECT_EQ(block.param, before);
  const std::vector<int32_t> ids = {2};
  const std::vector<float> g = {1, -1, 0.5f};
  AccumulateRows(&block, ids, g.data());
  EXPECT_EQ(SparseAdamStep(&block, 0.1, 1.0, {}), 1);
  for (int64_t r : {0, 1, 3}) {
    for (int64_t j = 0; j < 3; ++j) {
      EXPECT_EQ(block.param[r * 3 + j], before[r * 3 + j]);
      EXPECT_EQ(block.exp_avg[r * 3 + j], 0.0f);
    }
  }
  // First step of Adam moves each coordinate by ~lr against the gradient's sign.
  EXPECT_NEAR(block.param[6] - before[6], -0.1, 1e-6);
  EXPECT_NEAR(block.param[7] - before[7], 0.1, 1e-6);
}

TEST(SparseAdamTest, AccumulateOuterMatchesReference) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal;
  const int64_t dim = 9, T = 6;
  std::vector<float> x(T * dim);
  for (auto& v : x) v = normal(rng);
  ParamBlock block;
  block.Allocate(5, dim);
  const std::vector<int32_t> rows = {4, 1};
  const std::vector<int64_t> offsets = {0, 2, 5};
  const std::vector<int32_t> tokens = {0, 3, 1, 2, 5};
  const std::vector<float> coeffs = {0.5f, -1.0f, 2.0f, 0.25f, -0.75f};
  AccumulateOuter(&block, rows, offsets, tokens, coeffs, x.data());
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t j = 0; j < dim; ++j) {
      double want = 0;
      for (int64_t k = offsets[i]; k < offsets[i + 1]; ++k)
        want += coeffs[k] * x[tokens[k] * dim + j];
      EXPECT_NEAR(block.grad[rows[i] * dim + j], want, 1e-5);
    }
  }
  EXPECT_EQ(block.touched_rows, rows);
}

TEST(SparseAdamTest, MatchesTorchSparseAdamGolden) {
  std::ifstream in(MEFT_GOLDEN_DIR "/sparse_adam_golden.json");
  ASSERT_TRUE(in) << "missing " MEFT_GOLDEN_DIR "/sparse_adam_golden.json";
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(text.str());
  const int64_t rows = golden["rows"], dim = golden["dim"];
  ParamBlock block;
  block.Allocate(rows, dim);
  block.param = golden["initial"].get<std::vector<float>>();
  AdamOptions options;
  options.beta1 = golden["beta1"];
  options.beta2 = golden["beta2"];
  options.eps = golden["eps"];
  int step_index = 0;
  for (const auto& step : golden["steps"]) {
    for (const auto& mb : step["micro_batches"]) {
      const auto ids = mb["rows"].get<std::vector<int32_t>>();
      const auto grads = mb["grads"].get<std::vector<float>>();
      AccumulateRows(&block, ids, grads.data());
    }
    options.weight_decay = step["weight_decay"];
    SparseAdamStep(&block, step["lr"], step["clip"], options);
    const auto p = step["param"].get<std::vector<float>>();
    const auto m = step["exp_avg"].get<std::vector<float>>();
    const auto v = step["exp_avg_sq"].get<std::vector<float>>();
    // Same fp32 operations in the same order as torch: the results are bit-identical (a
    // double-precision implementation would differ in the last bits).
    for (int64_t i = 0; i < rows * dim; ++i) {
      ASSERT_EQ(block.param[i], p[i]) << "step " << step_index << " element " << i;
      ASSERT_EQ(block.exp_avg[i], m[i]) << "step " << step_index << " element " << i;
      ASSERT_EQ(block.exp_avg_sq[i], v[i]) << "step " << step_index << " element " << i;
    }
    EXPECT_EQ(block.adam_step, step["step"].get<int64_t>());
    ++step_index;
  }
  EXPECT_EQ(step_index, 5);
}

}  // namespace
}  // namespace meft::optim
