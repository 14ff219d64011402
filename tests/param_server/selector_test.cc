#include "param_server/routing/selector.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <numeric>
#include <random>

#include "gtest/gtest.h"

namespace meft::routing {
namespace {

using store::LayerStore;

// The slow, obvious selection of DESIGN §2: every token scores every expert and every key
// (dense scan), masks keys outside its probed experts, fully sorts, then the union and the cap
// by full sorts. Uses the kernels' single Dot, which DotTile matches bit for bit.
Selection ReferenceSelect(const LayerStore& s, const float* x, int64_t T, const uint8_t* mask,
                          const SelectorOptions& o, const kernels::Kernels& k) {
  const int64_t E = s.experts, nk = s.rows_per_expert, d = s.dim;
  const int64_t n_probe = std::min(o.n_probe, E);
  Selection sel;
  sel.num_tokens = T;
  sel.top_k = o.top_k;
  sel.slot_rows.assign(T * o.top_k, -1);
  sel.slot_pos.assign(T * o.top_k, -1);
  sel.slot_experts.assign(T * o.top_k, -1);
  sel.slot_gates.assign(T * o.top_k, 0.0f);
  sel.expert_load.assign(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (mask && !mask[t]) continue;
    const float* xt = x + t * d;
    std::vector<float> gate(E);
    for (int64_t e = 0; e < E; ++e) gate[e] = k.dot(xt, s.router.Row(e), d);
    std::vector<int32_t> experts(E);
    std::iota(experts.begin(), experts.end(), 0);
    std::sort(experts.begin(), experts.end(),
              [&](int32_t a, int32_t b) { return gate[a] != gate[b] ? gate[a] > gate[b] : a < b; });
    std::vector<bool> probed(E, false);
    for (int64_t p = 0; p < n_probe; ++p) {
      probed[experts[p]] = true;
      ++sel.expert_load[experts[p]];
    }
    std::vector<float> score(s.rows);
    std::vector<int32_t> cand;
    for (int64_t i = 0; i < s.rows; ++i) {
      const float dot = k.dot(xt, s.keys.Row(i), d);
      score[i] = o.gated ? gate[i / nk] * dot : dot;
      if (probed[i / nk]) cand.push_back(static_cast<int32_t>(i));
    }
    std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) {
      return score[a] != score[b] ? score[a] > score[b] : a < b;
    });
    for (int64_t j = 0; j < std::min<int64_t>(o.top_k, cand.size()); ++j) {
      const int64_t slot = t * o.top_k + j;
      sel.slot_rows[slot] = cand[j];
      sel.slot_experts[slot] = static_cast<int32_t>(cand[j] / nk);
      sel.slot_gates[slot] = o.gated ? gate[cand[j] / nk] : 1.0f;
    }
  }
  std::map<int32_t, int> count;
  for (int32_t r : sel.slot_rows) {
    if (r >= 0) ++count[r];
  }
  std::vector<int32_t> rows;
  for (const auto& [r, c] : count) rows.push_back(r);
  if (o.max_rows > 0 && static_cast<int64_t>(rows.size()) > o.max_rows) {
    std::sort(rows.begin(), rows.end(), [&](int32_t a, int32_t b) {
      return count[a] != count[b] ? count[a] > count[b] : a < b;
    });
    sel.rows_dropped = static_cast<int64_t>(rows.size()) - o.max_rows;
    rows.resize(o.max_rows);
    std::sort(rows.begin(), rows.end());
  }
  sel.rows = rows;
  std::vector<bool> used(E, false);
  for (size_t slot = 0; slot < sel.slot_rows.size(); ++slot) {
    const int32_t r = sel.slot_rows[slot];
    if (r < 0) continue;
    auto it = std::find(rows.begin(), rows.end(), r);
    if (it == rows.end()) {
      sel.slot_rows[slot] = sel.slot_experts[slot] = -1;
      sel.slot_gates[slot] = 0.0f;
      continue;
    }
    sel.slot_pos[slot] = static_cast<int32_t>(it - rows.begin());
    used[sel.slot_experts[slot]] = true;
  }
  for (int64_t e = 0; e < E; ++e) {
    if (used[e]) sel.experts.push_back(static_cast<int32_t>(e));
  }
  return sel;
}

void ExpectSame(const Selection& got, const Selection& want) {
  EXPECT_EQ(got.rows, want.rows);
  EXPECT_EQ(got.slot_rows, want.slot_rows);
  EXPECT_EQ(got.slot_pos, want.slot_pos);
  EXPECT_EQ(got.slot_experts, want.slot_experts);
  EXPECT_EQ(got.slot_gates, want.slot_gates);
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_EQ(got.expert_load, want.expert_load);
  EXPECT_EQ(got.rows_dropped, want.rows_dropped);
}

std::vector<float> RandomTokens(int64_t T, int64_t d, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d);
  for (auto& v : x) v = normal(rng);
  return x;
}

