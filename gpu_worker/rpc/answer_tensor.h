#pragma once

// A tensor of a parameter server's answer as a torch tensor, for both transports: the bytes are
// the message's inline `data` or an arena span, checked against the tensor's shape and dtype.

#include <torch/torch.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "meft/v1/param_server.pb.h"

namespace meft::worker {

// `t` (fp32, bf16 or int32) over `size` bytes at `data`, which must be exactly its elements.
// float32 and bfloat16 tensors alias `data` without a copy and keep `owner` (whatever keeps the
// bytes alive) until they are released; int32 is widened to an int64 copy. `data` must be
// aligned for the dtype. A negative or overflowing shape, another dtype, or a byte count that
// does not match give DATA_LOSS "server answer <field>: ...".
absl::StatusOr<torch::Tensor> AnswerTensor(const v1::Tensor& t, const char* field, void* data,
                                           uint64_t size, std::shared_ptr<const void> owner);

}  // namespace meft::worker
