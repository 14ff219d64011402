#include "param_server/rpc/param_server_convert.h"

#include <array>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/wire/lookup_layout.h"
#include "param_server/rpc/answer_sinks.h"

namespace meft::rpc {
namespace {

static_assert(wire::kAnswerAlignment == shm::kAlignment,
              "answers are placed on the arena's region alignment");

absl::StatusOr<wire::DType> DTypeFromProto(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return wire::DType::kFp32;
    case v1::DTYPE_BF16:
      return wire::DType::kBf16;
    case v1::DTYPE_INT32:
      return wire::DType::kInt32;
    case v1::DTYPE_UINT8:
      return wire::DType::kUint8;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(absl::StrCat(field, ": unspecified"));
    default:
      return absl::InvalidArgumentError(absl::StrCat(field, ": unknown value ", dtype));
  }
}

v1::DType DTypeToProto(wire::DType dtype) {
  switch (dtype) {
    case wire::DType::kFp32:
      return v1::DTYPE_FP32;
    case wire::DType::kBf16:
      return v1::DTYPE_BF16;
    case wire::DType::kInt32:
      return v1::DTYPE_INT32;
    case wire::DType::kUint8:
      return v1::DTYPE_UINT8;
  }
  return v1::DTYPE_UNSPECIFIED;
}

server::RequestHeader HeaderFromProto(const v1::RequestHeader& h) {
  return {h.step(), h.micro_step(), h.layer()};
}

absl::StatusOr<wire::TensorView> Required(const v1::Tensor& tensor, absl::string_view field,
                                          const shm::Arena* arena) {
  MEFT_ASSIGN_OR_RETURN(auto t, TensorFromProto(tensor, field, arena));
  if (!t.has_value()) return absl::InvalidArgumentError(absl::StrCat(field, ": missing"));
  return *std::move(t);
}

// The request's response_region as the call's answer sink; null when it offers none.
absl::StatusOr<std::shared_ptr<server::AnswerSink>> AnswerSinkFromProto(
    const v1::LookupRequest& request, const shm::Arena* arena) {
  if (!request.has_response_region()) return nullptr;
  if (arena == nullptr) {
    return absl::InvalidArgumentError("response_region: set, but the request names no arena_id");
  }
  const uint64_t offset = request.response_region().offset();
  const uint64_t capacity = request.response_region().bytes();
  if (!arena->Contains(offset, capacity)) {
    return absl::InvalidArgumentError(absl::StrCat("response_region: ", capacity,
                                                   " bytes at offset ", offset,
                                                   " do not lie inside the arena's usable range [",
                                                   shm::kHeaderBytes, ", ", arena->size(), ")"));
  }
  return std::make_shared<RegionAnswerSink>(arena->data(), offset, capacity);
}

}  // namespace

absl::StatusOr<std::optional<wire::TensorView>> TensorFromProto(const v1::Tensor& tensor,
                                                                absl::string_view field,
                                                                const shm::Arena* arena) {
  if (tensor.dtype() == v1::DTYPE_UNSPECIFIED && tensor.shape_size() == 0 &&
      tensor.data().empty() && !tensor.has_arena()) {
    return std::nullopt;
  }
  MEFT_ASSIGN_OR_RETURN(wire::DType dtype,
                        DTypeFromProto(tensor.dtype(), absl::StrCat(field, ".dtype")));
  wire::TensorView out;
  out.dtype = dtype;
  out.shape.assign(tensor.shape().begin(), tensor.shape().end());
  out.data = tensor.data();
  if (tensor.has_arena()) {
    if (arena == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".arena: set, but the request names no arena_id"));
    }
    if (!tensor.data().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": both data and arena are set; send one"));
    }
    const uint64_t offset = tensor.arena().offset();
    const uint64_t bytes = tensor.arena().bytes();
    if (!arena->Contains(offset, bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".arena: ", bytes, " bytes at offset ", offset,
                       " do not lie inside the arena's usable range [", shm::kHeaderBytes, ", ",
                       arena->size(), ")"));
    }
    out.data = absl::string_view(reinterpret_cast<const char*>(arena->data() + offset),
                                 static_cast<size_t>(bytes));
  }
  return out;
}

void TensorToProto(wire::Tensor&& tensor, v1::Tensor* out) {
  if (!tensor.present) return;
  out->set_dtype(DTypeToProto(tensor.dtype));
  for (int64_t d : tensor.shape) out->add_shape(d);
  out->set_data(std::move(tensor.data));
}

