#include "gpu_worker/data/collate.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace meft::worker {
namespace {

absl::Status TorchError(const char* what, const std::exception& e) {
  return absl::InternalError(absl::StrCat(what, ": LibTorch error: ", e.what()));
}

}  // namespace

absl::StatusOr<TokenizedExample> TokenizeExample(const Example& example,
                                                 const PromptFormatter& formatter,
                                                 const Tokenizer& tokenizer,
                                                 const TokenizeOptions& options) {
  if (options.max_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_length must be at least 2, got ", options.max_length));
  }
  const FormattedPrompt formatted = formatter.FormatWithSpans(example);
  MEFT_ASSIGN_OR_RETURN(const std::vector<int64_t> prompt,
                        tokenizer.Encode(formatted.text, formatted.template_spans));
  MEFT_ASSIGN_OR_RETURN(const std::vector<int64_t> output, tokenizer.Encode(example.output));

  TokenizedExample result;
  std::vector<int64_t>& ids = result.input_ids;
  const std::vector<int64_t>& prefix = tokenizer.prefix_ids();
  ids.reserve(prefix.size() + prompt.size() + output.size() + 1);
  ids.insert(ids.end(), prefix.begin(), prefix.end());
  ids.insert(ids.end(), prompt.begin(), prompt.end());
  ids.insert(ids.end(), output.begin(), output.end());
  ids.push_back(tokenizer.eos_id());
  const int64_t prompt_length = static_cast<int64_t>(prefix.size() + prompt.size());
  result.prompt_length = prompt_length;

  result.labels = ids;
  if (!options.train_on_inputs) {
    std::fill(result.labels.begin(), result.labels.begin() + prompt_length, kIgnoreIndex);
  }

  const int64_t length = static_cast<int64_t>(ids.size());
  if (length > options.max_length) {
    const int64_t first_response_id = ids[prompt_length];
    result.truncated = true;
    ids.resize(options.max_length);
    result.labels.resize(options.max_length);
    const bool has_label = std::any_of(result.labels.begin() + 1, result.labels.end(),
                                       [](int64_t label) { return label != kIgnoreIndex; });
    if (!has_label) {
      ids.back() = first_response_id;
      result.labels.back() = first_response_id;
    }
    result.prompt_length =
        std::min<int64_t>(prompt_length, has_label ? options.max_length : options.max_length - 1);
  }
  return result;
}

absl::StatusOr<TokenizedDataset> TokenizeExamples(const std::vector<Example>& examples,
                                                  const PromptFormatter& formatter,
                                                  const Tokenizer& tokenizer,
                                                  const TokenizeOptions& options) {
  TokenizedDataset dataset;
  dataset.examples.reserve(examples.size());
  for (const Example& example : examples) {
    MEFT_ASSIGN_OR_RETURN(TokenizedExample tokenized,
                          TokenizeExample(example, formatter, tokenizer, options));
    if (tokenized.truncated) ++dataset.num_truncated;
    dataset.examples.push_back(std::move(tokenized));
  }
  if (dataset.num_truncated > 0) {
    spdlog::warn("{} of {} examples were longer than max_length = {} tokens and were truncated",
                 dataset.num_truncated, examples.size(), options.max_length);
  }
  return dataset;
}

