#pragma once

// Loading the tensors of a Hugging Face model folder: either one `model.safetensors` or shards
// listed by `model.safetensors.index.json` ({"weight_map": {tensor name: shard file name}}).

#include <torch/types.h>

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace meft::worker {

// Tensor name -> path of the safetensors file it was read from (for error messages).
using WeightSources = std::map<std::string, std::string>;

// Reads every tensor of the model in `model_dir` into host memory, converted to `dtype`
// (torch::kFloat32, kBFloat16 or kFloat16). The returned tensors are contiguous CPU tensors that
// own their memory (copied out of the file mapping, which is closed before returning) and have
// requires_grad == false. If `sources` is not null it receives each tensor's file.
//
// model.safetensors is used when present (as transformers does), else the index. Index checks:
// it is a JSON object with an object "weight_map" of string file names inside `model_dir`; every
// listed shard exists and holds the tensor the map assigns to it; no shard holds a tensor that
// the map does not assign to that shard.
//
// Errors name the file and, where there is one, the tensor (and the index and shard for index
// problems): NOT_FOUND if neither weight file exists or a shard or tensor is missing;
// INVALID_ARGUMENT for corrupt files, a malformed index, an unsupported stored dtype (anything
// but F32/BF16/F16) or an unsupported `dtype`; INTERNAL if LibTorch fails. Never throws.
// Thread-safe (only reads files).
absl::StatusOr<std::map<std::string, torch::Tensor>> LoadWeights(const std::string& model_dir,
                                                                 torch::ScalarType dtype,
                                                                 WeightSources* sources = nullptr);

}  // namespace meft::worker
