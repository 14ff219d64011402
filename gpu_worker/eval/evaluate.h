#pragma once

// Evaluation of the (adapted) model on instruction data (DESIGN §5): generate a response for
// each example's prompt, score it against the example's references with the chosen metrics,
// and write predictions.jsonl and metrics.json.

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/eval/generate.h"
#include "gpu_worker/eval/metrics.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

struct EvaluateOptions {
  // Metrics computed for every example, e.g. {Metric::kNqSubstring}; may be empty (predictions
  // only).
  std::vector<Metric> metrics;
  GenerateOptions generate;
  // Longest prompt in tokens, BOS included (see TokenizePrompt); at least 2.
  int64_t max_prompt_length = 512;
  // Directory that receives predictions.jsonl and metrics.json (created if missing); "" writes
  // nothing.
  std::string output_dir;
  // Evaluate only the first `limit` examples; 0 = all.
  int64_t limit = 0;
  // Extra string entries for metrics.json (model, checkpoint, step, ...). They take precedence
  // over the generation settings Evaluate records; "num_examples", "metrics" and "counts" are
  // reserved.
  std::map<std::string, std::string> metadata;
};

struct EvaluateResult {
  MetricsSummary summary;
  // One per evaluated example, in the order of `examples`.
  std::vector<PredictionRecord> records;
};

// Evaluates the first `limit` (or all) examples: prompt = TokenizePrompt(example, formatter,
// tokenizer, max_prompt_length); continuation = Generate(model, prompts, tokenizer.eos_id(),
// tokenizer.pad_id(), options.generate, hooks); prediction = tokenizer.Decode(continuation)
// (special tokens skipped); references = References(example); scores per options.metrics;
// summary = Summarize(records).
//
// Each record carries the example's id, the untruncated prompt text, the prediction, the
// references and the scores. With output_dir set, writes <output_dir>/predictions.jsonl and
// <output_dir>/metrics.json; besides the summary, metrics.json holds the generation settings as
// strings ("decoding": "greedy" or "beam_search", "max_new_tokens", "num_beams",
// "length_penalty", "max_prompt_length", "num_truncated_prompts") and options.metadata.
//
// `progress`, if set, is called on the caller's thread after each generation batch with the
// number of examples done so far and the total. `hooks` as for Generate.
//
// INVALID_ARGUMENT for bad options (negative limit, max_prompt_length < 2, bad generate options,
// a reserved metadata key) or a tokenizer whose vocabulary is larger than the model's; errors of
// the tokenizer, of Generate and of writing the files are passed on. Never throws.
absl::StatusOr<EvaluateResult> Evaluate(
    const LlamaModel& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
    const PromptFormatter& formatter, const EvaluateOptions& options, AdapterHooks* hooks,
    const std::function<void(int64_t done, int64_t total)>& progress = {});

}  // namespace meft::worker
