#pragma once

// Prompt templates: the text before the response, rendered from an Example (Alpaca, ChatML).

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/data/jsonl.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {

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

}  // namespace meft::worker
