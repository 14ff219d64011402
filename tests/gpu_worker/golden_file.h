#pragma once

// Reading the decoder golden files of tests/golden/ (see tests/golden/README.md):
// golden.json = {"source", "input_ids", "attention_mask", "logits_shape", "logits"} with the
// logits flattened row-major, and optionally "vocab_indices": the vocabulary ids whose logits are
// stored (then logits_shape is [B, T, vocab_indices.size()]; absent = every id).

#include <torch/torch.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace meft::worker::test_golden {

struct Golden {
  torch::Tensor input_ids;       // [B, T] int64
  torch::Tensor attention_mask;  // [B, T] int64
  torch::Tensor logits;          // [B, T, V'] fp32
  torch::Tensor vocab_indices;   // [V'] int64, or undefined when every id is stored
  std::string source;
};

inline nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

// Reads `model_dir`/golden.json; throws nlohmann::json's exceptions on a malformed file.
inline Golden ReadGolden(const std::string& model_dir) {
  using nlohmann::json;
  json g = ReadJson(model_dir + "/golden.json");
  Golden out;
  out.source = g.at("source").get<std::string>();
  auto to_2d = [](const json& rows) {
    std::vector<int64_t> flat;
    for (const json& row : rows) {
      for (const json& x : row) flat.push_back(x.get<int64_t>());
    }
    const int64_t b = static_cast<int64_t>(rows.size());
    return torch::tensor(flat, torch::kInt64).view({b, -1});
  };
  out.input_ids = to_2d(g.at("input_ids"));
  out.attention_mask = to_2d(g.at("attention_mask"));
  std::vector<int64_t> shape = g.at("logits_shape").get<std::vector<int64_t>>();
  std::vector<float> logits = g.at("logits").get<std::vector<float>>();
  out.logits = torch::tensor(logits, torch::kFloat32).view(shape);
  if (g.contains("vocab_indices")) {
    out.vocab_indices =
        torch::tensor(g.at("vocab_indices").get<std::vector<int64_t>>(), torch::kInt64);
  }
  return out;
}

// Max |a - b| over the positions where mask is 1 ([B, T] masks, [B, T, V] logits).
inline double MaxErrorAtRealPositions(const torch::Tensor& a, const torch::Tensor& b,
                                      const torch::Tensor& mask) {
  torch::Tensor real = mask.to(torch::kBool);
  return (a.index({real}) - b.index({real})).abs().max().item<double>();
}

}  // namespace meft::worker::test_golden
