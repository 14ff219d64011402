#include "param_server/store/layer_store.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"
#include "common/random.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace meft::store {
namespace {

// Fills `out` with N(0, std) by Box-Muller from a stream keyed by (seed, layer, tensor, row).
void FillNormalRow(uint64_t seed, uint32_t layer, uint32_t tensor, int64_t row, float std,
                   std::span<float> out) {
  SplitMix64 rng(seed ^ (uint64_t{layer} << 48) ^ (uint64_t{tensor} << 40) ^
                 static_cast<uint64_t>(row) * 0x632be59bd9b4e019ull);
  rng.Next();
  for (size_t i = 0; i < out.size(); i += 2) {
    const double u1 = rng.UniformPositive();
    const double u2 = rng.UniformPositive();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * M_PI * u2;
    out[i] = static_cast<float>(radius * std::cos(angle) * std);
    if (i + 1 < out.size()) out[i + 1] = static_cast<float>(radius * std::sin(angle) * std);
  }
}

std::atomic<int64_t> allocations_before_failure{-1};

}  // namespace

void FailAllocationAfterForTesting(int64_t n) { allocations_before_failure.store(n); }

void ParamBlock::Allocate(int64_t n_rows, int64_t n_dim) {
  if (allocations_before_failure.load() >= 0 && allocations_before_failure.fetch_sub(1) == 0) {
    allocations_before_failure.store(-1);
    throw std::bad_alloc();
  }
  rows = n_rows;
  dim = n_dim;
  const size_t n = static_cast<size_t>(n_rows * n_dim);
  param.assign(n, 0.0f);
  exp_avg.assign(n, 0.0f);
  exp_avg_sq.assign(n, 0.0f);
  grad.assign(n, 0.0f);
  touched.assign(static_cast<size_t>(n_rows), 0);
  touched_rows.clear();
  adam_step = 0;
}

void ParamBlock::ClearGrad() {
  for (int32_t r : touched_rows) touched[r] = 0;
  touched_rows.clear();
}

int64_t DefaultExperts(int64_t rows) {
  const int64_t target = 4 * static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(rows))));
  int64_t best = 1;
  for (int64_t e = 1; e <= rows; ++e) {
    if (rows % e != 0) continue;
    const int64_t dist = std::llabs(e - target);
    const int64_t best_dist = std::llabs(best - target);
    if (dist < best_dist || (dist == best_dist && e > best)) best = e;
  }
  return best;
}

absl::StatusOr<LayerStore> LayerStore::Create(uint32_t layer, int64_t rows, int64_t dim,
                                              int64_t experts, const InitOptions& init) {
  if (rows <= 0 || dim <= 0 || experts <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": rows (", rows, "), dim (",
                                                   dim, ") and experts (", experts,
                                                   ") must be positive"));
  }
  if (rows % experts != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, ": experts (", experts, ") must divide rows (", rows, ")"));
  }
  if (rows > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, ": rows (", rows, ") exceeds the int32 row-id range"));
  }
  LayerStore s;
  s.layer = layer;
  s.rows = rows;
  s.dim = dim;
  s.experts = experts;
  s.rows_per_expert = rows / experts;
  try {
    s.keys.Allocate(rows, dim);
    s.values.Allocate(rows, dim);
    s.router.Allocate(experts, dim);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "layer ", layer, ": out of host memory allocating keys and values (", rows, " x ", dim,
        ") and router (", experts, " x ", dim, ") with their Adam state, ",
        16 * (2 * rows + experts) * dim, " bytes"));
  }

  tbb::parallel_for(tbb::blocked_range<int64_t>(0, rows),
                    [&](const tbb::blocked_range<int64_t>& rr) {
                      for (int64_t i = rr.begin(); i != rr.end(); ++i) {
                        FillNormalRow(init.seed, layer, /*tensor=*/0, i, init.init_std,
                                      std::span<float>(s.keys.Row(i), static_cast<size_t>(dim)));
                      }
                    });
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, experts), [&](const tbb::blocked_range<int64_t>& er) {
        for (int64_t e = er.begin(); e != er.end(); ++e) {
          float* g = s.router.Row(e);
          if (init.router_init == RouterInit::kNormal) {
            FillNormalRow(init.seed, layer, /*tensor=*/2, e, init.init_std,
                          std::span<float>(g, static_cast<size_t>(dim)));
            continue;
          }
          // Mean in double, key by key in order, so the result does not depend on threading.
          std::vector<double> sum(static_cast<size_t>(dim), 0.0);
          for (int64_t k = 0; k < s.rows_per_expert; ++k) {
            const float* key = s.keys.Row(e * s.rows_per_expert + k);
            for (int64_t j = 0; j < dim; ++j) sum[j] += key[j];
          }
          const double scale = init.router_scale / static_cast<double>(s.rows_per_expert);
          for (int64_t j = 0; j < dim; ++j) g[j] = static_cast<float>(sum[j] * scale);
        }
      });
  return s;
}

}  // namespace meft::store
