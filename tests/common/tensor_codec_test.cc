#include "common/wire/tensor_codec.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::wire {
namespace {

using ::testing::HasSubstr;

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// Reference rounding: of the two bf16 values around f (truncation and the next one up in
// magnitude), take the nearer in exact double arithmetic; on a tie the one with an even
// mantissa.
uint16_t ReferenceBf16(float f) {
  const uint16_t lo = static_cast<uint16_t>(Bits(f) >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double dlo = Bf16ToFloat(lo);
  const double dhi = Bf16ToFloat(hi);  // may be inf: then dist is inf unless f rounds there
  const double df = f;
  const double dist_lo = std::fabs(df - dlo);
  const double dist_hi =
      std::isinf(dhi) ? std::ldexp(1.0, 128) - std::fabs(df) : std::fabs(dhi - df);
  if (dist_lo < dist_hi) return lo;
  if (dist_hi < dist_lo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(Bf16Test, MatchesReferenceRoundingOnRandomFloats) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t b = bits(rng);
    float f;
    std::memcpy(&f, &b, sizeof(f));
    if (!std::isfinite(f)) continue;
    ASSERT_EQ(FloatToBf16(f), ReferenceBf16(f)) << "bits 0x" << std::hex << b;
    ++checked;
  }
  EXPECT_GT(checked, 1900000);
}

// The array encoders (vectorized at -O3) agree with the reference element by element, for
// random bit patterns including NaNs and infinities, at every length and misalignment of the
// vector loop's body and tail.
TEST(Bf16Test, ArrayEncodersMatchTheReference) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> values(4099);
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t b = bits(rng);
    if (i % 7 == 0) b |= 0x7f800000u;  // infinities and NaNs, signalling ones included
    std::memcpy(&values[i], &b, sizeof(b));
  }
  for (size_t offset : {size_t{0}, size_t{1}, size_t{3}}) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{16}, size_t{33}, size_t{4096}}) {
      const std::span<const float> in(values.data() + offset, n);
      std::string out;
      EncodeFloats(in, DType::kBf16, &out);
      ASSERT_EQ(out.size(), 2 * n);
      for (size_t i = 0; i < n; ++i) {
        uint16_t got;
        std::memcpy(&got, out.data() + 2 * i, sizeof(got));
        const float f = in[i];
        if (std::isnan(f)) {
          ASSERT_EQ(got, static_cast<uint16_t>((Bits(f) >> 16) | 0x0040u)) << i;  // quiet, sign
        } else if (std::isinf(f)) {
          ASSERT_EQ(got, static_cast<uint16_t>(Bits(f) >> 16)) << i;
        } else {
          ASSERT_EQ(got, ReferenceBf16(f)) << "element " << i << " of " << n;
        }
      }
    }
  }
}

// The row gather the server sends answers with, at -O3 as well: every element of every gathered
// row is FloatToBf16 of its source (which ArrayEncodersMatchTheReference checks against the
// reference), specials included, for row widths around the vector length.
TEST(Bf16Test, EncodeRowsGathersEveryElementExactly) {
  std::mt19937 rng(12);
  std::uniform_int_distribution<uint32_t> bits;
  for (const int64_t dim : {int64_t{1}, int64_t{7}, int64_t{64}, int64_t{67}}) {
    std::vector<float> table(static_cast<size_t>(40 * dim));
    for (size_t i = 0; i < table.size(); ++i) {
      uint32_t b = bits(rng);
      if (i % 5 == 0) b |= 0x7f800000u;
      std::memcpy(&table[i], &b, sizeof(b));
    }
    const std::vector<int32_t> rows = {39, 0, 17, 17, 5};
    std::string out;
    EncodeRows(table.data(), dim, rows, DType::kBf16, &out);
    ASSERT_EQ(out.size(), rows.size() * static_cast<size_t>(dim) * 2);
    for (size_t r = 0; r < rows.size(); ++r) {
      for (int64_t j = 0; j < dim; ++j) {
        uint16_t got;
        std::memcpy(&got, out.data() + 2 * (r * static_cast<size_t>(dim) + j), sizeof(got));
        ASSERT_EQ(got, FloatToBf16(table[static_cast<size_t>(rows[r] * dim + j)]))
            << "row " << r << " element " << j << " dim " << dim;
      }
    }
  }
}

TEST(Bf16Test, TiesGoToEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 (0x3f80) and 1.0078125 (0x3f81): even wins.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1.0078125 + 2^-8 is halfway between 0x3f81 and 0x3f82: rounds up to the even 0x3f82.
  EXPECT_EQ(FloatToBf16(1.0078125f + std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(FloatToBf16(-1.0f - std::ldexp(1.0f, -8)), 0xbf80);
}

TEST(Bf16Test, SpecialValues) {
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  const uint16_t nan = FloatToBf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(Bf16ToFloat(nan)));
  // A signalling NaN whose payload sits only in the low bits must stay NaN, not become inf.
  float snan;
  const uint32_t snan_bits = 0x7f800001u;
  std::memcpy(&snan, &snan_bits, sizeof(snan));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(snan))));
  // The smallest subnormal rounds to zero; bf16 keeps float's exponent range.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1e-38f)), Bf16ToFloat(ReferenceBf16(1e-38f)));
}

