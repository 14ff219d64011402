// Benchmarks of the parameter server's hot paths (DESIGN §2), measured side by side in one run:
//   1. key-expert selection (routing::Select) against a brute-force scan (K x for every key and
//      token with the same SIMD kernel, then a per-token top-k) and against the E = 1 ablation;
//   2. |S| / (T * top_k) for random and for clustered inputs;
//   3. the lazy Adam step's memory throughput against a STREAM triad.
// A summary with the ratios is printed after the benchmarks. Targets are reported, never
// enforced. How to run it and what the numbers mean: bench/README.md.

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "param_server/kernels/dot.h"
#include "param_server/optim/sparse_adam.h"
#include "param_server/routing/selector.h"
#include "param_server/store/layer_store.h"
#include "tbb/blocked_range.h"
#include "tbb/blocked_range2d.h"
#include "tbb/info.h"
#include "tbb/parallel_for.h"

namespace meft::bench {
namespace {

// One layer as in the issue: d = 4096, a micro-batch of T = 512 tokens, top_k = 64, n_probe = 8.
constexpr int64_t kDim = 4096;
constexpr int64_t kTokens = 512;
constexpr int64_t kTopK = 64;
constexpr int64_t kProbe = 8;
constexpr int64_t kRowsSmall = 8464;   // 92^2; DefaultExperts gives 368
constexpr int64_t kRowsLarge = 32768;  // 2^15

// Clustered inputs: kSequences sequences of kTokens / kSequences tokens; each token is its
// sequence's centroid plus kClusterNoise times fresh N(0, 1) noise, scaled to RMS 1.
constexpr int64_t kSequences = 2;
constexpr float kClusterNoise = 0.3f;
enum InputKind : int64_t { kRandom = 0, kClustered = 1 };

// Blocking of the brute-force scan. A task is (token block, key block); inside it the kernel
// runs over token chunks against the same key block, so the key block (64 rows, 1 MiB) stays in
// a 2 MiB L2 while tokens stream past it. Chosen as the fastest of several blockings on the
// machine of README.md: 245 ms at r = 8464 on 2 threads, against 330 ms for the token-major
// 32 x 128 tiles Select uses for its scores.
constexpr int64_t kBruteTokenBlock = 256;
constexpr int64_t kBruteTokenChunk = 32;
constexpr int64_t kBruteKeyBlock = 64;

// Lazy Adam: an r x d block with kAdamTouched rows touched per step.
constexpr int64_t kAdamRows = 32768;
constexpr int64_t kAdamTouched = 2000;
constexpr double kAdamBytesPerParam = 28;  // read p, m, v, g (16 B); write p, m, v (12 B)
// STREAM triad a[i] = b[i] + s * c[i]: read b, c (8 B); write a (4 B). The write-allocate read
// of a (another 4 B on a write-back cache) is not counted, as in STREAM.
constexpr double kTriadBytesPerElement = 12;
// Elements per triad task: the Adam step's grain (16384 / d rows of d floats).
constexpr size_t kTriadGrain = 16384;
// Each triad array is at least this large, and the three together at least 4x the LLC.
constexpr size_t kTriadMinArrayBytes = size_t{64} << 20;
constexpr size_t kTriadMaxArrayBytes = size_t{1} << 30;

// ---------------------------------------------------------------------------------------------
// Shared inputs.

void Release(std::vector<float>& v) { std::vector<float>().swap(v); }

// Layer stores shared by the selection benchmarks, keyed by (rows, experts), created on first
// use with seed 1. Keys depend only on (seed, layer, row), so every E sees the same keys. Only
// keys and router are kept: Select reads nothing else, and the values and optimizer state are
// seven more r x d arrays (3.5 GiB at r = 32768).
std::map<std::pair<int64_t, int64_t>, std::unique_ptr<store::LayerStore>>& StoreCache() {
  static auto* cache =
      new std::map<std::pair<int64_t, int64_t>, std::unique_ptr<store::LayerStore>>;
  return *cache;
}

const store::LayerStore& GetStore(int64_t rows, int64_t experts) {
  std::unique_ptr<store::LayerStore>& slot = StoreCache()[{rows, experts}];
  if (slot == nullptr) {
    store::InitOptions init;
    init.seed = 1;
    absl::StatusOr<store::LayerStore> created =
        store::LayerStore::Create(0, rows, kDim, experts, init);
    if (!created.ok()) {
      std::fprintf(stderr, "LayerStore::Create(r=%lld, E=%lld): %s\n", static_cast<long long>(rows),
                   static_cast<long long>(experts), created.status().ToString().c_str());
      std::abort();
    }
    slot = std::make_unique<store::LayerStore>(*std::move(created));
    for (store::ParamBlock* block : {&slot->keys, &slot->values, &slot->router}) {
      Release(block->exp_avg);
      Release(block->exp_avg_sq);
      Release(block->grad);
    }
    Release(slot->values.param);
  }
  return *slot;
}

void ReleaseStores() { StoreCache().clear(); }

// T x d token matrix (row-major): kRandom is iid N(0, 1); kClustered as described above.
const std::vector<float>& Inputs(int64_t kind) {
  static auto* cache = new std::vector<float>[2];
  std::vector<float>& x = cache[kind];
  if (!x.empty()) return x;
  std::mt19937_64 rng(kind == kRandom ? 11 : 12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  x.resize(static_cast<size_t>(kTokens * kDim));
  if (kind == kRandom) {
    for (float& v : x) v = normal(rng);
    return x;
  }
  std::vector<float> centroids(static_cast<size_t>(kSequences * kDim));
  for (float& v : centroids) v = normal(rng);
  const int64_t per_sequence = kTokens / kSequences;
  for (int64_t t = 0; t < kTokens; ++t) {
    const float* c = centroids.data() + (t / per_sequence) * kDim;
    float* row = x.data() + t * kDim;
    double sum_sq = 0.0;
    for (int64_t j = 0; j < kDim; ++j) {
      row[j] = c[j] + kClusterNoise * normal(rng);
      sum_sq += double{row[j]} * row[j];
    }
    const float scale = static_cast<float>(1.0 / std::sqrt(sum_sq / kDim));
    for (int64_t j = 0; j < kDim; ++j) row[j] *= scale;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Brute-force baseline: every key against every token, no experts, no gate.

// Scores all `store.rows` keys against T tokens with `kernels.dot_tile`, parallel over
// (token block, key block), then keeps each token's top_k by (score desc, id asc), the ordering
// Select uses. The T x r score buffer is allocated (and its pages touched) once, in the
// constructor, which favours the baseline: Select allocates its buffers on every call.
class BruteForce {
 public:
  BruteForce(const store::LayerStore& store, const kernels::Kernels& kernels, int64_t num_tokens,
             int64_t top_k)
      : store_(store),
        kernels_(kernels),
        num_tokens_(num_tokens),
        top_k_(std::min(top_k, store.rows)),
        scores_(static_cast<size_t>(num_tokens * store.rows)),
        slots_(static_cast<size_t>(num_tokens * top_k_)) {}

  // Returns S (sorted, unique) for tokens x[num_tokens, d].
  std::vector<int32_t> Run(const float* x) {
    const int64_t num_tokens = num_tokens_;
    const int64_t r = store_.rows;
    const int64_t d = store_.dim;
    const int64_t k = top_k_;
    std::vector<const float*> a_rows(static_cast<size_t>(num_tokens));
    for (int64_t t = 0; t < num_tokens; ++t) a_rows[t] = x + t * d;

    tbb::parallel_for(
        tbb::blocked_range2d<int64_t>(0, num_tokens, kBruteTokenBlock, 0, r, kBruteKeyBlock),
        [&](const tbb::blocked_range2d<int64_t>& b) {
          const int64_t k0 = b.cols().begin();
          for (int64_t t0 = b.rows().begin(); t0 < b.rows().end(); t0 += kBruteTokenChunk) {
            kernels_.dot_tile(a_rows.data() + t0, std::min(kBruteTokenChunk, b.rows().end() - t0),
                              store_.keys.Row(k0), b.cols().size(), d, scores_.data() + t0 * r + k0,
                              r);
          }
        });

    tbb::parallel_for(
        tbb::blocked_range<int64_t>(0, num_tokens), [&](const tbb::blocked_range<int64_t>& b) {
          std::vector<int32_t> idx(static_cast<size_t>(r));
          for (int64_t t = b.begin(); t != b.end(); ++t) {
            const float* s = scores_.data() + t * r;
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [s](int32_t u, int32_t v) {
              return s[u] > s[v] || (s[u] == s[v] && u < v);
            });
            std::copy(idx.begin(), idx.begin() + k, slots_.begin() + t * k);
          }
        });

    std::vector<int32_t> rows(slots_.begin(), slots_.end());
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    return rows;
  }

 private:
  const store::LayerStore& store_;
  const kernels::Kernels& kernels_;
  const int64_t num_tokens_;
  const int64_t top_k_;
  std::vector<float> scores_;
  std::vector<int32_t> slots_;
};

// |S| and |S| / (T * top_k) of the last iteration.
void SetUnionCounters(benchmark::State& state, int64_t union_rows) {
  state.counters["S"] = static_cast<double>(union_rows);
  state.counters["S_ratio"] =
      static_cast<double>(union_rows) / static_cast<double>(kTokens * kTopK);
}

// ---------------------------------------------------------------------------------------------
// 1 + 2: selection.

// Key experts as designed: E = DefaultExperts(r), n_probe = 8, gated scores.
void BM_SelectKeyExperts(benchmark::State& state) {
  const int64_t rows = state.range(0);
  const int64_t experts = store::DefaultExperts(rows);
  const store::LayerStore& store = GetStore(rows, experts);
  const std::vector<float>& x = Inputs(state.range(1));
  routing::SelectorOptions options;
  options.n_probe = kProbe;
  options.top_k = kTopK;
  int64_t union_rows = 0;
  for (auto _ : state) {
    routing::Selection sel =
        routing::Select(store, x.data(), kTokens, nullptr, options, kernels::Best());
    union_rows = static_cast<int64_t>(sel.rows.size());
    benchmark::DoNotOptimize(sel.rows.data());
  }
  SetUnionCounters(state, union_rows);
  state.counters["E"] = static_cast<double>(experts);
}

// The "no experts" ablation (DESIGN §2): E = 1, n_probe = 1, so Select scores every key. Ungated:
// with one expert the gate is a per-token scalar that only rescales (or, when negative, inverts)
// the ranking.
void BM_SelectNoExperts(benchmark::State& state) {
  const int64_t rows = state.range(0);
  const store::LayerStore& store = GetStore(rows, 1);
  const std::vector<float>& x = Inputs(state.range(1));
  routing::SelectorOptions options;
  options.n_probe = 1;
  options.top_k = kTopK;
  options.gated = false;
  int64_t union_rows = 0;
  for (auto _ : state) {
    routing::Selection sel =
        routing::Select(store, x.data(), kTokens, nullptr, options, kernels::Best());
    union_rows = static_cast<int64_t>(sel.rows.size());
    benchmark::DoNotOptimize(sel.rows.data());
  }
  SetUnionCounters(state, union_rows);
}

void BM_BruteForceScan(benchmark::State& state) {
  const int64_t rows = state.range(0);
  // Any store of r rows has the same keys; reuse the key-experts one.
  const store::LayerStore& store = GetStore(rows, store::DefaultExperts(rows));
  const std::vector<float>& x = Inputs(state.range(1));
  BruteForce brute(store, kernels::Best(), kTokens, kTopK);
  int64_t union_rows = 0;
  for (auto _ : state) {
    std::vector<int32_t> s = brute.Run(x.data());
    union_rows = static_cast<int64_t>(s.size());
    benchmark::DoNotOptimize(s.data());
  }
  SetUnionCounters(state, union_rows);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * kTokens * rows * kDim * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

// ---------------------------------------------------------------------------------------------
// 3: lazy Adam against STREAM.

// One SparseAdamStep over range(1) touched rows of a range(0) x d block. Each iteration picks a
// fresh sorted set of distinct rows (as AccumulateRows leaves them for a sorted S) and copies
// gradient rows in; only the step itself is timed (manual time). The gradient rows were just
// written, as in a real step after accumulation and the norm, so they may be cache-warm.
void BM_SparseAdamStep(benchmark::State& state) {
  // The stores are not needed any more; give their memory back before allocating 2 GiB.
  ReleaseStores();
  const int64_t rows = state.range(0);
  const int64_t touched = state.range(1);
  store::ParamBlock block;
  block.Allocate(rows, kDim);
  std::vector<float> grads(static_cast<size_t>(touched * kDim));
  {
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& g : grads) g = normal(rng);
  }
  std::mt19937_64 rng(7);
  std::vector<int32_t> ids(static_cast<size_t>(rows));
  std::iota(ids.begin(), ids.end(), 0);
  const optim::AdamOptions options;
  int64_t updated = 0;
  for (auto _ : state) {
    for (int64_t i = 0; i < touched; ++i) {
      std::uniform_int_distribution<int64_t> pick(i, rows - 1);
      std::swap(ids[i], ids[pick(rng)]);
    }
    block.touched_rows.assign(ids.begin(), ids.begin() + touched);
    std::sort(block.touched_rows.begin(), block.touched_rows.end());
    for (int64_t i = 0; i < touched; ++i) {
      const int32_t row = block.touched_rows[i];
      block.touched[row] = 1;
      std::memcpy(block.grad.data() + int64_t{row} * kDim, grads.data() + i * kDim,
                  kDim * sizeof(float));
    }
    const auto start = std::chrono::steady_clock::now();
    updated += optim::SparseAdamStep(&block, 1e-3, 1.0, options);
    const auto stop = std::chrono::steady_clock::now();
    state.SetIterationTime(std::chrono::duration<double>(stop - start).count());
  }
  state.counters["touched_rows"] = static_cast<double>(touched);
  state.counters["bytes_per_iter"] = kAdamBytesPerParam * static_cast<double>(updated) * kDim /
                                     static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(
      kAdamBytesPerParam * static_cast<double>(updated) * kDim, benchmark::Counter::kIsRate);
}

// a[i] = b[i] + s * c[i] over range(0) floats per array, oneTBB-parallel with the Adam step's
// grain and partitioner. Arrays are first touched by the same parallel loop.
void BM_StreamTriad(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::unique_ptr<float[]> a(new float[n]);
  std::unique_ptr<float[]> b(new float[n]);
  std::unique_ptr<float[]> c(new float[n]);
  tbb::parallel_for(tbb::blocked_range<size_t>(0, n, kTriadGrain),
                    [&](const tbb::blocked_range<size_t>& r) {
                      for (size_t i = r.begin(); i != r.end(); ++i) {
                        a[i] = 0.0f;
                        b[i] = 1.0f;
                        c[i] = 2.0f;
                      }
                    });
  const float s = 3.0f;
  for (auto _ : state) {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, kTriadGrain),
                      [&](const tbb::blocked_range<size_t>& r) {
                        float* __restrict pa = a.get();
                        const float* __restrict pb = b.get();
                        const float* __restrict pc = c.get();
                        for (size_t i = r.begin(); i != r.end(); ++i) pa[i] = pb[i] + s * pc[i];
                      });
    benchmark::ClobberMemory();
  }
  state.counters["MiB_per_array"] = static_cast<double>(n * sizeof(float)) / (1 << 20);
  state.counters["bytes_per_iter"] = kTriadBytesPerElement * static_cast<double>(n);
  state.counters["GB/s"] = benchmark::Counter(
      kTriadBytesPerElement * static_cast<double>(n) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
}

// ---------------------------------------------------------------------------------------------
// Reporting.

// Forwards everything to the display reporter (which honours --benchmark_format) and keeps the
// mean real time (ms) and counters of each benchmark's iteration runs for the summary.
class CapturingReporter : public benchmark::BenchmarkReporter {
 public:
  struct Result {
    double ms = 0.0;      // mean real (or manual) time per iteration
    double cpu_ms = 0.0;  // mean CPU time of the benchmark's main thread per iteration
    int runs = 0;
    std::map<std::string, double> counters;  // of the last run
  };

  explicit CapturingReporter(benchmark::BenchmarkReporter* display) : display_(display) {}

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      Result& result = results_[run.run_name.function_name + "/" + run.run_name.args];
      const double ms = run.GetAdjustedRealTime() * ToMilliseconds(run.time_unit);
      const double cpu_ms = run.GetAdjustedCPUTime() * ToMilliseconds(run.time_unit);
      result.ms = (result.ms * result.runs + ms) / (result.runs + 1);
      result.cpu_ms = (result.cpu_ms * result.runs + cpu_ms) / (result.runs + 1);
      ++result.runs;
      for (const auto& [name, counter] : run.counters) result.counters[name] = counter.value;
    }
    display_->ReportRuns(runs);
  }

