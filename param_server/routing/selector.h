#pragma once

// Row selection for one layer and one micro-batch (DESIGN §2, steps 1-5).

#include <cstdint>
#include <vector>

#include "param_server/kernels/dot.h"
#include "param_server/store/layer_store.h"

namespace meft::routing {

struct SelectorOptions {
  int64_t n_probe = 8;   // experts probed per token (clamped to E)
  int64_t top_k = 64;    // keys selected per token
  bool gated = true;     // score s_ti = g_t[e(i)] * (k_i . x_t); else k_i . x_t
  int64_t max_rows = 0;  // cap on |S|; 0 = no cap
};

// The outcome of one lookup. "Slots" are the top_k selections of each token, in order of
// decreasing score (ties: lower row id first); arrays of slots are [T, top_k] row-major.
struct Selection {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  // S: sorted, unique row ids.
  std::vector<int32_t> rows;
  // Per slot: the row id, its position in `rows`, its expert and its gate value g_t[e(i)]
  // (1 when ungated). Empty slots (padding, too few candidates, dropped by the cap) hold
  // row = pos = expert = -1 and gate 0.
  std::vector<int32_t> slot_rows;
  std::vector<int32_t> slot_pos;
  std::vector<int32_t> slot_experts;
  std::vector<float> slot_gates;
  // Sorted ids of the experts of every non-empty slot.
  std::vector<int32_t> experts;
  // Tokens that probed each expert (size E); for load statistics.
  std::vector<int32_t> expert_load;
  // Rows the max_rows cap removed.
  int64_t rows_dropped = 0;
};

// Selects rows for tokens x[T, dim] (row-major). `mask` is null (all tokens real) or T bytes,
// nonzero for real tokens; padding tokens get only empty slots. Only the keys of probed
// experts are multiplied. Parallel (oneTBB); deterministic whatever the thread count.
// Preconditions: store dims match, options positive. Thread-safe for concurrent calls on a
// store nobody writes.
Selection Select(const store::LayerStore& store, const float* x, int64_t num_tokens,
                 const uint8_t* mask, const SelectorOptions& options,
                 const kernels::Kernels& kernels);

// Keeps the `max_rows` rows chosen by the most tokens (ties: lower id), clears the slots of the
// others, recomputes rows/slot_pos/experts. Exposed for tests; Select calls it.
void ApplyRowCap(int64_t max_rows, Selection* selection);

}  // namespace meft::routing
