#include "gpu_worker/eval/generate.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/status_error.h"

namespace meft::worker {
namespace {

using Sequences = std::vector<std::vector<int64_t>>;

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// The logits of the last position of every row, [R, V] fp32.
torch::Tensor LastLogits(const torch::Tensor& logits) {
  return logits.select(1, logits.size(1) - 1);
}

// Host copy of a small tensor, contiguous, so data_ptr indexing is row-major.
torch::Tensor ToHost(const torch::Tensor& t) { return t.to(torch::kCPU).contiguous(); }

absl::Status ValidatePrompts(const Sequences& prompts, int64_t vocab_size, int64_t eos_id,
                             int64_t pad_id) {
  if (pad_id < 0 || pad_id >= vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pad_id ", pad_id, " is outside the model's vocabulary [0, ", vocab_size, ")"));
  }
  if (eos_id >= vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eos_id ", eos_id, " is outside the model's vocabulary [0, ", vocab_size, ")"));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty())
      return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " is empty"));
    for (size_t j = 0; j < prompts[i].size(); ++j) {
      const int64_t id = prompts[i][j];
      if (id < 0 || id >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " token ", j, ": id ", id,
                                                       " is outside the model's vocabulary [0, ",
                                                       vocab_size, ")"));
      }
    }
  }
  return absl::OkStatus();
}

// Greedy decoding of prompts[indices[i]] as one left-padded batch; appends the tokens of prompt
// p to (*out)[p]. Rows that emit EOS leave the batch (the cache follows with ReorderBatch).
absl::Status GreedyBatch(const LlamaModel& model, const Sequences& prompts,
                         std::span<const int64_t> indices, int64_t eos_id, int64_t pad_id,
                         int64_t max_new_tokens, AdapterHooks* hooks, Sequences* out) {
  MEFT_ASSIGN_OR_RETURN(Batch batch, CollateLeftPadded(prompts, indices, pad_id));
  KvCache cache;
  // rows[r]: the prompt that live row r of the batch (and the cache) belongs to.
  std::vector<int64_t> rows(indices.begin(), indices.end());
  torch::Tensor logits = model.Forward(batch.input_ids, batch.attention_mask, &cache, hooks);
  for (int64_t step = 0;; ++step) {
    const torch::Tensor next = ToHost(LastLogits(logits).argmax(-1));
    const int64_t* tokens = next.data_ptr<int64_t>();
    std::vector<int64_t> keep, keep_rows, keep_tokens;
    for (size_t r = 0; r < rows.size(); ++r) {
      if (tokens[r] == eos_id) continue;
      (*out)[rows[r]].push_back(tokens[r]);
      keep.push_back(static_cast<int64_t>(r));
      keep_rows.push_back(rows[r]);
      keep_tokens.push_back(tokens[r]);
    }
    if (step + 1 >= max_new_tokens || keep.empty()) break;
    if (keep.size() < rows.size()) cache.ReorderBatch(torch::tensor(keep, torch::kInt64));
    rows = std::move(keep_rows);
    const torch::Tensor input = torch::tensor(keep_tokens, torch::kInt64).view({-1, 1});
    logits = model.Forward(input, /*attention_mask=*/{}, &cache, hooks);
  }
  return absl::OkStatus();
}

// Beam search state of one prompt.
struct Beam {
  int64_t row = 0;   // Row of the batch (and cache) whose next-token distribution extends it.
  double sum = 0.0;  // Summed log-probability of `tokens`.
  std::vector<int64_t> tokens;
};
struct Hypothesis {
  double score = 0.0;
  std::vector<int64_t> tokens;  // EOS excluded.
};
struct PromptBeams {
  std::vector<Beam> beams;           // Live beams, best first.
  std::vector<Hypothesis> finished;  // Best first, at most num_beams.
  bool done = false;
};

// Keeps the best `capacity` hypotheses (Hugging Face's BeamHypotheses.add).
void AddHypothesis(double score, std::vector<int64_t> tokens, size_t capacity,
                   std::vector<Hypothesis>* finished) {
  if (finished->size() >= capacity && score <= finished->back().score) return;
  auto pos = std::upper_bound(finished->begin(), finished->end(), score,
                              [](double s, const Hypothesis& h) { return s > h.score; });
  finished->insert(pos, Hypothesis{score, std::move(tokens)});
  if (finished->size() > capacity) finished->pop_back();
}

