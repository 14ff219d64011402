#pragma once

// The adapter parameters of one decoder layer and everything the optimizer keeps for them.
// Plain data: locking is the owner's job (see server/param_server.h).

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace meft::store {

// One fp32 parameter matrix [rows, dim] (row-major), its SparseAdam state, and a row-sparse
// gradient accumulator. Memory: 4 floats per parameter (param, exp_avg, exp_avg_sq, grad) plus a
// byte and at most an int32 per row.
struct ParamBlock {
  int64_t rows = 0;
  int64_t dim = 0;
  std::vector<float> param;
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  // Gradient accumulator. Row i is meaningful only while touched[i] != 0; the first
  // accumulation into a row of a step overwrites instead of adding, so rows are never zeroed.
  std::vector<float> grad;
  std::vector<uint8_t> touched;
  // Ids of the rows with touched[i] != 0, unique, in first-touch order.
  std::vector<int32_t> touched_rows;
  // SparseAdam's per-tensor step count: optimizer steps in which this block had a gradient.
  int64_t adam_step = 0;

  void Allocate(int64_t rows, int64_t dim);
  float* Row(int64_t i) { return param.data() + i * dim; }
  const float* Row(int64_t i) const { return param.data() + i * dim; }
  // Forgets the accumulated gradient (touched flags and list); O(touched rows).
  void ClearGrad();
};

enum class RouterInit {
  kMeanKeys,  // G_e = scale * mean of the keys of expert e
  kNormal,    // G ~ N(0, init_std)
};

struct InitOptions {
  uint64_t seed = 0;
  float init_std = 0.02f;  // std of the normal init of K (and of G with kNormal)
  RouterInit router_init = RouterInit::kMeanKeys;
  float router_scale = 50.0f;  // scale of the kMeanKeys router init
};

// Keys, values and router of one layer. rows = r, experts = E, r % E == 0; expert e owns the
// keys [e * rows_per_expert, (e + 1) * rows_per_expert).
struct LayerStore {
  uint32_t layer = 0;
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t experts = 0;
  int64_t rows_per_expert = 0;
  ParamBlock keys;
  ParamBlock values;
  ParamBlock router;
  // Optimizer steps applied to this layer.
  uint64_t step = 0;

  // Allocates and initialises per DESIGN §2: V = 0, K ~ N(0, init_std), router per `init`.
  // Deterministic for (seed, layer) whatever the number of threads. Parallel (oneTBB).
  static absl::StatusOr<LayerStore> Create(uint32_t layer, int64_t rows, int64_t dim,
                                           int64_t experts, const InitOptions& init);
};

// Test seam for allocation failure: the next `n` ParamBlock::Allocate calls succeed and the one
// after throws std::bad_alloc (then allocation works again); negative (the default) never fails.
void FailAllocationAfterForTesting(int64_t n);

// Default expert count for r rows: the divisor of r nearest 4 * ceil(sqrt(r)) (the larger on a
// tie). Precondition: rows > 0.
int64_t DefaultExperts(int64_t rows);

}  // namespace meft::store
