// Translation between meft.v1 messages and the server's domain types (param_server_convert.h),
// without a server: tensor fields, requests and replies, and the field each error names. The
// same checks through gRPC are in rpc_validation_test.cc.

#include "param_server/rpc/param_server_convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::rpc {
namespace {

v1::Tensor ProtoTensor(v1::DType dtype, std::vector<int64_t> shape, std::string data) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::move(data));
  return t;
}

void ExpectInvalid(const absl::Status& status, const std::string& message) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_EQ(status.message(), message);
}

TEST(TensorFromProtoTest, UnsetIsNullopt) {
  absl::StatusOr<std::optional<wire::TensorView>> t = TensorFromProto(v1::Tensor(), "x");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->has_value());
}

TEST(TensorFromProtoTest, EveryDtypeAndTheBytesAsAView) {
  const std::vector<std::pair<v1::DType, wire::DType>> dtypes = {
      {v1::DTYPE_FP32, wire::DType::kFp32},
      {v1::DTYPE_BF16, wire::DType::kBf16},
      {v1::DTYPE_INT32, wire::DType::kInt32},
      {v1::DTYPE_UINT8, wire::DType::kUint8}};
  for (const auto& [proto, domain] : dtypes) {
    const v1::Tensor tensor = ProtoTensor(proto, {2, 3}, "abcdef");
    absl::StatusOr<std::optional<wire::TensorView>> t = TensorFromProto(tensor, "x");
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE(t->has_value());
    EXPECT_EQ((*t)->dtype, domain);
    EXPECT_EQ((*t)->shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ((*t)->data, "abcdef");
    EXPECT_EQ((*t)->data.data(), tensor.data().data()) << "the bytes were copied";
  }
}

TEST(TensorFromProtoTest, BadDtypeNamesTheField) {
  ExpectInvalid(TensorFromProto(ProtoTensor(v1::DTYPE_UNSPECIFIED, {1}, ""), "x").status(),
                "x.dtype: unspecified");
  ExpectInvalid(
      TensorFromProto(ProtoTensor(static_cast<v1::DType>(99), {1}, "a"), "key_grads").status(),
      "key_grads.dtype: unknown value 99");
}

TEST(TensorFromProtoTest, ArenaSpanWithoutAnArenaIsRejected) {
  v1::Tensor tensor = ProtoTensor(v1::DTYPE_FP32, {1}, "");
  tensor.mutable_arena()->set_offset(4096);
  tensor.mutable_arena()->set_bytes(4);
  ExpectInvalid(TensorFromProto(tensor, "x").status(),
                "x.arena: set, but the request names no arena_id");
}

TEST(TensorToProtoTest, MovesThePresentTensorAndLeavesAnAbsentOneUntouched) {
  wire::Tensor absent;
  v1::Tensor out = ProtoTensor(v1::DTYPE_UINT8, {1}, "z");
  TensorToProto(std::move(absent), &out);
  EXPECT_EQ(out.dtype(), v1::DTYPE_UINT8);
  EXPECT_EQ(out.data(), "z");

  wire::Tensor present;
  present.present = true;
  present.dtype = wire::DType::kBf16;
  present.shape = {2, 1};
  present.data = "abcd";
  v1::Tensor written;
  TensorToProto(std::move(present), &written);
  EXPECT_EQ(written.dtype(), v1::DTYPE_BF16);
  EXPECT_THAT(written.shape(), ::testing::ElementsAre(2, 1));
  EXPECT_EQ(written.data(), "abcd");
}

TEST(FromProtoTest, LookupRequest) {
  v1::LookupRequest r;
  r.mutable_header()->set_step(5);
  r.mutable_header()->set_micro_step(2);
  r.mutable_header()->set_layer(3);
  *r.mutable_x() = ProtoTensor(v1::DTYPE_FP32, {1, 1}, "abcd");
  r.set_training(true);
  absl::StatusOr<server::LookupCall> call = FromProto(r);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_EQ(call->header.step, 5u);
  EXPECT_EQ(call->header.micro_step, 2u);
  EXPECT_EQ(call->header.layer, 3u);
  EXPECT_EQ(call->x.data, "abcd");
  EXPECT_FALSE(call->token_mask.has_value());
  EXPECT_TRUE(call->training);
  EXPECT_FALSE(call->row_dtype.has_value()) << "unspecified row_dtype: the server's default";
  EXPECT_EQ(call->answer_sink, nullptr);

  r.set_row_dtype(v1::DTYPE_BF16);
  *r.mutable_token_mask() = ProtoTensor(v1::DTYPE_UINT8, {1}, std::string(1, '\1'));
  call = FromProto(r);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_TRUE(call->row_dtype.has_value());
  EXPECT_EQ(*call->row_dtype, wire::DType::kBf16);
  ASSERT_TRUE(call->token_mask.has_value());
  EXPECT_EQ(call->token_mask->dtype, wire::DType::kUint8);
}

TEST(FromProtoTest, LookupRequestErrorsNameTheField) {
  v1::LookupRequest r;
  ExpectInvalid(FromProto(r).status(), "x: missing");
  *r.mutable_x() = ProtoTensor(v1::DTYPE_FP32, {1, 1}, "abcd");
  r.set_row_dtype(static_cast<v1::DType>(42));
  ExpectInvalid(FromProto(r).status(), "row_dtype: unknown value 42");
  r.set_row_dtype(v1::DTYPE_FP32);
  r.mutable_response_region()->set_offset(4096);
  r.mutable_response_region()->set_bytes(64);
  ExpectInvalid(FromProto(r).status(), "response_region: set, but the request names no arena_id");
}

TEST(FromProtoTest, GradientsRequest) {
  v1::GradientsRequest r;
  ExpectInvalid(FromProto(r).status(), "key_grads: missing");
  *r.mutable_key_grads() = ProtoTensor(v1::DTYPE_FP32, {1, 1}, "kkkk");
  ExpectInvalid(FromProto(r).status(), "value_grads: missing");
  *r.mutable_value_grads() = ProtoTensor(v1::DTYPE_BF16, {1, 1}, "vv");
  r.mutable_header()->set_layer(7);
  absl::StatusOr<server::GradientsCall> call = FromProto(r);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_EQ(call->header.layer, 7u);
  EXPECT_EQ(call->key_grads.data, "kkkk");
  EXPECT_EQ(call->value_grads.dtype, wire::DType::kBf16);
  EXPECT_FALSE(call->gate_grads.has_value());
}

TEST(FromProtoTest, StepRequest) {
  v1::StepRequest r;
  r.set_step(9);
  r.set_lr(0.125);
  r.set_clip_factor(0.5);
  r.add_layers(0);
  r.add_layers(2);
  const server::StepCall call = FromProto(r);
  EXPECT_EQ(call.step, 9u);
  EXPECT_EQ(call.lr, 0.125);
  EXPECT_EQ(call.clip_factor, 0.5);
  EXPECT_EQ(call.layers, (std::vector<uint32_t>{0, 2}));
}

TEST(ToProtoTest, LookupReplyInlineAndPlacedTensors) {
  server::LookupReply reply;
  reply.row_ids.present = true;
  reply.row_ids.dtype = wire::DType::kInt32;
  reply.row_ids.shape = {1};
  reply.row_ids.data = "rrrr";
  reply.keys.present = true;
  reply.keys.dtype = wire::DType::kBf16;
  reply.keys.shape = {1, 2};
  reply.keys.placed_offset = 4096;
  reply.keys.placed_bytes = 4;
  reply.rows_dropped = 3;
  reply.replayed = true;
  v1::LookupResponse out;
  ToProto(std::move(reply), &out);
  EXPECT_EQ(out.row_ids().dtype(), v1::DTYPE_INT32);
  EXPECT_EQ(out.row_ids().data(), "rrrr");
  EXPECT_FALSE(out.row_ids().has_arena());
  EXPECT_EQ(out.keys().dtype(), v1::DTYPE_BF16);
  EXPECT_THAT(out.keys().shape(), ::testing::ElementsAre(1, 2));
  EXPECT_TRUE(out.keys().data().empty());
  ASSERT_TRUE(out.keys().has_arena());
  EXPECT_EQ(out.keys().arena().offset(), 4096u);
  EXPECT_EQ(out.keys().arena().bytes(), 4u);
  // An absent tensor stays empty (TensorFromProto reads it back as unset).
  EXPECT_EQ(out.values().dtype(), v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(out.values().shape_size(), 0);
  EXPECT_TRUE(out.values().data().empty());
  EXPECT_FALSE(out.values().has_arena());
  EXPECT_EQ(out.rows_dropped(), 3u);
  EXPECT_TRUE(out.replayed());
}

TEST(ToProtoTest, Replies) {
  v1::GradientsResponse gradients;
  ToProto(server::GradientsReply{.duplicate = true, .rows_accumulated = 12}, &gradients);
  EXPECT_TRUE(gradients.duplicate());
  EXPECT_EQ(gradients.rows_accumulated(), 12u);

  v1::GradNormResponse norm;
  ToProto(
      server::GradNormReply{.squared_norm = 2.5, .layers = {0, 2}, .layer_squared_norms = {1, 1.5}},
      &norm);
  EXPECT_EQ(norm.squared_norm(), 2.5);
  EXPECT_THAT(norm.layers(), ::testing::ElementsAre(0u, 2u));
  EXPECT_THAT(norm.layer_squared_norms(), ::testing::ElementsAre(1.0, 1.5));

  v1::StepResponse step;
  ToProto(
      server::StepReply{
          .already_applied = true, .rows_updated = 4, .router_rows_updated = 2, .server_step = 8},
      &step);
  EXPECT_TRUE(step.already_applied());
  EXPECT_EQ(step.rows_updated(), 4u);
  EXPECT_EQ(step.router_rows_updated(), 2u);
  EXPECT_EQ(step.server_step(), 8u);
}

}  // namespace
}  // namespace meft::rpc
