#include "gpu_worker/model/random_weights.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <vector>

#include "gpu_worker/model/llama_tensors.h"

namespace meft::worker {
namespace {

// The weights of `c` under their Hugging Face names: `normal(shape)` draws each projection and
// embedding (in LlamaTensorSpecs' order, so the draws stay in that order), norm weights are ones
// made with `options`.
template <typename Normal>
std::map<std::string, torch::Tensor> Build(const ModelConfig& c, Normal normal,
                                           const torch::TensorOptions& options) {
  std::map<std::string, torch::Tensor> w;
  for (const LlamaTensorSpec& t : LlamaTensorSpecs(LlamaDimsOf(c))) {
    w[t.name] = t.is_norm() ? torch::ones(t.shape, options) : normal(t.shape);
  }
  return w;
}

}  // namespace

std::map<std::string, torch::Tensor> RandomLlamaWeights(const ModelConfig& c, uint64_t seed,
                                                        double std) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  auto normal = [&](std::vector<int64_t> shape) {
    return torch::normal(0.0, std, shape, gen, options);
  };
  return Build(c, normal, options);
}

std::map<std::string, torch::Tensor> RandomLlamaWeightsOn(const ModelConfig& c, uint64_t seed,
                                                          torch::Device device,
                                                          torch::ScalarType dtype, double std) {
  torch::manual_seed(seed);
  const auto options = torch::TensorOptions().device(device).dtype(dtype);
  // normal_ fills in place in `dtype`: no fp32 temporary of the tensor's size.
  auto normal = [&](std::vector<int64_t> shape) {
    return torch::empty(shape, options).normal_(0.0, std);
  };
  return Build(c, normal, options);
}

}  // namespace meft::worker
