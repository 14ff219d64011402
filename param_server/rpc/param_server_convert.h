#pragma once

// Translation between meft.v1 protobuf messages and the domain types of server/param_server.h.
// Request views borrow bytes from the protobuf message (or from the shared-memory arena the
// request names), which must outlive them.

#include <optional>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/shm/arena.h"
#include "meft/v1/param_server.pb.h"
#include "param_server/server/param_server.h"

namespace meft::rpc {

// A tensor field. Unset (no dtype, shape, data or arena span) gives nullopt; a set tensor with
// an unspecified or unknown dtype is INVALID_ARGUMENT naming `field`. A tensor whose bytes lie
// in the shared-memory arena (`tensor.arena`) needs `arena` (the request's attached arena, null
// when the request names none), no inline data, and a span inside the arena's usable part;
// errors name `<field>.arena`. The view then points into the arena.
absl::StatusOr<std::optional<wire::TensorView>> TensorFromProto(const v1::Tensor& tensor,
                                                                absl::string_view field,
                                                                const shm::Arena* arena = nullptr);

// Moves the bytes of `tensor` into `out`; leaves `out` untouched when !tensor.present.
void TensorToProto(wire::Tensor&& tensor, v1::Tensor* out);

// `arena`: the arena of the request's arena_id, null when it names none. A response_region
// becomes the call's answer sink (checked to lie inside the arena; errors name response_region).
absl::StatusOr<server::LookupCall> FromProto(const v1::LookupRequest& request,
                                             const shm::Arena* arena = nullptr);
absl::StatusOr<server::GradientsCall> FromProto(const v1::GradientsRequest& request,
                                                const shm::Arena* arena = nullptr);
server::StepCall FromProto(const v1::StepRequest& request);

// Tensors the server wrote into the call's answer sink (placed_offset) become arena spans;
// the others move their bytes into the message.
void ToProto(server::LookupReply&& reply, v1::LookupResponse* out);
void ToProto(const server::GradientsReply& reply, v1::GradientsResponse* out);
void ToProto(const server::GradNormReply& reply, v1::GradNormResponse* out);
void ToProto(const server::StepReply& reply, v1::StepResponse* out);
void ToProto(const server::ServerInfo& info, v1::ServerInfoResponse* out);

}  // namespace meft::rpc
