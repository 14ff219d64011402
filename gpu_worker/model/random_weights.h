#pragma once

// Random LLaMA weights for tests and benchmarks that need a model of a chosen shape without a
// checkpoint: every projection and the embeddings N(0, std^2), RMSNorm weights 1, Hugging Face
// tensor names (pass the map to LlamaModel::FromWeights).

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>

#include "gpu_worker/model/model_config.h"

namespace meft::worker {

// fp32 CPU tensors for `config` (lm_head.weight only when the embeddings are not tied), drawn
// from a generator seeded with `seed`: the same (config, seed) gives the same weights.
std::map<std::string, torch::Tensor> RandomLlamaWeights(const ModelConfig& config, uint64_t seed,
                                                        double std = 0.02);

// The same tensors drawn directly on `device` in `dtype` (no host copy: a 7B model in bf16 is
// 13.5 GB), from the default generator of the device, which this reseeds with `seed` (as
// torch::manual_seed does, for every device). The same (config, seed, device type, dtype) gives
// the same weights; CPU and CUDA draw different numbers. Throws c10::Error when the device runs
// out of memory.
std::map<std::string, torch::Tensor> RandomLlamaWeightsOn(const ModelConfig& config, uint64_t seed,
                                                          torch::Device device,
                                                          torch::ScalarType dtype,
                                                          double std = 0.02);

}  // namespace meft::worker