TEST(Bf16Test, ExactValuesRoundTrip) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), b);
  }
}

TensorView View(DType dtype, std::vector<int64_t> shape, const std::string& data) {
  return {dtype, std::move(shape), data};
}

TEST(CheckTensorTest, AcceptsMatchingTensor) {
  const std::string data(3 * 4 * 4, '\0');
  EXPECT_TRUE(CheckTensor(View(DType::kFp32, {3, 4}, data), "x", {{DType::kFp32}, {-1, 4}}).ok());
}

TEST(CheckTensorTest, ErrorsNameTheField) {
  const std::string data(3 * 4 * 4, '\0');
  absl::Status s =
      CheckTensor(View(DType::kInt32, {3, 4}, data), "x", {{DType::kFp32, DType::kBf16}, {-1, 4}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("x.dtype: expected fp32 or bf16, got int32"));

  s = CheckTensor(View(DType::kFp32, {4, 3}, data), "x", {{DType::kFp32}, {-1, 4}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("x.shape: expected [*, 4], got [4, 3]"));

  s = CheckTensor(View(DType::kFp32, {12}, data), "x", {{DType::kFp32}, {-1, 4}});
  EXPECT_THAT(s.message(), HasSubstr("x.shape"));

  s = CheckTensor(View(DType::kFp32, {-3, 4}, data), "x", {{DType::kFp32}, {-1, 4}});
  EXPECT_THAT(s.message(), HasSubstr("x.shape"));

  s = CheckTensor(View(DType::kFp32, {2, 4}, data), "x", {{DType::kFp32}, {-1, 4}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("x.data: 48 bytes, expected 32"));

  s = CheckTensor(View(DType::kFp32, {3, 4}, data), "x", {{DType::kFp32}, {-1, 4}, 8});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("x.shape"));

  // Dims whose product overflows int64 are caught before any multiplication wraps.
  s = CheckTensor(View(DType::kFp32, {int64_t{1} << 40, int64_t{1} << 40}, data), "x",
                  {{DType::kFp32}, {-1, -1}});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
}

TEST(DecodeTest, Fp32AndBf16AndNonFinite) {
  const std::vector<float> values = {1.5f, -2.25f, 3.0f};
  std::string fp32;
  EncodeFloats(values, DType::kFp32, &fp32);
  std::vector<float> out;
  ASSERT_TRUE(DecodeFloats(View(DType::kFp32, {3}, fp32), "g", true, &out).ok());
  EXPECT_EQ(out, values);

  std::string bf16;
  EncodeFloats(values, DType::kBf16, &bf16);
  ASSERT_EQ(bf16.size(), 6u);
  ASSERT_TRUE(DecodeFloats(View(DType::kBf16, {3}, bf16), "g", true, &out).ok());
  EXPECT_EQ(out, values);  // all exactly representable in bf16

  std::vector<float> bad = {1.0f, std::numeric_limits<float>::infinity(), 0.0f};
  std::string bad_bytes;
  EncodeFloats(bad, DType::kFp32, &bad_bytes);
  absl::Status s = DecodeFloats(View(DType::kFp32, {3}, bad_bytes), "key_grads", true, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("key_grads.data: non-finite value at element 1"));
  EXPECT_TRUE(DecodeFloats(View(DType::kFp32, {3}, bad_bytes), "key_grads", false, &out).ok());
}

TEST(EncodeRowsTest, GathersAndConverts) {
  const int64_t dim = 3;
  const std::vector<float> base = {0, 1, 2, 10, 11, 12, 20, 21, 22.5f};
  const std::vector<int32_t> rows = {2, 0};
  std::string out;
  EncodeRows(base.data(), dim, rows, DType::kFp32, &out);
  std::vector<float> got(6);
  std::memcpy(got.data(), out.data(), out.size());
  EXPECT_EQ(got, (std::vector<float>{20, 21, 22.5f, 0, 1, 2}));

  std::string bf;
  EncodeRows(base.data(), dim, rows, DType::kBf16, &bf);
  ASSERT_EQ(bf.size(), 12u);
  std::vector<float> back;
  ASSERT_TRUE(DecodeFloats(View(DType::kBf16, {2, 3}, bf), "k", true, &back).ok());
  EXPECT_EQ(back, got);
}

}  // namespace
}  // namespace meft::wire