  void Finalize() override { display_->Finalize(); }

  // True when no benchmark ran (everything filtered out, or --benchmark_list_tests).
  bool empty() const { return results_.empty(); }

  // Null when the benchmark did not run (filtered out or failed).
  const Result* Find(const std::string& key) const {
    auto it = results_.find(key);
    return it == results_.end() ? nullptr : &it->second;
  }

 private:
  static double ToMilliseconds(benchmark::TimeUnit unit) {
    switch (unit) {
      case benchmark::kNanosecond:
        return 1e-6;
      case benchmark::kMicrosecond:
        return 1e-3;
      case benchmark::kMillisecond:
        return 1.0;
      case benchmark::kSecond:
        return 1e3;
    }
    return 1.0;
  }

  std::unique_ptr<benchmark::BenchmarkReporter> display_;
  std::map<std::string, Result> results_;
};

std::string SelectKey(const char* family, int64_t rows, int64_t kind) {
  return std::string(family) + "/r:" + std::to_string(rows) + "/clustered:" + std::to_string(kind);
}

std::string Fmt(const char* format, double value, bool present) {
  if (!present) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, value);
  return buf;
}

void PrintSummary(const CapturingReporter& results, int64_t triad_elements) {
  std::printf(
      "\n==== Summary: d=%lld T=%lld top_k=%lld n_probe=%lld, kernel %s, %d TBB threads ====\n",
      static_cast<long long>(kDim), static_cast<long long>(kTokens), static_cast<long long>(kTopK),
      static_cast<long long>(kProbe), std::string(kernels::Best().name).c_str(),
      tbb::info::default_concurrency());

  std::printf("\nSelection time per micro-batch (ms; random inputs unless noted)\n");
  std::printf("%-6s %-4s %10s %12s %9s %9s %13s %8s %4s %10s %10s\n", "r", "E", "key-exp",
              "key-exp(cl)", "E=1", "brute", "brute/keyexp", "target", "met", "FLOP-ratio",
              "brute/E=1");
  for (int64_t rows : {kRowsSmall, kRowsLarge}) {
    const auto* ke = results.Find(SelectKey("BM_SelectKeyExperts", rows, kRandom));
    const auto* ke_cl = results.Find(SelectKey("BM_SelectKeyExperts", rows, kClustered));
    const auto* e1 = results.Find(SelectKey("BM_SelectNoExperts", rows, kRandom));
    const auto* bf = results.Find(SelectKey("BM_BruteForceScan", rows, kRandom));
    const double target = rows == kRowsSmall ? 5.0 : 10.0;
    const bool have_speedup = ke != nullptr && bf != nullptr;
    const double speedup = have_speedup ? bf->ms / ke->ms : 0.0;
    // Multiply-adds per token: brute r * d; key experts (E + n_probe * r / E) * d.
    const int64_t experts = store::DefaultExperts(rows);
    const double flop_ratio =
        static_cast<double>(rows) / static_cast<double>(experts + kProbe * (rows / experts));
    std::printf("%-6lld %-4lld %10s %12s %9s %9s %13s %8s %4s %10s %10s\n",
                static_cast<long long>(rows), static_cast<long long>(experts),
                Fmt("%.2f", ke ? ke->ms : 0, ke).c_str(),
                Fmt("%.2f", ke_cl ? ke_cl->ms : 0, ke_cl).c_str(),
                Fmt("%.1f", e1 ? e1->ms : 0, e1).c_str(), Fmt("%.1f", bf ? bf->ms : 0, bf).c_str(),
                Fmt("%.1fx", speedup, have_speedup).c_str(), Fmt(">= %.0fx", target, true).c_str(),
                have_speedup ? (speedup >= target ? "yes" : "NO") : "n/a",
                Fmt("%.1fx", flop_ratio, true).c_str(),
                Fmt("%.2fx", (bf && e1) ? bf->ms / e1->ms : 0, bf && e1).c_str());
  }

  // The main thread works in every parallel loop of these benchmarks, so on idle cores its CPU
  // time is close to the real time. Much less means other processes took the cores.
  for (const char* family : {"BM_SelectKeyExperts", "BM_SelectNoExperts", "BM_BruteForceScan"}) {
    for (int64_t rows : {kRowsSmall, kRowsLarge}) {
      for (int64_t kind : {kRandom, kClustered}) {
        const auto* res = results.Find(SelectKey(family, rows, kind));
        if (res != nullptr && res->cpu_ms < 0.85 * res->ms) {
          std::printf(
              "warning: %s ran with main-thread CPU time at %.0f%% of real time: other "
              "processes competed for the cores; its time and ratios are not valid.\n",
              SelectKey(family, rows, kind).c_str(), 100.0 * res->cpu_ms / res->ms);
        }
      }
    }
  }

  std::printf("\n|S| / (T*top_k)  (T*top_k = %lld)\n", static_cast<long long>(kTokens * kTopK));
  std::printf("%-6s %16s %16s %16s %16s\n", "r", "key-exp random", "key-exp cluster",
              "brute random", "brute cluster");
  for (int64_t rows : {kRowsSmall, kRowsLarge}) {
    auto ratio = [&](const char* family, int64_t kind) {
      const auto* res = results.Find(SelectKey(family, rows, kind));
      if (res == nullptr) return std::string("n/a");
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.3f (%.0f)", res->counters.at("S_ratio"),
                    res->counters.at("S"));
      return std::string(buf);
    };
    std::printf("%-6lld %16s %16s %16s %16s\n", static_cast<long long>(rows),
                ratio("BM_SelectKeyExperts", kRandom).c_str(),
                ratio("BM_SelectKeyExperts", kClustered).c_str(),
                ratio("BM_BruteForceScan", kRandom).c_str(),
                ratio("BM_BruteForceScan", kClustered).c_str());
  }

  const auto* adam = results.Find("BM_SparseAdamStep/r:" + std::to_string(kAdamRows) +
                                  "/touched:" + std::to_string(kAdamTouched));
  const auto* triad = results.Find("BM_StreamTriad/elements:" + std::to_string(triad_elements));
  auto gbps = [](const CapturingReporter::Result* r) {
    return r == nullptr ? 0.0 : r->counters.at("bytes_per_iter") / (r->ms * 1e-3) / 1e9;
  };
  std::printf("\nLazy Adam vs STREAM triad (GB/s = 1e9 B/s)\n");
  std::printf(
      "  SparseAdamStep r=%lld d=%lld, %lld touched rows, 28 B/param: %s ms/step, %s GB/s\n",
      static_cast<long long>(kAdamRows), static_cast<long long>(kDim),
      static_cast<long long>(kAdamTouched), Fmt("%.2f", adam ? adam->ms : 0, adam).c_str(),
      Fmt("%.2f", gbps(adam), adam).c_str());
  std::printf("  STREAM triad, 12 B/element (write-allocate not counted): %s GB/s\n",
              Fmt("%.2f", gbps(triad), triad).c_str());
  const bool have_ratio = adam != nullptr && triad != nullptr;
  const double pct = have_ratio ? 100.0 * gbps(adam) / gbps(triad) : 0.0;
  std::printf("  Adam / triad: %s (target >= 60%%: %s)\n", Fmt("%.0f%%", pct, have_ratio).c_str(),
              have_ratio ? (pct >= 60.0 ? "met" : "NOT met") : "n/a");
}

