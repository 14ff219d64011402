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

}  // namespace meft::worker
