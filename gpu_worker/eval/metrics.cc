#include "gpu_worker/eval/metrics.h"

#include <algorithm>
#include <exception>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"

namespace meft::worker {
namespace {

using OrderedJson = nlohmann::ordered_json;

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsAsciiAlnum(char c) { return IsDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

std::string_view Trim(std::string_view text) {
  while (!text.empty() && IsSpace(text.front())) text.remove_prefix(1);
  while (!text.empty() && IsSpace(text.back())) text.remove_suffix(1);
  return text;
}

// Shared body of the two substring metrics; `lower` selects the SQuAD variant.
double SubstringMatch(std::string_view prediction, std::span<const std::string> golds, bool lower) {
  std::string pred = NormalizeWhitespace(prediction);
  if (lower) pred = AsciiLower(pred);
  for (const std::string& gold : golds) {
    std::string g = NormalizeWhitespace(gold);
    if (lower) g = AsciiLower(g);
    if (!g.empty() && pred.find(g) != std::string::npos) return 1.0;
  }
  return 0.0;
}

std::string CanonicalNumber(bool negative, std::string integer, std::string fraction) {
  const size_t first_nonzero = integer.find_first_not_of('0');
  integer = first_nonzero == std::string::npos ? "0" : integer.substr(first_nonzero);
  while (!fraction.empty() && fraction.back() == '0') fraction.pop_back();
  const bool zero = integer == "0" && fraction.empty();
  std::string out = (negative && !zero) ? "-" : "";
  out += integer;
  if (!fraction.empty()) absl::StrAppend(&out, ".", fraction);
  return out;
}

OrderedJson ToJson(const PredictionRecord& record) {
  OrderedJson line = OrderedJson::object();
  line["id"] = record.id;
  line["prompt"] = record.prompt;
  line["prediction"] = record.prediction;
  line["references"] = record.references;
  OrderedJson scores = OrderedJson::object();
  for (const auto& [name, score] : record.scores) scores[name] = score;
  line["scores"] = std::move(scores);
  return line;
}

std::string Dump(const OrderedJson& value, int indent) {
  return value.dump(indent, ' ', /*ensure_ascii=*/false, OrderedJson::error_handler_t::replace);
}

}  // namespace

std::string NormalizeWhitespace(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (const char c : text) {
    if (IsSpace(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(' ');
    pending_space = false;
    out.push_back(c);
  }
  return out;
}

std::string AsciiLower(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

double NqSubstringMatch(std::string_view prediction, std::span<const std::string> golds) {
  return SubstringMatch(prediction, golds, /*lower=*/false);
}

double SquadLowercaseSubstringMatch(std::string_view prediction,
                                    std::span<const std::string> golds) {
  return SubstringMatch(prediction, golds, /*lower=*/true);
}

std::optional<std::string> ExtractLastNumber(std::string_view text) {
  std::optional<std::string> last;
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    if (!IsDigit(text[i])) {
      ++i;
      continue;
    }
    const bool negative = i >= 1 && text[i - 1] == '-' && (i < 2 || !IsAsciiAlnum(text[i - 2]));
    size_t j = i;
    while (j < n && IsDigit(text[j])) ++j;
    std::string integer(text.substr(i, j - i));
    // Thousands groups: ",ddd" not followed by another digit.
    while (j + 3 < n && text[j] == ',' && IsDigit(text[j + 1]) && IsDigit(text[j + 2]) &&
           IsDigit(text[j + 3]) && (j + 4 == n || !IsDigit(text[j + 4]))) {
      integer.append(text.substr(j + 1, 3));
      j += 4;
    }
    std::string fraction;
    if (j + 1 < n && text[j] == '.' && IsDigit(text[j + 1])) {
      size_t k = j + 1;
      while (k < n && IsDigit(text[k])) ++k;
      fraction = std::string(text.substr(j + 1, k - j - 1));
      j = k;
    }
    last = CanonicalNumber(negative, std::move(integer), std::move(fraction));
    i = j;
  }
  return last;
}

std::optional<std::string> Gsm8kGoldNumber(std::string_view gold) {
  const size_t marker = gold.rfind("####");
  if (marker != std::string_view::npos) return ExtractLastNumber(gold.substr(marker + 4));
  return ExtractLastNumber(gold);
}

double Gsm8kFinalNumberMatch(std::string_view prediction, std::span<const std::string> golds) {
  const std::optional<std::string> predicted = ExtractLastNumber(prediction);
  if (!predicted.has_value()) return 0.0;
  for (const std::string& gold : golds) {
    const std::optional<std::string> expected = Gsm8kGoldNumber(gold);
    if (expected.has_value() && *expected == *predicted) return 1.0;
  }
  return 0.0;
}

std::set<std::string> ParseApiSet(std::string_view text) {
  std::set<std::string> names;
  const std::string_view trimmed = Trim(text);
  if (!trimmed.empty() && trimmed.front() == '[') {
    const nlohmann::json parsed =
        nlohmann::json::parse(trimmed.begin(), trimmed.end(), nullptr, /*allow_exceptions=*/false);
    if (parsed.is_array() &&
        std::all_of(parsed.begin(), parsed.end(), [](const auto& v) { return v.is_string(); })) {
      for (const auto& value : parsed) {
        const std::string_view name = Trim(value.template get_ref<const std::string&>());
        if (!name.empty()) names.emplace(name);
      }
      return names;
    }
  }
  size_t begin = 0;
  while (begin <= trimmed.size()) {
    size_t end = trimmed.find(',', begin);
    if (end == std::string_view::npos) end = trimmed.size();
    std::string_view item = trimmed.substr(begin, end - begin);
    auto strip = [](char c) { return IsSpace(c) || c == '[' || c == ']' || c == '"' || c == '\''; };
    while (!item.empty() && strip(item.front())) item.remove_prefix(1);
    while (!item.empty() && strip(item.back())) item.remove_suffix(1);
    if (!item.empty()) names.emplace(item);
    begin = end + 1;
  }
  return names;
}

double ApiSetIoU(const std::set<std::string>& prediction, const std::set<std::string>& gold) {
  if (prediction.empty() && gold.empty()) return 1.0;
  size_t intersection = 0;
  for (const std::string& name : prediction) intersection += gold.count(name);
  const size_t union_size = prediction.size() + gold.size() - intersection;
  return static_cast<double>(intersection) / static_cast<double>(union_size);
}

double ToolBenchApiIoU(std::string_view prediction, std::span<const std::string> golds) {
  const std::set<std::string> predicted = ParseApiSet(prediction);
  double best = 0.0;
  for (const std::string& gold : golds)
    best = std::max(best, ApiSetIoU(predicted, ParseApiSet(gold)));
  return best;
}

std::string_view MetricName(Metric metric) {
  switch (metric) {
    case Metric::kNqSubstring:
      return "nq_substring_em";
    case Metric::kSquadLowercaseSubstring:
      return "squad_lower_substring";
    case Metric::kGsm8kFinalNumber:
      return "gsm8k_final_number";
    case Metric::kToolBenchApiIoU:
      return "toolbench_api_iou";
  }
  return "unknown";
}

absl::StatusOr<Metric> ParseMetric(std::string_view name) {
  for (const Metric metric : {Metric::kNqSubstring, Metric::kSquadLowercaseSubstring,
                              Metric::kGsm8kFinalNumber, Metric::kToolBenchApiIoU}) {
    if (MetricName(metric) == name) return metric;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown metric \"", std::string(name),
      "\"; known: nq_substring_em, squad_lower_substring, gsm8k_final_number, toolbench_api_iou"));
}

double Score(Metric metric, std::string_view prediction, std::span<const std::string> references) {
  switch (metric) {
    case Metric::kNqSubstring:
      return NqSubstringMatch(prediction, references);
    case Metric::kSquadLowercaseSubstring:
      return SquadLowercaseSubstringMatch(prediction, references);
    case Metric::kGsm8kFinalNumber:
      return Gsm8kFinalNumberMatch(prediction, references);
    case Metric::kToolBenchApiIoU:
      return ToolBenchApiIoU(prediction, references);
  }
  return 0.0;
}

void ScoreRecord(std::span<const Metric> metrics, PredictionRecord* record) {
  for (const Metric metric : metrics) {
    record->scores[std::string(MetricName(metric))] =
        Score(metric, record->prediction, record->references);
  }
}

MetricsSummary Summarize(std::span<const PredictionRecord> records) {
  MetricsSummary summary;
  summary.num_examples = static_cast<int64_t>(records.size());
  std::map<std::string, double> sums;
  for (const PredictionRecord& record : records) {
    for (const auto& [name, score] : record.scores) {
      sums[name] += score;
      ++summary.counts[name];
    }
  }
  for (const auto& [name, sum] : sums) {
    summary.means[name] = sum / static_cast<double>(summary.counts[name]);
  }
  return summary;
}

absl::Status WritePredictionsJsonl(const std::string& path,
                                   std::span<const PredictionRecord> records) {
  std::string content;
  try {
    for (const PredictionRecord& record : records) {
      content += Dump(ToJson(record), -1);
      content.push_back('\n');
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": cannot serialise predictions: ", e.what()));
  }
  return io::WriteFileDurably(path, {std::string_view(content)});
}

absl::Status WriteMetricsJson(const std::string& path, const MetricsSummary& summary,
                              const std::map<std::string, std::string>& extra) {
  std::string content;
  try {
    OrderedJson root = OrderedJson::object();
    for (const auto& [key, value] : extra) {
      if (key == "num_examples" || key == "metrics" || key == "counts") {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": extra key \"", key, "\" collides with a reserved key"));
      }
      root[key] = value;
    }
    root["num_examples"] = summary.num_examples;
    OrderedJson means = OrderedJson::object();
    for (const auto& [name, mean] : summary.means) means[name] = mean;
    root["metrics"] = std::move(means);
    OrderedJson counts = OrderedJson::object();
    for (const auto& [name, count] : summary.counts) counts[name] = count;
    root["counts"] = std::move(counts);
    content = Dump(root, 2);
    content.push_back('\n');
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": cannot serialise metrics: ", e.what()));
  }
  return io::WriteFileDurably(path, {std::string_view(content)});
}

}  // namespace meft::worker
