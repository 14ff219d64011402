#include "gpu_worker/eval/evaluate.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace meft::worker {
namespace {

absl::Status ValidateOptions(const EvaluateOptions& options) {
  if (options.limit < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("evaluate: limit must be >= 0, got ", options.limit));
  }
  if (options.max_prompt_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("evaluate: max_prompt_length must be >= 2, got ", options.max_prompt_length));
  }
  for (const char* reserved : {"num_examples", "metrics", "counts"}) {
    if (options.metadata.count(reserved) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("evaluate: metadata key \"", reserved, "\" is reserved in metrics.json"));
    }
  }
  return ValidateGenerateOptions(options.generate);
}

std::map<std::string, std::string> MetricsExtra(const EvaluateOptions& options,
                                                int64_t num_truncated) {
  std::map<std::string, std::string> extra = options.metadata;
  const GenerateOptions& g = options.generate;
  // insert() leaves the caller's metadata in place on a clash.
  extra.insert({"decoding", g.num_beams == 1 ? "greedy" : "beam_search"});
  extra.insert({"max_new_tokens", absl::StrCat(g.max_new_tokens)});
  extra.insert({"num_beams", absl::StrCat(g.num_beams)});
  extra.insert({"length_penalty", absl::StrCat(g.length_penalty)});
  extra.insert({"max_prompt_length", absl::StrCat(options.max_prompt_length)});
  extra.insert({"num_truncated_prompts", absl::StrCat(num_truncated)});
  return extra;
}

}  // namespace

absl::StatusOr<EvaluateResult> Evaluate(
    const LlamaModel& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
    const PromptFormatter& formatter, const EvaluateOptions& options, AdapterHooks* hooks,
    const std::function<void(int64_t done, int64_t total)>& progress) {
  MEFT_RETURN_IF_ERROR(ValidateOptions(options));
  if (tokenizer.vocab_size() > model.config().vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("evaluate: tokenizer '", tokenizer.source(), "' has ", tokenizer.vocab_size(),
                     " pieces but the model's vocabulary has only ", model.config().vocab_size));
  }
  const int64_t total =
      options.limit > 0 ? std::min<int64_t>(options.limit, static_cast<int64_t>(examples.size()))
                        : static_cast<int64_t>(examples.size());

  std::vector<std::vector<int64_t>> prompts(total);
  int64_t num_truncated = 0;
  for (int64_t i = 0; i < total; ++i) {
    bool truncated = false;
    MEFT_ASSIGN_OR_RETURN(prompts[i], TokenizePrompt(examples[i], formatter, tokenizer,
                                                     options.max_prompt_length, &truncated));
    if (truncated) ++num_truncated;
  }
  if (num_truncated > 0) {
    spdlog::warn("{} of {} prompts were longer than max_prompt_length = {} tokens; kept their end",
                 num_truncated, total, options.max_prompt_length);
  }

  // Generate sorts each call's prompts by length; sorting here first makes the progress batches
  // the same as Generate's own batches.
  std::vector<int64_t> order(total);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&prompts](int64_t a, int64_t b) {
    return prompts[a].size() > prompts[b].size();
  });
  std::vector<std::vector<int64_t>> generated(total);
  const int64_t chunk = options.generate.batch_size;
  for (int64_t begin = 0; begin < total; begin += chunk) {
    const int64_t end = std::min(total, begin + chunk);
    std::vector<std::vector<int64_t>> batch;
    batch.reserve(end - begin);
    for (int64_t k = begin; k < end; ++k) batch.push_back(std::move(prompts[order[k]]));
    MEFT_ASSIGN_OR_RETURN(
        std::vector<std::vector<int64_t>> out,
        Generate(model, batch, tokenizer.eos_id(), tokenizer.pad_id(), options.generate, hooks));
    for (int64_t k = begin; k < end; ++k) generated[order[k]] = std::move(out[k - begin]);
    if (progress) progress(end, total);
  }

  EvaluateResult result;
  result.records.reserve(total);
  for (int64_t i = 0; i < total; ++i) {
    const Example& example = examples[i];
    PredictionRecord record;
    record.id = example.id;
    record.prompt = formatter.Format(example);
    record.prediction = tokenizer.Decode(generated[i]);
    record.references = References(example);
    ScoreRecord(options.metrics, &record);
    result.records.push_back(std::move(record));
  }
  result.summary = Summarize(result.records);

  if (!options.output_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(options.output_dir, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("evaluate: cannot create output directory '",
                                              options.output_dir, "': ", ec.message()));
    }
    const std::filesystem::path dir(options.output_dir);
    MEFT_RETURN_IF_ERROR(
        WritePredictionsJsonl((dir / "predictions.jsonl").string(), result.records));
    MEFT_RETURN_IF_ERROR(WriteMetricsJson((dir / "metrics.json").string(), result.summary,
                                          MetricsExtra(options, num_truncated)));
  }
  return result;
}

}  // namespace meft::worker
