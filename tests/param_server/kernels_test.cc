#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "param_server/kernels/dot.h"

namespace meft::kernels {
namespace {

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
    if (IsaSupported(isa)) out.push_back(isa);
  }
  return out;
}

TEST(KernelsTest, GenericIsAlwaysSupportedAndBestIsSupported) {
  EXPECT_TRUE(IsaSupported(Isa::kGeneric));
  EXPECT_TRUE(IsaSupported(Best().isa));
}

TEST(KernelsTest, DotMatchesDoublePrecisionReference) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (Isa isa : SupportedIsas()) {
    const Kernels& k = ForIsa(isa);
    for (int64_t d : {1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 4096}) {
      std::vector<float> a(d), b(d);
      for (auto& v : a) v = normal(rng);
      for (auto& v : b) v = normal(rng);
      double exact = 0, scale = 0;
      for (int64_t i = 0; i < d; ++i) {
        exact += double{a[i]} * b[i];
        scale += std::fabs(double{a[i]} * b[i]);
      }
      EXPECT_NEAR(k.dot(a.data(), b.data(), d), exact, 1e-6 * scale + 1e-7) << k.name << " d=" << d;
    }
  }
}

TEST(KernelsTest, DotTileIsBitIdenticalToDot) {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(1, 13);
  for (Isa isa : SupportedIsas()) {
    const Kernels& k = ForIsa(isa);
    for (int trial = 0; trial < 60; ++trial) {
      const int64_t na = pick(rng), nb = pick(rng);
      const int64_t d = std::uniform_int_distribution<int>(1, 70)(rng);
      // Rows of `a` scattered through a larger buffer, in shuffled order.
      std::vector<float> pool((na + 5) * d);
      for (auto& v : pool) v = normal(rng);
      std::vector<const float*> a(na);
      for (int64_t i = 0; i < na; ++i) a[i] = pool.data() + ((i * 7) % (na + 5)) * d;
      std::vector<float> b(nb * d);
      for (auto& v : b) v = normal(rng);
      const int64_t ldo = nb + 3;
      std::vector<float> out(na * ldo, -1.0f);
      k.dot_tile(a.data(), na, b.data(), nb, d, out.data(), ldo);
      for (int64_t i = 0; i < na; ++i) {
        for (int64_t j = 0; j < nb; ++j) {
          ASSERT_EQ(out[i * ldo + j], k.dot(a[i], b.data() + j * d, d))
              << k.name << " na=" << na << " nb=" << nb << " d=" << d;
        }
        for (int64_t j = nb; j < ldo; ++j) ASSERT_EQ(out[i * ldo + j], -1.0f) << "wrote past nb";
      }
    }
  }
}

}  // namespace
}  // namespace meft::kernels
