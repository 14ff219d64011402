#pragma once

// Instruction-tuning data (DESIGN §5): JSONL examples, the prompt template, tokenization with
// prompt masking and truncation, right-padded training micro-batches from a deterministic,
// resumable loader, and left-padded prompt batches for generation.
//
// Data file: one JSON object per line,
//   {"instruction": "...", "input": "...", "output": "..."}
// `instruction` and `output` are required strings; `input` is an optional string (null or absent
// means no input). Optional extras used by evaluation: `id` (string or integer) and `answers`
// (array of strings: the gold references when there are several). Other fields are ignored.
// Blank lines are skipped. Errors are INVALID_ARGUMENT naming `file:line` and the field, e.g.
// `train.jsonl:17: field "output" is missing`.
//
// Nothing here throws: LibTorch errors are caught and returned as INTERNAL. Tensors are created
// on the CPU; the caller moves them to the GPU.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

// Label value the loss ignores (PyTorch's cross-entropy ignore_index).
inline constexpr int64_t kIgnoreIndex = -100;

struct Example {
  std::string instruction;
  // Empty when the line has no input (absent, null or "").
  std::string input;
  std::string output;
  // The line's `id` (an integer is written in decimal); otherwise the 0-based position of the
  // example among the file's examples, in decimal.
  std::string id;
  // The line's `answers`; empty when absent.
  std::vector<std::string> answers;
  // 1-based line number in the source file.
  int64_t line = 0;
};

// Reads and parses the JSONL file `path`. NOT_FOUND if it does not exist; INVALID_ARGUMENT naming
// `path:line` and the field for a bad line, or `path` alone when it holds no example.
absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path);

// Parses JSONL `content`; `source` stands for the file name in error messages.
absl::StatusOr<std::vector<Example>> ParseJsonl(std::string_view content,
                                                const std::string& source);

// The gold references of an example for evaluation: `answers` when non-empty, else {output}.
std::vector<std::string> References(const Example& example);

inline constexpr char kAlpacaPromptWithInput[] =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
inline constexpr char kAlpacaPromptWithoutInput[] =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

// The system message SmolLM2-Instruct's chat template inserts when a conversation has none; the
// default of data.system_prompt, so that chatml prompts equal that template's output.
inline constexpr char kSmolLM2SystemPrompt[] =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

// The prompt text before the response. Placeholders are `{instruction}` and `{input}`; `{{` and
// `}}` stand for literal braces, and a lone `}` is literal. Any other `{...}` is an error.
// `with_input` (used when the example has a non-empty input) must contain both placeholders;
// `without_input` must contain `{instruction}` and must not contain `{input}`.
// The template's own text is trusted: special-token strings in it ("<|im_start|>") become
// special tokens, while the substituted instruction and input never do (see Tokenizer::Encode).
struct PromptTemplate {
  std::string with_input = kAlpacaPromptWithInput;
  std::string without_input = kAlpacaPromptWithoutInput;
};

// The presets of data.template:
//   "alpaca"  the Stanford Alpaca prompt above (system_prompt unused);
//   "chatml"  one user turn and the start of the assistant's, as the ChatML chat templates of
//             SmolLM2 and Qwen render it with add_generation_prompt=True:
//               <|im_start|>system\n{system_prompt}<|im_end|>\n      (only if system_prompt != "")
//               <|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n
//             ("\n\n{input}" only when the example has an input). With kSmolLM2SystemPrompt this
//             is exactly SmolLM2-Instruct's apply_chat_template output for the user message
//             instruction + "\n\n" + input; Qwen2.5 inserts its own default system message.
// Braces in system_prompt are literal. INVALID_ARGUMENT for another name.
absl::StatusOr<PromptTemplate> PresetTemplate(
    std::string_view name, std::string_view system_prompt = kSmolLM2SystemPrompt);

// A rendered prompt: the text and the byte ranges of it that came from the template (trusted
// for special tokens), in order and disjoint.
struct FormattedPrompt {
  std::string text;
  std::vector<TextSpan> template_spans;
};

