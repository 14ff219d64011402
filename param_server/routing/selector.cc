#include "param_server/routing/selector.h"

#include <algorithm>
#include <numeric>

#include "tbb/blocked_range.h"
#include "tbb/blocked_range2d.h"
#include "tbb/parallel_for.h"

namespace meft::routing {
namespace {

// Token and key chunk sizes of one scoring task: big enough to amortise the task, small
// enough that the key chunk stays in L2 while the token chunk streams over it.
constexpr int64_t kTokenChunk = 32;
constexpr int64_t kKeyChunk = 128;

// Higher score first, then lower id: the one ordering used for experts and keys everywhere.
inline bool Better(float score_a, int32_t id_a, float score_b, int32_t id_b) {
  return score_a > score_b || (score_a == score_b && id_a < id_b);
}

// Fills slot_pos from slot_rows and `rows`, clearing slots whose row is not in `rows`, and
// recomputes `experts`.
void FinishSlots(Selection* sel) {
  const int64_t n = static_cast<int64_t>(sel->slot_rows.size());
  std::vector<uint8_t> expert_used(sel->expert_load.size(), 0);
  for (int64_t s = 0; s < n; ++s) {
    const int32_t row = sel->slot_rows[s];
    if (row < 0) continue;
    auto it = std::lower_bound(sel->rows.begin(), sel->rows.end(), row);
    if (it == sel->rows.end() || *it != row) {
      sel->slot_rows[s] = -1;
      sel->slot_pos[s] = -1;
      sel->slot_experts[s] = -1;
      sel->slot_gates[s] = 0.0f;
      continue;
    }
    sel->slot_pos[s] = static_cast<int32_t>(it - sel->rows.begin());
    expert_used[sel->slot_experts[s]] = 1;
  }
  sel->experts.clear();
  for (size_t e = 0; e < expert_used.size(); ++e) {
    if (expert_used[e]) sel->experts.push_back(static_cast<int32_t>(e));
  }
}

}  // namespace

void ApplyRowCap(int64_t max_rows, Selection* sel) {
  if (max_rows <= 0 || static_cast<int64_t>(sel->rows.size()) <= max_rows) return;
  // Count the tokens that chose each row of S.
  std::vector<int32_t> counts(sel->rows.size(), 0);
  for (int32_t row : sel->slot_rows) {
    if (row < 0) continue;
    auto it = std::lower_bound(sel->rows.begin(), sel->rows.end(), row);
    ++counts[it - sel->rows.begin()];
  }
  std::vector<int32_t> order(sel->rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return counts[a] > counts[b]; });
  std::vector<int32_t> kept;
  kept.reserve(static_cast<size_t>(max_rows));
  for (int64_t i = 0; i < max_rows; ++i) kept.push_back(sel->rows[order[i]]);
  std::sort(kept.begin(), kept.end());
  sel->rows_dropped = static_cast<int64_t>(sel->rows.size()) - max_rows;
  sel->rows = std::move(kept);
  FinishSlots(sel);
}

