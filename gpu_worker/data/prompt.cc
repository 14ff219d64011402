#include "gpu_worker/data/prompt.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace meft::worker {

absl::Status PromptFormatter::Compile(std::string_view text, std::string_view name,
                                      bool is_with_input, std::vector<Segment>* segments) {
  const std::string where = absl::StrCat("prompt template ", std::string(name));
  bool has_instruction = false;
  bool has_input = false;
  std::string literal;
  auto flush = [&] {
    if (literal.empty()) return;
    segments->push_back(Segment{Segment::Kind::kLiteral, std::move(literal)});
    literal.clear();
  };
  for (size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (c == '}') {
      literal.push_back('}');
      i += (i + 1 < text.size() && text[i + 1] == '}') ? 2 : 1;
      continue;
    }
    if (c != '{') {
      literal.push_back(c);
      ++i;
      continue;
    }
    if (i + 1 < text.size() && text[i + 1] == '{') {
      literal.push_back('{');
      i += 2;
      continue;
    }
    const size_t close = text.find('}', i + 1);
    if (close == std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unterminated \"{\" at offset ", i, " (write \"{{\" for a brace)"));
    }
    const std::string placeholder(text.substr(i + 1, close - i - 1));
    if (placeholder == "instruction") {
      flush();
      segments->push_back(Segment{Segment::Kind::kInstruction, ""});
      has_instruction = true;
    } else if (placeholder == "input") {
      if (!is_with_input) {
        return absl::InvalidArgumentError(
            absl::StrCat(where,
                         ": placeholder \"{input}\" is not allowed (this template is used for "
                         "examples without input)"));
      }
      flush();
      segments->push_back(Segment{Segment::Kind::kInput, ""});
      has_input = true;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": unknown placeholder \"{", placeholder, "}\" (known: {instruction}, {input})"));
    }
    i = close + 1;
  }
  flush();
  if (!has_instruction) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": placeholder \"{instruction}\" is missing"));
  }
  if (is_with_input && !has_input) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": placeholder \"{input}\" is missing"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PromptFormatter> PromptFormatter::Create(const PromptTemplate& prompt_template) {
  PromptFormatter formatter;
  MEFT_RETURN_IF_ERROR(Compile(prompt_template.with_input, "with_input", /*is_with_input=*/true,
                               &formatter.with_input_));
  MEFT_RETURN_IF_ERROR(Compile(prompt_template.without_input, "without_input",
                               /*is_with_input=*/false, &formatter.without_input_));
  return formatter;
}

void PromptFormatter::Append(const std::vector<Segment>& segments, const Example& example,
                             FormattedPrompt* out) {
  for (const Segment& segment : segments) {
    switch (segment.kind) {
      case Segment::Kind::kLiteral: {
        const size_t begin = out->text.size();
        out->text += segment.text;
        out->template_spans.push_back(TextSpan{begin, out->text.size()});
        break;
      }
      case Segment::Kind::kInstruction:
        out->text += example.instruction;
        break;
      case Segment::Kind::kInput:
        out->text += example.input;
        break;
    }
  }
}

FormattedPrompt PromptFormatter::FormatWithSpans(const Example& example) const {
  FormattedPrompt out;
  Append(example.input.empty() ? without_input_ : with_input_, example, &out);
  return out;
}

namespace {

// `text` with its braces doubled, so that a template shows it literally.
std::string EscapeBraces(std::string_view text) {
  std::string out;
  for (const char c : text) {
    out.push_back(c);
    if (c == '{' || c == '}') out.push_back(c);
  }
  return out;
}

}  // namespace

absl::StatusOr<PromptTemplate> PresetTemplate(std::string_view name,
                                              std::string_view system_prompt) {
  if (name == "alpaca") return PromptTemplate{};
  if (name == "chatml") {
    const std::string system =
        system_prompt.empty()
            ? ""
            : absl::StrCat("<|im_start|>system\n", EscapeBraces(system_prompt), "<|im_end|>\n");
    PromptTemplate t;
    t.with_input = absl::StrCat(system, "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n",
                                "<|im_start|>assistant\n");
    t.without_input =
        absl::StrCat(system, "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n");
    return t;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown prompt template \"", std::string(name), "\" (known: alpaca, chatml)"));
}

}  // namespace meft::worker
