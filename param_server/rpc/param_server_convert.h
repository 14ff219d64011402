#pragma once

// Translation between meft.v1 protobuf messages and the domain types of server/param_server.h.
// Request views borrow bytes from the protobuf message, which must outlive them.

#include <optional>
#include <string_view>

#include "absl/status/statusor.h"
#include "meft/v1/param_server.pb.h"
#include "param_server/server/param_server.h"

namespace meft::rpc {

// A tensor field. Unset (no dtype, shape or data) gives nullopt; a set tensor with an
// unspecified or unknown dtype is INVALID_ARGUMENT naming `field`.
absl::StatusOr<std::optional<wire::WireTensor>> TensorFromProto(const v1::Tensor& tensor,
                                                                absl::string_view field);
// Moves the bytes of `tensor` into `out`; leaves `out` untouched when !tensor.present.
void TensorToProto(wire::Tensor&& tensor, v1::Tensor* out);

absl::StatusOr<server::LookupCall> FromProto(const v1::LookupRequest& request);
absl::StatusOr<server::GradientsCall> FromProto(const v1::GradientsRequest& request);
server::StepCall FromProto(const v1::StepRequest& request);

void ToProto(server::LookupReply&& reply, v1::LookupResponse* out);
void ToProto(const server::GradientsReply& reply, v1::GradientsResponse* out);
void ToProto(const server::GradNormReply& reply, v1::GradNormResponse* out);
void ToProto(const server::StepReply& reply, v1::StepResponse* out);
void ToProto(const server::ServerInfo& info, v1::ServerInfoResponse* out);

}  // namespace meft::rpc