Selection Select(const store::LayerStore& store, const float* x, int64_t num_tokens,
                 const uint8_t* mask, const SelectorOptions& options,
                 const kernels::Kernels& kernels) {
  const int64_t d = store.dim;
  const int64_t num_experts = store.experts;
  const int64_t nk = store.rows_per_expert;
  const int64_t n_probe = std::min(options.n_probe, num_experts);
  const int64_t top_k = options.top_k;
  const int64_t n_cand = n_probe * nk;
  const int64_t k_eff = std::min(top_k, n_cand);

  Selection sel;
  sel.num_tokens = num_tokens;
  sel.top_k = top_k;
  const size_t n_slots = static_cast<size_t>(num_tokens * top_k);
  sel.slot_rows.assign(n_slots, -1);
  sel.slot_pos.assign(n_slots, -1);
  sel.slot_experts.assign(n_slots, -1);
  sel.slot_gates.assign(n_slots, 0.0f);
  sel.expert_load.assign(static_cast<size_t>(num_experts), 0);

  // Real tokens only; everything below is indexed by a = 0..n_active-1.
  std::vector<int64_t> active;
  active.reserve(static_cast<size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (mask == nullptr || mask[t] != 0) active.push_back(t);
  }
  const int64_t n_active = static_cast<int64_t>(active.size());
  if (n_active == 0) return sel;
  std::vector<const float*> a_rows(static_cast<size_t>(n_active));
  for (int64_t a = 0; a < n_active; ++a) a_rows[a] = x + active[a] * d;

  // Step 1: gate scores g = G x for every real token, blocked over tokens and experts.
  std::vector<float> gates(static_cast<size_t>(n_active * num_experts));
  tbb::parallel_for(
      tbb::blocked_range2d<int64_t>(0, n_active, kTokenChunk, 0, num_experts, kKeyChunk),
      [&](const tbb::blocked_range2d<int64_t>& r) {
        const int64_t a0 = r.rows().begin();
        const int64_t e0 = r.cols().begin();
        kernels.dot_tile(a_rows.data() + a0, r.rows().size(), store.router.Row(e0), r.cols().size(),
                         d, gates.data() + a0 * num_experts + e0, num_experts);
      });

  // Step 2: the n_probe best experts of each token.
  std::vector<int32_t> probe(static_cast<size_t>(n_active * n_probe));
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, n_active), [&](const tbb::blocked_range<int64_t>& r) {
        std::vector<int32_t> ids(static_cast<size_t>(num_experts));
        for (int64_t a = r.begin(); a != r.end(); ++a) {
          const float* g = gates.data() + a * num_experts;
          std::iota(ids.begin(), ids.end(), 0);
          std::partial_sort(ids.begin(), ids.begin() + n_probe, ids.end(),
                            [g](int32_t p, int32_t q) { return Better(g[p], p, g[q], q); });
          std::copy(ids.begin(), ids.begin() + n_probe, probe.begin() + a * n_probe);
        }
      });

  // Bucket tokens by expert: for expert e, the (token, probe slot) pairs that chose it.
  std::vector<int64_t> bucket_start(static_cast<size_t>(num_experts + 1), 0);
  for (int32_t e : probe) ++bucket_start[e + 1];
  for (int64_t e = 0; e < num_experts; ++e) {
    sel.expert_load[e] = static_cast<int32_t>(bucket_start[e + 1]);
    bucket_start[e + 1] += bucket_start[e];
  }
  std::vector<int64_t> bucket(probe.size());  // entries: a * n_probe + p
  {
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (int64_t i = 0; i < static_cast<int64_t>(probe.size()); ++i) bucket[fill[probe[i]]++] = i;
  }

  // Step 3: candidate scores, only for keys of probed experts. Tasks are (expert, token chunk,
  // key chunk) so a single large expert (E = 1, the brute-force ablation) still parallelises.
  struct Task {
    int32_t expert;
    int64_t begin, end;          // range in bucket
    int64_t key_begin, key_end;  // key range inside the expert
  };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t b = bucket_start[e]; b < bucket_start[e + 1]; b += kTokenChunk) {
      for (int64_t k = 0; k < nk; k += kKeyChunk) {
        tasks.push_back({static_cast<int32_t>(e), b, std::min(b + kTokenChunk, bucket_start[e + 1]),
                         k, std::min(k + kKeyChunk, nk)});
      }
    }
  }
  std::vector<float> cand(static_cast<size_t>(n_active * n_cand));
  tbb::parallel_for(tbb::blocked_range<size_t>(0, tasks.size(), 1),
                    [&](const tbb::blocked_range<size_t>& r) {
                      std::vector<const float*> rows_a;
                      std::vector<float> scores;
                      for (size_t ti = r.begin(); ti != r.end(); ++ti) {
                        const Task& task = tasks[ti];
                        const int64_t na = task.end - task.begin;
                        const int64_t nb = task.key_end - task.key_begin;
                        rows_a.resize(static_cast<size_t>(na));
                        for (int64_t i = 0; i < na; ++i)
                          rows_a[i] = a_rows[bucket[task.begin + i] / n_probe];
                        scores.resize(static_cast<size_t>(na * nb));
                        kernels.dot_tile(rows_a.data(), na,
                                         store.keys.Row(int64_t{task.expert} * nk + task.key_begin),
                                         nb, d, scores.data(), nb);
                        for (int64_t i = 0; i < na; ++i) {
                          const int64_t entry = bucket[task.begin + i];
                          const int64_t a = entry / n_probe;
                          const int64_t p = entry % n_probe;
                          const float g = gates[a * num_experts + task.expert];
                          float* dst = cand.data() + a * n_cand + p * nk + task.key_begin;
                          for (int64_t j = 0; j < nb; ++j)
                            dst[j] = options.gated ? g * scores[i * nb + j] : scores[i * nb + j];
                        }
                      }
                    });

  // Step 4: each token's top_k candidates.
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, n_active), [&](const tbb::blocked_range<int64_t>& r) {
        std::vector<int32_t> idx(static_cast<size_t>(n_cand));
        std::vector<int32_t> ids(static_cast<size_t>(n_cand));
        for (int64_t a = r.begin(); a != r.end(); ++a) {
          const float* c = cand.data() + a * n_cand;
          for (int64_t p = 0; p < n_probe; ++p) {
            const int32_t base = probe[a * n_probe + p] * static_cast<int32_t>(nk);
            for (int64_t j = 0; j < nk; ++j) ids[p * nk + j] = base + static_cast<int32_t>(j);
          }
          std::iota(idx.begin(), idx.end(), 0);
          std::partial_sort(idx.begin(), idx.begin() + k_eff, idx.end(), [&](int32_t u, int32_t v) {
            return Better(c[u], ids[u], c[v], ids[v]);
          });
          const int64_t t = active[a];
          for (int64_t j = 0; j < k_eff; ++j) {
            const int32_t ci = idx[j];
            const int64_t slot = t * top_k + j;
            const int32_t expert = probe[a * n_probe + ci / nk];
            sel.slot_rows[slot] = ids[ci];
            sel.slot_experts[slot] = expert;
            sel.slot_gates[slot] = options.gated ? gates[a * num_experts + expert] : 1.0f;
          }
        }
      });

  // Step 5: S = sorted union, then the max_rows cap.
  sel.rows.reserve(static_cast<size_t>(n_active * k_eff));
  for (int32_t row : sel.slot_rows) {
    if (row >= 0) sel.rows.push_back(row);
  }
  std::sort(sel.rows.begin(), sel.rows.end());
  sel.rows.erase(std::unique(sel.rows.begin(), sel.rows.end()), sel.rows.end());
  if (options.max_rows > 0 && static_cast<int64_t>(sel.rows.size()) > options.max_rows) {
    ApplyRowCap(options.max_rows, &sel);
  } else {
    FinishSlots(&sel);
  }
  return sel;
}

}  // namespace meft::routing