absl::StatusOr<server::LookupCall> FromProto(const v1::LookupRequest& request,
                                             const shm::Arena* arena) {
  server::LookupCall call;
  call.header = HeaderFromProto(request.header());
  MEFT_ASSIGN_OR_RETURN(call.x, Required(request.x(), "x", arena));
  MEFT_ASSIGN_OR_RETURN(call.token_mask,
                        TensorFromProto(request.token_mask(), "token_mask", arena));
  call.training = request.training();
  MEFT_ASSIGN_OR_RETURN(call.answer_sink, AnswerSinkFromProto(request, arena));
  if (request.row_dtype() != v1::DTYPE_UNSPECIFIED) {
    MEFT_ASSIGN_OR_RETURN(call.row_dtype, DTypeFromProto(request.row_dtype(), "row_dtype"));
  }
  return call;
}

absl::StatusOr<server::GradientsCall> FromProto(const v1::GradientsRequest& request,
                                                const shm::Arena* arena) {
  server::GradientsCall call;
  call.header = HeaderFromProto(request.header());
  MEFT_ASSIGN_OR_RETURN(call.key_grads, Required(request.key_grads(), "key_grads", arena));
  MEFT_ASSIGN_OR_RETURN(call.value_grads, Required(request.value_grads(), "value_grads", arena));
  MEFT_ASSIGN_OR_RETURN(call.gate_grads,
                        TensorFromProto(request.gate_grads(), "gate_grads", arena));
  return call;
}

server::StepCall FromProto(const v1::StepRequest& request) {
  server::StepCall call;
  call.step = request.step();
  call.lr = request.lr();
  call.clip_factor = request.clip_factor();
  call.layers.assign(request.layers().begin(), request.layers().end());
  return call;
}

void ToProto(server::LookupReply&& reply, v1::LookupResponse* out) {
  const std::array<std::pair<wire::Tensor*, v1::Tensor*>, 8> fields = {{
      {&reply.row_ids, out->mutable_row_ids()},
      {&reply.keys, out->mutable_keys()},
      {&reply.values, out->mutable_values()},
      {&reply.token_rows, out->mutable_token_rows()},
      {&reply.token_gates, out->mutable_token_gates()},
      {&reply.token_experts, out->mutable_token_experts()},
      {&reply.expert_ids, out->mutable_expert_ids()},
      {&reply.router_rows, out->mutable_router_rows()},
  }};
  for (const auto& [tensor, proto] : fields) {
    if (!tensor->present || !tensor->placed_offset.has_value()) {
      TensorToProto(std::move(*tensor), proto);
      continue;
    }
    proto->set_dtype(DTypeToProto(tensor->dtype));
    for (int64_t d : tensor->shape) proto->add_shape(d);
    proto->mutable_arena()->set_offset(*tensor->placed_offset);
    proto->mutable_arena()->set_bytes(tensor->placed_bytes);
  }
  out->set_rows_dropped(reply.rows_dropped);
  out->set_replayed(reply.replayed);
}

void ToProto(const server::GradientsReply& reply, v1::GradientsResponse* out) {
  out->set_duplicate(reply.duplicate);
  out->set_rows_accumulated(reply.rows_accumulated);
}

void ToProto(const server::GradNormReply& reply, v1::GradNormResponse* out) {
  out->set_squared_norm(reply.squared_norm);
  for (uint32_t l : reply.layers) out->add_layers(l);
  for (double n : reply.layer_squared_norms) out->add_layer_squared_norms(n);
}

void ToProto(const server::StepReply& reply, v1::StepResponse* out) {
  out->set_already_applied(reply.already_applied);
  out->set_rows_updated(reply.rows_updated);
  out->set_router_rows_updated(reply.router_rows_updated);
  out->set_server_step(reply.server_step);
}

void ToProto(const server::ServerInfo& info, v1::ServerInfoResponse* out) {
  out->set_version("meft.v1");
  for (uint32_t l : info.layers) out->add_layers(l);
  out->set_rows(static_cast<uint32_t>(info.rows));
  out->set_dim(static_cast<uint32_t>(info.dim));
  out->set_experts(static_cast<uint32_t>(info.experts));
  out->set_n_probe(static_cast<uint32_t>(info.n_probe));
  out->set_top_k(static_cast<uint32_t>(info.top_k));
  out->set_max_rows(static_cast<uint32_t>(info.max_rows));
  out->set_mode(info.mode == server::Mode::kPerToken ? v1::SELECTION_MODE_PER_TOKEN
                                                     : v1::SELECTION_MODE_UNION);
  out->set_gated(info.gated);
  out->set_wire_dtype(DTypeToProto(info.wire_dtype));
  out->set_step(info.step);
  out->set_max_tokens(static_cast<uint32_t>(info.max_tokens));
  out->set_beta1(info.adam.beta1);
  out->set_beta2(info.adam.beta2);
  out->set_eps(info.adam.eps);
  out->set_weight_decay(info.adam.weight_decay);
}

}  // namespace meft::rpc
