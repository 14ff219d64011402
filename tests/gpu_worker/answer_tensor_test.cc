// AnswerTensor: a server answer's tensor checked against its shape and dtype and turned into a
// torch tensor; float tensors alias the bytes and keep their owner alive, int32 is widened.

#include "gpu_worker/rpc/answer_tensor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace meft::worker {
namespace {

using ::testing::HasSubstr;

v1::Tensor Spec(v1::DType dtype, std::vector<int64_t> shape) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  return t;
}

TEST(AnswerTensorTest, FloatsAliasTheBytesAndKeepTheirOwnerAlive) {
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4, 5, 6});
  std::weak_ptr<std::vector<float>> watch = owner;
  auto t = AnswerTensor(Spec(v1::DTYPE_FP32, {2, 3}), "keys", owner->data(), 24, owner);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data_ptr<float>(), owner->data()) << "no copy";
  owner.reset();
  EXPECT_FALSE(watch.expired()) << "the tensor holds the owner";
  EXPECT_TRUE(torch::equal(*t, torch::tensor({{1.f, 2.f, 3.f}, {4.f, 5.f, 6.f}})));
  *t = torch::Tensor();
  EXPECT_TRUE(watch.expired()) << "released with the tensor";
}

TEST(AnswerTensorTest, Bf16StaysBf16AndInt32IsWidened) {
  std::vector<uint16_t> bf16 = {0x3f80, 0xc000};  // 1, -2
  auto b = AnswerTensor(Spec(v1::DTYPE_BF16, {2}), "values", bf16.data(), 4, nullptr);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(b->to(torch::kFloat32), torch::tensor({1.f, -2.f})));
  std::vector<int32_t> ids = {7, -1, 3};
  auto i = AnswerTensor(Spec(v1::DTYPE_INT32, {3}), "row_ids", ids.data(), 12, nullptr);
  ASSERT_TRUE(i.ok()) << i.status();
  EXPECT_EQ(i->scalar_type(), torch::kInt64);
  ids[0] = 99;  // a copy: the int64 tensor does not see later writes
  EXPECT_TRUE(torch::equal(*i, torch::tensor({7, -1, 3}, torch::kInt64)));
}

TEST(AnswerTensorTest, MalformedTensorsAreDataLossNamingTheField) {
  std::vector<float> bytes(8);
  struct Case {
    v1::Tensor t;
    uint64_t size;
    const char* message;
  };
  const Case cases[] = {
      {Spec(v1::DTYPE_FP32, {2, -1}), 0, "server answer f: bad shape"},
      {Spec(v1::DTYPE_FP32, {int64_t{1} << 30, int64_t{1} << 30}), 0, "bad shape"},
      {Spec(v1::DTYPE_FP32, {2, 3}), 20, "server answer f: 20 bytes for 6 elements"},
      {Spec(v1::DTYPE_BF16, {2, 3}), 24, "24 bytes for 6 elements"},
      {Spec(v1::DTYPE_UINT8, {4}), 4, "server answer f: unexpected dtype"},
      {Spec(v1::DTYPE_UNSPECIFIED, {4}), 16, "unexpected dtype"},
  };
  for (const Case& c : cases) {
    const auto r = AnswerTensor(c.t, "f", bytes.data(), c.size, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << c.message;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace meft::worker