TEST(SelectorTest, EqualsDenseReferenceOnRandomShapes) {
  std::mt19937 rng(42);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int cases = 0;
  for (kernels::Isa isa : {kernels::Isa::kGeneric, kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
    if (!kernels::IsaSupported(isa)) continue;
    const kernels::Kernels& k = kernels::ForIsa(isa);
    for (int trial = 0; trial < 40; ++trial) {
      const int64_t E = uniform(1, 12);
      const int64_t nk = uniform(1, 40);
      const int64_t d = uniform(1, 70);
      const int64_t T = uniform(1, 40);
      store::InitOptions init;
      init.seed = static_cast<uint64_t>(trial);
      init.router_init = trial % 3 == 0 ? store::RouterInit::kNormal : store::RouterInit::kMeanKeys;
      auto s = LayerStore::Create(0, E * nk, d, E, init);
      ASSERT_TRUE(s.ok());
      const std::vector<float> x = RandomTokens(T, d, rng);
      std::vector<uint8_t> mask(T);
      for (auto& m : mask) m = uniform(0, 4) != 0;
      SelectorOptions o;
      o.n_probe = uniform(1, static_cast<int>(E) + 2);  // sometimes more than E
      o.top_k = uniform(1, 80);                         // sometimes more than the candidates
      o.gated = trial % 2 == 0;
      o.max_rows = trial % 4 == 1 ? uniform(1, 30) : 0;
      const bool use_mask = trial % 3 != 2;
      const uint8_t* m = use_mask ? mask.data() : nullptr;
      SCOPED_TRACE(testing::Message() << k.name << " E=" << E << " nk=" << nk << " d=" << d << " T="
                                      << T << " n_probe=" << o.n_probe << " top_k=" << o.top_k
                                      << " gated=" << o.gated << " max_rows=" << o.max_rows);
      ExpectSame(Select(*s, x.data(), T, m, o, k), ReferenceSelect(*s, x.data(), T, m, o, k));
      ++cases;
    }
  }
  EXPECT_GE(cases, 40);
}

TEST(SelectorTest, EqualsDenseReferenceOnLargeExpertsAndManyExperts) {
  // Shapes that cross the selector's blocking: experts with more keys than one key chunk (128),
  // more experts than one gate block, more tokens than one token chunk (32), and E = 1.
  std::mt19937 rng(77);
  struct Shape {
    int64_t experts, keys_per_expert, d, tokens, n_probe, top_k;
    bool gated;
  };
  for (const Shape& sh : {Shape{1, 300, 20, 40, 1, 17, false}, Shape{2, 260, 9, 70, 2, 64, true},
                          Shape{150, 2, 16, 37, 5, 6, true}, Shape{300, 1, 5, 65, 8, 4, false}}) {
    SCOPED_TRACE(testing::Message() << "E=" << sh.experts << " nk=" << sh.keys_per_expert);
    store::InitOptions init;
    init.router_init = store::RouterInit::kNormal;
    auto s = LayerStore::Create(0, sh.experts * sh.keys_per_expert, sh.d, sh.experts, init);
    ASSERT_TRUE(s.ok());
    const std::vector<float> x = RandomTokens(sh.tokens, sh.d, rng);
    SelectorOptions o;
    o.n_probe = sh.n_probe;
    o.top_k = sh.top_k;
    o.gated = sh.gated;
    o.max_rows = 50;
    ExpectSame(Select(*s, x.data(), sh.tokens, nullptr, o, kernels::Best()),
               ReferenceSelect(*s, x.data(), sh.tokens, nullptr, o, kernels::Best()));
  }
}

TEST(SelectorTest, TiesBreakTowardLowerIds) {
  // All keys equal and all router rows equal: every score ties, so each token must take the
  // lowest-numbered experts and, within them, the lowest-numbered keys.
  auto s = LayerStore::Create(0, 40, 8, 5, {});
  ASSERT_TRUE(s.ok());
  for (int64_t i = 0; i < 40; ++i) std::fill_n(s->keys.Row(i), 8, 0.5f);
  for (int64_t e = 0; e < 5; ++e) std::fill_n(s->router.Row(e), 8, 1.0f);
  std::vector<float> x(3 * 8, 1.0f);
  SelectorOptions o;
  o.n_probe = 2;
  o.top_k = 10;
  const Selection sel = Select(*s, x.data(), 3, nullptr, o, kernels::Best());
  for (int64_t t = 0; t < 3; ++t) {
    for (int64_t j = 0; j < 10; ++j) EXPECT_EQ(sel.slot_rows[t * 10 + j], j);  // experts 0 and 1
  }
  std::vector<int32_t> want(10);
  std::iota(want.begin(), want.end(), 0);
  EXPECT_EQ(sel.rows, want);
  EXPECT_EQ(sel.experts, (std::vector<int32_t>{0, 1}));
}

TEST(SelectorTest, PaddingNeverSelects) {
  auto s = LayerStore::Create(0, 64, 16, 8, {});
  std::mt19937 rng(3);
  const std::vector<float> x = RandomTokens(4, 16, rng);
  const std::vector<uint8_t> mask = {1, 0, 0, 1};
  SelectorOptions o;
  o.n_probe = 2;
  o.top_k = 4;
  const Selection sel = Select(*s, x.data(), 4, mask.data(), o, kernels::Best());
  for (int64_t t : {1, 2}) {
    for (int64_t j = 0; j < 4; ++j) {
      EXPECT_EQ(sel.slot_rows[t * 4 + j], -1);
      EXPECT_EQ(sel.slot_pos[t * 4 + j], -1);
      EXPECT_EQ(sel.slot_gates[t * 4 + j], 0.0f);
    }
  }
  // The rows of S are exactly those of the two real tokens.
  const Selection only_real = Select(*s, x.data(), 4, mask.data(), o, kernels::Best());
  std::vector<float> real(x.begin(), x.begin() + 16);
  real.insert(real.end(), x.begin() + 48, x.end());
  const Selection two = Select(*s, real.data(), 2, nullptr, o, kernels::Best());
  EXPECT_EQ(only_real.rows, two.rows);
  const std::vector<uint8_t> none = {0, 0, 0, 0};
  EXPECT_TRUE(Select(*s, x.data(), 4, none.data(), o, kernels::Best()).rows.empty());
}

TEST(SelectorTest, RowCapKeepsRowsChosenByMostTokensNotLowestIds) {
  Selection sel;
  sel.num_tokens = 3;
  sel.top_k = 2;
  sel.expert_load = {0, 0, 0, 0};
  // Row 1 is chosen once, row 7 three times, row 9 twice.
  sel.slot_rows = {1, 7, 7, 9, 7, 9};
  sel.slot_experts = {0, 3, 3, 3, 3, 3};
  sel.slot_gates = {1, 2, 2, 3, 2, 3};
  sel.slot_pos.assign(6, -1);
  sel.rows = {1, 7, 9};
  ApplyRowCap(2, &sel);
  EXPECT_EQ(sel.rows, (std::vector<int32_t>{7, 9}));
  EXPECT_EQ(sel.rows_dropped, 1);
  EXPECT_EQ(sel.slot_rows, (std::vector<int32_t>{-1, 7, 7, 9, 7, 9}));
  EXPECT_EQ(sel.slot_pos, (std::vector<int32_t>{-1, 0, 0, 1, 0, 1}));
  EXPECT_EQ(sel.slot_gates[0], 0.0f);
  EXPECT_EQ(sel.experts, (std::vector<int32_t>{3}));
}

// A kernel table that counts dot products against keys and against router rows, to prove that
// only candidate keys are multiplied (no full K x scan).
struct Counting {
  static inline const LayerStore* store = nullptr;
  static inline std::atomic<int64_t> key_dots{0};
  static inline std::atomic<int64_t> router_dots{0};
  static void Tile(const float* const* a, int64_t na, const float* b, int64_t nb, int64_t d,
                   float* out, int64_t ldo) {
    const float* keys = store->keys.param.data();
    const bool is_key = b >= keys && b < keys + store->keys.param.size();
    (is_key ? key_dots : router_dots) += na * nb;
    kernels::Best().dot_tile(a, na, b, nb, d, out, ldo);
  }
};

TEST(SelectorTest, MultipliesOnlyCandidateKeys) {
  auto s = LayerStore::Create(0, 8 * 25, 32, 25, {});
  ASSERT_TRUE(s.ok());
  Counting::store = &*s;
  Counting::router_dots = 0;  // the counters are static: start from zero on every run
  Counting::key_dots = 0;
  kernels::Kernels counting = kernels::Best();
  counting.dot_tile = &Counting::Tile;
  std::mt19937 rng(9);
  const int64_t T = 50;
  const std::vector<float> x = RandomTokens(T, 32, rng);
  std::vector<uint8_t> mask(T, 1);
  mask[3] = mask[17] = 0;
  SelectorOptions o;
  o.n_probe = 3;
  o.top_k = 5;
  const Selection sel = Select(*s, x.data(), T, mask.data(), o, counting);
  const int64_t real = T - 2;
  EXPECT_EQ(Counting::router_dots.load(), real * 25);       // g_t = G x_t
  EXPECT_EQ(Counting::key_dots.load(), real * 3 * 8);       // n_probe experts of 8 keys
  EXPECT_LT(Counting::key_dots.load(), real * 8 * 25 / 5);  // far from the dense r * T
  ExpectSame(sel, ReferenceSelect(*s, x.data(), T, mask.data(), o, kernels::Best()));
}

}  // namespace
}  // namespace meft::routing
