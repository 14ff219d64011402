#pragma once

// Conversion between the worker's ParamClient types (gpu_worker/client/param_client.h) and the
// messages of meft.v1.ParamServer: the worker's counterpart of
// param_server/rpc/param_server_convert.h. Only gpu_worker/rpc code includes it.

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/wire/lookup_layout.h"
#include "gpu_worker/client/param_client.h"
#include "meft/v1/param_server.pb.h"

namespace meft::worker {

void HeaderToProto(const RequestHeader& header, v1::RequestHeader* out);

// A float tensor (any device) as an inline wire tensor of fp32 or bf16 (rounded to nearest even,
// as the server rounds).
void FloatsToProto(const torch::Tensor& t, bool bf16, v1::Tensor* out);

// A token mask (nonzero = real token) as a [T] uint8 tensor of 0/1.
void TokenMaskToProto(const torch::Tensor& mask, v1::Tensor* out);

ServerInfo ServerInfoFromProto(const v1::ServerInfoResponse& response);

// (layer, squared norm) pairs of a GradNorm answer; DATA_LOSS when the two lists differ in length.
absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerNormsFromProto(
    const v1::GradNormResponse& response);

// The tensor of `field` in a Lookup answer.
const v1::Tensor& AnswerTensorProto(const v1::LookupResponse& response, wire::AnswerField field);

// An answer tensor sent inline: float tensors alias the message's bytes and keep `owner` alive
// (see AnswerTensor); an absent tensor gives an undefined tensor.
absl::StatusOr<torch::Tensor> InlineAnswerTensor(
    const v1::Tensor& t, const char* field, const std::shared_ptr<const v1::LookupResponse>& owner);

// Makes the torch tensor of one answer tensor (inline, or from the arena); `field` names it in
// errors.
using TakeAnswerTensor =
    std::function<absl::StatusOr<torch::Tensor>(const v1::Tensor& t, const char* field)>;

// The LookupReply of `response`, every tensor made by `take`, in layout order; the first error
// is returned.
absl::StatusOr<LookupReply> LookupResultFromProto(const v1::LookupResponse& response,
                                                   const TakeAnswerTensor& take);

}  // namespace meft::worker