absl::StatusOr<Batch> CollateRightPadded(const std::vector<TokenizedExample>& examples,
                                         std::span<const int64_t> indices, int64_t pad_id) {
  if (indices.empty()) return absl::InvalidArgumentError("CollateRightPadded: no examples");
  int64_t max_length = 0;
  for (const int64_t index : indices) {
    if (index < 0 || index >= static_cast<int64_t>(examples.size())) {
      return absl::InvalidArgumentError(absl::StrCat("CollateRightPadded: example index ", index,
                                                     " is outside [0, ", examples.size(), ")"));
    }
    max_length =
        std::max<int64_t>(max_length, static_cast<int64_t>(examples[index].input_ids.size()));
  }
  if (max_length == 0) return absl::InvalidArgumentError("CollateRightPadded: empty examples");
  const int64_t rows = static_cast<int64_t>(indices.size());
  Batch batch;
  try {
    const auto options = at::TensorOptions().dtype(at::kLong);
    batch.input_ids = at::full({rows, max_length}, pad_id, options);
    batch.attention_mask = at::zeros({rows, max_length}, options);
    batch.labels = at::full({rows, max_length}, kIgnoreIndex, options);
    int64_t* ids = batch.input_ids.data_ptr<int64_t>();
    int64_t* mask = batch.attention_mask.data_ptr<int64_t>();
    int64_t* labels = batch.labels.data_ptr<int64_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const TokenizedExample& example = examples[indices[row]];
      const int64_t offset = row * max_length;
      std::copy(example.input_ids.begin(), example.input_ids.end(), ids + offset);
      std::copy(example.labels.begin(), example.labels.end(), labels + offset);
      std::fill_n(mask + offset, example.input_ids.size(), 1);
    }
  } catch (const c10::Error& e) {
    return TorchError("CollateRightPadded", e);
  } catch (const std::exception& e) {
    return TorchError("CollateRightPadded", e);
  }
  batch.example_indices.assign(indices.begin(), indices.end());
  return batch;
}

absl::StatusOr<std::vector<int64_t>> TokenizePrompt(const Example& example,
                                                    const PromptFormatter& formatter,
                                                    const Tokenizer& tokenizer,
                                                    int64_t max_prompt_length, bool* truncated) {
  const FormattedPrompt formatted = formatter.FormatWithSpans(example);
  MEFT_ASSIGN_OR_RETURN(const std::vector<int64_t> prompt,
                        tokenizer.Encode(formatted.text, formatted.template_spans));
  const std::vector<int64_t>& prefix = tokenizer.prefix_ids();
  std::vector<int64_t> ids = prefix;
  ids.insert(ids.end(), prompt.begin(), prompt.end());
  const int64_t kept_prefix = static_cast<int64_t>(prefix.size());
  const int64_t limit = std::max<int64_t>(max_prompt_length, kept_prefix + 1);
  const bool cut = static_cast<int64_t>(ids.size()) > limit;
  if (cut) ids.erase(ids.begin() + kept_prefix, ids.end() - (limit - kept_prefix));
  if (truncated != nullptr) *truncated = cut;
  return ids;
}

absl::StatusOr<Batch> CollateLeftPadded(const std::vector<std::vector<int64_t>>& prompts,
                                        std::span<const int64_t> indices, int64_t pad_id) {
  if (indices.empty()) return absl::InvalidArgumentError("CollateLeftPadded: no prompts");
  int64_t max_length = 0;
  for (const int64_t index : indices) {
    if (index < 0 || index >= static_cast<int64_t>(prompts.size())) {
      return absl::InvalidArgumentError(absl::StrCat("CollateLeftPadded: prompt index ", index,
                                                     " is outside [0, ", prompts.size(), ")"));
    }
    if (prompts[index].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CollateLeftPadded: prompt ", index, " is empty"));
    }
    max_length = std::max<int64_t>(max_length, static_cast<int64_t>(prompts[index].size()));
  }
  const int64_t rows = static_cast<int64_t>(indices.size());
  Batch batch;
  try {
    const auto options = at::TensorOptions().dtype(at::kLong);
    batch.input_ids = at::full({rows, max_length}, pad_id, options);
    batch.attention_mask = at::zeros({rows, max_length}, options);
    int64_t* ids = batch.input_ids.data_ptr<int64_t>();
    int64_t* mask = batch.attention_mask.data_ptr<int64_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const std::vector<int64_t>& prompt = prompts[indices[row]];
      const int64_t offset = row * max_length + max_length - static_cast<int64_t>(prompt.size());
      std::copy(prompt.begin(), prompt.end(), ids + offset);
      std::fill_n(mask + offset, prompt.size(), 1);
    }
  } catch (const c10::Error& e) {
    return TorchError("CollateLeftPadded", e);
  } catch (const std::exception& e) {
    return TorchError("CollateLeftPadded", e);
  }
  batch.example_indices.assign(indices.begin(), indices.end());
  return batch;
}

}  // namespace meft::worker