absl::Status BeamSearchBatch(const LlamaModel& model, const Sequences& prompts,
                             std::span<const int64_t> indices, int64_t eos_id, int64_t pad_id,
                             const GenerateOptions& options, AdapterHooks* hooks, Sequences* out) {
  MEFT_ASSIGN_OR_RETURN(Batch batch, CollateLeftPadded(prompts, indices, pad_id));
  const size_t num_beams = static_cast<size_t>(options.num_beams);
  const int64_t vocab = model.config().vocab_size;
  const double lp = options.length_penalty;
  const auto penalised = [lp](double sum, int64_t length) {
    return sum / std::pow(static_cast<double>(length), lp);
  };

  std::vector<PromptBeams> state(indices.size());
  for (size_t p = 0; p < indices.size(); ++p)
    state[p].beams.push_back(Beam{static_cast<int64_t>(p)});

  KvCache cache;
  torch::Tensor logits = model.Forward(batch.input_ids, batch.attention_mask, &cache, hooks);
  const int64_t per_row = std::min<int64_t>(2 * options.num_beams, vocab);
  struct Candidate {
    double sum;
    size_t beam;
    int64_t token;
  };
  for (int64_t step = 0;; ++step) {
    const int64_t length = step + 1;  // Generated tokens once this step's token is appended.
    // The best 2K candidates of a prompt are among the per-row top 2K, so only those leave the
    // device.
    const auto top = torch::log_softmax(LastLogits(logits), -1).topk(per_row, -1);
    const torch::Tensor top_values = ToHost(std::get<0>(top).to(torch::kFloat64));
    const torch::Tensor top_tokens = ToHost(std::get<1>(top));
    const double* values = top_values.data_ptr<double>();
    const int64_t* tokens = top_tokens.data_ptr<int64_t>();

    std::vector<int64_t> source_rows, next_tokens;
    for (PromptBeams& prompt : state) {
      if (prompt.done) continue;
      std::vector<Candidate> candidates;
      candidates.reserve(prompt.beams.size() * per_row);
      for (size_t b = 0; b < prompt.beams.size(); ++b) {
        const Beam& beam = prompt.beams[b];
        for (int64_t j = 0; j < per_row; ++j) {
          const int64_t k = beam.row * per_row + j;
          // A NaN (from a broken hook) would break the ordering; it ranks last instead.
          const double value = std::isnan(values[k]) ? -kInfinity : values[k];
          candidates.push_back(Candidate{beam.sum + value, b, tokens[k]});
        }
      }
      std::stable_sort(candidates.begin(), candidates.end(),
                       [](const Candidate& a, const Candidate& b) { return a.sum > b.sum; });
      const size_t considered = std::min(candidates.size(), 2 * num_beams);
      std::vector<Beam> next;
      for (size_t rank = 0; rank < considered && next.size() < num_beams; ++rank) {
        const Candidate& c = candidates[rank];
        const Beam& parent = prompt.beams[c.beam];
        if (c.token == eos_id) {
          if (rank < num_beams) {
            AddHypothesis(penalised(c.sum, length), parent.tokens, num_beams, &prompt.finished);
          }
          continue;
        }
        Beam beam{parent.row, c.sum, parent.tokens};
        beam.tokens.push_back(c.token);
        next.push_back(std::move(beam));
      }
      if (length >= options.max_new_tokens) {
        for (Beam& beam : next) {
          AddHypothesis(penalised(beam.sum, length), std::move(beam.tokens), num_beams,
                        &prompt.finished);
        }
        next.clear();
      } else if (!next.empty() && prompt.finished.size() >= num_beams) {
        // Log-probabilities are <= 0: the best live sum can only fall, so its best possible
        // score is at the length that maximises sum / L^lp.
        const int64_t best_length = lp > 0.0 ? options.max_new_tokens : length + 1;
        if (prompt.finished.back().score >= penalised(next.front().sum, best_length)) next.clear();
      }
      prompt.beams = std::move(next);
      if (prompt.beams.empty()) {
        prompt.done = true;
        continue;
      }
      for (Beam& beam : prompt.beams) {
        source_rows.push_back(beam.row);
        next_tokens.push_back(beam.tokens.back());
        beam.row = static_cast<int64_t>(source_rows.size()) - 1;
      }
    }
    if (source_rows.empty()) break;
    cache.ReorderBatch(torch::tensor(source_rows, torch::kInt64));
    const torch::Tensor input = torch::tensor(next_tokens, torch::kInt64).view({-1, 1});
    logits = model.Forward(input, /*attention_mask=*/{}, &cache, hooks);
  }
  for (size_t p = 0; p < indices.size(); ++p) {
    if (!state[p].finished.empty())
      (*out)[indices[p]] = std::move(state[p].finished.front().tokens);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateGenerateOptions(const GenerateOptions& options) {
  if (options.max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: max_new_tokens must be >= 0, got ", options.max_new_tokens));
  }
  if (options.num_beams < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: num_beams must be >= 1, got ", options.num_beams));
  }
  if (options.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: batch_size must be >= 1, got ", options.batch_size));
  }
  if (!std::isfinite(options.length_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: length_penalty must be finite, got ", options.length_penalty));
  }
  return absl::OkStatus();
}

absl::StatusOr<Sequences> Generate(const LlamaModel& model, const Sequences& prompts,
                                   int64_t eos_id, int64_t pad_id, const GenerateOptions& options,
                                   AdapterHooks* hooks) {
  MEFT_RETURN_IF_ERROR(ValidateGenerateOptions(options));
  MEFT_RETURN_IF_ERROR(ValidatePrompts(prompts, model.config().vocab_size, eos_id, pad_id));
  Sequences out(prompts.size());
  if (options.max_new_tokens == 0 || prompts.empty()) return out;

  // Longest first (stable, so equal lengths keep their order): batches of similar lengths waste
  // little on padding, and the first batch shows the peak memory early.
  std::vector<int64_t> order(prompts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&prompts](int64_t a, int64_t b) {
    return prompts[a].size() > prompts[b].size();
  });
  try {
    torch::NoGradGuard no_grad;
    for (size_t begin = 0; begin < order.size(); begin += options.batch_size) {
      const size_t end = std::min(order.size(), begin + static_cast<size_t>(options.batch_size));
      const std::span<const int64_t> indices(order.data() + begin, end - begin);
      if (options.num_beams == 1) {
        MEFT_RETURN_IF_ERROR(GreedyBatch(model, prompts, indices, eos_id, pad_id,
                                         options.max_new_tokens, hooks, &out));
      } else {
        MEFT_RETURN_IF_ERROR(
            BeamSearchBatch(model, prompts, indices, eos_id, pad_id, options, hooks, &out));
      }
    }
  } catch (...) {
    return StatusFromCurrentException("generate");
  }
  return out;
}

}  // namespace meft::worker
