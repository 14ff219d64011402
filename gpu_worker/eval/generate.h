#pragma once

// Autoregressive generation with the frozen decoder (llama.h): greedy decoding and Hugging
// Face-style beam search, batched over prompts with left padding and the model's KvCache.

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama.h"

namespace meft::worker {

struct GenerateOptions {
  // Most tokens generated per prompt, EOS included; 0 gives empty continuations.
  int64_t max_new_tokens = 32;
  // Beams per prompt; 1 = greedy decoding.
  int64_t num_beams = 1;
  // Beam search only: a hypothesis of L generated tokens (its EOS counted, as Hugging Face does)
  // with summed log-probability s scores s / L^length_penalty. > 0 favours longer outputs.
  double length_penalty = 1.0;
  // Prompts per forward batch (the batch holds batch_size * num_beams rows while decoding).
  int64_t batch_size = 8;
};

// OK, or INVALID_ARGUMENT naming the field: max_new_tokens < 0, num_beams < 1, batch_size < 1,
// non-finite length_penalty.
absl::Status ValidateGenerateOptions(const GenerateOptions& options);

// For each prompt (token ids, BOS included), the generated continuation: prompt excluded, EOS
// excluded, stopping at EOS or after max_new_tokens tokens. out[i] belongs to prompts[i].
//
// Prompts are processed in batches of options.batch_size, grouped by length (longest first) to
// limit padding; each batch is left-padded with `pad_id` and decoded with a KvCache, so a
// prompt's result does not depend on which other prompts share its batch (up to floating-point
// rounding). Rows that finish leave the batch. `eos_id` < 0 means no token ends a sequence.
//
// Greedy (num_beams == 1): the argmax token at each step.
// Beam search (num_beams > 1), as Hugging Face's BeamSearchScorer with one returned sequence:
// each step ranks, per prompt, the top 2 * num_beams (beam, token) candidates by summed
// log-softmax probability; an EOS candidate ranked among the first num_beams becomes a finished
// hypothesis (scored as in GenerateOptions::length_penalty), the best num_beams non-EOS
// candidates continue as beams (fewer when the vocabulary is too small). At most num_beams
// finished hypotheses are kept. A prompt stops early once it holds num_beams hypotheses and no
// live beam can still beat the worst of them: log-probabilities are <= 0, so a live beam's best
// possible score is its current sum divided by max_new_tokens^length_penalty when
// length_penalty > 0, and by (its length + 1)^length_penalty otherwise. This bound is exact,
// so stopping early never changes the result (unlike Hugging Face's default heuristic). After
// max_new_tokens steps the live beams become hypotheses too; the best-scoring one is returned.
//
// `hooks` (may be null) is passed to every Forward call; generation runs under
// torch::NoGradGuard.
// INVALID_ARGUMENT for bad options (ValidateGenerateOptions), an empty prompt, a prompt or pad id
// outside [0, vocab_size) or an eos_id >= vocab_size (messages name the prompt); INTERNAL if
// LibTorch (or a hook) throws. Thread-safety: as LlamaModel::Forward (distinct hooks per concurrent
// call).
absl::StatusOr<std::vector<std::vector<int64_t>>> Generate(
    const LlamaModel& model, const std::vector<std::vector<int64_t>>& prompts, int64_t eos_id,
    int64_t pad_id, const GenerateOptions& options, AdapterHooks* hooks);

}  // namespace meft::worker
