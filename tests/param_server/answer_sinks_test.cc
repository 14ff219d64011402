// RegionAnswerSink (param_server/rpc/answer_sinks.h): places an answer's tensors one after another
// on 64-byte boundaries inside the offered range, refuses a layout that does not fit, and never
// hands out memory for a tensor it did not reserve.

#include "param_server/rpc/answer_sinks.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace meft::rpc {
namespace {

using wire::AnswerField;
using wire::AnswerTensorLayout;

const std::vector<AnswerTensorLayout> kLayout = {
    {AnswerField::kRowIds, 12}, {AnswerField::kKeys, 100}, {AnswerField::kValues, 64}};

TEST(RegionAnswerSinkTest, PlacesEachTensorOnTheNextBoundary) {
  std::vector<uint8_t> memory(4096);
  // From an unaligned begin: the first tensor starts at the next boundary.
  RegionAnswerSink sink(memory.data(), 70, 1000);
  ASSERT_TRUE(sink.Reserve(kLayout));
  const std::vector<uint64_t> want = {128, 192, 320};
  for (size_t i = 0; i < kLayout.size(); ++i) {
    uint64_t offset = 0;
    char* dst = sink.Place(i, &offset);
    EXPECT_EQ(offset, want[i]) << i;
    EXPECT_EQ(dst, reinterpret_cast<char*>(memory.data() + want[i])) << i;
  }
}

TEST(RegionAnswerSinkTest, RefusesALayoutThatDoesNotFit) {
  std::vector<uint8_t> memory(4096);
  // From offset 0 the tensors start at 0, 64 and 192; the last one ends at 256.
  EXPECT_TRUE(RegionAnswerSink(memory.data(), 0, 256).Reserve(kLayout));
  EXPECT_FALSE(RegionAnswerSink(memory.data(), 0, 255).Reserve(kLayout));
  EXPECT_FALSE(RegionAnswerSink(nullptr, 0, 4096).Reserve(kLayout));
  // An empty layout always fits.
  EXPECT_TRUE(RegionAnswerSink(memory.data(), 0, 0).Reserve({}));
}

TEST(RegionAnswerSinkDeathTest, NeverPlacesATensorItDidNotReserve) {
  std::vector<uint8_t> memory(4096);
  RegionAnswerSink sink(memory.data(), 0, 4096);
  uint64_t offset = 0;
  EXPECT_DEATH(sink.Place(0, &offset), "");  // the message goes to spdlog
  ASSERT_TRUE(sink.Reserve(kLayout));
  EXPECT_DEATH(sink.Place(3, &offset), "");
}

}  // namespace
}  // namespace meft::rpc
