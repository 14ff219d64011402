#pragma once

// A tiny next-token task over the golden llama_tiny model's vocabulary, shared by the trainer
// tests: fixed question -> answer pairs, the answer token and EOS labelled.

#include <cstdint>
#include <vector>

#include "gpu_worker/data/dataset.h"

namespace meft::worker::test_data {

inline std::vector<TokenizedExample> TinyDataset(int64_t n) {
  std::vector<TokenizedExample> out;
  for (int64_t i = 0; i < n; ++i) {
    TokenizedExample e;
    e.input_ids = {1, 10 + i % 7, 20 + i % 5, 40 + (i * 7) % 30, 2};
    e.labels = {kIgnoreIndex, kIgnoreIndex, kIgnoreIndex, e.input_ids[3], 2};
    e.prompt_length = 3;
    out.push_back(e);
  }
  return out;
}

}  // namespace meft::worker::test_data
