#pragma once

// Row-sparse gradient accumulation and the lazy Adam step over touched rows.

#include <cstdint>
#include <span>

#include "param_server/store/layer_store.h"

namespace meft::optim {

struct AdamOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  // Decoupled (AdamW-style) weight decay, applied to touched rows only: p *= 1 - lr * wd.
  double weight_decay = 0.0;
};

// Adds grads[i] (row i of a [rows.size(), block.dim] matrix) into the accumulator row rows[i].
// The first gradient of a row in a step overwrites, later ones add. Preconditions: rows unique
// and < block.rows. Parallel; not thread-safe against other writers of `block`.
void AccumulateRows(store::ParamBlock* block, std::span<const int32_t> rows, const float* grads);

// Adds to accumulator row rows[i] the sum over j in [offsets[i], offsets[i+1]) of
// coeffs[j] * x[tokens[j]] (x is [T, block.dim]). Used for the router: dG_e = sum_t dg_t[e] x_t.
// Preconditions: rows unique; offsets.size() == rows.size() + 1.
void AccumulateOuter(store::ParamBlock* block, std::span<const int32_t> rows,
                     std::span<const int64_t> offsets, std::span<const int32_t> tokens,
                     std::span<const float> coeffs, const float* x);

// Sum of squares of the accumulated gradient (touched rows), in double; deterministic.
double SquaredNorm(const store::ParamBlock& block);

// One torch.optim.SparseAdam step over the touched rows, with the gradient scaled by
// `clip_factor` first and optional decoupled weight decay; then clears the gradient. Follows
// SparseAdam's arithmetic: per-tensor step count (incremented only when some row is touched),
// bias corrections 1 - beta^step, step_size = lr * sqrt(bc2) / bc1, all element math in fp32.
// Returns the number of rows updated. Parallel.
int64_t SparseAdamStep(store::ParamBlock* block, double lr, double clip_factor,
                       const AdamOptions& options);

}  // namespace meft::optim