// A validated PromptTemplate. Substitution is one pass: braces inside the substituted
// instruction or input are copied verbatim, never expanded. Immutable; thread-safe.
class PromptFormatter {
 public:
  // INVALID_ARGUMENT naming the template ("with_input"/"without_input") and the offending
  // placeholder, e.g. `prompt template with_input: unknown placeholder "{context}"`.
  static absl::StatusOr<PromptFormatter> Create(const PromptTemplate& prompt_template = {});

  // The prompt of `example` (its output is not part of it).
  std::string Format(const Example& example) const { return FormatWithSpans(example).text; }
  // The same text with the template's spans.
  FormattedPrompt FormatWithSpans(const Example& example) const;

 private:
  struct Segment {
    enum class Kind { kLiteral, kInstruction, kInput };
    Kind kind = Kind::kLiteral;
    std::string text;  // kLiteral only
  };
  static absl::Status Compile(std::string_view text, std::string_view name, bool is_with_input,
                              std::vector<Segment>* segments);
  static void Append(const std::vector<Segment>& segments, const Example& example,
                     FormattedPrompt* out);

  std::vector<Segment> with_input_;
  std::vector<Segment> without_input_;
};

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

// The order in which epoch `epoch` visits examples 0..n-1: identity without shuffling, otherwise a
// Fisher-Yates shuffle driven by SplitMix64 seeded from (seed, epoch), with unbiased bounded draws
// by rejection. Pure integer arithmetic, so identical on every platform and LibTorch version.
std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

struct DataLoaderOptions {
  // Examples per micro-batch; at least 1.
  int64_t micro_batch_size = 4;
  // Shuffle each epoch (a different order per epoch, fixed by `seed`).
  bool shuffle = true;
  uint64_t seed = 0;
  // Drop the last, smaller micro-batch of each epoch.
  bool drop_last = false;
};

// Where a DataLoader stands: Next() returns batch `index` (0-based, in micro-batches) of epoch
// `epoch`. Saved in the training state so that a resumed run continues with the same batches.
struct DataPosition {
  int64_t epoch = 0;
  int64_t index = 0;
  bool operator==(const DataPosition&) const = default;
};

// Endless, deterministic iterator over training micro-batches: epoch e visits the examples in
// EpochOrder(n, seed, e, shuffle), cut into consecutive micro-batches; after the last batch of an
// epoch it continues with batch 0 of the next. The batches depend only on (examples, pad_id,
// options, position), so Seek to a saved position reproduces the same batch sequence.
// Thread-safety: none; one thread drives a loader.
class DataLoader {
 public:
  // INVALID_ARGUMENT for no examples, micro_batch_size < 1, or drop_last with fewer examples
  // than one micro-batch.
  static absl::StatusOr<std::unique_ptr<DataLoader>> Create(std::vector<TokenizedExample> examples,
                                                            int64_t pad_id,
                                                            const DataLoaderOptions& options);

  // The batch at position() (carrying that position), then advances. Fails only if LibTorch does.
  absl::StatusOr<Batch> Next();

  DataPosition position() const { return position_; }

  // Moves to batch `index` of epoch `epoch`. INVALID_ARGUMENT (position unchanged) unless
  // epoch >= 0 and 0 <= index < batches_per_epoch(); index == batches_per_epoch() is accepted
  // and means batch 0 of the next epoch.
  absl::Status Seek(int64_t epoch, int64_t index);

  int64_t batches_per_epoch() const;
  int64_t num_examples() const { return static_cast<int64_t>(examples_.size()); }
  const std::vector<TokenizedExample>& examples() const { return examples_; }

 private:
  DataLoader(std::vector<TokenizedExample> examples, int64_t pad_id,
             const DataLoaderOptions& options);
  void EnsureOrder();

  std::vector<TokenizedExample> examples_;
  int64_t pad_id_;
  DataLoaderOptions options_;
  DataPosition position_;
  // EpochOrder of order_epoch_; recomputed when position_.epoch moves.
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
};

}  // namespace meft::worker
