#include "param_server/optim/sparse_adam.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"
#include "tbb/parallel_reduce.h"

namespace meft::optim {
namespace {

// Rows per task: enough work (rows * dim elements) to amortise scheduling.
int64_t GrainRows(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim)); }

}  // namespace

void AccumulateRows(store::ParamBlock* block, std::span<const int32_t> rows, const float* grads) {
  const int64_t dim = block->dim;
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<uint8_t> fresh(rows.size(), 0);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, GrainRows(dim)),
                    [&](const tbb::blocked_range<int64_t>& r) {
                      for (int64_t i = r.begin(); i != r.end(); ++i) {
                        const int32_t row = rows[i];
                        float* dst = block->grad.data() + int64_t{row} * dim;
                        const float* src = grads + i * dim;
                        if (block->touched[row] == 0) {
                          std::memcpy(dst, src, static_cast<size_t>(dim) * sizeof(float));
                          block->touched[row] = 1;
                          fresh[i] = 1;
                        } else {
                          for (int64_t j = 0; j < dim; ++j) dst[j] += src[j];
                        }
                      }
                    });
  for (int64_t i = 0; i < n; ++i) {
    if (fresh[i]) block->touched_rows.push_back(rows[i]);
  }
}

void AccumulateOuter(store::ParamBlock* block, std::span<const int32_t> rows,
                     std::span<const int64_t> offsets, std::span<const int32_t> tokens,
                     std::span<const float> coeffs, const float* x) {
  const int64_t dim = block->dim;
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<float> sums(static_cast<size_t>(n * dim), 0.0f);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i != r.end(); ++i) {
      float* dst = sums.data() + i * dim;
      for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) {
        const float c = coeffs[j];
        const float* xt = x + int64_t{tokens[j]} * dim;
        for (int64_t k = 0; k < dim; ++k) dst[k] += c * xt[k];
      }
    }
  });
  AccumulateRows(block, rows, sums.data());
}

double SquaredNorm(const store::ParamBlock& block) {
  const int64_t dim = block.dim;
  const auto& rows = block.touched_rows;
  return tbb::parallel_deterministic_reduce(
      tbb::blocked_range<size_t>(0, rows.size(), static_cast<size_t>(GrainRows(dim))), 0.0,
      [&](const tbb::blocked_range<size_t>& r, double acc) {
        for (size_t i = r.begin(); i != r.end(); ++i) {
          const float* g = block.grad.data() + int64_t{rows[i]} * dim;
          for (int64_t j = 0; j < dim; ++j) acc += double{g[j]} * double{g[j]};
        }
        return acc;
      },
      [](double a, double b) { return a + b; });
}

int64_t SparseAdamStep(store::ParamBlock* block, double lr, double clip_factor,
                       const AdamOptions& options) {
  const int64_t n = static_cast<int64_t>(block->touched_rows.size());
  if (n == 0) return 0;
  block->adam_step += 1;
  const double step = static_cast<double>(block->adam_step);
  const double bias_correction1 = 1.0 - std::pow(options.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(options.beta2, step);
  const double step_size = lr * std::sqrt(bias_correction2) / bias_correction1;
  // Python scalars reach torch's fp32 kernels as floats; do the same conversions.
  const float one_minus_beta1 = static_cast<float>(1.0 - options.beta1);
  const float one_minus_beta2 = static_cast<float>(1.0 - options.beta2);
  const float eps = static_cast<float>(options.eps);
  const float neg_step_size = static_cast<float>(-step_size);
  const float clip = static_cast<float>(clip_factor);
  const bool scale = clip_factor != 1.0;
  const bool decay = options.weight_decay != 0.0;
  const float decay_factor = static_cast<float>(1.0 - lr * options.weight_decay);
  const int64_t dim = block->dim;

  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, GrainRows(dim)),
                    [&](const tbb::blocked_range<int64_t>& r) {
                      for (int64_t i = r.begin(); i != r.end(); ++i) {
                        const int64_t base = int64_t{block->touched_rows[i]} * dim;
                        float* __restrict p = block->param.data() + base;
                        float* __restrict m = block->exp_avg.data() + base;
                        float* __restrict v = block->exp_avg_sq.data() + base;
                        const float* __restrict gr = block->grad.data() + base;
                        for (int64_t j = 0; j < dim; ++j) {
                          const float g = scale ? gr[j] * clip : gr[j];
                          const float pj = decay ? p[j] * decay_factor : p[j];
                          const float m_new = (g - m[j]) * one_minus_beta1 + m[j];
                          const float v_new = (g * g - v[j]) * one_minus_beta2 + v[j];
                          const float denom = std::sqrt(v_new) + eps;
                          p[j] = pj + neg_step_size * (m_new / denom);
                          m[j] = m_new;
                          v[j] = v_new;
                        }
                      }
                    });
  block->ClearGrad();
  return n;
}

}  // namespace meft::optim
