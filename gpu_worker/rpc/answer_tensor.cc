#include "gpu_worker/rpc/answer_tensor.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace meft::worker {

absl::StatusOr<torch::Tensor> AnswerTensor(const v1::Tensor& t, const char* field, void* data,
                                           uint64_t size, std::shared_ptr<const void> owner) {
  std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && numel > (int64_t{1} << 40) / d)) {
      return absl::DataLossError(absl::StrCat("server answer ", field, ": bad shape"));
    }
    numel *= d;
  }
  uint64_t elem = 4;
  torch::ScalarType type = torch::kFloat32;
  switch (t.dtype()) {
    case v1::DTYPE_FP32:
      break;
    case v1::DTYPE_BF16:
      elem = 2;
      type = torch::kBFloat16;
      break;
    case v1::DTYPE_INT32:
      type = torch::kInt32;
      break;
    default:
      return absl::DataLossError(absl::StrCat("server answer ", field, ": unexpected dtype ",
                                              static_cast<int>(t.dtype())));
  }
  if (size != static_cast<uint64_t>(numel) * elem) {
    return absl::DataLossError(
        absl::StrCat("server answer ", field, ": ", size, " bytes for ", numel, " elements"));
  }
  if (type == torch::kInt32) return torch::from_blob(data, shape, torch::kInt32).to(torch::kInt64);
  return torch::from_blob(
      data, shape, [owner = std::move(owner)](void*) {}, torch::TensorOptions().dtype(type));
}

}  // namespace meft::worker
