#pragma once

// From examples to model inputs: tokenization with prompt masking and truncation, right-padded
// training micro-batches and left-padded prompt batches for generation.
//
// Nothing here throws: LibTorch errors are caught and returned as INTERNAL. Tensors are created
// on the CPU; the caller moves them to the GPU.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/data/jsonl.h"
#include "gpu_worker/data/prompt.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

// Label value the loss ignores (PyTorch's cross-entropy ignore_index).
inline constexpr int64_t kIgnoreIndex = -100;

struct TokenizeOptions {
  // Longest sequence in tokens, prefix (BOS) and EOS included; at least 2.
  int64_t max_length = 512;
  // Also train on the prompt tokens (labels = input ids everywhere).
  bool train_on_inputs = false;
};

// One training sequence. input_ids.size() == labels.size() <= max_length.
struct TokenizedExample {
  std::vector<int64_t> input_ids;
  // kIgnoreIndex where no loss is taken; otherwise equal to input_ids at that position. The
  // model shifts labels by one (labels[t] is predicted from positions < t), as in Hugging Face.
  std::vector<int64_t> labels;
  // Number of leading positions that belong to the prefix (BOS) + prompt (after truncation).
  int64_t prompt_length = 0;
  bool truncated = false;
};

// Tokenizes one example as
//   input_ids = prefix_ids + Encode(prompt) + Encode(output) + [EOS]
// where prefix_ids is what the tokenizer's add_special_tokens puts before a sequence ([BOS] for
// Llama, nothing for SmolLM2); its suffix_ids are not used (EOS is always appended once). The
// prompt (special tokens matched in the template's text only) and the output (never matched)
// are encoded separately and concatenated, so the prompt/response boundary is exact: position
// |prefix| + |Encode(prompt)| is the first response token. The price, for SentencePiece, is its
// dummy prefix "▁" before the output's first token, as if the response began with a space;
// generation with the same tokenizer learns and strips it consistently.
// labels = kIgnoreIndex on prefix + prompt unless `train_on_inputs`, input_ids elsewhere (the EOS
// is trained, so the model learns to stop; with chatml and SmolLM2 that EOS is <|im_end|>).
// Truncation (when longer than max_length): keep the first max_length positions. If that leaves
// no trained position at index >= 1 (a prompt that fills max_length), the last kept position is
// replaced by the first response token, so every example trains at least one label.
// INVALID_ARGUMENT if max_length < 2; the tokenizer's errors are passed on.
absl::StatusOr<TokenizedExample> TokenizeExample(const Example& example,
                                                 const PromptFormatter& formatter,
                                                 const Tokenizer& tokenizer,
                                                 const TokenizeOptions& options);

struct TokenizedDataset {
  std::vector<TokenizedExample> examples;
  // How many examples were truncated (also logged as a warning when non-zero).
  int64_t num_truncated = 0;
};

// TokenizeExample over all examples, in order.
absl::StatusOr<TokenizedDataset> TokenizeExamples(const std::vector<Example>& examples,
                                                  const PromptFormatter& formatter,
                                                  const Tokenizer& tokenizer,
                                                  const TokenizeOptions& options);

// A micro-batch. All tensors are [B, T] int64 on the CPU, T = the longest sequence in the batch.
struct Batch {
  at::Tensor input_ids;
  // 1 for real tokens, 0 for padding.
  at::Tensor attention_mask;
  // kIgnoreIndex at padding; undefined (not defined()) for prompt batches.
  at::Tensor labels;
  // Row b holds the example at this index of the dataset the batch was built from.
  std::vector<int64_t> example_indices;
  // DataLoader position of this batch (0 for batches built directly).
  int64_t epoch = 0;
  int64_t index = 0;
};

// Right-padded training batch of examples[indices[0]], examples[indices[1]], ...: input_ids
// padded with `pad_id`, attention_mask 0 and labels kIgnoreIndex at padding. INVALID_ARGUMENT if
// `indices` is empty or holds an index out of range.
absl::StatusOr<Batch> CollateRightPadded(const std::vector<TokenizedExample>& examples,
                                         std::span<const int64_t> indices, int64_t pad_id);

// Prompt ids for generation: prefix_ids + Encode(prompt) (special tokens matched in the
// template's text only). A prompt longer than `max_prompt_length` (at least |prefix| + 1) keeps
// the prefix and its last tokens, since the end of the prompt ("### Response:\n") is what
// generation continues from; `*truncated` (if given) says whether that happened. The tokenizer's
// errors are passed on.
absl::StatusOr<std::vector<int64_t>> TokenizePrompt(const Example& example,
                                                    const PromptFormatter& formatter,
                                                    const Tokenizer& tokenizer,
                                                    int64_t max_prompt_length,
                                                    bool* truncated = nullptr);

// Left-padded batch of prompts[indices[i]] for batched generation: row i is padding (pad_id,
// attention_mask 0) followed by the prompt, so every row ends at column T - 1 and generated
// tokens are appended at the same column. The model must derive position ids from the mask
// (cumsum - 1) so that padding does not shift positions. labels is left undefined.
// INVALID_ARGUMENT if `indices` is empty, holds an index out of range or selects an empty prompt.
absl::StatusOr<Batch> CollateLeftPadded(const std::vector<std::vector<int64_t>>& prompts,
                                        std::span<const int64_t> indices, int64_t pad_id);

}  // namespace meft::worker
