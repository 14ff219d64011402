// The Lookup answer's layout (common/wire/lookup_layout.h) against the reply's fields written out
// by hand for each mode.

#include "common/wire/lookup_layout.h"

#include <gtest/gtest.h>

#include <vector>

namespace meft::wire {
namespace {

std::vector<AnswerField> Fields(const std::vector<AnswerTensorLayout>& layout) {
  std::vector<AnswerField> out;
  for (const AnswerTensorLayout& t : layout) out.push_back(t.field);
  return out;
}

TEST(LookupLayoutTest, GatedPerTokenHasEveryTensorInFieldOrder) {
  // 5 rows of d = 8 bf16 (16 bytes), T = 3 tokens, top_k = 2, 4 experts.
  const auto layout = LookupAnswerLayout({.rows = 5,
                                          .row_bytes = 16,
                                          .tokens = 3,
                                          .top_k = 2,
                                          .experts = 4,
                                          .per_token = true,
                                          .gated = true});
  using F = AnswerField;
  EXPECT_EQ(Fields(layout), (std::vector<F>{F::kRowIds, F::kKeys, F::kValues, F::kTokenRows,
                                            F::kTokenGates, F::kTokenExperts, F::kExpertIds,
                                            F::kRouterRows}));
  const std::vector<uint64_t> want = {5 * 4, 5 * 16, 5 * 16, 6 * 4, 6 * 4, 6 * 4, 4 * 4, 4 * 16};
  for (size_t i = 0; i < layout.size(); ++i) {
    EXPECT_EQ(layout[i].bytes, want[i]) << AnswerFieldName(layout[i].field);
  }
  // Every tensor rounded up to 64: 64 + 128 + 128 + 64 + 64 + 64 + 64 + 64.
  EXPECT_EQ(PlacedBytes(layout), 640u);
}

TEST(LookupLayoutTest, UngatedPerTokenSendsNoExperts) {
  const auto layout = LookupAnswerLayout(
      {.rows = 2, .row_bytes = 32, .tokens = 1, .top_k = 2, .experts = 9, .per_token = true});
  using F = AnswerField;
  EXPECT_EQ(Fields(layout),
            (std::vector<F>{F::kRowIds, F::kKeys, F::kValues, F::kTokenRows, F::kTokenGates}));
}

TEST(LookupLayoutTest, UnionModeSendsRowsOnly) {
  const auto layout =
      LookupAnswerLayout({.rows = 16, .row_bytes = 4, .tokens = 7, .top_k = 3, .gated = true});
  using F = AnswerField;
  EXPECT_EQ(Fields(layout), (std::vector<F>{F::kRowIds, F::kKeys, F::kValues}));
  EXPECT_EQ(PlacedBytes(layout), 64u * 3);
}

TEST(LookupLayoutTest, EmptyTensorsTakeNoRoom) {
  const auto layout = LookupAnswerLayout({.row_bytes = 16, .per_token = true, .gated = true});
  for (const AnswerTensorLayout& t : layout) EXPECT_EQ(t.bytes, 0u) << AnswerFieldName(t.field);
  EXPECT_EQ(PlacedBytes(layout), 0u);
}

TEST(LookupLayoutTest, AlignAnswerRoundsUpToTheCacheLine) {
  EXPECT_EQ(AlignAnswer(0), 0u);
  EXPECT_EQ(AlignAnswer(1), 64u);
  EXPECT_EQ(AlignAnswer(64), 64u);
  EXPECT_EQ(AlignAnswer(65), 128u);
}

}  // namespace
}  // namespace meft::wire
