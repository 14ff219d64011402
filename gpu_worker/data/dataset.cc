#include "gpu_worker/data/dataset.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/random.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace meft::worker {
namespace {

using Json = nlohmann::json;

std::string JsonTypeName(const Json& value) { return value.type_name(); }

std::string LineRef(const std::string& source, int64_t line) {
  return absl::StrCat(source, ":", line);
}

bool IsBlank(std::string_view line) {
  return std::all_of(line.begin(), line.end(), [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
  });
}

// Reads the required or optional string field `name` of `object` into `*out`.
absl::Status GetStringField(const Json& object, const char* name, bool required, bool allow_null,
                            const std::string& where, std::string* out) {
  auto it = object.find(name);
  if (it == object.end() || (allow_null && it->is_null())) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat(where, ": field \"", name, "\" is missing"));
    return absl::OkStatus();
  }
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": field \"", name, "\" must be a string, got ", JsonTypeName(*it)));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status ParseLine(std::string_view text, const std::string& where, Example* example) {
  Json object;
  try {
    object = Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not valid JSON: ", e.what()));
  }
  if (!object.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected a JSON object, got ", JsonTypeName(object)));
  }
  MEFT_RETURN_IF_ERROR(GetStringField(object, "instruction", /*required=*/true,
                                      /*allow_null=*/false, where, &example->instruction));
  MEFT_RETURN_IF_ERROR(GetStringField(object, "input", /*required=*/false, /*allow_null=*/true,
                                      where, &example->input));
  MEFT_RETURN_IF_ERROR(GetStringField(object, "output", /*required=*/true, /*allow_null=*/false,
                                      where, &example->output));
  if (auto it = object.find("id"); it != object.end()) {
    if (it->is_string()) {
      example->id = it->get<std::string>();
    } else if (it->is_number_integer()) {
      example->id = it->dump();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": field \"id\" must be a string or an integer, got ", JsonTypeName(*it)));
    }
  }
  if (auto it = object.find("answers"); it != object.end()) {
    if (!it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": field \"answers\" must be an array of strings, got ", JsonTypeName(*it)));
    }
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& answer = (*it)[i];
      if (!answer.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": field \"answers\"[", i, "] must be a string, got ", JsonTypeName(answer)));
      }
      example->answers.push_back(answer.get<std::string>());
    }
  }
  return absl::OkStatus();
}

absl::Status TorchError(const char* what, const std::exception& e) {
  return absl::InternalError(absl::StrCat(what, ": LibTorch error: ", e.what()));
}

}  // namespace

absl::StatusOr<std::vector<Example>> ParseJsonl(std::string_view content,
                                                const std::string& source) {
  std::vector<Example> examples;
  int64_t line_number = 0;
  size_t begin = 0;
  while (begin < content.size()) {
    size_t end = content.find('\n', begin);
    if (end == std::string_view::npos) end = content.size();
    std::string_view line = content.substr(begin, end - begin);
    begin = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (IsBlank(line)) continue;
    Example example;
    example.line = line_number;
    MEFT_RETURN_IF_ERROR(ParseLine(line, LineRef(source, line_number), &example));
    if (example.id.empty()) example.id = absl::StrCat(examples.size());
    examples.push_back(std::move(example));
  }
  if (examples.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no examples"));
  }
  return examples;
}

absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(const std::string content, io::ReadFile(path));
  return ParseJsonl(content, path);
}

std::vector<std::string> References(const Example& example) {
  if (!example.answers.empty()) return example.answers;
  return {example.output};
}

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

namespace {}  // namespace

std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  if (!shuffle || order.size() < 2) return order;
  // Derive the epoch's stream from (seed, epoch) through one SplitMix64 step of each, so that
  // neighbouring seeds or epochs give unrelated streams.
  SplitMix64 seeder(seed);
  const uint64_t mixed =
      seeder.Next() ^ SplitMix64(static_cast<uint64_t>(epoch) + 0x632BE59BD9B4E019ULL).Next();
  SplitMix64 rng(mixed);
  for (size_t i = order.size() - 1; i > 0; --i) {
    const size_t j = static_cast<size_t>(rng.Below(static_cast<uint64_t>(i) + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

DataLoader::DataLoader(std::vector<TokenizedExample> examples, int64_t pad_id,
                       const DataLoaderOptions& options)
    : examples_(std::move(examples)), pad_id_(pad_id), options_(options) {}

absl::StatusOr<std::unique_ptr<DataLoader>> DataLoader::Create(
    std::vector<TokenizedExample> examples, int64_t pad_id, const DataLoaderOptions& options) {
  if (examples.empty()) return absl::InvalidArgumentError("DataLoader: no examples");
  if (options.micro_batch_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DataLoader: micro_batch_size must be at least 1, got ", options.micro_batch_size));
  }
  if (options.drop_last && static_cast<int64_t>(examples.size()) < options.micro_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat("DataLoader: drop_last with ", examples.size(),
                                                   " examples and micro_batch_size ",
                                                   options.micro_batch_size, " leaves no batch"));
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    if (examples[i].input_ids.empty() ||
        examples[i].input_ids.size() != examples[i].labels.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DataLoader: example ", i, " is empty or its labels differ in length from its ids"));
    }
  }
  return std::unique_ptr<DataLoader>(new DataLoader(std::move(examples), pad_id, options));
}

int64_t DataLoader::batches_per_epoch() const {
  const int64_t n = num_examples();
  const int64_t b = options_.micro_batch_size;
  return options_.drop_last ? n / b : (n + b - 1) / b;
}

void DataLoader::EnsureOrder() {
  if (order_epoch_ == position_.epoch) return;
  order_ = EpochOrder(num_examples(), options_.seed, position_.epoch, options_.shuffle);
  order_epoch_ = position_.epoch;
}

absl::StatusOr<Batch> DataLoader::Next() {
  EnsureOrder();
  const int64_t begin = position_.index * options_.micro_batch_size;
  const int64_t end = std::min<int64_t>(begin + options_.micro_batch_size, num_examples());
  std::span<const int64_t> indices(order_.data() + begin, static_cast<size_t>(end - begin));
  MEFT_ASSIGN_OR_RETURN(Batch batch, CollateRightPadded(examples_, indices, pad_id_));
  batch.epoch = position_.epoch;
  batch.index = position_.index;
  if (++position_.index >= batches_per_epoch()) {
    position_.index = 0;
    ++position_.epoch;
  }
  return batch;
}

absl::Status DataLoader::Seek(int64_t epoch, int64_t index) {
  if (epoch < 0 || index < 0 || index > batches_per_epoch()) {
    return absl::InvalidArgumentError(absl::StrCat("DataLoader::Seek: position (epoch ", epoch,
                                                   ", batch ", index, ") is invalid; an epoch has ",
                                                   batches_per_epoch(), " batches"));
  }
  position_ =
      index == batches_per_epoch() ? DataPosition{epoch + 1, 0} : DataPosition{epoch, index};
  return absl::OkStatus();
}

}  // namespace meft::worker
