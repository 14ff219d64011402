#include "gpu_worker/rpc/param_client_convert.h"

#include <torch/torch.h>

#include <span>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/wire/tensor_codec.h"
#include "gpu_worker/rpc/answer_tensor.h"

namespace meft::worker {
namespace {

torch::Tensor* ResultTensor(LookupReply* r, wire::AnswerField field) {
  switch (field) {
    case wire::AnswerField::kRowIds:
      return &r->row_ids;
    case wire::AnswerField::kKeys:
      return &r->keys;
    case wire::AnswerField::kValues:
      return &r->values;
    case wire::AnswerField::kTokenRows:
      return &r->token_rows;
    case wire::AnswerField::kTokenGates:
      return &r->token_gates;
    case wire::AnswerField::kTokenExperts:
      return &r->token_experts;
    case wire::AnswerField::kExpertIds:
      return &r->expert_ids;
    case wire::AnswerField::kRouterRows:
      return &r->router_rows;
  }
  return nullptr;
}

}  // namespace

void HeaderToProto(const RequestHeader& h, v1::RequestHeader* out) {
  out->set_step(h.step);
  out->set_micro_step(h.micro_step);
  out->set_layer(h.layer);
}

void FloatsToProto(const torch::Tensor& t, bool bf16, v1::Tensor* out) {
  const torch::Tensor cpu = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  out->set_dtype(bf16 ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
  for (int64_t d : cpu.sizes()) out->add_shape(d);
  std::string data;
  wire::EncodeFloats(
      std::span<const float>(cpu.data_ptr<float>(), static_cast<size_t>(cpu.numel())),
      bf16 ? wire::DType::kBf16 : wire::DType::kFp32, &data);
  out->set_data(std::move(data));
}

void TokenMaskToProto(const torch::Tensor& mask, v1::Tensor* out) {
  const torch::Tensor m = mask.detach().to(torch::kCPU).ne(0).to(torch::kUInt8).contiguous();
  out->set_dtype(v1::DTYPE_UINT8);
  out->add_shape(m.numel());
  out->set_data(std::string(reinterpret_cast<const char*>(m.data_ptr<uint8_t>()),
                            static_cast<size_t>(m.numel())));
}

ServerInfo ServerInfoFromProto(const v1::ServerInfoResponse& r) {
  ServerInfo d;
  d.layers.assign(r.layers().begin(), r.layers().end());
  d.rows = r.rows();
  d.dim = r.dim();
  d.experts = r.experts();
  d.n_probe = r.n_probe();
  d.top_k = r.top_k();
  d.max_rows = r.max_rows();
  d.max_tokens = r.max_tokens();
  d.per_token = r.mode() != v1::SELECTION_MODE_UNION;
  d.gated = r.gated();
  d.step = r.step();
  return d;
}

absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerNormsFromProto(
    const v1::GradNormResponse& response) {
  if (response.layers_size() != response.layer_squared_norms_size()) {
    return absl::DataLossError(
        absl::StrCat("server answer layer_squared_norms: ", response.layer_squared_norms_size(),
                     " norms for ", response.layers_size(), " layers"));
  }
  std::vector<std::pair<uint32_t, double>> out;
  for (int i = 0; i < response.layers_size(); ++i) {
    out.emplace_back(response.layers(i), response.layer_squared_norms(i));
  }
  return out;
}

const v1::Tensor& AnswerTensorProto(const v1::LookupResponse& r, wire::AnswerField field) {
  switch (field) {
    case wire::AnswerField::kRowIds:
      return r.row_ids();
    case wire::AnswerField::kKeys:
      return r.keys();
    case wire::AnswerField::kValues:
      return r.values();
    case wire::AnswerField::kTokenRows:
      return r.token_rows();
    case wire::AnswerField::kTokenGates:
      return r.token_gates();
    case wire::AnswerField::kTokenExperts:
      return r.token_experts();
    case wire::AnswerField::kExpertIds:
      return r.expert_ids();
    case wire::AnswerField::kRouterRows:
      return r.router_rows();
  }
  return v1::Tensor::default_instance();
}

absl::StatusOr<torch::Tensor> InlineAnswerTensor(
    const v1::Tensor& t, const char* field, const std::shared_ptr<const v1::LookupResponse>& owner) {
  if (t.dtype() == v1::DTYPE_UNSPECIFIED && t.shape_size() == 0) return torch::Tensor();
  // std::string's heap buffer is aligned for any scalar type; an empty one is never read.
  return AnswerTensor(t, field, const_cast<char*>(t.data().data()), t.data().size(), owner);
}

absl::StatusOr<LookupReply> LookupResultFromProto(const v1::LookupResponse& response,
                                                   const TakeAnswerTensor& take) {
  LookupReply r;
  for (wire::AnswerField field : wire::kAnswerFields) {
    MEFT_ASSIGN_OR_RETURN(*ResultTensor(&r, field),
                          take(AnswerTensorProto(response, field), wire::AnswerFieldName(field)));
  }
  r.replayed = response.replayed();
  return r;
}

}  // namespace meft::worker