// Floats per triad array: at least 64 MiB, and 3 arrays >= 4x the last-level cache, capped at
// 1 GiB per array.
int64_t TriadElements() {
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  size_t bytes = kTriadMinArrayBytes;
  if (llc > 0) bytes = std::max(bytes, (4 * static_cast<size_t>(llc) + 2) / 3);
  bytes = std::min(bytes, kTriadMaxArrayBytes);
  bytes = (bytes + (size_t{1} << 20) - 1) & ~((size_t{1} << 20) - 1);  // whole MiB
  return static_cast<int64_t>(bytes / sizeof(float));
}

std::string CpuModel() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

// Iteration counts keep the whole run near two minutes on 2 cores (README.md).
void RegisterAll(int64_t triad_elements) {
  benchmark::RegisterBenchmark("BM_SelectKeyExperts", BM_SelectKeyExperts)
      ->ArgNames({"r", "clustered"})
      ->Args({kRowsSmall, kRandom})
      ->Args({kRowsSmall, kClustered})
      ->Args({kRowsLarge, kRandom})
      ->Args({kRowsLarge, kClustered})
      ->Iterations(20)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("BM_SelectNoExperts", BM_SelectNoExperts)
      ->ArgNames({"r", "clustered"})
      ->Args({kRowsSmall, kRandom})
      ->Args({kRowsLarge, kRandom})
      ->Iterations(3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("BM_BruteForceScan", BM_BruteForceScan)
      ->ArgNames({"r", "clustered"})
      ->Args({kRowsSmall, kRandom})
      ->Args({kRowsSmall, kClustered})
      ->Args({kRowsLarge, kRandom})
      ->Args({kRowsLarge, kClustered})
      ->Iterations(3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("BM_SparseAdamStep", BM_SparseAdamStep)
      ->ArgNames({"r", "touched"})
      ->Args({kAdamRows, kAdamTouched})
      ->Iterations(30)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  benchmark::RegisterBenchmark("BM_StreamTriad", BM_StreamTriad)
      ->ArgNames({"elements"})
      ->Arg(triad_elements)
      ->Iterations(10)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace
}  // namespace meft::bench

int main(int argc, char** argv) {
  namespace bench = meft::bench;
  namespace kernels = meft::kernels;
  namespace store = meft::store;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const int64_t triad_elements = bench::TriadElements();
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  std::printf("CPU: %s; LLC (sysconf): %.0f MiB\n", bench::CpuModel().c_str(),
              llc > 0 ? static_cast<double>(llc) / (1 << 20) : 0.0);
  std::printf("Dot kernel ISA: %s\n", std::string(kernels::Best().name).c_str());
  std::printf("TBB threads: %d\n", tbb::info::default_concurrency());
  std::printf("BLAS: not used (selection uses meft's own SIMD kernels)\n");
  for (int64_t rows : {bench::kRowsSmall, bench::kRowsLarge}) {
    std::printf("r=%lld: DefaultExperts=%lld (%lld keys per expert; 4*ceil(sqrt(r)) = %lld)\n",
                static_cast<long long>(rows), static_cast<long long>(store::DefaultExperts(rows)),
                static_cast<long long>(rows / store::DefaultExperts(rows)),
                static_cast<long long>(
                    4 * static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(rows))))));
  }
  std::printf("STREAM triad: 3 arrays of %lld MiB\n\n",
              static_cast<long long>(triad_elements * static_cast<int64_t>(sizeof(float)) >> 20));
  std::fflush(stdout);

  bench::RegisterAll(triad_elements);
  bench::CapturingReporter reporter(benchmark::CreateDefaultDisplayReporter());
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::fflush(stdout);
  if (!reporter.empty()) bench::PrintSummary(reporter, triad_elements);
  benchmark::Shutdown();
  return 0;
}
